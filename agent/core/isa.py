"""Instruction-set families: the unit in which a quantized variant's accuracy is proven.

An INT8 graph computes different numbers on different CPUs. ONNX Runtime's x86 u8s8 kernels multiply
with ``VPMADDUBSW`` where the CPU has no VNNI; its 16-bit pair sums saturate, and a variant that is
exact on an AVX-512 VNNI host lost 22 points of accuracy on an AVX2-only one. So the accuracy gate's
verdict holds for the *family* of CPUs it ran on, and a device in another family must prove the
variant itself (see ``agent/variants/device_gate.py``). The families are the integer dot-product paths
the kernels dispatch on, not marketing generations:

    x86-vnni       AVX512-VNNI, AVX-VNNI or AMX-INT8: u8 x s8 products accumulated in 32 bits, exact
    x86-avx2       AVX2 (or AVX-512 BW) without VNNI: VPMADDUBSW, 16-bit pair sums that can saturate
    x86-baseline   x86-64 without AVX2 (SSE4.1 kernels)
    arm-dotprod    AArch64 with SDOT/UDOT (the ``asimddp`` HWCAP): exact 32-bit accumulation
    arm-baseline   AArch64 without the dot-product extension
    other          anything else

Only the architecture is ever a hard requirement; these families decide where accuracy has been
shown, and the CPU features that make a variant fast are ordering hints (``Variant.fast_on``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from agent.core.manifest import Variant

__all__ = ["FAMILIES", "ONEDNN_MAX_ISA", "Proof", "describe_family", "isa_family", "proof_needed", "refusal"]

FAMILIES = ("x86-vnni", "x86-avx2", "x86-baseline", "arm-dotprod", "arm-baseline", "other")

#: the ``ONEDNN_MAX_CPU_ISA`` value that makes oneDNN (OpenVINO's CPU plugin) compute as a CPU of
#: that family would, on a CPU of a higher family: how a build host gates lower families
ONEDNN_MAX_ISA = {"x86-avx2": "AVX2", "x86-baseline": "SSE41"}

_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
_DESCRIPTIONS = {
    "x86-vnni": "x86 with VNNI/AMX (exact 32-bit integer dot products)",
    "x86-avx2": "x86 with AVX2, no VNNI (VPMADDUBSW: 16-bit sums that saturate)",
    "x86-baseline": "x86 without AVX2",
    "arm-dotprod": "ARM with the dot-product extension (SDOT/UDOT)",
    "arm-baseline": "ARM without the dot-product extension",
    "other": "another architecture",
}


def isa_family(arch: str, flags: Collection[str]) -> str:
    """The family of a CPU from its normalised architecture (``x86_64``/``aarch64``) and the
    flags ``/proc/cpuinfo`` lists (x86 ``flags``, ARM ``Features``)."""
    have = {f.lower() for f in flags}
    if arch == "x86_64":
        if any(f in have for f in _VNNI):
            return "x86-vnni"
        return "x86-avx2" if "avx2" in have else "x86-baseline"
    if arch == "aarch64":
        return "arm-dotprod" if "asimddp" in have else "arm-baseline"
    return "other"


def describe_family(family: str) -> str:
    """One line for reports and ``edge-agent probe``."""
    return _DESCRIPTIONS.get(family, family)


@dataclass(frozen=True)
class Proof:
    """Whether a variant's accuracy on this device is already shown, refused, or must be gated.

    ``decision``: ``proven`` (a native or ISA-limited pass for this family, or the FP32 reference
    itself), ``refused`` (a failed verdict for this family: never tried) or ``gate`` (run the
    device gate). ``reason`` says which verdict decided, in words."""

    decision: str
    reason: str


def proof_needed(variant: Variant, fallback: str, family: str) -> Proof:
    """Decide from the manifest's per-family verdicts whether ``variant`` needs the device gate."""
    if variant.id == fallback:
        return Proof("proven", "the FP32 reference")
    if variant.precision == "fp32":
        # float kernels round alike on every instruction set; the self-test checks the file
        return Proof("proven", "FP32: no integer path; checked by the self-test")
    verdict = variant.isa_gates.get(family)
    if verdict is not None and not verdict.passed:
        return Proof("refused", f"failed the publisher's gate on {family} ({verdict.method}): {verdict.summary}")
    if verdict is not None and verdict.method in ("native", "isa-limited"):
        return Proof("proven", f"passed the publisher's gate on {family} ({verdict.method})")
    if variant.backend == "tensorrt":
        # the engine is built on this device from the graph the gate simulated; the self-test
        # vector (simulation tolerances) is its proof until a GPU gate exists
        return Proof("proven", "TensorRT: graph gated by simulation; engine checked by the self-test")
    # a manifest from before per-family verdicts lands here too: its gate proved one unknown family
    known = ", ".join(f"{k} ({v.method})" for k, v in sorted(variant.isa_gates.items())) or "none"
    return Proof("gate", f"not proven on {family} (publisher's verdicts: {known})")


def refusal(proof: Proof, has_validation_set: bool) -> str:
    """Why a variant with ``proof`` may not run on the device ("" when it may): a failed verdict for
    its family, or a variant to be gated with no validation set to gate it on. The pull (what to
    download) and the activation (what to try) ask this same question."""
    if proof.decision == "refused":
        return proof.reason
    if proof.decision == "gate" and not has_validation_set:
        return f"{proof.reason}, and the manifest has no validation set to gate it here"
    return ""
