"""The inference worker process: starting and ending it (parent side), and its main loop (child side).

Parent side, used by ``InferenceRunner``:

    proc, conn = spawn_worker(ctx, threads=0, memory_limit_mb=4096, ...)  # ready, or BackendError
    how = kill_worker(proc, grace_s)  # SIGTERM, then SIGKILL after the grace: "SIGTERM" / "SIGKILL"
    exit_reason(proc)                 # "exit code 70", "signal SIGSEGV", ...

Child side, ``worker_main``: ignore SIGINT, cap the address space at ``memory_limit_mb``
(RLIMIT_AS), set up logging, watch the parent, import the inference code (``executor``: only
here, after the limit, so a limit too low for the imports is reported as a failed start), answer
``Ready`` and then one request at a time (``agent.inference.messages``) until ``StopRequest`` or
until the pipe closes. This module itself stays light: the parent imports it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from agent.core.errors import BackendError
from agent.core.log import JsonFormatter, log_event, setup_logging
from agent.inference.messages import (
    JobRequest,
    PrefetchRequest,
    Ready,
    Reply,
    ReplyError,
    StartFailed,
    TrialRequest,
    ValidationRequest,
)

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext
    from multiprocessing.process import BaseProcess

    from agent.inference.executor import Executor

logger = logging.getLogger(__name__)


# ---- parent side ---------------------------------------------------------------------------------
def spawn_worker(
    ctx: SpawnContext,
    *,
    threads: int,
    memory_limit_mb: int,
    fault_injection: bool,
    start_timeout_s: float,
    kill_grace_s: float,
) -> tuple[BaseProcess, Connection]:
    """Start a worker and wait up to ``start_timeout_s`` for its ``Ready``. Returns the process
    and the parent's end of its pipe; BackendError saying why when it does not become ready."""
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    root = logging.getLogger()
    fmt = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "kv"
    proc = ctx.Process(
        target=worker_main,
        args=(
            child_conn,
            threads,
            memory_limit_mb,
            logging.getLevelName(root.level),
            fmt,
            fault_injection,
            os.getpid(),
        ),
        name="edge-agent-inference",
        daemon=True,  # never outlive the service
    )
    try:
        proc.start()
    except OSError as exc:  # EAGAIN / ENOMEM from fork-exec: out of processes or memory
        parent_conn.close()
        child_conn.close()
        raise BackendError(f"inference worker failed to start: {exc}") from exc
    child_conn.close()  # ours is closed so a dead worker reads as EOF on parent_conn
    ready = wait([parent_conn, proc.sentinel], timeout=start_timeout_s)
    msg: object = None
    if parent_conn in ready:
        try:
            msg = parent_conn.recv()
        except (EOFError, OSError):
            msg = None
    if isinstance(msg, Ready):
        return proc, parent_conn
    if isinstance(msg, StartFailed):
        why = msg.reason
    elif ready:  # it died: the sentinel fires a moment before the exit status can be read
        proc.join(kill_grace_s)
        why = exit_reason(proc)
    else:
        why = f"not ready after {start_timeout_s:g} s"
    kill_worker(proc, kill_grace_s)
    parent_conn.close()
    # under RLIMIT_AS a failed mmap surfaces as MemoryError, ImportError (a shared library)
    # or RuntimeError (a thread stack), or kills the worker outright
    hint = f" (is memory_limit_mb={memory_limit_mb} too low?)" if memory_limit_mb else ""
    raise BackendError(f"inference worker failed to start: {why}{hint}")


def kill_worker(proc: BaseProcess, grace_s: float) -> str:
    """Terminate ``proc``: SIGTERM, then SIGKILL after ``grace_s``. Returns which one ended it."""
    if proc.exitcode is not None:
        proc.join(0)
        return "already exited"
    proc.terminate()
    proc.join(grace_s)
    if _exitcode(proc) is None:
        proc.kill()
        proc.join(grace_s)
        return "SIGKILL"
    return "SIGTERM"


def _exitcode(proc: BaseProcess) -> int | None:
    """``proc.exitcode`` read afresh: a process ends between two looks (a plain second read of the
    property would keep the first one's narrowed type)."""
    return proc.exitcode


def exit_reason(proc: BaseProcess) -> str:
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


# ---- child side ----------------------------------------------------------------------------------
def worker_main(
    conn: Connection,
    threads: int,
    memory_limit_mb: int,
    log_level: str,
    log_format: str,
    fault_injection: bool,
    parent_pid: int,
) -> None:
    """Entry point of the worker process: set limits, then answer requests until told to stop."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(log_level, log_format)
    if memory_limit_mb > 0:
        _limit_memory(memory_limit_mb * 1024 * 1024)
    faulthandler.enable()  # a segfault in native code leaves a Python traceback on stderr
    try:
        _watch_parent(parent_pid)
        # imported here, in the worker and under the limit: the parent stays free of inference
        # libraries, and a limit too low for them is a failed start rather than a failed job
        from agent.inference.executor import Executor

        executor = Executor(threads, memory_limit_mb, fault_injection)
    except (ImportError, MemoryError, RuntimeError) as exc:  # RuntimeError: can't start a thread
        conn.send(StartFailed(f"{type(exc).__name__}: {exc or 'allocation failed'}"))
        return
    conn.send(Ready(os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if not isinstance(msg, (JobRequest, TrialRequest, ValidationRequest, PrefetchRequest)):
            return  # StopRequest (or anything this worker does not understand)
        reply = _answer(executor, msg)
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(ReplyError(f"prediction cannot be returned: {exc}"))
        except OSError:
            return  # the parent is gone


#: the worker's exit status when its resident memory passed ``memory_limit_mb`` (GPU hosts)
EXIT_MEMORY_LIMIT = 75
#: device nodes whose presence means CUDA may be initialised in this process (desktop/datacentre, Jetson)
_CUDA_NODES = ("/dev/nvidiactl", "/dev/nvhost-ctrl", "/dev/nvgpu")


def _limit_memory(limit: int, *, cuda: bool | None = None, every_s: float = 0.2) -> None:
    """Cap the worker's memory at ``limit`` bytes. Without CUDA: its address space (RLIMIT_AS), so
    an allocation past it fails at once as a MemoryError. With CUDA the driver reserves tens of GB
    of address space at initialisation, which RLIMIT_AS would refuse: resident memory is watched
    instead, and past the limit the worker exits with ``EXIT_MEMORY_LIMIT`` (the runner reports
    the job ``oom``, not the model's fault)."""
    if cuda is None:
        cuda = any(os.path.exists(node) for node in _CUDA_NODES)
    if not cuda:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def watch() -> None:
        while True:
            try:
                with open("/proc/self/statm", "rb") as f:
                    resident = int(f.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                return  # no procfs: nothing to watch with (the service manager's MemoryMax still holds)
            if resident > limit:
                log_event(logger, "worker.memory_limit", logging.ERROR, resident_mb=resident >> 20,
                          limit_mb=limit >> 20)
                os._exit(EXIT_MEMORY_LIMIT)
            time.sleep(every_s)

    threading.Thread(target=watch, name="memory-watch", daemon=True).start()
    log_event(logger, "worker.memory_watch", limit_mb=limit >> 20, reason="CUDA device present: RLIMIT_AS not set")


def _answer(
    executor: Executor, msg: JobRequest | TrialRequest | ValidationRequest | PrefetchRequest
) -> Reply:
    """The executor's outcome for one request (it never raises for a request's failure)."""
    if isinstance(msg, TrialRequest):
        return executor.trial(msg)
    if isinstance(msg, ValidationRequest):
        return executor.validate(msg)
    if isinstance(msg, PrefetchRequest):
        return executor.prefetch(msg.paths)
    return executor.run(msg.job, msg.fault)


def _watch_parent(parent_pid: int, every_s: float = 2.0) -> None:
    """Exit when the parent is gone (SIGKILLed, crashed): an orphan would otherwise finish, or
    hang in, its current job holding memory and cores. The pipe only tells us between jobs."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent_pid:  # re-parented to init or a subreaper
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
