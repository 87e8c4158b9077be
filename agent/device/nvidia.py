"""The NVIDIA stack: GPUs, driver and CUDA versions, TensorRT, Jetson boards.

``probe_nvidia(sources) -> NvidiaInfo`` lists GPUs from NVML (``pynvml``, when installed) or
``nvidia-smi`` (3 s timeout, process group killed on timeout, absent binary = no GPU), each with
compute capability, memory, ``int8`` (CC >= 6.1) and ``fp8`` (CC >= 8.9); driver and CUDA
versions; the TensorRT version from package metadata (TensorRT is *not* imported); Jetson boards
from ``/etc/nv_tegra_release`` and the device-tree model (Orin: CC 8.7, INT8 yes, FP8 no).
Never raises for missing hardware or tools: absent means "not available", and a stack that looks
present but lists no GPU says why in ``NvidiaInfo.error``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.core.log import log_event
from agent.device.sources import ProbeSources, package_version, read_text, run_bounded

logger = logging.getLogger(__name__)

#: TensorRT precision thresholds (compute capability): INT8 tensor ops from 6.1, FP8 from 8.9 (Ada, Hopper).
INT8_MIN_CC = (6, 1)
FP8_MIN_CC = (8, 9)

#: the `tensorrt` metapackage, or the per-CUDA packages that actually ship the module
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings",
                          "tensorrt-cu12-bindings")

#: Jetson modules by device-tree model keyword -> compute capability (CUDA documentation). Checked in
#: order: "orin nano" must match Orin before the older "nano".
_JETSON_CC: tuple[tuple[str, str, str], ...] = (
    ("orin", "orin", "8.7"),
    ("xavier", "xavier", "7.2"),
    ("tx2", "tx2", "6.2"),
    ("tx1", "tx1", "5.3"),
    ("nano", "nano", "5.3"),
)

_SMI_QUERY = "--query-gpu=name,compute_cap,memory.total,driver_version"
_SMI_QUERY_OLD = "--query-gpu=name,memory.total,driver_version"  # drivers before compute_cap existed
_NA = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]"}


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU. ``compute_capability`` is "major.minor" (None: unknown, nothing GPU-specific
    is then considered compatible); ``memory_mb`` is the board memory (system RAM on Jetson)."""

    index: int
    name: str
    compute_capability: str | None
    memory_mb: int | None
    int8: bool
    fp8: bool
    jetson: bool = False


@dataclass(frozen=True)
class JetsonInfo:
    """A Jetson board: device-tree ``model``, ``module`` family (orin, xavier, ...), L4T release."""

    model: str
    module: str
    l4t: str | None


@dataclass(frozen=True)
class NvidiaInfo:
    """NVIDIA stack. ``source``: where the GPU list came from (nvml, nvidia-smi, jetson, none);
    ``error``: why a present-looking stack listed no GPU ("" when fine or simply absent)."""

    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    tensorrt_version: str | None = None
    jetson: JetsonInfo | None = None
    source: str = "none"
    error: str = ""


def cc_tuple(cc: str | None) -> tuple[int, int] | None:
    """"8.9" -> (8, 9); None or garbage -> None."""
    if not cc:
        return None
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", cc)
    return (int(m.group(1)), int(m.group(2))) if m else None


def gpu_info(index: int, name: str, cc: str | None, memory_mb: int | None, jetson: bool = False) -> GpuInfo:
    """A GpuInfo with its compute capability normalised and ``int8``/``fp8`` derived from it."""
    t = cc_tuple(cc)
    return GpuInfo(
        index=index,
        name=name,
        compute_capability=f"{t[0]}.{t[1]}" if t else None,
        memory_mb=memory_mb,
        int8=t is not None and t >= INT8_MIN_CC,
        fp8=t is not None and t >= FP8_MIN_CC,
        jetson=jetson,
    )


def parse_smi_csv(text: str, with_cc: bool = True) -> tuple[list[GpuInfo], str | None]:
    """Parse ``nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,
    noheader,nounits`` output -> (GPUs, driver version). Unparsable lines are skipped (logged)."""
    gpus: list[GpuInfo] = []
    driver: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        expected = 4 if with_cc else 3
        if len(cells) != expected:
            log_event(logger, "probe.smi_unparsed", logging.WARNING, line=line[:200])
            continue
        if with_cc:
            name, cc, mem, drv = cells
        else:
            (name, mem, drv), cc = cells, ""
        cc_val = None if cc.lower() in _NA else cc
        mem_val = int(float(mem)) if re.fullmatch(r"\d+(\.\d+)?", mem) else None
        gpus.append(gpu_info(len(gpus), name, cc_val, mem_val))
        if drv.lower() not in _NA:
            driver = drv
    return gpus, driver


def _smi(sources: ProbeSources) -> tuple[list[GpuInfo], str | None, str | None, str]:
    """GPUs via nvidia-smi -> (gpus, driver, cuda_version, error)."""
    base = list(sources.nvidia_smi)
    try:
        rc, out, err = run_bounded([*base, _SMI_QUERY, "--format=csv,noheader,nounits"],
                                   sources.smi_timeout_s, sources.extra_env)
        with_cc = True
        if rc != 0 and "compute_cap" in (out + err):
            # drivers older than ~510 do not know the compute_cap field: list the GPUs anyway,
            # with an unknown CC (no GPU variant will then be chosen for them)
            rc, out, err = run_bounded([*base, _SMI_QUERY_OLD, "--format=csv,noheader,nounits"],
                                       sources.smi_timeout_s, sources.extra_env)
            with_cc = False
    except FileNotFoundError:
        return [], None, None, ""  # no NVIDIA driver installed: the normal CPU-only case
    except (TimeoutError, OSError) as exc:
        return [], None, None, f"nvidia-smi: {exc}"
    if rc != 0:
        msg = (err.strip() or out.strip()).splitlines()
        return [], None, None, f"nvidia-smi exited {rc}: {msg[0][:200] if msg else 'no output'}"
    gpus, driver = parse_smi_csv(out, with_cc=with_cc)
    cuda = None
    try:
        rc2, banner, _ = run_bounded(base, sources.smi_timeout_s, sources.extra_env)
        m = re.search(r"CUDA Version:\s*([\d.]+)", banner) if rc2 == 0 else None
        cuda = m.group(1) if m else None
    except (TimeoutError, OSError) as exc:
        log_event(logger, "probe.smi_banner_failed", logging.WARNING, error=exc)
    return gpus, driver, cuda, ""


def _nvml() -> tuple[list[GpuInfo], str | None, str | None] | None:
    """GPUs via pynvml, or None when pynvml is absent or NVML cannot initialise (then nvidia-smi)."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    # optional and light (ctypes over libnvidia-ml); imported by name because it ships no type
    # information, so its calls are typed Any here
    pynvml = importlib.import_module("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log_event(logger, "probe.nvml_unavailable", logging.DEBUG, error=exc)
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            mem = int(pynvml.nvmlDeviceGetMemoryInfo(h).total) // (1024 * 1024)
            gpus.append(gpu_info(i, name, f"{major}.{minor}", mem))
        drv = pynvml.nvmlSystemGetDriverVersion()
        drv = drv.decode() if isinstance(drv, bytes) else str(drv)
        cuda_int = int(pynvml.nvmlSystemGetCudaDriverVersion())
        cuda = f"{cuda_int // 1000}.{(cuda_int % 1000) // 10}"
        return gpus, drv, cuda
    except pynvml.NVMLError as exc:
        log_event(logger, "probe.nvml_failed", logging.WARNING, error=exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log_event(logger, "probe.nvml_shutdown_failed", logging.DEBUG, error=exc)


def parse_tegra_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 3.0, ...`` -> "36.3.0" (the L4T version); None if not matched."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def probe_jetson(sources: ProbeSources) -> JetsonInfo | None:
    """A Jetson board, from ``/etc/nv_tegra_release`` and/or a device-tree model naming Jetson."""
    release = read_text(sources.nv_tegra_release)
    model = read_text(sources.device_tree_model)
    if not release and "jetson" not in model.lower():
        return None
    lower = model.lower()
    module = next((fam for key, fam, _cc in _JETSON_CC if key in lower), "unknown")
    return JetsonInfo(model=model or "NVIDIA Jetson (unknown model)", module=module,
                      l4t=parse_tegra_release(release))


def _jetson_cc(module: str) -> str | None:
    return next((cc for _key, fam, cc in _JETSON_CC if fam == module), None)


def _cuda_home_version(cuda_home: Path) -> str | None:
    """The CUDA toolkit version from ``<cuda_home>/version.json`` (CUDA >= 11) or ``version.txt``."""
    try:
        doc = json.loads((cuda_home / "version.json").read_text())
        v = doc.get("cuda", {}).get("version")
        if v:
            return ".".join(str(v).split(".")[:2])
    except (OSError, ValueError, AttributeError):
        log_event(logger, "probe.cuda_version_json_unreadable", logging.DEBUG, path=str(cuda_home))
    m = re.search(r"CUDA Version\s+([\d.]+)", read_text(cuda_home / "version.txt"))
    return ".".join(m.group(1).split(".")[:2]) if m else None


def probe_nvidia(sources: ProbeSources) -> NvidiaInfo:
    """NVIDIA GPUs (NVML, else nvidia-smi, else the Jetson board tables), driver/CUDA/TensorRT versions."""
    jetson = probe_jetson(sources)
    trt = package_version("tensorrt", TENSORRT_DISTRIBUTIONS)
    gpus: list[GpuInfo] = []
    driver = cuda = None
    error = ""
    source = "none"
    got = _nvml() if sources.use_nvml else None
    if got is not None:
        gpus, driver, cuda = got
        source = "nvml"
    else:
        gpus, driver, cuda, error = _smi(sources)
        source = "nvidia-smi" if gpus else "none"
    if jetson is not None:
        cc = _jetson_cc(jetson.module)
        mem = _jetson_memory_mb(sources)
        if gpus:
            # JetPack 6's nvidia-smi lists the integrated GPU but may leave fields N/A: fill them in
            gpus = [gpu_info(g.index, g.name, g.compute_capability or cc, g.memory_mb or mem, jetson=True)
                    for g in gpus]
        else:
            gpus = [gpu_info(0, jetson.model, cc, mem, jetson=True)]
            source = "jetson"
            error = ""
        cuda = cuda or _cuda_home_version(sources.cuda_home)
    return NvidiaInfo(gpus=tuple(gpus), driver_version=driver, cuda_version=cuda,
                      tensorrt_version=trt, jetson=jetson, source=source, error=error)


def _jetson_memory_mb(sources: ProbeSources) -> int | None:
    # The Jetson GPU shares system RAM; a fixture machine's RAM says nothing about the board.
    return int(psutil.virtual_memory().total // (1024 * 1024)) if sources.live else None
