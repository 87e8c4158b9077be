"""The job thread: one job at a time through the active variant, its result into the outbox.

Claims the oldest pending job, loads the series from the spool, runs it through the variant
manager (active variant, FP32 fallback, shadow validation, rollback: agent/variants) in the
inference worker, and commits the result's outbox row together with the job's ``inferred`` state.
A failed attempt is retried up to ``pipeline.max_attempts`` and then published as ``job.failed``.
While no job is waiting it decodes the newest prefetch offer. Patient identifiers are read from the
DICOM file only when ``privacy.include_patient_identifiers`` allows it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from agent.assembly.jobs import FAILED, INFERRED, Job
from agent.core import db
from agent.core.config import Config
from agent.core.errors import EdgeAgentError
from agent.core.events import JobFailed
from agent.core.log import log_event
from agent.core.metrics import NO_METRICS, Metrics, Stage
from agent.core.topics import Topics
from agent.core.types import ModelRef, Result, Series
from agent.core.util import iso_utc
from agent.inference.runner import InferenceRunner
from agent.ingest.spool import Spool
from agent.mqtt import payloads
from agent.service.assembly_loop import PrefetchOffers
from agent.service.drift_feed import DriftFeed
from agent.service.event_sink import EventSink
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

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            job = self.db.jobs.claim_next()
            if job is None:
                if self._prefetch_next():
                    continue
                self.jobs_ready.wait(1.0)
                self.jobs_ready.clear()
                continue
            try:
                self.run_job(job)
            except EdgeAgentError as exc:
                self._failed(job, f"{exc}", "error")
            except Exception as exc:  # noqa: BLE001 - a bug in one job must not stop the others
                log.exception("job.crashed")
                self._failed(job, f"internal error: {type(exc).__name__}: {exc}", "error")

    def _prefetch_next(self) -> bool:
        """Decode the most recently offered quiet series in the worker; False when none is waiting."""
        latest = self.prefetch.latest()
        if latest is None:
            return False
        instances = self.spool.instances_for_series(latest)
        if instances:
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
        # the prediction's model field names what actually produced it (fallback included)
        outcome = self.variants.run_job(job.job_id, series, job.model_name, self.runner.submit)
        if outcome.kind == "cancelled":  # we are shutting down: not the job's fault
            self.db.jobs.release(job.job_id)
            return
        if not outcome.ok or outcome.prediction is None:
            self._failed(job, outcome.error, outcome.kind)
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
        # the outbox row and the job state change commit together: a crash leaves either both
        # (message will be sent) or neither (job re-runs), never a lost or doubled result
        with db.transaction(self.db.conn):
            self.db.outbox.put(self.topics.results, payload, qos=1, kind="result", dedup_key=key,
                               in_transaction=True)
            self.db.jobs.mark(job.job_id, INFERRED, result_key=key, conn=self.db.conn)
        self.metrics.count("jobs_inferred")
        for stage in _TIMED_STAGES:
            if stage in pred.timings_ms:
                self.metrics.observe(stage, pred.timings_ms[stage] / 1000.0)
        log_event(log, "job.inferred", job_id=job.job_id, model=ref.name, variant=ref.variant,
                  revision=job.revision, ms=timings.get("queue_to_result"))
        self.on_result()
        if self.drift is not None and outcome.summary is not None:
            self.drift.series(ref.name, ref.version, outcome.summary)

    def _failed(self, job: Job, error: str, kind: str) -> None:
        state = self.db.jobs.retry_or_fail(job.job_id, error, self.cfg.pipeline.max_attempts)
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
