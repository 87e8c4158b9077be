"""Where the probe reads from, and how it reads without hanging or importing.

``ProbeSources`` names every file and command the probe reads, so tests feed recorded fixtures.
The helpers are the probe's only ways of reading the system:

* ``read_text(path)``: a small system file as text ("" when absent: the common case off Jetson);
* ``run_bounded(argv, timeout_s)``: a child process that never blocks past its timeout, its whole
  process group killed on timeout;
* ``package_version(module)``: an installed package's version without importing it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.core.log import log_event

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSources:
    """Where the probe reads from; tests point these at recorded fixtures.

    ``machine``: overrides ``platform.machine()``; ``nvidia_smi``: the command (argv prefix);
    ``use_nvml``: try ``pynvml`` first when it is installed; ``live``: the sources describe the
    running system, so psutil may fill in what a fixture file lacks (physical cores, RAM).
    """

    cpuinfo: Path = Path("/proc/cpuinfo")
    machine: str | None = None
    nv_tegra_release: Path = Path("/etc/nv_tegra_release")
    device_tree_model: Path = Path("/proc/device-tree/model")
    os_release: Path = Path("/etc/os-release")
    cuda_home: Path = Path("/usr/local/cuda")
    nvidia_smi: tuple[str, ...] = ("nvidia-smi",)
    smi_timeout_s: float = 3.0
    use_nvml: bool = True
    backends_timeout_s: float = 60.0
    live: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)


def read_text(path: Path) -> str:
    """``path`` as text, NULs (device-tree strings) and surrounding blanks removed; "" when unreadable."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace").replace("\x00", "").strip()
    except OSError:  # absent on non-Jetson machines: the common case
        return ""


def run_bounded(argv: Sequence[str], timeout_s: float,
                env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``argv``, return (returncode, stdout, stderr); never blocks past ``timeout_s``.

    The child gets its own process group, killed as a whole on timeout: ``subprocess.run(timeout=)``
    kills only the direct child and then waits for the pipes, which a grandchild (a wrapper script's
    ``sleep``, a hung driver call) keeps open for as long as it lives.
    Raises FileNotFoundError for a missing binary, TimeoutError on timeout, OSError otherwise.
    """
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=None if env is None else {**os.environ, **env},
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # exited between the timeout and the kill
            log_event(logger, "probe.child_gone", logging.DEBUG, argv=argv[0])
        proc.communicate()
        raise TimeoutError(f"{argv[0]} did not answer within {timeout_s:g} s") from exc
    return proc.returncode, out, err


def package_version(module: str, distributions: Sequence[str] = ()) -> str | None:
    """Version of an installed package without importing it: distribution metadata first, then a
    ``__version__ = "..."`` literal in the module's ``__init__.py`` (JetPack's python3-libnvinfer has
    no pip metadata). None when the module is not installed; "unknown" when no version is found."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for dist in (*distributions, module):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if spec.origin and spec.origin.endswith(".py"):
        try:
            m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", Path(spec.origin).read_text(), re.M)
        except OSError:
            m = None
        if m:
            return m.group(1)
    return "unknown"
