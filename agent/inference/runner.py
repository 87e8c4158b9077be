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
timeout    ran past ``job_timeout_s``: worker SIGTERMed, SIGKILLed after grace   replaced
crash      the worker died (segfault, abort, os._exit, SIGKILL by the kernel     replaced
           OOM killer): ``error`` names the exit code or signal
oom        MemoryError under ``memory_limit_mb`` (RLIMIT_AS) or an allocation   replaced
           failure reported by the backend
cancelled  ``stop()`` was called while the job ran; not the job's fault          (stopped)
=========  ====================================================================  ==================

Retrying is the caller's business (the service owns the job table and ``max_attempts``). A
replaced worker is started lazily by the next ``submit``.

The parent process never imports onnxruntime, openvino, the imaging code or the pipeline: those are
imported inside the worker only (``tests/test_runner.py`` checks ``sys.modules``).

Fault injection (tests only): with ``InferenceRunner(..., fault_injection=True)`` -- never set by
configuration in production -- ``submit`` reads ``EDGE_AGENT_FAULT`` from the environment and the
worker misbehaves at the job's first inference call: ``crash`` (``os._exit(70)``), ``segv`` (SIGSEGV
to itself), ``hang`` (sleeps with SIGTERM ignored, so the SIGKILL escalation is exercised), ``oom``
(allocates past the memory limit; raises MemoryError directly when no limit is set), ``nan``
(the backend returns NaN), ``raise`` (the backend raises BackendError) or ``disagree`` (the backend
returns its class channels in reverse order: finite, plausible, wrong). ``FAULT@TARGET`` limits the
fault to jobs whose ``variant`` or ``version`` is TARGET (the shadow FP32 run is never faulted).
Without ``fault_injection`` the variable is ignored.

Besides jobs, the worker runs *trials* (``trial``): load one model file on one backend, run a given
input, time a few more runs. The engine manager (agent/engines) self-tests and times variants this
way, in the same process and with the same threads as the jobs they will later run. It also runs
*validations* (``validate``): one model file over a whole validation set, returning what it predicts
for each sample, for the device's own accuracy gate (agent/engines/device_gate.py).

A job may carry a ``shadow``: after the job's own model produced its prediction, the worker runs the
same series through the shadow model (the FP32 fallback) and reports how far they agree
(``JobOutcome.shadow``): classification 1.0/0.0 for the same/another label, segmentation the mean
Dice of the foreground labels of the two argmax maps (in model space). A failing shadow run never
fails the job.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.errors import BackendError, DicomError, EdgeAgentError, PreprocessError, VolumeError
from agent.log import JsonFormatter, log_event, setup_logging
from agent.modelspec import ModelSpec
from agent.types import Prediction, Series

if TYPE_CHECKING:  # only for annotations: the parent must not import these at run time
    from multiprocessing.process import BaseProcess

    from agent.inference.base import Backend, BackendInfo
    from agent.types import ModelRef

logger = logging.getLogger(__name__)

JobKind = Literal["ok", "error", "timeout", "crash", "oom", "cancelled"]

#: environment variable read by ``submit`` when the runner was built with ``fault_injection=True``
FAULT_ENV = "EDGE_AGENT_FAULT"
FAULTS = ("crash", "segv", "hang", "oom", "nan", "raise", "disagree")
#: JobOutcome.failure: whose fault a failed job was. "model": the model/backend failed (load error,
#: exception, non-finite output, crash, timeout): another variant may succeed. "input": the series
#: cannot be read or prepared: any variant would fail the same way. "": ok, cancelled or out of memory.
FailureKind = Literal["", "model", "input"]


@dataclass(frozen=True)
class ModelFile:
    """One runnable model file: what ``Backend.load`` needs, and the variant id it reports."""

    variant_file: Path
    backend: str = "onnxruntime"
    precision: str = "fp32"
    variant: str = ""
    backend_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceJob:
    """One series to run through one model variant (picklable: it crosses the process boundary).

    ``model_dir`` holds ``model.toml``; ``variant_file`` is the ONNX file to run (absolute, or
    relative to the current directory). ``variant`` names it in ``ModelRef.variant`` (default:
    ``precision``). ``backend_options`` go to ``Backend.load`` (e.g. ``{"providers": [...]}``).
    ``spec``: the model spec when it does not come from ``model_dir/model.toml`` (a registry
    version carries it in its manifest). ``version``: the installed version the file belongs to
    ("" for models.dir). ``shadow``: also run this model file and report agreement (see above).
    """

    job_id: str
    series: Series
    model_name: str
    model_dir: Path
    variant_file: Path
    backend: str = "onnxruntime"
    precision: str = "fp32"
    variant: str = ""
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None
    version: str = ""
    shadow: ModelFile | None = None


@dataclass(frozen=True)
class ShadowOutcome:
    """The shadow run of a job: ``agreement`` (see the module docstring) or the ``error`` that
    stopped the shadow run (then ``agreement`` is None)."""

    variant: str
    agreement: float | None
    error: str = ""


@dataclass(frozen=True)
class TrialRequest:
    """Load ``model`` and run ``inputs`` once (output returned), then time ``bench_runs`` runs of its
    first sample: jobs run one slice or one sliding-window patch at a time, so batch 1 is the speed
    that decides (at batch 4 two variants measured 1.2x apart at batch 1 came out even)."""

    model: ModelFile
    inputs: np.ndarray
    bench_runs: int = 5


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial did. ``kind`` as for jobs (ok, error, timeout, crash, oom, cancelled).
    ``output``: the first run's output; ``latency_ms``: fastest of the timed runs; ``precision``:
    what the backend reports it computed in (``BackendInfo.precision``)."""

    kind: JobKind
    output: np.ndarray | None = None
    load_ms: float = 0.0
    latency_ms: float = 0.0
    backend_version: str = ""
    precision: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


@dataclass(frozen=True)
class ValidationRequest:
    """Load ``model`` and predict every sample of the validation set file ``set_path`` with it
    (``agent.engines.device_gate.predict``: logits per slice, or a label map per volume)."""

    model: ModelFile
    set_path: Path
    spec: ModelSpec


@dataclass(frozen=True)
class ValidationOutcome:
    """What a validation did: ``predictions`` per sample, in the set's order, and how long it took."""

    kind: JobKind
    predictions: tuple[np.ndarray, ...] = ()
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended (see the module docstring for ``kind``). ``error`` is a one-line reason."""

    kind: JobKind
    prediction: Prediction | None = None
    error: str = ""
    duration_ms: float = 0.0
    failure: FailureKind = ""
    shadow: ShadowOutcome | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


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
                    conn.send(("stop",))
                except OSError:  # already gone; reaped below
                    log_event(logger, "runner.worker_gone", logging.DEBUG, pid=proc.pid)
                proc.join(self.kill_grace_s)
            _kill(proc, self.kill_grace_s)
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
                reason=_exit_reason(self._proc),
            )
            self._discard()
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        root = logging.getLogger()
        fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "kv"
        proc = self._ctx.Process(
            target=_worker_main,
            args=(
                child_conn,
                self.threads,
                self.memory_limit_mb,
                logging.getLevelName(root.level),
                fmt,
                self._fault_injection,
                os.getpid(),
            ),
            name="edge-agent-inference",
            daemon=True,  # never outlive the service
        )
        t0 = time.monotonic()
        try:
            proc.start()
        except OSError as exc:  # EAGAIN / ENOMEM from fork-exec: out of processes or memory
            parent_conn.close()
            child_conn.close()
            raise BackendError(f"inference worker failed to start: {exc}") from exc
        child_conn.close()  # ours is closed so a dead worker reads as EOF on parent_conn
        ready = wait([parent_conn, proc.sentinel], timeout=self.start_timeout_s)
        msg: Any = None
        if parent_conn in ready:
            try:
                msg = parent_conn.recv()
            except (EOFError, OSError):
                msg = None
        if not (isinstance(msg, tuple) and msg and msg[0] == "ready"):
            if isinstance(msg, tuple) and len(msg) > 1:  # ("failed", reason) from the worker
                why = str(msg[1])
            elif ready:  # it died: the sentinel fires a moment before the exit status can be read
                proc.join(self.kill_grace_s)
                why = _exit_reason(proc)
            else:
                why = f"not ready after {self.start_timeout_s:g} s"
            _kill(proc, self.kill_grace_s)
            parent_conn.close()
            # under RLIMIT_AS a failed mmap surfaces as MemoryError, ImportError (a shared library)
            # or RuntimeError (a thread stack), or kills the worker outright
            hint = f" (is memory_limit_mb={self.memory_limit_mb} too low?)" if self.memory_limit_mb else ""
            raise BackendError(f"inference worker failed to start: {why}{hint}")
        self._proc, self._conn = proc, parent_conn
        log_event(
            logger,
            "runner.worker_started",
            pid=proc.pid,
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
                    _kill(proc, self.kill_grace_s)
                conn.close()
            return self._stopped

    def _discard(self, kill: bool = True) -> None:
        """Forget (and kill) the current worker. Caller holds ``_state_lock``."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None and kill:
            _kill(proc, self.kill_grace_s)
        if conn is not None:
            conn.close()

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, job: InferenceJob) -> JobOutcome:
        """Run ``job`` in the worker and wait for it; returns a JobOutcome and never raises for the
        job's own failures (see the module docstring for the kinds)."""
        with self._job_lock:
            t0 = time.monotonic()
            outcome = self._submit(job)
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
            reply = self._exchange(("trial", replace(request, model=model), ""),
                                   timeout_s or self.job_timeout_s, f"trial:{model.variant}")
            if isinstance(reply, JobOutcome):
                return TrialOutcome(reply.kind, error=reply.error)
            if len(reply) != 8:  # the worker's generic error reply (its answer could not be sent)
                return TrialOutcome("error", error=str(reply[3]))
            _, kind, output, load_ms, latency_ms, version, precision, error = reply
            return TrialOutcome(kind, output, load_ms, latency_ms, version, precision, error)

    def validate(self, request: ValidationRequest, timeout_s: float | None = None) -> ValidationOutcome:
        """Run ``request`` in the worker (see ValidationRequest); waits at most ``timeout_s`` (default
        ``job_timeout_s``). Never raises for the model's or the file's failures."""
        model = replace(request.model, variant_file=Path(request.model.variant_file).absolute())
        request = replace(request, model=model, set_path=Path(request.set_path).absolute())
        with self._job_lock:
            reply = self._exchange(("validate", request, ""), timeout_s or self.job_timeout_s,
                                   f"validate:{model.variant}")
            if isinstance(reply, JobOutcome):
                return ValidationOutcome(reply.kind, error=reply.error)
            if len(reply) != 5:  # the worker's generic error reply (its answer could not be sent)
                return ValidationOutcome("error", error=str(reply[3]))
            _, kind, predictions, seconds, error = reply
            return ValidationOutcome(kind, tuple(predictions or ()), seconds, error)

    def prefetch(self, paths: Sequence[Path], timeout_s: float | None = None) -> bool:
        """Have the worker decode the series ``paths`` now, while nothing else runs, so the job on
        the same files starts with the volume in memory. True when the worker holds it; a failure
        here is logged and harmless (the job loads the series itself and reports its own error)."""
        files = tuple(str(Path(p).absolute()) for p in paths)
        with self._job_lock:
            t0 = time.monotonic()
            reply = self._exchange(("prefetch", files, ""), timeout_s or self.job_timeout_s, "prefetch")
        ok = not isinstance(reply, JobOutcome) and reply[1] == "ok"
        error = reply.error if isinstance(reply, JobOutcome) else str(reply[3])
        log_event(logger, "runner.prefetched" if ok else "runner.prefetch_failed",
                  logging.DEBUG if ok else logging.WARNING, instances=len(files),
                  ms=round((time.monotonic() - t0) * 1000, 1), error=error or "-")
        return ok

    def _send(self, msg: tuple[Any, ...]) -> tuple[BaseProcess, Connection] | JobOutcome:
        """Hand ``msg`` to a live worker (starting one if needed); the worker and its pipe, or the
        outcome that ends the job before it started."""
        for attempt in (1, 2):
            with self._state_lock:
                if self._stopped:
                    return JobOutcome("cancelled", error="inference runner is stopped")
                try:
                    self._ensure_worker()
                except BackendError as exc:
                    return JobOutcome("crash", error=str(exc), failure="model")
                proc, conn = self._proc, self._conn
            assert proc is not None and conn is not None  # _ensure_worker set them
            try:
                conn.send(msg)
                return proc, conn
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                return JobOutcome("error", error=f"job cannot be sent to the worker: {exc}", failure="input")
            except OSError:
                # the worker died between jobs; the job never started, so start a fresh one once
                self._forget(proc, conn, kill=True)
                if attempt == 2:
                    break
        return JobOutcome("crash", error="inference worker died before the job started", failure="model")

    def _submit(self, job: InferenceJob) -> JobOutcome:
        job = _absolute_paths(job)
        fault = os.environ.get(FAULT_ENV, "") if self._fault_injection else ""
        reply = self._exchange(("job", job, fault), self.job_timeout_s, job.job_id)
        if isinstance(reply, JobOutcome):
            return reply
        _, kind, prediction, error, failure, shadow = reply
        return JobOutcome(kind, prediction, error, failure=failure, shadow=shadow)

    def _exchange(self, msg: tuple[Any, ...], timeout_s: float, label: str) -> tuple[Any, ...] | JobOutcome:
        """Send ``msg``, wait up to ``timeout_s`` for the worker's ("done", kind, ...) reply and
        return it; a JobOutcome when there is none (crash, timeout, cancelled). Caller holds
        ``_job_lock``."""
        sent = self._send(msg)
        if isinstance(sent, JobOutcome):
            return sent
        proc, conn = sent

        try:
            ready = wait([conn, proc.sentinel], timeout=timeout_s)
        except OSError:  # stop() killed the worker and closed the pipe before we got to wait
            ready = [proc.sentinel]
        if conn in ready or proc.sentinel in ready:
            reply: Any = None
            try:
                if conn.poll():
                    reply = conn.recv()
            except (EOFError, OSError):
                reply = None
            if isinstance(reply, tuple) and len(reply) > 2 and reply[0] == "done":
                if reply[1] == "oom":
                    # a process that hit its memory ceiling is not trusted with the next job
                    self._forget(proc, conn, kill=True)
                return reply
            # no answer: the worker died (or stop() killed it)
            proc.join(self.kill_grace_s)
            stopped = self._forget(proc, conn, kill=True)
            if stopped:
                return JobOutcome("cancelled", error="inference runner stopped during the job")
            reason = _exit_reason(proc)
            log_event(logger, "runner.worker_crashed", logging.ERROR, job_id=label, pid=proc.pid, reason=reason)
            return JobOutcome("crash", error=f"inference worker died during the job: {reason}", failure="model")

        # timeout: the worker is busy with a job we no longer want; kill it, a fresh one comes next
        self._forget(proc, conn, kill=False)  # killed below, outside the lock (takes up to 2 graces)
        how = _kill(proc, self.kill_grace_s)
        log_event(logger, "runner.job_timeout", logging.ERROR, job_id=label, pid=proc.pid,
                  timeout_s=timeout_s, killed_with=how)
        return JobOutcome("timeout", error=f"job ran past {timeout_s:g} s; worker killed ({how})", failure="model")


def _absolute_paths(job: InferenceJob) -> InferenceJob:
    """The job with absolute model paths (relative ones are taken from the current directory)."""
    shadow = job.shadow
    if shadow is not None:
        shadow = replace(shadow, variant_file=Path(shadow.variant_file).absolute())
    return replace(
        job, model_dir=Path(job.model_dir).absolute(), variant_file=Path(job.variant_file).absolute(),
        shadow=shadow,
    )


def _kill(proc: BaseProcess, grace_s: float) -> str:
    """Terminate ``proc``: SIGTERM, then SIGKILL after ``grace_s``. Returns which one ended it."""
    if proc.exitcode is not None:
        proc.join(0)
        return "already exited"
    proc.terminate()
    proc.join(grace_s)
    if proc.exitcode is None:
        proc.kill()
        proc.join(grace_s)
        return "SIGKILL"
    return "SIGTERM"


def _exit_reason(proc: BaseProcess) -> str:
    """Human-readable reason a process ended: 'signal SIGSEGV', 'exit code 70', ..."""
    code = proc.exitcode
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = " (killed: the kernel OOM killer or an operator)" if -code == signal.SIGKILL else ""
        return f"signal {name}{hint}"
    return f"exit code {code}"


# ---- the worker process --------------------------------------------------------------------------
def _worker_main(
    conn: Connection,
    threads: int,
    memory_limit_mb: int,
    log_level: str,
    log_format: str,
    fault_injection: bool,
    parent_pid: int,
) -> None:
    """Entry point of the worker process: set limits, then answer jobs until told to stop."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit_mb > 0:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    setup_logging(log_level, log_format)
    faulthandler.enable()  # a segfault in native code leaves a Python traceback on stderr
    try:
        _watch_parent(parent_pid)
        worker = _Worker(threads, memory_limit_mb, fault_injection)
    except (ImportError, MemoryError, RuntimeError) as exc:  # RuntimeError: can't start a thread
        conn.send(("failed", f"{type(exc).__name__}: {exc or 'allocation failed'}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if not isinstance(msg, tuple) or not msg or msg[0] == "stop":
            return
        if msg[0] == "trial":
            reply = worker.trial(msg[1])
        elif msg[0] == "validate":
            reply = worker.validate(msg[1])
        elif msg[0] == "prefetch":
            reply = worker.prefetch(msg[1])
        else:
            reply = worker.run(msg[1], msg[2])
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(("done", "error", None, f"prediction cannot be returned: {exc}", "model", None))
        except OSError:
            return  # the parent is gone


def _watch_parent(parent_pid: int, every_s: float = 2.0) -> None:
    """Exit when the parent is gone (SIGKILLed, crashed): an orphan would otherwise finish, or
    hang in, its current job holding memory and cores. The pipe only tells us between jobs."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent_pid:  # re-parented to init or a subreaper
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Worker:
    """Job execution inside the worker process, with a cache of loaded models."""

    def __init__(self, threads: int, memory_limit_mb: int, fault_injection: bool) -> None:
        # imported here, in the worker: the parent must stay free of inference libraries
        from agent.inference import pipeline, registry
        from agent.modelspec import load_spec

        self._pipeline = pipeline
        self._registry = registry
        self._load_spec = load_spec
        self.threads = threads
        self.memory_limit_mb = memory_limit_mb
        self.fault_injection = fault_injection
        #: (model name, backend, precision, variant) -> (fingerprint, spec, backend)
        self._models: dict[tuple[str, str, str, str], tuple[tuple[Any, ...], ModelSpec, Backend]] = {}
        #: the one prefetched series: its exact file list and the decoded Volume (see prefetch)
        self._prefetched: tuple[tuple[str, ...], Any] | None = None

    def run(self, job: InferenceJob, fault: str) -> tuple[Any, ...]:
        """Run one job; returns ``("done", kind, prediction, error, failure, shadow)``. Never raises."""
        try:
            spec, backend = self._model(job, job)
            info = backend.describe()
            ref = _model_ref(spec, job, info)
            if self.fault_injection and _fault_applies(fault, job):
                backend = _FaultyBackend(backend, fault.partition("@")[0], self.memory_limit_mb)
            paths = [inst.path for inst in job.series.instances]
            volume = self._take_prefetched(paths)
            if job.shadow is None:
                prediction = self._pipeline.run_model(paths, spec, backend, ref, volume=volume)
                return ("done", "ok", prediction, "", "", None)
            run = self._pipeline.run_model_detailed(paths, spec, backend, ref, volume=volume)
            return ("done", "ok", run.prediction, "", "",
                    self._shadow(job, spec, paths, run.logits, volume))
        except MemoryError as exc:
            return ("done", "oom", None, f"out of memory (worker limit {self.memory_limit_mb or 'none'} MB): "
                    f"{exc or 'allocation failed'}", "", None)
        except EdgeAgentError as exc:
            kind = "oom" if _looks_like_oom(str(exc)) else "error"
            failure = "" if kind == "oom" else _failure_of(exc)
            return ("done", kind, None, f"{type(exc).__name__}: {exc}", failure, None)
        except Exception as exc:
            # a bug in one model's code path must become an outcome, not kill the warm worker
            logger.exception("worker.job_failed")
            return ("done", "error", None, f"internal error: {type(exc).__name__}: {exc}", "model", None)

    def prefetch(self, paths: Sequence[str]) -> tuple[Any, ...]:
        """Decode the series made of ``paths`` and keep it for the next job on exactly these files
        (spooled files never change, so the same list means the same volume). One series is kept;
        a newer prefetch replaces it. Returns ``("done", kind, None, error)``."""
        self._prefetched = None  # free the previous one before decoding the next
        try:
            from agent.imaging.volume import load_series

            self._prefetched = (tuple(str(p) for p in paths), load_series([Path(p) for p in paths]))
        except (EdgeAgentError, MemoryError) as exc:
            # not a job failure: the job decodes the series itself and reports its own error
            return ("done", "error", None, f"{type(exc).__name__}: {exc}")
        return ("done", "ok", None, "")

    def _take_prefetched(self, paths: Sequence[Path]) -> Any:
        """The prefetched Volume when it was decoded from exactly ``paths``, else None (and dropped
        either way: a job consumes it)."""
        held, self._prefetched = self._prefetched, None
        if held is not None and held[0] == tuple(str(p) for p in paths):
            return held[1]
        return None

    def _shadow(self, job: InferenceJob, spec: ModelSpec, paths: list[Path], logits: np.ndarray,
                volume: Any = None) -> ShadowOutcome:
        """Run the job's shadow model on the same series; agreement of the two outputs."""
        assert job.shadow is not None
        shadow = replace(job, variant_file=job.shadow.variant_file, backend=job.shadow.backend,
                         precision=job.shadow.precision, variant=job.shadow.variant,
                         backend_options=job.shadow.backend_options, shadow=None)
        name = shadow.variant or shadow.precision
        try:
            _, backend = self._model(shadow, job)
            run = self._pipeline.run_model_detailed(paths, spec, backend, _model_ref(spec, shadow, backend.describe()),
                                                    volume=volume)
        except (EdgeAgentError, MemoryError) as exc:
            log_event(logger, "worker.shadow_failed", logging.WARNING, job_id=job.job_id, variant=name, error=str(exc))
            return ShadowOutcome(name, None, f"{type(exc).__name__}: {exc}")
        return ShadowOutcome(name, agreement(spec.task, logits, run.logits))

    def trial(self, request: TrialRequest) -> tuple[Any, ...]:
        """Load a model file fresh, run the request's input, time ``bench_runs`` more runs.
        Returns ``("done", kind, output, load_ms, latency_ms, version, precision, error)``."""
        m = request.model
        try:
            timed = np.ascontiguousarray(request.inputs[:1])
            # warmed up (and, for OpenVINO, compiled statically) for the timed shape, as jobs run
            options = {**dict(m.backend_options), "warmup_shape": tuple(timed.shape)}
            backend = self._registry.create(m.backend)
            t0 = time.perf_counter()
            backend.load(Path(m.variant_file), precision=m.precision, threads=self.threads, options=options)
            load_ms = (time.perf_counter() - t0) * 1000
            output = np.asarray(backend.run(request.inputs), dtype=np.float32)
            backend.run(timed)  # once untimed: the first run of a shape may still allocate
            times = []
            for _ in range(max(1, request.bench_runs)):
                t0 = time.perf_counter()
                backend.run(timed)
                times.append((time.perf_counter() - t0) * 1000)
            info = backend.describe()
            del backend  # free the session before the reply: trials load many variants in a row
            # best of N: other processes on the device only ever add time, so the minimum is the
            # steadiest estimate of the variant's own speed (medians flipped choices on a busy box)
            return ("done", "ok", output, round(load_ms, 1), round(min(times), 3),
                    info.version, info.precision, "")
        except MemoryError as exc:
            return ("done", "oom", None, 0.0, 0.0, "", "", f"out of memory: {exc or 'allocation failed'}")
        except EdgeAgentError as exc:
            return ("done", "error", None, 0.0, 0.0, "", "", f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            logger.exception("worker.trial_failed")
            return ("done", "error", None, 0.0, 0.0, "", "", f"internal error: {type(exc).__name__}: {exc}")

    def validate(self, request: ValidationRequest) -> tuple[Any, ...]:
        """Load a model file fresh and predict every sample of a validation set with it.
        Returns ``("done", kind, predictions, seconds, error)``."""
        from agent.accuracy import load_validation_set
        from agent.engines.device_gate import CLASSIFICATION_BATCH, predict

        m, spec = request.model, request.spec
        t0 = time.perf_counter()
        try:
            samples = load_validation_set(Path(request.set_path))
            first = samples.inputs[0]
            if spec.task == "classification":
                warm: tuple[int, ...] = (min(CLASSIFICATION_BATCH, len(samples)), *first.shape)
            else:
                warm = _warmup_shape(spec) or (1, *first.shape)
            backend = self._registry.create(m.backend)
            backend.load(Path(m.variant_file), precision=m.precision, threads=self.threads,
                         options={**dict(m.backend_options), "warmup_shape": warm})
            predictions = predict(backend.run, samples, spec)
            del backend  # free the session before the reply: a gate loads several variants in a row
            return ("done", "ok", predictions, round(time.perf_counter() - t0, 2), "")
        except MemoryError as exc:
            return ("done", "oom", None, 0.0, f"out of memory: {exc or 'allocation failed'}")
        except (EdgeAgentError, ValueError) as exc:
            return ("done", "error", None, 0.0, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            logger.exception("worker.validate_failed")
            return ("done", "error", None, 0.0, f"internal error: {type(exc).__name__}: {exc}")

    def _model(self, job: InferenceJob, owner: InferenceJob) -> tuple[ModelSpec, Backend]:
        """The loaded (spec, backend) for the job, from the cache when the files did not change.
        ``owner``: the job whose spec / model folder applies (a shadow run borrows its job's)."""
        variant = Path(job.variant_file)
        try:
            vstat = variant.stat()
            spec_stamp: Any = (owner.spec.model_dump_json() if owner.spec is not None
                               else (Path(owner.model_dir) / "model.toml").stat().st_mtime_ns)
        except OSError as exc:
            raise BackendError(f"model file missing: {exc}") from exc
        options = dict(job.backend_options)
        fingerprint = (str(variant), vstat.st_mtime_ns, vstat.st_size, spec_stamp, repr(sorted(options.items())))
        key = (job.model_name, job.backend, job.precision, job.variant)
        cached = self._models.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1], cached[2]
        # a new or updated model: drop the old one first so both are never in memory together
        self._models.pop(key, None)
        spec = owner.spec if owner.spec is not None else self._load_spec(owner.model_dir)
        if spec.name != job.model_name:
            raise BackendError(f"the spec of {owner.model_dir} declares model {spec.name!r}, "
                               f"the job asked for {job.model_name!r}")
        if "warmup_shape" not in options:
            shape = _warmup_shape(spec)
            if shape is not None:
                options["warmup_shape"] = shape
        backend = self._registry.create(job.backend)
        t0 = time.monotonic()
        backend.load(variant, precision=job.precision, threads=self.threads, options=options)
        info = backend.describe()
        log_event(
            logger,
            "worker.model_loaded",
            model=spec.name,
            version=spec.version,
            variant=job.variant or job.precision,
            backend=info.name,
            precision=info.precision,
            device=info.device,
            ms=round((time.monotonic() - t0) * 1000),
        )
        self._models[key] = (fingerprint, spec, backend)
        return spec, backend


def agreement(task: str, a: np.ndarray, b: np.ndarray) -> float:
    """How far two logits arrays of one series agree. Classification (K,): 1.0 when the argmax
    (label) is the same, else 0.0. Segmentation (K, *spatial): mean Dice over the foreground labels
    (1..K-1) present in either argmax map; 1.0 when neither has any foreground."""
    if a.shape != b.shape:
        return 0.0
    if task == "classification":
        return 1.0 if int(np.argmax(a)) == int(np.argmax(b)) else 0.0
    la, lb = np.argmax(a, axis=0), np.argmax(b, axis=0)
    dices = []
    for label in range(1, a.shape[0]):
        ina, inb = la == label, lb == label
        total = int(ina.sum()) + int(inb.sum())
        if total:
            dices.append(2.0 * int(np.logical_and(ina, inb).sum()) / total)
    return round(float(np.mean(dices)), 6) if dices else 1.0


def _failure_of(exc: EdgeAgentError) -> FailureKind:
    """Whose fault: the series (unreadable, or one the model's input spec cannot take), or the model."""
    return "input" if isinstance(exc, (DicomError, PreprocessError, VolumeError)) else "model"


def _fault_applies(fault: str, job: InferenceJob) -> bool:
    """Fault injection: ``FAULT`` hits every job, ``FAULT@TARGET`` only jobs of that variant or version."""
    if not fault:
        return False
    target = fault.partition("@")[2]
    return not target or target in (job.variant, job.version)


def _model_ref(spec: ModelSpec, job: InferenceJob, info: BackendInfo) -> ModelRef:
    from agent.types import ModelRef

    return ModelRef(
        name=spec.name,
        version=spec.version,
        variant=job.variant or job.precision,
        backend=info.name,
        precision=info.precision,
    )


def _warmup_shape(spec: ModelSpec) -> tuple[int, ...] | None:
    """The input shape of one inference call for this model, when the spec fixes it."""
    inp = spec.input
    if inp.dims == 3 and inp.patch_size is not None:
        return (1, inp.channels, *inp.patch_size)
    if inp.dims == 2 and inp.target_size is not None:
        return (1, inp.channels, *inp.target_size)
    return None


def _looks_like_oom(message: str) -> bool:
    """Native allocation failures reach us as backend errors (ORT: 'bad allocation', OpenVINO:
    'std::bad_alloc'); they are out-of-memory outcomes, not model errors."""
    m = message.lower()
    return "bad_alloc" in m or "bad allocation" in m or "failed to allocate" in m


class _FaultyBackend:
    """Test-only wrapper (fault injection): misbehaves on the first ``run`` call."""

    def __init__(self, inner: Backend, fault: str, memory_limit_mb: int) -> None:
        if fault not in FAULTS:
            raise BackendError(f"unknown {FAULT_ENV} value {fault!r}; expected one of {', '.join(FAULTS)}")
        self._inner, self._fault, self._limit = inner, fault, memory_limit_mb
        self.name = inner.name

    def load(self, model_path: Path, *, precision: str, threads: int, options: Mapping[str, Any]) -> None:
        self._inner.load(model_path, precision=precision, threads=threads, options=options)

    def describe(self) -> BackendInfo:
        return self._inner.describe()

    def run(self, inputs: np.ndarray) -> np.ndarray:
        fault = self._fault
        log_event(logger, "worker.fault_injected", logging.WARNING, fault=fault)
        if fault == "crash":
            os._exit(70)
        if fault == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(10)  # the signal is delivered asynchronously
        if fault == "hang":
            # like a wedged native call: ignore SIGTERM so the runner has to escalate to SIGKILL
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        if fault == "oom":
            if self._limit > 0:
                # touches the pages, so it is a real failure under RLIMIT_AS, not a lazy mapping
                np.ones((self._limit + 64) * 1024 * 1024, dtype=np.uint8)
            raise MemoryError("fault injection: oom")
        if fault == "raise":
            raise BackendError("fault injection: the backend raised")
        out = self._inner.run(inputs)
        if fault == "disagree":
            return np.ascontiguousarray(out[:, ::-1])
        return np.full_like(out, np.nan)  # "nan"
