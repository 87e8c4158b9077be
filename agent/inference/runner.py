"""Inference in a worker process, so a crashing or runaway model never takes the DICOM listener down.

``InferenceRunner`` owns one worker process (multiprocessing ``spawn`` context: a fork of a process
holding threads, sockets and SQLite connections is unsafe) and talks to it over a ``Pipe``. Jobs are
serial per runner; the worker stays warm and caches loaded models between jobs.

    runner = InferenceRunner(cfg.models.dir, threads=0, job_timeout_s=600, memory_limit_mb=4096)
    runner.start()                         # spawns the worker, waits until it is ready (-> bool)
    outcome = runner.submit(InferenceJob(...))   # blocks; never raises for a job's failure
    runner.stop()

``submit`` turns every way a job can end into a ``JobOutcome.kind``:

=========  ====================================================================  ==================
kind       meaning                                                               worker afterwards
=========  ====================================================================  ==================
ok         ``prediction`` is set                                                 kept (warm)
error      the job failed with a reason (bad series, model error, non-finite     kept
           outputs, ...); retrying the same job will likely fail again
timeout    ran past its budget (``submit``'s ``timeout_s``, default             replaced
           ``job_timeout_s``): worker SIGTERMed, SIGKILLed after grace
crash      the worker died (segfault, abort, os._exit, SIGKILL by the kernel     replaced
           OOM killer): ``error`` names the exit code or signal
oom        MemoryError under ``memory_limit_mb`` (RLIMIT_AS) or an allocation   replaced
           failure reported by the backend
refused    the series is over one of the job's ``SeriesLimits`` (``limit``      kept
           names which); nothing was decoded
cancelled  ``stop()`` was called while the job ran; not the job's fault          (stopped)
=========  ====================================================================  ==================

Retrying is the caller's business (the service owns the job table and ``max_attempts``). A
replaced worker is started lazily by the next ``submit``.

The parent process never imports onnxruntime, openvino, the imaging code or the pipeline: those are
imported inside the worker only (``tests/test_runner.py`` checks ``sys.modules``).

Fault injection (tests only): with ``InferenceRunner(..., fault_injection=True)`` -- never set by
configuration in production -- ``submit`` reads ``EDGE_AGENT_FAULT`` from the environment and the
worker misbehaves as ``agent.inference.faults`` describes (crash, segv, hang, oom, nan, raise,
disagree; ``FAULT@TARGET`` for one variant or version). Without ``fault_injection`` the variable
is ignored.

Besides jobs, the worker runs *trials* (``trial``): load one model file on one backend, run a given
input, time a few more runs. The variant manager (agent/variants) self-tests and times variants this
way, in the same process and with the same threads as the jobs they will later run. It also runs
*validations* (``validate``): one model file over a whole validation set, returning what it predicts
for each sample, for the device's own accuracy gate (agent/variants/device_gate.py).

A job may carry a ``shadow``: after the job's own model produced its prediction, the worker runs the
same series through the shadow model (the FP32 fallback) and reports how far they agree
(``JobOutcome.shadow``): classification 1.0/0.0 for the same/another label, segmentation the mean
Dice of the foreground labels of the two argmax maps (in model space). A failing shadow run never
fails the job.

The pieces: ``messages`` (the requests and outcomes, frozen dataclasses), ``worker`` (starting
the worker process and its main loop), ``executor`` (what the worker does with a request, model
cache included), ``faults`` (fault injection). This module is the parent side, and re-exports
the message types callers use (``from agent.inference.runner import InferenceJob, ...``).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING

from agent.core.errors import BackendError
from agent.core.log import log_event
from agent.inference.faults import FAULT_ENV, FAULTS
from agent.inference.messages import (
    REPLY_TYPES,
    FailureKind,
    InferenceJob,
    JobKind,
    JobOutcome,
    JobRequest,
    ModelFile,
    PrefetchOutcome,
    PrefetchRequest,
    Reply,
    ReplyError,
    Request,
    SeriesLimits,
    ShadowOutcome,
    StopRequest,
    TrialOutcome,
    TrialRequest,
    ValidationOutcome,
    ValidationRequest,
)
from agent.inference.worker import EXIT_MEMORY_LIMIT, exit_reason, kill_worker, spawn_worker

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

__all__ = [
    "FAULTS",
    "FAULT_ENV",
    "FailureKind",
    "InferenceJob",
    "InferenceRunner",
    "JobKind",
    "JobOutcome",
    "ModelFile",
    "SeriesLimits",
    "ShadowOutcome",
    "TrialOutcome",
    "TrialRequest",
    "ValidationOutcome",
    "ValidationRequest",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoReply:
    """No reply to a request: the worker could not be started or sent it, crashed, ran past its
    time, or the runner was stopped. Each caller turns this into its own outcome type."""

    kind: JobKind
    error: str
    failure: FailureKind = ""


class InferenceRunner:
    """Runs ``InferenceJob``s in one warm worker process; see the module docstring."""

    def __init__(
        self,
        models_dir: Path,
        *,
        threads: int,
        job_timeout_s: float,
        memory_limit_mb: int = 0,
        fault_injection: bool = False,
        kill_grace_s: float = 3.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        """``models_dir``: the folder of model folders (logged; job paths carry their own folder).
        ``threads``: inference threads in the worker (0: all cores). ``job_timeout_s``: wall-clock
        limit per job, model loading included. ``memory_limit_mb``: RLIMIT_AS of the worker (0: none;
        it caps virtual address space, so leave room: native thread stacks and allocator arenas
        reserve far more than they touch). ``fault_injection``: honour EDGE_AGENT_FAULT (tests only).
        ``kill_grace_s``: SIGTERM-to-SIGKILL grace when killing a worker. ``start_timeout_s``: how
        long a worker may take to start (import numpy, scipy, ...)."""
        self.models_dir = Path(models_dir)
        self.threads = int(threads)
        self.job_timeout_s = float(job_timeout_s)
        self.memory_limit_mb = int(memory_limit_mb)
        self.kill_grace_s = float(kill_grace_s)
        self.start_timeout_s = float(start_timeout_s)
        self._fault_injection = bool(fault_injection)
        self._ctx = get_context("spawn")
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._job_lock = threading.Lock()  # one job at a time
        self._state_lock = threading.Lock()  # guards _proc/_conn against stop() from another thread
        self._stopped = False
        #: monotonic time by which the request in the worker ends, killed if need be (0: none in flight);
        #: the service's watchdog counts a thread waiting here as busy, not wedged
        self.busy_until = 0.0
        if self._fault_injection:
            log_event(
                logger,
                "runner.fault_injection_enabled",
                logging.WARNING,
                note="test-only: EDGE_AGENT_FAULT is honoured",
            )

    # ---- lifecycle -----------------------------------------------------------------------------
    @property
    def worker_pid(self) -> int | None:
        """Pid of the live worker, or None (for health reports and tests)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def start(self) -> bool:
        """Spawn the worker and wait until it is ready. Returns True when it is; False (logged as
        ``runner.worker_start_failed``) when it could not start, e.g. a ``memory_limit_mb`` too low
        for the imports. Never raises for that: the service must keep receiving DICOM, and each
        ``submit`` tries again (answering ``crash`` with the reason while it keeps failing)."""
        with self._state_lock:
            self._stopped = False
            try:
                self._ensure_worker()
            except BackendError as exc:
                log_event(logger, "runner.worker_start_failed", logging.ERROR, error=str(exc))
                return False
            return True

    def stop(self) -> None:
        """Stop the worker: politely when idle, by killing it when a job is running (that job's
        ``submit`` returns ``cancelled``). Safe to call twice and from another thread."""
        idle = self._job_lock.acquire(blocking=False)
        try:
            with self._state_lock:
                self._stopped = True
                proc, conn = self._proc, self._conn
                self._proc = self._conn = None
            if proc is None or conn is None:
                return
            if idle:
                try:
                    conn.send(StopRequest())
                except OSError:  # already gone; reaped below
                    log_event(logger, "runner.worker_gone", logging.DEBUG, pid=proc.pid)
                proc.join(self.kill_grace_s)
            kill_worker(proc, self.kill_grace_s)
            if idle:
                conn.close()  # when busy, the submitting thread is reading it and closes it
            log_event(logger, "runner.stopped", pid=proc.pid, exitcode=proc.exitcode)
        finally:
            if idle:
                self._job_lock.release()

    def _ensure_worker(self) -> None:
        """Start a worker unless a live one exists. Caller holds ``_state_lock``."""
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return
        if self._proc is not None:  # died while idle (e.g. picked by the kernel OOM killer)
            log_event(
                logger,
                "runner.worker_died_idle",
                logging.WARNING,
                pid=self._proc.pid,
                reason=exit_reason(self._proc),
            )
            self._discard()
        t0 = time.monotonic()
        self._proc, self._conn = spawn_worker(
            self._ctx,
            threads=self.threads,
            memory_limit_mb=self.memory_limit_mb,
            fault_injection=self._fault_injection,
            start_timeout_s=self.start_timeout_s,
            kill_grace_s=self.kill_grace_s,
        )
        log_event(
            logger,
            "runner.worker_started",
            pid=self._proc.pid,
            ms=round((time.monotonic() - t0) * 1000),
            threads=self.threads,
            memory_limit_mb=self.memory_limit_mb,
            models_dir=str(self.models_dir),
        )

    def _forget(self, proc: BaseProcess, conn: Connection, *, kill: bool) -> bool:
        """Drop worker ``proc`` after a job (unless another already replaced it), close its pipe,
        and kill it if ``kill``. Returns whether the runner is stopped."""
        with self._state_lock:
            if self._proc is proc:
                self._discard(kill=kill)
            else:  # stop() already detached it and left the pipe to us
                if kill:
                    kill_worker(proc, self.kill_grace_s)
                conn.close()
            return self._stopped

    def _discard(self, kill: bool = True) -> None:
        """Forget (and kill) the current worker. Caller holds ``_state_lock``."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None and kill:
            kill_worker(proc, self.kill_grace_s)
        if conn is not None:
            conn.close()

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, job: InferenceJob, timeout_s: float | None = None) -> JobOutcome:
        """Run ``job`` in the worker and wait at most ``timeout_s`` (default ``job_timeout_s``) for
        it; returns a JobOutcome and never raises for the job's own failures (see the module
        docstring for the kinds)."""
        with self._job_lock:
            t0 = time.monotonic()
            outcome = self._submit(job, timeout_s or self.job_timeout_s)
            outcome = replace(outcome, duration_ms=round((time.monotonic() - t0) * 1000, 1))
            level = logging.INFO if outcome.ok else logging.WARNING
            log_event(
                logger,
                "runner.job_done",
                level,
                job_id=job.job_id,
                model=job.model_name,
                backend=job.backend,
                precision=job.precision,
                variant=job.variant or job.precision,
                kind=outcome.kind,
                ms=outcome.duration_ms,
                error=outcome.error or "-",
            )
            return outcome

    def trial(self, request: TrialRequest, timeout_s: float | None = None) -> TrialOutcome:
        """Load ``request.model`` in the worker, run its input, time it (see TrialRequest); waits at
        most ``timeout_s`` (default ``job_timeout_s``). Never raises for the model's failures."""
        model = replace(request.model, variant_file=Path(request.model.variant_file).absolute())
        with self._job_lock:
            reply = self._exchange(replace(request, model=model), timeout_s or self.job_timeout_s,
                                   f"trial:{model.variant}")
        if isinstance(reply, TrialOutcome):
            return reply
        # no answer, or the worker's generic error reply (its answer could not be sent)
        return TrialOutcome(reply.kind if isinstance(reply, NoReply) else "error", error=reply.error)

    def validate(self, request: ValidationRequest, timeout_s: float | None = None) -> ValidationOutcome:
        """Run ``request`` in the worker (see ValidationRequest); waits at most ``timeout_s`` (default
        ``job_timeout_s``). Never raises for the model's or the file's failures."""
        model = replace(request.model, variant_file=Path(request.model.variant_file).absolute())
        request = replace(request, model=model, set_path=Path(request.set_path).absolute())
        with self._job_lock:
            reply = self._exchange(request, timeout_s or self.job_timeout_s, f"validate:{model.variant}")
        if isinstance(reply, ValidationOutcome):
            return reply
        return ValidationOutcome(reply.kind if isinstance(reply, NoReply) else "error", error=reply.error)

    def prefetch(self, paths: Sequence[Path], timeout_s: float | None = None) -> bool:
        """Have the worker decode the series ``paths`` now, while nothing else runs, so the job on
        the same files starts with the volume in memory. True when the worker holds it; a failure
        here is logged and harmless (the job loads the series itself and reports its own error)."""
        files = tuple(str(Path(p).absolute()) for p in paths)
        with self._job_lock:
            t0 = time.monotonic()
            reply = self._exchange(PrefetchRequest(files), timeout_s or self.job_timeout_s, "prefetch")
        ok = isinstance(reply, PrefetchOutcome) and reply.kind == "ok"
        error = reply.error
        log_event(logger, "runner.prefetched" if ok else "runner.prefetch_failed",
                  logging.DEBUG if ok else logging.WARNING, instances=len(files),
                  ms=round((time.monotonic() - t0) * 1000, 1), error=error or "-")
        return ok

    def _submit(self, job: InferenceJob, timeout_s: float) -> JobOutcome:
        job = _absolute_paths(job)
        fault = os.environ.get(FAULT_ENV, "") if self._fault_injection else ""
        reply = self._exchange(JobRequest(job, fault), timeout_s, job.job_id)
        if isinstance(reply, JobOutcome):
            return reply
        if isinstance(reply, NoReply):
            return JobOutcome(reply.kind, error=reply.error, failure=reply.failure)
        return JobOutcome("error", error=reply.error, failure="model")

    def _send(self, msg: Request) -> tuple[BaseProcess, Connection] | NoReply:
        """Hand ``msg`` to a live worker (starting one if needed); the worker and its pipe, or why
        the request ends before it started."""
        for attempt in (1, 2):
            with self._state_lock:
                if self._stopped:
                    return NoReply("cancelled", "inference runner is stopped")
                try:
                    self._ensure_worker()
                except BackendError as exc:
                    return NoReply("crash", str(exc), "model")
                proc, conn = self._proc, self._conn
            assert proc is not None and conn is not None  # _ensure_worker set them
            try:
                conn.send(msg)
                return proc, conn
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                return NoReply("error", f"job cannot be sent to the worker: {exc}", "input")
            except OSError:
                # the worker died between jobs; the job never started, so start a fresh one once
                self._forget(proc, conn, kill=True)
                if attempt == 2:
                    break
        return NoReply("crash", "inference worker died before the job started", "model")

    def _exchange(self, msg: Request, timeout_s: float, label: str) -> Reply | NoReply:
        """Send ``msg``, wait up to ``timeout_s`` for the worker's reply and return it; a NoReply
        when there is none (crash, timeout, cancelled). Caller holds ``_job_lock``."""
        self.busy_until = time.monotonic() + self.start_timeout_s + timeout_s + 2 * self.kill_grace_s + 5.0
        try:
            return self._exchange_once(msg, timeout_s, label)
        finally:
            self.busy_until = 0.0

    def _exchange_once(self, msg: Request, timeout_s: float, label: str) -> Reply | NoReply:
        sent = self._send(msg)
        if isinstance(sent, NoReply):
            return sent
        proc, conn = sent

        try:
            ready = wait([conn, proc.sentinel], timeout=timeout_s)
        except OSError:  # stop() killed the worker and closed the pipe before we got to wait
            ready = [proc.sentinel]
        if conn in ready or proc.sentinel in ready:
            reply: object = None
            try:
                if conn.poll():
                    reply = conn.recv()
            except (EOFError, OSError):
                reply = None
            if isinstance(reply, REPLY_TYPES):
                if not isinstance(reply, ReplyError) and reply.kind == "oom":
                    # a process that hit its memory ceiling is not trusted with the next job
                    self._forget(proc, conn, kill=True)
                return reply
            # no answer: the worker died (or stop() killed it)
            proc.join(self.kill_grace_s)
            stopped = self._forget(proc, conn, kill=True)
            if stopped:
                return NoReply("cancelled", "inference runner stopped during the job")
            reason = exit_reason(proc)
            log_event(logger, "runner.worker_crashed", logging.ERROR, job_id=label, pid=proc.pid,
                      reason=reason)
            if proc.exitcode == EXIT_MEMORY_LIMIT:  # its own watch (GPU hosts): as a MemoryError would be
                return NoReply("oom", f"inference worker over its memory limit ({self.memory_limit_mb} MB, "
                               "pipeline.worker_memory_mb)", "resource")
            # SIGKILL that we did not send: the kernel's OOM killer (the device's memory, not the model)
            killed = proc.exitcode == -signal.SIGKILL
            return NoReply("crash", f"inference worker died during the job: {reason}",
                           "resource" if killed else "model")

        # timeout: the worker is busy with a job we no longer want; kill it, a fresh one comes next
        self._forget(proc, conn, kill=False)  # killed below, outside the lock (takes up to 2 graces)
        how = kill_worker(proc, self.kill_grace_s)
        log_event(logger, "runner.job_timeout", logging.ERROR, job_id=label, pid=proc.pid,
                  timeout_s=timeout_s, killed_with=how)
        # the job's budget ran out: a series too large or a device too busy, not the model's fault
        return NoReply("timeout", f"job ran past {timeout_s:g} s; worker killed ({how})", "resource")


def _absolute_paths(job: InferenceJob) -> InferenceJob:
    """The job with absolute model paths (relative ones are taken from the current directory)."""
    shadow = job.shadow
    if shadow is not None:
        shadow = replace(shadow, variant_file=Path(shadow.variant_file).absolute())
    return replace(
        job, model_dir=Path(job.model_dir).absolute(), variant_file=Path(job.variant_file).absolute(),
        shadow=shadow,
    )
