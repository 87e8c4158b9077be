"""The one place that decides which variant of a model version runs on this device.

Inputs: the variants in the manifest's priority order (the publisher's preference, from its own
benchmarks) and each one's trial on this device (self-test verdict and measured latency).
Rule:

1. Only variants whose self-test passed here, and whose accuracy is shown for this CPU's
   instruction-set family (by the publisher's gate or the device's own, see device_gate.py), are
   candidates. The FP32 fallback must pass: it is
   what every failure falls back to, so a version whose FP32 fails is not activated at all.
2. The fastest candidate *as measured here* wins...
3. ...except that a candidate earlier in the manifest's priority order is kept when it is within
   ``prefer_margin`` (default 5 %) of the fastest: timing noise must not flip the choice between
   restarts, and the publisher's order already encodes accuracy-gate margins.

Published figures never decide on their own (INT8 vs FP8 vs FP16 is measured, never assumed); they
only break near-ties.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.core.errors import ActivationError
from agent.variants.choices import VariantTrial


def choose(model: str, version: str, fallback: str, trials: Sequence[VariantTrial],
           prefer_margin: float) -> tuple[str, str]:
    """Pick a variant from ``trials`` (in manifest priority order); returns (variant id, reason).

    Raises ActivationError when the fallback did not pass its self-test (or was not tried).
    """
    by_id = {t.id: t for t in trials}
    fb = by_id.get(fallback)
    if fb is None or not fb.passed:
        why = fb.error if fb is not None else "not installed"
        raise ActivationError(f"{model} {version}: the FP32 fallback {fallback!r} failed its self-test on this "
                              f"device ({why}); the version is not activated")
    passed = [t for t in trials if t.passed and t.latency_ms is not None]
    fastest = min(passed, key=lambda t: t.latency_ms or 0.0)
    limit = (fastest.latency_ms or 0.0) * (1.0 + prefer_margin)
    chosen = next(t for t in passed if (t.latency_ms or 0.0) <= limit)  # earliest in priority order
    failed = [t for t in trials if t.tried and not t.passed]
    skipped = [t for t in trials if not t.tried]
    parts = [f"{chosen.id} ({chosen.backend} {chosen.precision}) {chosen.latency_ms:.3g} ms"]
    if chosen.id != fallback:
        parts.append(f"vs {fallback} {fb.latency_ms:.3g} ms")
    if chosen is not fastest:
        parts.append(f"preferred by the manifest over {fastest.id} {fastest.latency_ms:.3g} ms "
                     f"(within {prefer_margin:.0%})")
    reason = "fastest passing self-test on this device: " + ", ".join(parts)
    if chosen.proof and chosen.id != fallback:
        reason += f"; accuracy: {chosen.proof}"
    reason += f"; {len(passed)} of {len(trials)} variant(s) passed"
    if failed:
        reason += "; failed: " + ", ".join(f"{t.id} ({t.error})" for t in failed)
    if skipped:
        reason += "; not tried: " + ", ".join(t.id for t in skipped)
    return chosen.id, reason
