"""The stages one agent is made of, built from the configuration in the order recovery needs.

``build_stages(cfg, on_event)`` opens the state database once per owner (each stage that writes
keeps its own connection, so no connection is shared between threads), creates the storage
folders and returns them as one record. Nothing is started here: threads, the inference worker
and the listener start in ``Service.start()``. A test builds ``Stages`` itself (or with this
function on a temporary folder) and hands them to ``Service``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from agent.assembly import JobStore, SeriesAssembler
from agent.core import db, util
from agent.core.config import Config
from agent.core.limits import DecodeLimits
from agent.core.log import log_event
from agent.core.types import Event
from agent.drift import DriftMonitor
from agent.export.queue import ExportQueue
from agent.inference.runner import InferenceRunner
from agent.ingest.spool import QuarantineLimits, Spool
from agent.mqtt.outbox import Outbox
from agent.updates.store import ModelStore
from agent.variants import VariantManager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobStages:
    """The job thread's own view of the jobs and the outbox, on one connection, so a result's
    outbox row and its job's state change commit in one transaction."""

    conn: sqlite3.Connection
    jobs: JobStore
    outbox: Outbox
    exports: ExportQueue | None = None  # [[export]]: rows written with the result's outbox row


@dataclass(frozen=True)
class Stages:
    """Everything the service wires together. ``jobs``/``outbox`` are the assembly thread's;
    ``job`` is the job thread's; ``telemetry_jobs`` the telemetry thread's (queue depth); ``exports``
    the export thread's."""

    spool: Spool
    assembler: SeriesAssembler
    jobs: JobStore
    outbox: Outbox
    job: JobStages
    runner: InferenceRunner
    store: ModelStore
    variants: VariantManager
    telemetry_jobs: JobStore
    drift: DriftMonitor | None  # None: drift.enabled is false
    exports: ExportQueue | None = None  # the export thread's (None: no [[export]] destination)
    telemetry_exports: ExportQueue | None = None  # the telemetry thread's (queue depth per destination)


def build_stages(cfg: Config, on_event: Callable[[Event], None], *, fault_injection: bool = False) -> Stages:
    # 0700 folders, 0600 files (patient data); older versions' wider modes are tightened, logged
    tightened = [d.name for d in (cfg.storage.dir, cfg.spool_dir, cfg.quarantine_dir) if util.private_dir(d)]
    tightened += [d.name for d in (cfg.spool_dir / ".pool", cfg.spool_dir / ".tmp", cfg.storage.dir / "models")
                  if util.tighten(d, util.PRIVATE_DIR)]
    tightened += db.tighten_files(cfg.db_path)
    if tightened:
        log_event(logger, "storage.permissions_tightened", logging.WARNING, paths=",".join(tightened))
    busy_s = cfg.supervision.db_busy_timeout_s

    def connect() -> sqlite3.Connection:
        return db.connect(cfg.db_path, busy_timeout_s=busy_s)

    q, lim = cfg.quarantine, cfg.dicom.limits
    spool = Spool(cfg.spool_dir, cfg.quarantine_dir, connect(), cfg.storage.min_free_mb,
                  decode_limits=DecodeLimits.from_mb(lim.max_decompressed_mb, lim.max_decompression_ratio),
                  quarantine_limits=QuarantineLimits(q.max_files, q.max_mb * 1024 * 1024, q.max_age_days * 86400.0))
    # the current registry version of each installed model (its manifest's spec), else the FP32
    # ONNX in models.dir; agent/variants decides which variant runs (docs/engines.md)
    store = ModelStore(cfg.storage.dir)
    variants = VariantManager(cfg, store, cfg.db_path, on_event)
    asm_conn = connect()
    # per-instance series bookkeeping need not reach the platter before the C-STORE answer: the
    # spool's files are the truth, and start-up re-derives series from them (reconcile)
    asm_conn.execute("PRAGMA synchronous=NORMAL")
    assembler = SeriesAssembler(asm_conn, list(variants.specs().values()), cfg.pipeline.stable_age_s,
                                max_instances=cfg.series_limits.max_instances)
    job_conn = connect()
    runner = InferenceRunner(cfg.models.dir, threads=cfg.pipeline.threads,
                             job_timeout_s=cfg.pipeline.job_timeout_s,
                             memory_limit_mb=cfg.pipeline.worker_memory_mb,
                             fault_injection=fault_injection)
    return Stages(
        spool=spool,
        assembler=assembler,
        jobs=JobStore(asm_conn),
        # telemetry and drift get a bounded share of the outbox; results and events never drop
        outbox=Outbox(connect(),
                      caps={"telemetry": cfg.telemetry.max_queued, "drift": cfg.drift.max_queued}),
        job=JobStages(job_conn, JobStore(job_conn), Outbox(job_conn), ExportQueue(job_conn) if cfg.export else None),
        runner=runner,
        store=store,
        variants=variants,
        telemetry_jobs=JobStore(connect()),
        drift=DriftMonitor(connect(), cfg.drift, familywise=cfg.drift.thresholds == "model")
        if cfg.drift.enabled else None,
        exports=ExportQueue(connect()) if cfg.export else None,
        telemetry_exports=ExportQueue(connect()) if cfg.export else None,
    )
