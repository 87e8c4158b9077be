"""Capability probe: what this device can run, read from the kernel and the driver, never guessed.

``probe(state_dir) -> Probe`` gathers, in well under a second on a CPU-only device:

* CPU: architecture (``x86_64`` / ``aarch64``), model name, cores, and the instruction-set features
  the kernel reports (``/proc/cpuinfo`` ``flags`` on x86, ``Features`` on ARM: that line *is* the
  kernel's HWCAP list, which Python has no ``getauxval`` for). Derived: ``int8_path`` (``vnni``,
  ``avx2``, ``arm_dotprod`` or ``none``) and ``bf16``.
* NVIDIA: GPUs from NVML (``pynvml``, when installed) or ``nvidia-smi`` (3 s timeout, process group
  killed on timeout, absent binary = no GPU), each with compute capability, memory, ``int8``
  (CC >= 6.1) and ``fp8`` (CC >= 8.9); driver and CUDA versions; the TensorRT version from package
  metadata (TensorRT is *not* imported); Jetson boards from ``/etc/nv_tegra_release`` and the
  device-tree model (Orin: CC 8.7, INT8 yes, FP8 no).
* Memory, free disk under the state directory, OS, and which inference backends are installed.
  Listing ONNX Runtime's execution providers and OpenVINO's devices needs importing them, which the
  DICOM listener's process must not do: with ``backend_details=True`` that import happens in a
  short-lived child process (``python -c``), never in the caller.

Every path and command is injectable through ``ProbeSources`` so tests feed recorded fixtures.
``compatible(requires, probe)`` evaluates a manifest variant's ``requires`` block against a probe.
The JSON form is documented in docs/probe.md (``schema: "edge-agent/probe/1"``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.isa import describe_family, isa_family
from agent.log import log_event

logger = logging.getLogger(__name__)

SCHEMA = "edge-agent/probe/1"

#: Features the agent's variant selection cares about, per architecture, as the kernel names them.
X86_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve")

INT8_PATHS = ("vnni", "avx2", "arm_dotprod", "none")

#: TensorRT precision thresholds (compute capability): INT8 tensor ops from 6.1, FP8 from 8.9 (Ada, Hopper).
INT8_MIN_CC = (6, 1)
FP8_MIN_CC = (8, 9)

#: Jetson modules by device-tree model keyword -> compute capability (CUDA documentation). Checked in
#: order: "orin nano" must match Orin before the older "nano".
_JETSON_CC: tuple[tuple[str, str, str], ...] = (
    ("orin", "orin", "8.7"),
    ("xavier", "xavier", "7.2"),
    ("tx2", "tx2", "6.2"),
    ("tx1", "tx1", "5.3"),
    ("nano", "nano", "5.3"),
)

#: ARM "CPU implementer"/"CPU part" -> core name, only to print a readable model name (features are
#: never derived from it).
_ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4f"): "Neoverse-V2", ("0x4e", "0x004"): "NVIDIA Carmel",
}

_BACKEND_DISTRIBUTIONS: Mapping[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "openvino": ("openvino",),
    # the `tensorrt` metapackage, or the per-CUDA packages that actually ship the module
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings",
                 "tensorrt-cu12-bindings"),
}
BACKENDS = tuple(_BACKEND_DISTRIBUTIONS)

_SMI_QUERY = "--query-gpu=name,compute_cap,memory.total,driver_version"
_SMI_QUERY_OLD = "--query-gpu=name,memory.total,driver_version"  # drivers before compute_cap existed
_NA = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]"}


# ------------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as the kernel reports it.

    ``features``: the tracked features (``X86_FEATURES`` / ``ARM_FEATURES``) present, in that order;
    ``flags``: every flag the kernel lists (sorted), so ``requires.cpu_features`` may name any of them.
    ``physical_cores`` is None where the kernel does not say; ``usable_cores`` honours CPU affinity.
    """

    arch: str
    model: str
    logical_cores: int
    physical_cores: int | None
    usable_cores: int
    features: tuple[str, ...]
    flags: tuple[str, ...]
    int8_path: str
    bf16: bool
    isa_family: str = ""  # agent.isa: the family whose gate verdicts apply; derived from arch + flags

    def __post_init__(self) -> None:
        if not self.isa_family:  # frozen: set once, here, so a CpuInfo built anywhere has it right
            object.__setattr__(self, "isa_family", isa_family(self.arch, self.flags))


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


@dataclass(frozen=True)
class MemoryInfo:
    total_mb: int
    available_mb: int


@dataclass(frozen=True)
class DiskInfo:
    """Space on the file system holding ``path`` (the state directory, or its nearest existing parent)."""

    path: str
    total_mb: int
    free_mb: int


@dataclass(frozen=True)
class OsInfo:
    system: str
    release: str
    distro: str
    python: str


@dataclass(frozen=True)
class BackendProbe:
    """One inference backend: installed (package found), its version, and, when ``backend_details``
    was asked for, the devices / execution providers it reports (``error`` says what went wrong)."""

    name: str
    installed: bool
    version: str | None = None
    devices: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class Probe:
    """Everything ``probe()`` found. ``to_json()`` is the documented, stable form (docs/probe.md)."""

    cpu: CpuInfo
    nvidia: NvidiaInfo
    memory: MemoryInfo
    disk: DiskInfo
    os: OsInfo
    backends: tuple[BackendProbe, ...]
    probed_at: float = 0.0  # epoch seconds
    schema: str = SCHEMA

    def backend(self, name: str) -> BackendProbe | None:
        """The entry for backend ``name`` or None."""
        return next((b for b in self.backends if b.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists), as ``to_json`` writes it."""
        doc: dict[str, Any] = json.loads(self.to_json())
        return doc

    def to_json(self, indent: int | None = None) -> str:
        """Stable JSON: sorted keys, so two probes of the same device diff cleanly."""
        return json.dumps(asdict(self), sort_keys=True, indent=indent)

    def summary(self) -> dict[str, Any]:
        """The short form for the MQTT status birth message."""
        return {
            "arch": self.cpu.arch,
            "features": list(self.cpu.features),
            "int8_path": self.cpu.int8_path,
            "isa_family": self.cpu.isa_family,
            "bf16": self.cpu.bf16,
            "gpus": [{"name": g.name, "cc": g.compute_capability, "int8": g.int8, "fp8": g.fp8}
                     for g in self.nvidia.gpus],
            "jetson": self.nvidia.jetson.model if self.nvidia.jetson else None,
            "backends": [b.name for b in self.backends if b.installed and not b.error],
        }


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


# -------------------------------------------------------------------------------------------- CPU


def normalise_arch(machine: str) -> str:
    """``platform.machine()`` spelling -> ``x86_64`` / ``aarch64`` (others lower-cased as given)."""
    m = machine.strip().lower()
    if m in {"x86_64", "amd64", "x64"}:
        return "x86_64"
    if m in {"aarch64", "arm64", "armv8l"}:
        return "aarch64"
    return m


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """Split ``/proc/cpuinfo`` into blocks (one per processor, plus trailing global blocks)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def _cpu_flags(blocks: Sequence[Mapping[str, str]]) -> set[str]:
    """Flags every processor has: the intersection, since a job may run on any core (a feature only
    some cores have would fault when the scheduler moves the thread)."""
    lists = [b.get("flags") or b.get("features") for b in blocks]
    sets = [set(s.split()) for s in lists if s]
    if not sets:
        return set()
    common = set(sets[0])
    for s in sets[1:]:
        common &= s
    return common


def derive_int8_path(arch: str, flags: set[str] | frozenset[str]) -> str:
    """Which integer dot-product path the CPU offers: ``vnni`` (AVX512-VNNI or AVX-VNNI), ``avx2``
    (pmaddubsw, slower), ``arm_dotprod`` (SDOT/UDOT, the ``asimddp`` HWCAP) or ``none``."""
    if arch == "x86_64":
        if "avx512_vnni" in flags or "avx_vnni" in flags:
            return "vnni"
        if "avx2" in flags:
            return "avx2"
        return "none"
    if arch == "aarch64" and "asimddp" in flags:
        return "arm_dotprod"
    return "none"


def derive_bf16(arch: str, flags: set[str] | frozenset[str]) -> bool:
    """Native bf16 arithmetic: AVX512_BF16 / AMX-BF16 on x86, the ``bf16`` HWCAP on ARM."""
    if arch == "x86_64":
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return arch == "aarch64" and "bf16" in flags


def _cpu_model(blocks: Sequence[Mapping[str, str]], dt_model: str) -> str:
    for b in blocks:
        if b.get("model name"):
            return b["model name"]
    for b in blocks:
        impl, part = b.get("cpu implementer", "").lower(), b.get("cpu part", "").lower()
        if impl and part:
            return _ARM_PARTS.get((impl, part), f"implementer {impl} part {part}")
    for b in blocks:
        if b.get("hardware"):
            return b["hardware"]
    return dt_model or "unknown"


def probe_cpu(sources: ProbeSources, dt_model: str = "") -> CpuInfo:
    """Read the CPU from ``sources.cpuinfo`` (+ the machine name). Never raises on odd files: a
    missing or unreadable cpuinfo gives an empty feature set, i.e. the FP32 safety net only."""
    arch = normalise_arch(sources.machine or platform.machine())
    try:
        text = sources.cpuinfo.read_text(errors="replace")
    except OSError as exc:
        log_event(logger, "probe.cpuinfo_unreadable", logging.WARNING, path=str(sources.cpuinfo), error=exc)
        text = ""
    blocks = parse_cpuinfo(text)
    flags = _cpu_flags(blocks)
    tracked = X86_FEATURES if arch == "x86_64" else ARM_FEATURES if arch == "aarch64" else ()
    procs = [b for b in blocks if b.get("processor", "").isdigit()]
    logical = len(procs) or ((os.cpu_count() or 1) if sources.live else 1)
    pairs = {(b.get("physical id"), b["core id"]) for b in procs if "core id" in b}
    physical: int | None = len(pairs) if pairs else None
    if physical is None and sources.live:
        physical = psutil.cpu_count(logical=False)
    usable = logical
    if sources.live and hasattr(os, "sched_getaffinity"):
        usable = len(os.sched_getaffinity(0))
    return CpuInfo(
        arch=arch,
        model=_cpu_model(blocks, dt_model),
        logical_cores=logical,
        physical_cores=physical,
        usable_cores=usable,
        features=tuple(f for f in tracked if f in flags),
        flags=tuple(sorted(flags)),
        int8_path=derive_int8_path(arch, flags),
        bf16=derive_bf16(arch, flags),
    )


# ----------------------------------------------------------------------------------------- NVIDIA


def cc_tuple(cc: str | None) -> tuple[int, int] | None:
    """"8.9" -> (8, 9); None or garbage -> None."""
    if not cc:
        return None
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", cc)
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """"10.3.0.26" -> (10, 3, 0, 26); leading numeric components only; None when none."""
    if not version:
        return None
    parts = []
    for piece in re.split(r"[.+\-]", version.strip()):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts) or None


def _version_ge(have: tuple[int, ...], need: tuple[int, ...]) -> bool:
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def _gpu(index: int, name: str, cc: str | None, memory_mb: int | None, jetson: bool = False) -> GpuInfo:
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
        gpus.append(_gpu(len(gpus), name, cc_val, mem_val))
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
    import pynvml  # optional; light (ctypes over libnvidia-ml)

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
            gpus.append(_gpu(i, name, f"{major}.{minor}", mem))
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


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace").replace("\x00", "").strip()
    except OSError:  # absent on non-Jetson machines: the common case
        return ""


def parse_tegra_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 3.0, ...`` -> "36.3.0" (the L4T version); None if not matched."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def probe_jetson(sources: ProbeSources) -> JetsonInfo | None:
    """A Jetson board, from ``/etc/nv_tegra_release`` and/or a device-tree model naming Jetson."""
    release = _read_text(sources.nv_tegra_release)
    model = _read_text(sources.device_tree_model)
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
    m = re.search(r"CUDA Version\s+([\d.]+)", _read_text(cuda_home / "version.txt"))
    return ".".join(m.group(1).split(".")[:2]) if m else None


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


def probe_nvidia(sources: ProbeSources) -> NvidiaInfo:
    """NVIDIA GPUs (NVML, else nvidia-smi, else the Jetson board tables), driver/CUDA/TensorRT versions."""
    jetson = probe_jetson(sources)
    trt = package_version("tensorrt", _BACKEND_DISTRIBUTIONS["tensorrt"])
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
            gpus = [_gpu(g.index, g.name, g.compute_capability or cc, g.memory_mb or mem, jetson=True)
                    for g in gpus]
        else:
            gpus = [_gpu(0, jetson.model, cc, mem, jetson=True)]
            source = "jetson"
            error = ""
        cuda = cuda or _cuda_home_version(sources.cuda_home)
    return NvidiaInfo(gpus=tuple(gpus), driver_version=driver, cuda_version=cuda,
                      tensorrt_version=trt, jetson=jetson, source=source, error=error)


def _jetson_memory_mb(sources: ProbeSources) -> int | None:
    # The Jetson GPU shares system RAM; a fixture machine's RAM says nothing about the board.
    return int(psutil.virtual_memory().total // (1024 * 1024)) if sources.live else None


# --------------------------------------------------------------------------- backends, OS, memory

# Runs in a child interpreter: imports each installed backend and lists what it can use.
_BACKEND_CHILD = r"""
import json, sys
out = {}
for name in sys.argv[1:]:
    try:
        if name == "onnxruntime":
            import onnxruntime
            out[name] = {"devices": list(onnxruntime.get_available_providers())}
        elif name == "openvino":
            import openvino
            out[name] = {"devices": list(openvino.Core().available_devices)}
        elif name == "tensorrt":
            import tensorrt
            out[name] = {"devices": ["cuda"], "version": tensorrt.__version__}
    except Exception as exc:  # report any import/initialisation failure to the parent
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


def probe_backends(sources: ProbeSources, details: bool, gpus: Sequence[GpuInfo] = ()) -> tuple[BackendProbe, ...]:
    """Installed backends (by package spec + metadata); with ``details`` their devices/providers,
    listed by a child interpreter so the calling process never imports onnxruntime/openvino."""
    found = {name: package_version(name, dists) for name, dists in _BACKEND_DISTRIBUTIONS.items()}
    installed = [n for n, v in found.items() if v is not None]
    extra: dict[str, dict[str, Any]] = {}
    child_error = ""
    if details and installed:
        try:
            rc, out, err = run_bounded([sys.executable, "-c", _BACKEND_CHILD, *installed],
                                       sources.backends_timeout_s, sources.extra_env)
            if rc == 0:
                extra = json.loads(out.strip().splitlines()[-1])
            else:
                child_error = f"backend probe exited {rc}: {err.strip()[-300:]}"
        except (TimeoutError, OSError, ValueError, IndexError) as exc:
            child_error = f"backend probe failed: {exc}"
    result = []
    for name in BACKENDS:
        version = found[name]
        if version is None:
            result.append(BackendProbe(name=name, installed=False))
            continue
        info = extra.get(name, {})
        error = str(info.get("error", "")) or (child_error if details else "")
        if name == "tensorrt" and not error:
            if not gpus:
                error = "no NVIDIA GPU"
            elif importlib.util.find_spec("cuda") is None and importlib.util.find_spec("pycuda") is None:
                error = "no CUDA Python binding (install cuda-python or pycuda)"
        result.append(BackendProbe(name=name, installed=True, version=version,
                                   devices=tuple(str(d) for d in info.get("devices", ())), error=error))
    return tuple(result)


def probe_os(sources: ProbeSources) -> OsInfo:
    distro = ""
    for line in _read_text(sources.os_release).splitlines():
        if line.startswith("PRETTY_NAME="):
            distro = line.partition("=")[2].strip().strip('"')
    return OsInfo(system=platform.system(), release=platform.release(), distro=distro,
                  python=platform.python_version())


def probe_disk(state_dir: Path) -> DiskInfo:
    """Free space where the state directory lives (its nearest existing ancestor if not created yet)."""
    path = Path(state_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return DiskInfo(path=str(Path(state_dir)), total_mb=usage.total // 2**20, free_mb=usage.free // 2**20)


def probe(state_dir: Path, *, sources: ProbeSources | None = None, backend_details: bool = False) -> Probe:
    """Probe this device. ``state_dir``: where models and engines go (its free space is reported).

    ``backend_details=True`` also lists ONNX Runtime providers / OpenVINO devices through a child
    interpreter (about a second); the default reads package metadata only, cheap enough for the
    listener process. Never raises for missing hardware or tools: absent means "not available".
    """
    src = sources or ProbeSources()
    dt_model = _read_text(src.device_tree_model)
    cpu = probe_cpu(src, dt_model)
    nvidia = probe_nvidia(src)
    vm = psutil.virtual_memory()
    p = Probe(
        cpu=cpu,
        nvidia=nvidia,
        memory=MemoryInfo(total_mb=vm.total // 2**20, available_mb=vm.available // 2**20),
        disk=probe_disk(state_dir),
        os=probe_os(src),
        backends=probe_backends(src, backend_details, nvidia.gpus),
        probed_at=round(time.time(), 3),
    )
    log_event(logger, "probe.done", arch=cpu.arch, int8_path=cpu.int8_path, bf16=cpu.bf16,
              gpus=len(nvidia.gpus), nvidia_source=nvidia.source, nvidia_error=nvidia.error)
    return p


# ---------------------------------------------------------------------------------- compatibility


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def compatible(requires: Mapping[str, Any] | Any, probe: Probe, backend: str | None = None) -> tuple[bool, str]:
    """Can a variant with this ``requires`` block run here? Returns (ok, reason); the reason names
    the first unmet requirement ("" when ok).

    ``requires`` is agent.manifest.Requires (or its ``model_dump()``); keys, all optional, an empty
    block meaning "runs anywhere" (the FP32 safety net):
      ``arch``: acceptable architectures ("x86_64", "aarch64"); empty: any;
      ``cpu_features``: kernel flag names that must ALL be present (e.g. ["avx512_vnni"]);
      ``cpu_features_any``: flag names of which at least one must be present;
      ``gpu``: needs an NVIDIA GPU; ``gpu_compute_capability_min`` / ``_max``: "major.minor",
      inclusive: one of the device's GPUs must lie in the range (implies ``gpu``);
      ``tensorrt_min``: TensorRT installed, at least this version;
      ``backend_min_version``: with ``backend`` given, that backend installed at least this version.
    ``backend``: the variant's backend; when given it must be installed and importable here.
    Unknown keys make the variant incompatible: an old agent must not run what it does not understand.
    """
    req: Mapping[str, Any] = requires.model_dump() if hasattr(requires, "model_dump") else requires
    known = {"arch", "cpu_features", "cpu_features_any", "gpu", "gpu_compute_capability_min",
             "gpu_compute_capability_max", "tensorrt_min", "backend_min_version"}
    unknown = sorted(k for k, v in req.items() if k not in known and v not in (None, (), [], False))
    if unknown:
        return False, f"unknown requirement(s) {', '.join(unknown)}: this agent is too old for the variant"
    archs = [normalise_arch(a) for a in _as_list(req.get("arch"))]
    if archs and probe.cpu.arch not in archs:
        return False, f"needs arch {'/'.join(archs)}, this is {probe.cpu.arch}"
    missing = [f for f in _as_list(req.get("cpu_features")) if f.lower() not in probe.cpu.flags]
    if missing:
        return False, f"CPU lacks {', '.join(missing)}"
    any_of = _as_list(req.get("cpu_features_any"))
    if any_of and not any(f.lower() in probe.cpu.flags for f in any_of):
        return False, f"CPU has none of {', '.join(any_of)}"
    cc_min_s, cc_max_s = req.get("gpu_compute_capability_min"), req.get("gpu_compute_capability_max")
    if req.get("gpu") or cc_min_s is not None or cc_max_s is not None:
        lo = cc_tuple(str(cc_min_s)) if cc_min_s is not None else (0, 0)
        hi = cc_tuple(str(cc_max_s)) if cc_max_s is not None else (999, 0)
        if lo is None or hi is None:
            return False, f"malformed compute capability range {cc_min_s!r}..{cc_max_s!r}"
        if not probe.nvidia.gpus:
            return False, "needs an NVIDIA GPU, none found" + (
                f" ({probe.nvidia.error})" if probe.nvidia.error else "")
        ccs = [cc_tuple(g.compute_capability) for g in probe.nvidia.gpus]
        if not any(c is not None and lo <= c <= hi for c in ccs):
            have = ", ".join(g.compute_capability or "unknown" for g in probe.nvidia.gpus)
            return False, f"needs GPU compute capability {cc_min_s or 'any'}..{cc_max_s or 'any'}, found {have}"
    trt_min = req.get("tensorrt_min")
    if trt_min is not None:
        ok, why = _min_version("TensorRT", probe.nvidia.tensorrt_version, str(trt_min))
        if not ok:
            return False, why
    if backend is not None:
        b = probe.backend(backend)
        if b is None or not b.installed:
            return False, f"backend {backend} is not installed"
        if b.error:
            return False, f"backend {backend} is unusable here: {b.error}"
        bmin = req.get("backend_min_version")
        if bmin is not None:
            ok, why = _min_version(backend, b.version, str(bmin))
            if not ok:
                return False, why
    return True, ""


def _min_version(what: str, have_s: str | None, need_s: str) -> tuple[bool, str]:
    need = version_tuple(need_s)
    if need is None:
        return False, f"malformed minimum {what} version {need_s!r}"
    if have_s is None:
        return False, f"needs {what} >= {need_s}, not installed"
    have = version_tuple(have_s)
    if have is None or not _version_ge(have, need):
        return False, f"needs {what} >= {need_s}, found {have_s}"
    return True, ""


# ------------------------------------------------------------------------------------------- CLI


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``probe`` to the ``edge-agent`` sub-commands (``subparsers`` from add_subparsers())."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "probe", help="show what this device can run (CPU features, GPUs, backends)")
    p.add_argument("--config", type=Path, help="TOML file (its storage.dir is probed for free space)")
    p.add_argument("--json", action="store_true", help="print the full probe as JSON (docs/probe.md)")
    p.add_argument("--quick", action="store_true",
                   help="do not start a child interpreter to list backend providers/devices")
    p.set_defaults(func=cmd_probe)
    return p


def cmd_probe(args: argparse.Namespace) -> int:
    """``edge-agent probe [--json] [--quick]``: print the probe; exit 0."""
    from agent.config import load_config

    cfg = load_config(getattr(args, "config", None))
    result = probe(cfg.storage.dir, backend_details=not getattr(args, "quick", False))
    if getattr(args, "json", False):
        print(result.to_json(indent=2))
    else:
        print(render_table(result))
    return 0


def render_table(p: Probe) -> str:
    """Human-readable, one fact per line."""
    rows: list[tuple[str, str]] = [
        ("arch", p.cpu.arch),
        ("cpu", f"{p.cpu.model} ({p.cpu.logical_cores} logical, "
                f"{p.cpu.physical_cores if p.cpu.physical_cores is not None else '?'} physical, "
                f"{p.cpu.usable_cores} usable)"),
        ("cpu features", " ".join(p.cpu.features) or "-"),
        ("int8 path", p.cpu.int8_path),
        ("isa family", f"{p.cpu.isa_family} ({describe_family(p.cpu.isa_family)})"),
        ("bf16", "yes" if p.cpu.bf16 else "no"),
        ("memory", f"{p.memory.total_mb} MB total, {p.memory.available_mb} MB available"),
        ("disk", f"{p.disk.free_mb} MB free of {p.disk.total_mb} MB at {p.disk.path}"),
        ("os", f"{p.os.distro or p.os.system} {p.os.release}, Python {p.os.python}"),
    ]
    nv = p.nvidia
    if nv.jetson:
        rows.append(("jetson", f"{nv.jetson.model} ({nv.jetson.module}, L4T {nv.jetson.l4t or '?'})"))
    if nv.gpus:
        for g in nv.gpus:
            rows.append((f"gpu {g.index}", f"{g.name}, CC {g.compute_capability or '?'}, "
                         f"{g.memory_mb if g.memory_mb is not None else '?'} MB, "
                         f"int8 {'yes' if g.int8 else 'no'}, fp8 {'yes' if g.fp8 else 'no'}"))
        rows.append(("nvidia", f"driver {nv.driver_version or '?'}, CUDA {nv.cuda_version or '?'} "
                     f"(via {nv.source})"))
    else:
        rows.append(("gpu", f"none{f' ({nv.error})' if nv.error else ''}"))
    rows.append(("tensorrt", nv.tensorrt_version or "not installed"))
    for b in p.backends:
        if not b.installed:
            state = "not installed"
        else:
            state = b.version or "?"
            if b.devices:
                state += f" [{', '.join(b.devices)}]"
            if b.error:
                state += f" (unusable: {b.error})"
        rows.append((f"backend {b.name}", state))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
