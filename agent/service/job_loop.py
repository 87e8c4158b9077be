"""The job thread: one job at a time through the active variant, its result into the outbox.

Claims the next job (fewest attempts first: agent/assembly/jobs.py), loads the series from the
spool, runs it through the variant manager (active variant, FP32 fallback, shadow validation,
rollback: agent/variants) in the inference worker within the job's time budget (``[jobs]``: a base
plus its size, capped by ``pipeline.job_timeout_s``), and commits the result's outbox row together
with the job's ``inferred`` state. A failed attempt is retried up to ``pipeline.max_attempts``, behind
newer work (``jobs.retry_backoff_s``), and then published as ``job.failed``. A series over a
``series_limits`` limit, or whose job hit the worker's memory limit, is refused at once
(``series.refused``), never retried. While no job is waiting it decodes the newest prefetch offer.
Patient identifiers are read from the DICOM file only when ``privacy.include_patient_identifiers``
allows it.

Database faults are not job failures. The service runs ``step`` supervised (supervisor.py): when a
claim, a state change or the result's write fails (locked past the busy timeout, disk full, I/O
error), the step raises and is retried with backoff, and what the loop holds survives: a claimed
job is run again (its attempt not counted twice), a computed result or a failure record is kept
in memory and written by the next step, before anything else (the job stays ``running`` meanwhile;
a restart returns it to ``pending``). No job is claimed while ``claiming`` is clear (models still
activating after start, or the service stopping); ``on_busy`` tells the watchdog how long a job may run.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pydicom

from agent.assembly.jobs import FAILED, INFERRED, Job
from agent.core import db
from agent.core.config import Config
from agent.core.errors import EdgeAgentError, StorageError
from agent.core.events import JobFailed, SeriesRefused
from agent.core.log import log_event
from agent.core.metrics import NO_METRICS, Metrics, Stage
from agent.core.topics import Topics
from agent.core.types import ModelRef, Result, Series
from agent.core.util import iso_utc
from agent.export.plan import ExportPlan
from agent.inference.runner import InferenceJob, InferenceRunner, JobOutcome, SeriesLimits
from agent.ingest.spool import Spool
from agent.mqtt import payloads
from agent.service.assembly_loop import PrefetchOffers
from agent.service.drift_feed import DriftFeed
from agent.service.event_sink import EventSink
from agent.service.export_hook import export_request, label_map_path
from agent.service.stages import JobStages
from agent.variants import VariantManager

log = logging.getLogger(__name__)

#: stages the inference pipeline times itself (Prediction.timings_ms, milliseconds)
_TIMED_STAGES: tuple[Stage, ...] = ("load", "preprocess", "inference", "postprocess")


class JobLoop:
    def __init__(self, cfg: Config, topics: Topics, stages: JobStages, spool: Spool, runner: InferenceRunner,
                 variants: VariantManager, events: EventSink, prefetch: PrefetchOffers,
                 jobs_ready: threading.Event, metrics: Metrics = NO_METRICS,
                 drift: DriftFeed | None = None) -> None:
        self.metrics = metrics
        self.drift = drift
        self.cfg = cfg
        self.topics = topics
        self.db = stages
        self.spool = spool
        self.runner = runner
        self.variants = variants
        self.events = events
        self.prefetch = prefetch
        self.jobs_ready = jobs_ready
        self.on_result: Callable[[], None] = lambda: None  # the publisher's wake-up, set by the service
        # the service's: set while jobs may be claimed (cleared while models activate and when stopping)
        self.claiming = threading.Event()
        self.claiming.set()
        self.parked = threading.Event()  # set while it waits for ``claiming`` holding nothing
        self.on_busy: Callable[[float], None] = lambda _s: None  # a heartbeat: "inside a job, up to s seconds"
        lim = cfg.series_limits
        dec = cfg.dicom.limits
        self.limits = SeriesLimits(lim.max_instances, lim.max_rows, lim.max_columns, lim.max_frames,
                                   dec.max_decompressed_mb, dec.max_decompression_ratio)
        # ---- export (issue 15; agent/service/export_hook.py): rows in the result's transaction
        self.export_plan = ExportPlan(cfg.export)
        self.on_export: Callable[[], None] = lambda: None  # the export loop's wake-up, set by the service
        self._job: Job | None = None  # claimed, not finished
        self._unwritten: Callable[[], None] | None = None  # a job's outcome the database has not taken yet

    def step(self) -> float:
        """One round (the supervisor's step): finish an unwritten result or failure record first,
        else run the claimed or next job, else prefetch or wait a moment for work."""
        if self._unwritten is not None:
            self._unwritten()  # raises while the database still refuses it
            self._unwritten = None
            return 0.0
        if self._job is None and not self.claiming.is_set():  # waiting (not failing): nothing claimed
            self.parked.set()
            self.claiming.wait(1.0)
            return 0.0
        self.parked.clear()
        job = self._job or self.db.jobs.claim_next()
        if job is None:
            if not self._prefetch_next():
                self.jobs_ready.wait(1.0)
                self.jobs_ready.clear()
            return 0.0
        self._job = job  # held until it ends: a database fault below re-runs it, not a new claim
        try:
            self.run_job(job)
        except (sqlite3.Error, StorageError):
            if self.holds_unwritten():  # the job's outcome is known; only its write is pending
                self._job = None
            raise
        except EdgeAgentError as exc:
            error = f"{exc}"
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not stop the others
            log.exception("job.crashed")
            error = f"internal error: {type(exc).__name__}: {exc}"
        else:
            self._job = None
            return 0.0
        self._job = None
        self._record(lambda: self._failed(job, error, "error"))
        return 0.0

    def holds_unwritten(self) -> bool:
        """A job's outcome (result or failure) is waiting for the database to take it."""
        return self._unwritten is not None

    def _record(self, write: Callable[[], None]) -> None:
        """Run ``write`` (a job's outcome into the database); when it fails, keep it for the next
        step and re-raise (the supervisor retries with backoff)."""
        self._unwritten = write
        write()
        self._unwritten = None

    def budget_s(self, series: Series) -> float:
        """The job's time budget: ``jobs.budget_base_s`` plus the larger of its per-instance and
        per-MB shares, at most ``pipeline.job_timeout_s``."""
        j = self.cfg.jobs
        mb = sum(inst.size for inst in series.instances) / 1e6
        extra = max(j.budget_s_per_instance * len(series.instances), j.budget_s_per_mb * mb)
        return min(self.cfg.pipeline.job_timeout_s, j.budget_base_s + extra)

    def _prefetch_next(self) -> bool:
        """Decode the most recently offered quiet series in the worker; False when none is waiting."""
        latest = self.prefetch.latest()
        if latest is None:
            return False
        instances = self.spool.instances_for_series(latest)
        if instances:
            self.on_busy(self.cfg.pipeline.job_timeout_s)
            self.runner.prefetch([inst.path for inst in instances])
        return True

    def run_job(self, job: Job) -> None:
        instances = tuple(self.spool.instances_for_series(job.series_uid))
        if not instances:
            self.db.jobs.mark(job.job_id, FAILED, error="series no longer in the spool")
            return
        first = instances[0]
        series = Series(first.study_uid, first.series_uid, first.modality, instances, job.revision,
                        first.series_description, first.body_part)
        t0 = time.monotonic()
        budget = self.budget_s(series)

        lm_path = label_map_path(self.cfg, job.job_id) if self.export_plan.wants_label_map(job.model_name) else None

        def submit(ij: InferenceJob) -> JobOutcome:
            self.on_busy(budget + self.runner.kill_grace_s * 2 + 5.0)  # the runner ends it by then
            return self.runner.submit(replace(ij, limits=self.limits, label_map_path=lm_path), timeout_s=budget)

        # the prediction's model field names what actually produced it (fallback included)
        outcome = self.variants.run_job(job.job_id, series, job.model_name, submit)
        if outcome.kind == "cancelled":  # we are shutting down: not the job's fault
            self.db.jobs.release(job.job_id)
            return
        if outcome.kind in ("refused", "oom"):
            self._record(lambda: self._refused(job, outcome))
            return
        if not outcome.ok or outcome.prediction is None:
            self._record(lambda: self._failed(job, outcome.error, outcome.kind))
            return
        pred = outcome.prediction
        timings = dict(pred.timings_ms)
        timings["queue_to_result"] = round((time.monotonic() - t0) * 1000, 1)
        ref: ModelRef = pred.model
        rid = payloads.result_id(series.series_uid, ref.name, ref.version)
        result = Result(rid, job.revision, self.cfg.device_id, series.study_uid, series.series_uid,
                        type(pred)(pred.model, pred.task, pred.outputs, timings), iso_utc())
        allowed = self.cfg.privacy.include_patient_identifiers
        payload = payloads.result_payload(result, patient=_patient(first.path) if allowed else None,
                                          include_patient_identifiers=allowed)
        key = f"{rid}:{job.revision}"
        targets = self.export_plan.targets(ref.name, pred.task)
        export = (export_request(self.cfg, self.variants, result, instances, lm_path) if targets and self.db.exports
                  else None)

        def commit() -> None:
            # the outbox row and the job state change commit together: a crash leaves either both
            # (message will be sent) or neither (job re-runs), never a lost or doubled result
            try:
                with db.transaction(self.db.conn):
                    self.db.outbox.put(self.topics.results, payload, qos=1, kind="result", dedup_key=key,
                                       in_transaction=True)
                    self.db.jobs.mark(job.job_id, INFERRED, result_key=key, conn=self.db.conn)
                    if export is not None and self.db.exports is not None:  # same transaction: both or neither
                        self.db.exports.enqueue(export, targets, in_transaction=True)
            except (sqlite3.Error, StorageError) as exc:
                # not the model's failure: the prediction is kept and written by the next step
                log_event(log, "job.result_unwritten", logging.ERROR, job_id=job.job_id, error=str(exc))
                raise
            try:  # after the commit: nothing here may send the result's write round again
                if export is not None:
                    self.on_export()
                self._inferred(job, ref, timings, pred.timings_ms)
                if self.drift is not None and outcome.summary is not None:
                    self.drift.series(ref.name, ref.version, outcome.summary)
            except Exception:  # noqa: BLE001 - logged; the result is safe in the outbox
                log.exception("job.after_result_failed")

        self._record(commit)

    def _inferred(self, job: Job, ref: ModelRef, timings: dict[str, float], measured: Mapping[str, float]) -> None:
        self.metrics.count("jobs_inferred")
        for stage in _TIMED_STAGES:
            if stage in measured:
                self.metrics.observe(stage, measured[stage] / 1000.0)
        log_event(log, "job.inferred", job_id=job.job_id, model=ref.name, variant=ref.variant,
                  revision=job.revision, ms=timings.get("queue_to_result"))
        self.on_result()

    def _refused(self, job: Job, outcome: JobOutcome) -> None:
        """Too large for this device: failed at once, announced, never retried or blamed on a model."""
        limit = outcome.limit or "pipeline.worker_memory_mb"
        self.db.jobs.mark(job.job_id, FAILED, error=f"refused: {outcome.error}")
        log_event(log, "job.refused", logging.WARNING, job_id=job.job_id, kind=outcome.kind, limit=limit,
                  error=outcome.error)
        self.events.put(SeriesRefused(series_uid=job.series_uid, model=job.model_name, limit=limit,
                                      reason=outcome.error).to_event())

    def _failed(self, job: Job, error: str, kind: str) -> None:
        state = self.db.jobs.retry_or_fail(job.job_id, error, self.cfg.pipeline.max_attempts,
                                           backoff_s=self.cfg.jobs.retry_backoff_s)
        log_event(log, "job.attempt_failed", logging.WARNING, job_id=job.job_id, kind=kind, error=error,
                  next_state=state)
        if state == FAILED:
            self.events.put(JobFailed(series_uid=job.series_uid, model=job.model_name, kind=kind,
                                      attempts=self.cfg.pipeline.max_attempts, error=error).to_event())
        else:
            self.jobs_ready.set()


def _patient(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["PatientName", "PatientID", "PatientBirthDate"])
    return {"name": str(ds.get("PatientName", "")), "id": str(ds.get("PatientID", "")),
            "birth_date": str(ds.get("PatientBirthDate", ""))}
