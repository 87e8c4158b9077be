"""Variant choice on the device (agent/variants): activation, the device gate, self-tests,
fallback, demotion, rollback. The wire keeps the ``engine.*`` names these kinds have always had.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.core.events.base import DETAIL, OMIT_NONE, DataclassInstance, Severity, TypedEvent
from agent.core.status import SelfTestReport

# --------------------------------------------------------------------------------------------
# variants (agent/variants/manager.py): ``correlation_id`` only when a command started the work


@dataclass(frozen=True, kw_only=True)
class EngineActivated(TypedEvent):
    """A version's variant was chosen (measured now, or a stored choice reused)."""

    KIND = "engine.activated"
    SEVERITY = "info"

    model: str
    version: str
    variant: str
    backend: str
    precision: str
    measured: bool
    correlation_id: str | None = field(default=None, metadata=OMIT_NONE)
    reason: str = field(metadata=DETAIL)

    def message(self) -> str:
        return f"{self.model} {self.version}: {self.variant} ({self.reason})"


@dataclass(frozen=True, kw_only=True)
class EngineActivationFailed(TypedEvent):
    """No variant of a version can run here (not even FP32): it is not activated."""

    KIND = "engine.activation_failed"
    SEVERITY = "error"

    model: str
    version: str
    #: every variant's trial (agent/variants/choices.py ``VariantTrial``), field by field
    trials: tuple[DataclassInstance, ...]
    correlation_id: str | None = field(default=None, metadata=OMIT_NONE)
    error: str = field(metadata=DETAIL)

    def message(self) -> str:
        return self.error


@dataclass(frozen=True, kw_only=True)
class EngineDeviceGateStarted(TypedEvent):
    """Variants not proven on this CPU's instruction-set family are being gated on the device."""

    KIND = "engine.device_gate_started"
    SEVERITY = "info"

    model: str
    version: str
    variants: tuple[str, ...]
    family: str
    n_samples: int

    def message(self) -> str:
        return (f"{self.model} {self.version}: gating {', '.join(self.variants)} on this device ({self.family}) "
                f"with {self.n_samples} validation samples")


@dataclass(frozen=True, kw_only=True)
class EngineDeviceGate(TypedEvent):
    """One variant's device accuracy gate: info when it passed, warning when refused."""

    KIND = "engine.device_gate"
    SEVERITY = "info"
    SEVERITIES = ("info", "warning")

    model: str
    version: str
    variant: str
    passed: bool
    family: str
    result: str
    seconds: float

    def severity(self) -> Severity:
        return "info" if self.passed else "warning"

    def message(self) -> str:
        verdict = "passed" if self.passed else "refused by"
        return (f"{self.model} {self.version}: {self.variant} {verdict} the device accuracy gate on "
                f"{self.family}: {self.result}")


@dataclass(frozen=True, kw_only=True)
class EngineSelftest(TypedEvent):
    """Self-tests re-run on request: info when all passed, warning otherwise."""

    KIND = "engine.selftest"
    SEVERITY = "info"
    SEVERITIES = ("info", "warning")

    results: tuple[SelfTestReport, ...]
    correlation_id: str | None = field(default=None, metadata=OMIT_NONE)

    def severity(self) -> Severity:
        return "info" if all(r.passed for r in self.results) else "warning"

    def message(self) -> str:
        passed = sum(r.passed for r in self.results)
        return f"{passed} of {len(self.results)} variant self-test(s) passed"


@dataclass(frozen=True, kw_only=True)
class EngineSelftestFailed(TypedEvent):
    """The FP32 fallback itself failed its self-test: nothing safe to fall back to."""

    KIND = "engine.selftest_failed"
    SEVERITY = "error"

    model: str
    version: str
    variant: str
    correlation_id: str | None = field(default=None, metadata=OMIT_NONE)
    error: str = field(metadata=DETAIL)

    def message(self) -> str:
        return f"{self.model} {self.version}: the FP32 fallback failed its self-test: {self.error}"


@dataclass(frozen=True, kw_only=True)
class EngineServingModelsDir(TypedEvent):
    """A registry version cannot be activated and there is nothing to roll back to: the FP32
    ONNX from ``models.dir`` serves the model."""

    KIND = "engine.serving_models_dir"
    SEVERITY = "warning"

    model: str
    version: str

    def message(self) -> str:
        return f"{self.model} {self.version} cannot be activated; serving the FP32 ONNX from models.dir"


@dataclass(frozen=True, kw_only=True)
class EngineFallback(TypedEvent):
    """The active variant failed a job, which was re-run on the FP32 fallback."""

    KIND = "engine.fallback"
    SEVERITY = "warning"

    model: str
    version: str
    variant: str
    job_id: str
    kind: str  # the runner's failure kind
    fallback_variant: str = field(metadata=DETAIL)
    error: str = field(metadata=DETAIL)

    def message(self) -> str:
        return (f"{self.model} {self.version}: {self.variant} failed, job re-run on {self.fallback_variant}: "
                f"{self.error}")


@dataclass(frozen=True, kw_only=True)
class EngineDemoted(TypedEvent):
    """A variant demoted to FP32 until the next update (repeated failures, failed self-test)."""

    KIND = "engine.demoted"
    SEVERITY = "warning"

    model: str
    version: str
    variant: str
    reason: str
    correlation_id: str | None = field(default=None, metadata=OMIT_NONE)

    def message(self) -> str:
        return f"{self.model} {self.version}: {self.variant} demoted to FP32 until the next update: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class EngineShadowDisagreement(TypedEvent):
    """A variant demoted because its shadow comparisons with FP32 agreed too rarely (an alert)."""

    KIND = "engine.shadow_disagreement"
    SEVERITY = "error"

    model: str
    version: str
    variant: str
    reason: str

    def message(self) -> str:
        return f"{self.model} {self.version}: {self.variant} demoted to FP32 until the next update: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class EngineRollbackImpossible(TypedEvent):
    """A version that should be rolled back has no previous version to go to."""

    KIND = "engine.rollback_impossible"
    SEVERITY = "error"

    model: str
    version: str
    reason: str = field(metadata=DETAIL)

    def message(self) -> str:
        return f"{self.model} {self.version}: {self.reason}; no previous version to roll back to"


@dataclass(frozen=True, kw_only=True)
class EngineRollbackFailed(TypedEvent):
    """The automatic rollback's target could not be activated either."""

    KIND = "engine.rollback_failed"
    SEVERITY = "error"

    model: str
    version: str
    previous: str
    error: str = field(metadata=DETAIL)

    def message(self) -> str:
        return f"{self.model}: rollback from {self.version} to {self.previous} failed: {self.error}"


@dataclass(frozen=True, kw_only=True)
class EngineRolledBack(TypedEvent):
    """A version none of whose first jobs produced a result (or that cannot be activated) was
    rolled back automatically."""

    KIND = "engine.rolled_back"
    SEVERITY = "error"

    model: str
    from_version: str
    to_version: str
    reason: str

    def message(self) -> str:
        return f"{self.model}: rolled back from {self.from_version} to {self.to_version}: {self.reason}"
