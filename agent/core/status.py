"""What the agent reports outward about this device and its models, as typed, frozen records.

    DeviceSummary   the capability probe in short: MQTT status message ``device``, the birth's
                    ``capabilities.backends`` (built by ``agent.device.probe.Probe.summary()``)
    ModelSummary    one entry of the status message's ``models[]`` (``VariantManager.summary()``)
    ModelStatus     one model in ``edge-agent models`` (``VariantManager.describe()``), with its
                    ActiveVariant, VariantStatus rows (each with its TrialStatus), JobCounts, GuardStatus
    SelfTestReport  one variant's re-run self-test: the ``cmd/selftest`` answer's ``result[]`` and the
                    ``engine.selftest`` event's ``results``

Takes plain values only (agent.device and agent.variants build the records; nothing here imports a
stage). Every record's ``to_json()`` returns its documented JSON form (docs/probe.md "Status
summary", docs/mqtt.md status message, docs/engines.md ``edge-agent models --json``): the keys,
their order and the cases in which one is left out are those of the dicts these records replaced,
because consumers parse that form.
"""

from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------------------------ the device


@dataclass(frozen=True)
class GpuSummary:
    """One NVIDIA GPU: ``cc`` is the compute capability "major.minor" (None: the driver does not say)."""

    name: str
    cc: str | None
    int8: bool
    fp8: bool

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "cc": self.cc, "int8": self.int8, "fp8": self.fp8}


@dataclass(frozen=True)
class DeviceSummary:
    """The capability probe in short (docs/probe.md "Status summary").

    ``features``: the tracked CPU features present, as the kernel names them; ``int8_path``: ``vnni``,
    ``avx2``, ``arm_dotprod`` or ``none``; ``isa_family``: agent.core.isa family; ``jetson``: the
    device-tree model of a Jetson board, else None; ``backends``: inference backends installed and usable.
    """

    arch: str
    features: tuple[str, ...]
    int8_path: str
    isa_family: str
    bf16: bool
    gpus: tuple[GpuSummary, ...]
    jetson: str | None
    backends: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"arch": self.arch, "features": list(self.features), "int8_path": self.int8_path,
                "isa_family": self.isa_family, "bf16": self.bf16, "gpus": [g.to_json() for g in self.gpus],
                "jetson": self.jetson, "backends": list(self.backends)}


# ---------------------------------------------------------------------------- the status message


@dataclass(frozen=True)
class ModelSummary:
    """What one model runs (or will run) with, for the status message's ``models[]``.

    ``variant``/``backend``/``precision`` are "" for a registry version not activated yet;
    ``accuracy``: how the running variant's accuracy on this device's instruction-set family is
    known ("" for FP32 from models.dir or a version not activated yet); ``source``: ``registry`` or
    ``models.dir``.
    """

    name: str
    version: str
    variant: str
    backend: str
    precision: str
    accuracy: str
    source: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "variant": self.variant, "backend": self.backend,
                "precision": self.precision, "accuracy": self.accuracy, "source": self.source}


# --------------------------------------------------------------------------- edge-agent models


@dataclass(frozen=True)
class ActiveVariant:
    """The variant a model runs and why. ``variant`` is None for a registry version not measured on
    this device yet; ``backend``/``precision`` are left out of the JSON then (None).
    ``chosen``/``measured_at`` (registry versions only, else None and left out): the variant the
    measurement chose (another than ``variant`` when it was demoted) and when."""

    variant: str | None
    reason: str
    backend: str | None = None
    precision: str | None = None
    chosen: str | None = None
    measured_at: float | None = None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"variant": self.variant}
        if self.backend is not None:
            doc["backend"] = self.backend
        if self.precision is not None:
            doc["precision"] = self.precision
        doc["reason"] = self.reason
        if self.chosen is not None:
            doc["chosen"] = self.chosen
        if self.measured_at is not None:
            doc["measured_at"] = self.measured_at
        return doc


@dataclass(frozen=True)
class TrialStatus:
    """A variant's stored trial on this device (agent.variants.choices.VariantTrial, as reported):
    ``measured_precision`` is the precision the backend reported running."""

    tried: bool
    passed: bool
    error: str
    max_abs_err: float | None
    latency_ms: float | None
    load_ms: float | None
    measured_precision: str
    proof: str

    def to_json(self) -> dict[str, object]:
        return {"tried": self.tried, "passed": self.passed, "error": self.error, "max_abs_err": self.max_abs_err,
                "latency_ms": self.latency_ms, "load_ms": self.load_ms,
                "measured_precision": self.measured_precision, "proof": self.proof}


@dataclass(frozen=True)
class VariantStatus:
    """One variant of the installed manifest. ``trial``: None (its keys left out) when not measured
    with the current choice key; ``demoted``: the reason it was taken out of service for this
    version, None (left out) when it was not."""

    id: str
    backend: str
    precision: str
    installed: bool
    priority: int
    fast_on: tuple[str, ...]
    targets: tuple[str, ...]
    trial: TrialStatus | None = None
    demoted: str | None = None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"id": self.id, "backend": self.backend, "precision": self.precision,
                                  "installed": self.installed, "priority": self.priority,
                                  "fast_on": list(self.fast_on), "targets": list(self.targets)}
        if self.trial is not None:
            doc.update(self.trial.to_json())
        if self.demoted is not None:
            doc["demoted"] = self.demoted
        return doc


@dataclass(frozen=True)
class JobCounts:
    """Jobs that succeeded / failed on one installed version (its rollback probation)."""

    ok: int
    failed: int

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "failed": self.failed}


@dataclass(frozen=True)
class GuardStatus:
    """The job-time counters of the variant running now (agent.variants.guard); ``variant`` is
    "version/variant"; ``shadow_agreement`` None before the first shadow comparison."""

    variant: str
    jobs: int
    consecutive_failures: int
    shadow_comparisons: int
    shadow_agreement: float | None

    def to_json(self) -> dict[str, object]:
        return {"variant": self.variant, "jobs": self.jobs, "consecutive_failures": self.consecutive_failures,
                "shadow_comparisons": self.shadow_comparisons, "shadow_agreement": self.shadow_agreement}


@dataclass(frozen=True)
class ModelStatus:
    """One model as ``edge-agent models`` shows it. Three shapes, and their JSON keys:

    * ``source="models.dir"``: name, source, version, task, path, active, variants (empty);
    * ``source="registry"`` whose manifest cannot be read (``error`` set): name, source, version,
      previous, versions, active (null), error, variants (empty);
    * ``source="registry"``: name, source, version, previous, versions, task, manifest_sha256,
      choice_key, active, jobs, variants, guard (``{}`` outside the running daemon's jobs).
    """

    name: str
    source: str
    version: str
    active: ActiveVariant | None
    variants: tuple[VariantStatus, ...] = ()
    task: str = ""
    path: str = ""  # models.dir: the FP32 ONNX
    previous: str | None = None  # registry: the version kept for rollback
    versions: tuple[str, ...] = ()  # registry: committed versions on disk
    error: str | None = None  # registry: why the current version's manifest is unreadable
    manifest_sha256: str = ""
    choice_key: str = ""
    jobs: JobCounts = JobCounts(0, 0)
    guard: GuardStatus | None = None

    def to_json(self) -> dict[str, object]:
        active = self.active.to_json() if self.active is not None else None
        variants = [v.to_json() for v in self.variants]
        if self.source == "models.dir":
            return {"name": self.name, "source": self.source, "version": self.version, "task": self.task,
                    "path": self.path, "active": active, "variants": variants}
        head: dict[str, object] = {"name": self.name, "source": self.source, "version": self.version,
                                   "previous": self.previous, "versions": list(self.versions)}
        if self.error is not None:
            return {**head, "active": active, "error": self.error, "variants": variants}
        return {**head, "task": self.task, "manifest_sha256": self.manifest_sha256, "choice_key": self.choice_key,
                "active": active, "jobs": self.jobs.to_json(), "variants": variants,
                "guard": self.guard.to_json() if self.guard is not None else {}}


# ------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class SelfTestReport:
    """One variant's self-test, re-run on request (``VariantManager.selftest``)."""

    model: str
    version: str
    variant: str
    passed: bool
    error: str = ""
    max_abs_err: float | None = None

    def to_json(self) -> dict[str, object]:
        return {"model": self.model, "version": self.version, "variant": self.variant, "passed": self.passed,
                "error": self.error, "max_abs_err": self.max_abs_err}


# ----------------------------------------------------------------------------------- publishing


@dataclass(frozen=True)
class PublisherHealth:
    """The MQTT publisher's state (``MqttPublisher.health()``): connected, the status messages'
    ``seq``, messages in flight, the last connection error, and the outbox backlog and its age."""

    connected: bool
    status_seq: int
    inflight: int
    last_error: str | None
    outbox_pending: int
    outbox_oldest_age_s: float

    def to_json(self) -> dict[str, object]:
        return {"connected": self.connected, "status_seq": self.status_seq, "inflight": self.inflight,
                "last_error": self.last_error, "outbox_pending": self.outbox_pending,
                "outbox_oldest_age_s": self.outbox_oldest_age_s}
