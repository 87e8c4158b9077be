"""Capability probe: what this device can run, read from the kernel and the driver, never guessed.

``probe(state_dir) -> Probe`` gathers, in well under a second on a CPU-only device:

* CPU (``cpu.py``): architecture (``x86_64`` / ``aarch64``), model name, cores, and the
  instruction-set features the kernel reports. Derived: ``int8_path`` (``vnni``, ``avx2``,
  ``arm_dotprod`` or ``none``), ``bf16`` and the instruction-set family.
* NVIDIA (``nvidia.py``): GPUs from NVML or ``nvidia-smi``, each with compute capability, memory,
  ``int8`` (CC >= 6.1) and ``fp8`` (CC >= 8.9); driver and CUDA versions; the TensorRT version from
  package metadata (TensorRT is *not* imported); Jetson boards.
* Memory, free disk under the state directory, OS (``host.py``), and which inference backends are
  installed (``backends.py``; their providers/devices listed by a child process on request).

Every path and command is injectable through ``ProbeSources`` (``sources.py``) so tests feed
recorded fixtures. ``compatible(requires, probe)`` evaluates a manifest variant's ``requires`` block
against a probe. The JSON form is documented in docs/probe.md (``schema: "edge-agent/probe/1"``);
``Probe.summary()`` is the short form the MQTT status message carries (agent.core.status).

Every name the probe's callers import (records, ``probe``, ``compatible``, the parsers) is
importable from this module.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.core.log import log_event
from agent.core.status import DeviceSummary, GpuSummary
from agent.device.backends import BACKENDS, BackendProbe, probe_backends
from agent.device.cpu import (
    ARM_FEATURES,
    INT8_PATHS,
    X86_FEATURES,
    CpuInfo,
    derive_bf16,
    derive_int8_path,
    normalise_arch,
    parse_cpuinfo,
    probe_cpu,
)
from agent.device.host import DiskInfo, MemoryInfo, OsInfo, probe_disk, probe_memory, probe_os
from agent.device.nvidia import (
    FP8_MIN_CC,
    INT8_MIN_CC,
    GpuInfo,
    JetsonInfo,
    NvidiaInfo,
    cc_tuple,
    gpu_info,
    parse_smi_csv,
    parse_tegra_release,
    probe_jetson,
    probe_nvidia,
)
from agent.device.sources import ProbeSources, package_version, read_text, run_bounded

__all__ = [
    "ARM_FEATURES", "BACKENDS", "FP8_MIN_CC", "INT8_MIN_CC", "INT8_PATHS", "SCHEMA", "X86_FEATURES",
    "BackendProbe", "CpuInfo", "DiskInfo", "GpuInfo", "JetsonInfo", "MemoryInfo", "NvidiaInfo", "OsInfo",
    "Probe", "ProbeSources",
    "cc_tuple", "compatible", "derive_bf16", "derive_int8_path", "gpu_info", "normalise_arch",
    "package_version", "parse_cpuinfo", "parse_smi_csv", "parse_tegra_release", "probe", "probe_backends",
    "probe_cpu", "probe_disk", "probe_jetson", "probe_memory", "probe_nvidia", "probe_os", "run_bounded",
    "version_tuple",
]

logger = logging.getLogger(__name__)

SCHEMA = "edge-agent/probe/1"

#: the name ``gpu_info`` had before the probe was split; tests/test_pull.py still imports it
_gpu = gpu_info


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

    def summary(self) -> DeviceSummary:
        """The short form for the MQTT status birth message (``to_json()`` is its wire form)."""
        return DeviceSummary(
            arch=self.cpu.arch,
            features=self.cpu.features,
            int8_path=self.cpu.int8_path,
            isa_family=self.cpu.isa_family,
            bf16=self.cpu.bf16,
            gpus=tuple(GpuSummary(g.name, g.compute_capability, g.int8, g.fp8) for g in self.nvidia.gpus),
            jetson=self.nvidia.jetson.model if self.nvidia.jetson else None,
            backends=tuple(b.name for b in self.backends if b.installed and not b.error),
        )


def probe(state_dir: Path, *, sources: ProbeSources | None = None, backend_details: bool = False) -> Probe:
    """Probe this device. ``state_dir``: where models and engines go (its free space is reported).

    ``backend_details=True`` also lists ONNX Runtime providers / OpenVINO devices through a child
    interpreter (about a second); the default reads package metadata only, cheap enough for the
    listener process. Never raises for missing hardware or tools: absent means "not available".
    """
    src = sources or ProbeSources()
    dt_model = read_text(src.device_tree_model)
    cpu = probe_cpu(src, dt_model)
    nvidia = probe_nvidia(src)
    p = Probe(
        cpu=cpu,
        nvidia=nvidia,
        memory=probe_memory(),
        disk=probe_disk(state_dir),
        os=probe_os(src),
        backends=probe_backends(src, backend_details, nvidia.gpus),
        probed_at=round(time.time(), 3),
    )
    log_event(logger, "probe.done", arch=cpu.arch, int8_path=cpu.int8_path, bf16=cpu.bf16,
              gpus=len(nvidia.gpus), nvidia_source=nvidia.source, nvidia_error=nvidia.error)
    return p


# ---------------------------------------------------------------------------------- compatibility


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


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


_KNOWN_REQUIREMENTS = frozenset({"arch", "cpu_features", "cpu_features_any", "gpu", "gpu_compute_capability_min",
                                 "gpu_compute_capability_max", "tensorrt_min", "backend_min_version"})


def compatible(requires: Mapping[str, Any] | Any, probe: Probe, backend: str | None = None) -> tuple[bool, str]:
    """Can a variant with this ``requires`` block run here? Returns (ok, reason); the reason names
    the first unmet requirement ("" when ok).

    ``requires`` is agent.core.manifest.Requires (or its ``model_dump()``); keys, all optional, an empty
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
    unknown = sorted(k for k, v in req.items() if k not in _KNOWN_REQUIREMENTS and v not in (None, (), [], False))
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
    ok, why = _gpu_compatible(req, probe)
    if not ok:
        return False, why
    trt_min = req.get("tensorrt_min")
    if trt_min is not None:
        ok, why = _min_version("TensorRT", probe.nvidia.tensorrt_version, str(trt_min))
        if not ok:
            return False, why
    if backend is not None:
        return _backend_compatible(req, probe, backend)
    return True, ""


def _gpu_compatible(req: Mapping[str, Any], probe: Probe) -> tuple[bool, str]:
    """``gpu`` and the compute capability range: one GPU must lie in it (no GPU asked for: ok)."""
    cc_min_s, cc_max_s = req.get("gpu_compute_capability_min"), req.get("gpu_compute_capability_max")
    if not (req.get("gpu") or cc_min_s is not None or cc_max_s is not None):
        return True, ""
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
    return True, ""


def _backend_compatible(req: Mapping[str, Any], probe: Probe, backend: str) -> tuple[bool, str]:
    """The variant's backend: installed, usable here, and at least ``backend_min_version``."""
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
