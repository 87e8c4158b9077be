"""What the host reports now: CPU, memory, temperatures, disk, process memory, GPUs.

``HostSampler(state_dir, spool_dir=, quarantine_dir=)`` -> ``sample(worker_pid)`` ->
``agent.core.telemetry.HostSample``. psutil for the host and the processes
(``sensors_temperatures`` where the platform has it); GPUs from NVML via ``pynvml`` when it is
importable and initialises, else from a Jetson's sysfs (``load`` of the integrated GPU, the GPU
thermal zone) when present, else none. Every figure a source does not give is left out (None),
never guessed; a source that fails is logged at debug level and skipped, because telemetry
must never stop the agent.

The spool and quarantine sizes are a directory walk (``os.scandir``, no symlinks followed): a few
tenths of a second on a spool of 100,000 files, once per telemetry interval, on the telemetry
thread only.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from agent.core.log import log_event
from agent.core.telemetry import GpuSample, HostSample

logger = logging.getLogger(__name__)

# The integrated GPU's load (per mille) on the Jetson generations: TX2/Xavier/Orin (L4T <= 35)
# and Orin on JetPack 6 (L4T 36, under bus@0).
_JETSON_LOAD = (
    "sys/devices/gpu.0/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/17000000.ga10b/load",
    "sys/devices/platform/17000000.ga10b/load",
    "sys/devices/platform/bus@0/17000000.gpu/load",
)
_JETSON_THERMAL = {"gpu-therm", "gpu-thermal"}


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist). Files that vanish
    during the walk (the janitor deletes, the listener renames) are skipped."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


def _free_bytes(path: Path) -> int:
    """Free bytes (for unprivileged users) of the filesystem holding ``path`` or its nearest
    existing parent (the state directory may not exist before the first start)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(psutil.disk_usage(str(p)).free)
    except OSError:
        return 0


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):  # the worker is restarting, or gone
        return None


def _temperatures() -> dict[str, float]:
    read = getattr(psutil, "sensors_temperatures", None)  # absent on macOS and Windows
    if read is None:
        return {}
    try:
        chips = read()
    except (OSError, RuntimeError) as exc:
        logger.debug("telemetry.temperatures_failed", extra={"ea_fields": {"error": str(exc)}})
        return {}
    out: dict[str, float] = {}
    for chip, entries in chips.items():
        for i, t in enumerate(entries):
            key = f"{chip}/{t.label or i}"
            if t.current is not None and key not in out:
                out[key] = round(float(t.current), 1)
    return out


class NvmlGpus:
    """GPUs via NVML (``pynvml``, from the ``nvidia-ml-py`` distribution); ``open()`` returns None
    when the module is missing or NVML does not initialise (no driver)."""

    def __init__(self, nvml: ModuleType) -> None:
        self._nvml = nvml

    @classmethod
    def open(cls) -> NvmlGpus | None:
        if importlib.util.find_spec("pynvml") is None:
            return None
        nvml = importlib.import_module("pynvml")
        try:
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError and its driver-specific subclasses
            log_event(logger, "telemetry.nvml_unavailable", logging.DEBUG, error=str(exc))
            return None
        return cls(nvml)

    def _get(self, fn: str, *args: Any) -> Any:
        """One NVML query; None when the GPU or driver does not support it."""
        try:
            return getattr(self._nvml, fn)(*args)
        except Exception:  # noqa: BLE001 - NVMLError_NotSupported and friends: the field is left out
            return None

    def sample(self) -> tuple[GpuSample, ...]:
        n = self._get("nvmlDeviceGetCount") or 0
        out = []
        for i in range(int(n)):
            h = self._get("nvmlDeviceGetHandleByIndex", i)
            if h is None:
                continue
            name = self._get("nvmlDeviceGetName", h)
            util = self._get("nvmlDeviceGetUtilizationRates", h)
            mem = self._get("nvmlDeviceGetMemoryInfo", h)
            temp = self._get("nvmlDeviceGetTemperature", h, getattr(self._nvml, "NVML_TEMPERATURE_GPU", 0))
            power_mw = self._get("nvmlDeviceGetPowerUsage", h)
            out.append(GpuSample(
                index=i, name=name.decode() if isinstance(name, bytes) else str(name or f"GPU {i}"), source="nvml",
                utilization_percent=None if util is None else float(util.gpu),
                memory_used_bytes=None if mem is None else int(mem.used),
                memory_total_bytes=None if mem is None else int(mem.total),
                temperature_c=None if temp is None else float(temp),
                power_w=None if power_mw is None else round(float(power_mw) / 1000.0, 1),
            ))
        return tuple(out)

    def close(self) -> None:
        self._get("nvmlShutdown")


class JetsonGpu:
    """A Jetson's integrated GPU from sysfs (``root``: ``/`` on a device, a fixture tree in tests):
    load and temperature; no memory figures (it shares system memory) and no power."""

    def __init__(self, load: Path, thermal: Path | None, name: str) -> None:
        self._load, self._thermal, self._name = load, thermal, name

    @classmethod
    def open(cls, root: Path = Path("/")) -> JetsonGpu | None:
        load = next((root / p for p in _JETSON_LOAD if (root / p).is_file()), None)
        if load is None:
            return None
        thermal = None
        for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
            if _read(zone / "type").lower() in _JETSON_THERMAL:
                thermal = zone / "temp"
                break
        model = _read(root / "proc/device-tree/model").replace("\x00", "")
        return cls(load, thermal, f"{model} GPU" if model else "Jetson GPU")

    def sample(self) -> tuple[GpuSample, ...]:
        load = _number(_read(self._load))
        temp = _number(_read(self._thermal)) if self._thermal is not None else None
        return (GpuSample(index=0, name=self._name, source="jetson",
                          utilization_percent=None if load is None else round(min(100.0, load / 10.0), 1),
                          temperature_c=None if temp is None else round(temp / 1000.0, 1)),)

    def close(self) -> None:
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class HostSampler:
    """Samples the host (see the module docstring). ``state_dir``: ``storage.dir`` (its
    filesystem's free space); ``spool_dir``/``quarantine_dir``: default ``state_dir/spool`` and
    ``state_dir/quarantine``; ``gpus``: False skips GPU sources; ``sysfs_root``: where to look for
    a Jetson's sysfs (tests).

    Not thread-safe: one telemetry thread samples. Call ``close()`` at shutdown (NVML).
    """

    def __init__(self, state_dir: Path, *, spool_dir: Path | None = None, quarantine_dir: Path | None = None,
                 gpus: bool = True, sysfs_root: Path = Path("/")) -> None:
        self.state_dir = Path(state_dir)
        self.spool_dir = spool_dir if spool_dir is not None else self.state_dir / "spool"
        self.quarantine_dir = quarantine_dir if quarantine_dir is not None else self.state_dir / "quarantine"
        self._proc = psutil.Process()
        self._gpu: NvmlGpus | JetsonGpu | None = None
        if gpus:
            self._gpu = NvmlGpus.open() or JetsonGpu.open(sysfs_root)
        # psutil's CPU percent is "since the previous call": prime it so the first sample covers
        # the first window instead of reading 0.0
        psutil.cpu_percent(interval=None)

    @property
    def gpu_source(self) -> str:
        """``nvml``, ``jetson`` or ``none``."""
        if isinstance(self._gpu, NvmlGpus):
            return "nvml"
        return "jetson" if isinstance(self._gpu, JetsonGpu) else "none"

    def sample(self, worker_pid: int | None = None) -> HostSample:
        """The host now; ``worker_pid``: the inference worker's pid (None: not running)."""
        mem = psutil.virtual_memory()
        try:
            load = tuple(round(float(x), 2) for x in psutil.getloadavg())
        except OSError:
            load = (0.0, 0.0, 0.0)
        gpus: tuple[GpuSample, ...] = ()
        if self._gpu is not None:
            try:
                gpus = self._gpu.sample()
            except Exception as exc:  # noqa: BLE001 - a failing GPU source must not lose the host figures
                log_event(logger, "telemetry.gpu_failed", logging.DEBUG, source=self.gpu_source, error=str(exc))
        return HostSample(
            cpu_percent=round(float(psutil.cpu_percent(interval=None)), 1),
            load_avg=(load[0], load[1], load[2]),
            memory_total_bytes=int(mem.total),
            memory_available_bytes=int(mem.available),
            temperatures_c=_temperatures(),
            state_dir_free_bytes=_free_bytes(self.state_dir),
            spool_bytes=dir_bytes(self.spool_dir),
            quarantine_bytes=dir_bytes(self.quarantine_dir),
            agent_rss_bytes=int(self._proc.memory_info().rss),
            worker_rss_bytes=_rss(worker_pid),
            gpus=gpus,
        )

    def close(self) -> None:
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
