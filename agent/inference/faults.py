"""Fault injection for the inference worker (tests only): a backend wrapper that misbehaves.

With ``InferenceRunner(..., fault_injection=True)`` -- never set by configuration in production --
``submit`` reads ``EDGE_AGENT_FAULT`` (``FAULT_ENV``) from the environment and the worker wraps the
job's backend in ``FaultyBackend``, which misbehaves at the job's first inference call: ``crash``
(``os._exit(70)``), ``segv`` (SIGSEGV to itself), ``hang`` (sleeps with SIGTERM ignored, so the
SIGKILL escalation is exercised), ``oom`` (allocates past the memory limit; raises MemoryError
directly when no limit is set), ``nan`` (the backend returns NaN), ``raise`` (the backend raises
BackendError) or ``disagree`` (the backend returns its class channels in reverse order: finite,
plausible, wrong). ``FAULT@TARGET`` limits the fault to jobs whose ``variant``, ``version`` or
model name is TARGET (``fault_applies``; the shadow FP32 run is never faulted). Without ``fault_injection`` the
variable is ignored.

Faults of the service around the worker come from a *file*, so a test can start and end them while
the agent runs: ``EDGE_AGENT_FAULT_FILE`` (``FAULT_FILE_ENV``) names a file whose first word is the
fault, active while the file exists (``file_fault``; honoured only by ``Service(...,
fault_injection=True)``): ``slow-activation`` (model activation after READY waits) and
``wedge-jobs`` (the job thread blocks inside its step, as a deadlock would: no heartbeat).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.core.errors import BackendError
from agent.core.log import log_event

if TYPE_CHECKING:
    from agent.inference.base import Backend, BackendInfo
    from agent.inference.messages import InferenceJob

# the runner's logger, as before the split: log filters and dashboards select on its name
logger = logging.getLogger("agent.inference.runner")

#: environment variable read by ``submit`` when the runner was built with ``fault_injection=True``
FAULT_ENV = "EDGE_AGENT_FAULT"
FAULTS = ("crash", "segv", "hang", "oom", "nan", "raise", "disagree")
#: environment variable naming the service-level fault file (see the module docstring)
FAULT_FILE_ENV = "EDGE_AGENT_FAULT_FILE"
FILE_FAULTS = ("slow-activation", "wedge-jobs")


def file_fault(environ: Mapping[str, str] | None = None) -> str:
    """The fault named in ``$EDGE_AGENT_FAULT_FILE`` while that file exists, else ""."""
    name = (os.environ if environ is None else environ).get(FAULT_FILE_ENV, "")
    if not name:
        return ""
    try:
        words = Path(name).read_text().split()
    except OSError:
        return ""
    return words[0] if words and words[0] in FILE_FAULTS else ""


def fault_applies(fault: str, job: InferenceJob) -> bool:
    """Fault injection: ``FAULT`` hits every job, ``FAULT@TARGET`` only jobs of that variant, version
    or model."""
    if not fault:
        return False
    target = fault.partition("@")[2]
    return not target or target in (job.variant, job.version, job.model_name)


class FaultyBackend:
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

    def run(self, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
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
