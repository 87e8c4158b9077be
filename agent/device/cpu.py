"""The CPU as the kernel reports it: architecture, model name, cores, instruction-set features.

``probe_cpu(sources, dt_model) -> CpuInfo`` reads ``/proc/cpuinfo``: ``flags`` on x86, ``Features``
on ARM (that line *is* the kernel's HWCAP list, which Python has no ``getauxval`` for). Derived:
``int8_path`` (``vnni``, ``avx2``, ``arm_dotprod`` or ``none``), ``bf16``, and the instruction-set
family (``agent.core.isa``) whose gate verdicts apply here. Features are never guessed from the
model name.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

from agent.core.isa import isa_family
from agent.core.log import log_event
from agent.device.sources import ProbeSources

logger = logging.getLogger(__name__)

#: Features the agent's variant selection cares about, per architecture, as the kernel names them.
X86_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve")

INT8_PATHS = ("vnni", "avx2", "arm_dotprod", "none")

#: ARM "CPU implementer"/"CPU part" -> core name, only to print a readable model name (features are
#: never derived from it).
_ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4f"): "Neoverse-V2", ("0x4e", "0x004"): "NVIDIA Carmel",
}


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
    isa_family: str = ""  # agent.core.isa: the family whose gate verdicts apply; derived from arch + flags

    def __post_init__(self) -> None:
        if not self.isa_family:  # frozen: set once, here, so a CpuInfo built anywhere has it right
            object.__setattr__(self, "isa_family", isa_family(self.arch, self.flags))


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
