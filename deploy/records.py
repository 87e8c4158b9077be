"""Typed records of the build folder's JSON files: ``variants.json``, ``gate.json``, ``bench/report.json``.

Takes the documents as the stages write them and returns frozen pydantic models
(:class:`VariantsDoc`, :class:`GateDoc`, :class:`BenchReport`, each with ``read(path)``); writes
models back with ``write(path)`` as the same JSON (sorted keys, 2-space indent, atomically: see
:func:`deploy.variants.write_json`). The on-disk format is the one the stages have always
written: a field that is None is left out of the file unless its model lists it in ``nullable``
(then it is written as null), and keys this code does not know are ignored when reading, so a
file from a newer toolkit still reads. Sub-records the signed manifest repeats verbatim are the
manifest's own models (``IsaVerdict``, ``SelfTest``, ``ValidationSet``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    SerializerFunctionWrapHandler,
    Tag,
    model_serializer,
    model_validator,
)

from agent.core.errors import EdgeAgentError
from agent.core.manifest import IsaVerdict, SelfTest, ValidationSet
from deploy.variants import write_json

__all__ = [
    "BatchInvariance",
    "BenchReport",
    "BenchRow",
    "BenchTarget",
    "ExecutionPrecision",
    "GateDoc",
    "GateRunSummary",
    "GateValidation",
    "IsaLimitedRun",
    "IsaVerdict",
    "LayerProfile",
    "LayerTime",
    "MeasuredVariant",
    "RecordError",
    "SelfTest",
    "ValidationSet",
    "VariantRecord",
    "VariantVerdict",
    "VariantsDoc",
]

_D = TypeVar("_D", bound="Document")


class RecordError(EdgeAgentError):
    """A build-folder JSON file is missing a field, has one of the wrong type, or is not JSON."""


class Record(BaseModel):
    """A JSON object of a build-folder file. Fields that are None are omitted when written, except
    those named in ``nullable`` (written as null, as the stages always did for them)."""

    # extra="ignore": a key from a newer toolkit must not make an older one refuse the file
    model_config = ConfigDict(frozen=True, extra="ignore")
    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        # only declared fields: extra keys a model keeps (extra="allow") are written as they came
        declared = type(self).model_fields
        return {k: v for k, v in out.items() if v is not None or k not in declared or k in self.nullable}


class Document(Record):
    """A whole build-folder file: read and written as one JSON document."""

    @classmethod
    def read(cls: type[_D], path: Path) -> _D:
        """Parse ``path``; RecordError (naming the file and the field) when it does not fit."""
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except ValueError as exc:  # pydantic's ValidationError and json's JSONDecodeError both are
            raise RecordError(f"{path}: not a valid {path.name}: {exc}") from exc

    def write(self, path: Path) -> Path:
        """Write this document to ``path`` atomically; returns the path."""
        return write_json(path, self.model_dump())


# --------------------------------------------------------------------------------------------
# variants.json (edge-deploy quantize)
# --------------------------------------------------------------------------------------------


class VariantRecord(Record):
    """One catalogue variant as ``quantize`` left it: its file with ``sha256``, ``size``, the
    builder's ``notes`` and ``build_seconds`` when ``built``, else the ``reason`` it was not."""

    id: str
    backend: str
    precision: str
    file: str
    built: bool
    sha256: str | None = None
    size: int | None = None
    notes: dict[str, Any] | None = None
    build_seconds: float | None = None
    reason: str | None = None

    @model_validator(mode="after")
    def _built_has_digest(self) -> VariantRecord:
        if self.built and (self.sha256 is None or self.size is None):
            raise ValueError(f"variant {self.id} is built but has no sha256/size")
        return self

    @property
    def digest(self) -> str:
        """The SHA-256 ``quantize`` recorded for the file (a built variant always has one)."""
        if self.sha256 is None:
            raise RecordError(f"variant {self.id} was not built: {self.reason or 'no reason recorded'}")
        return self.sha256


class VariantsDoc(Document):
    """``variants.json``: every selected catalogue variant, in catalogue order."""

    model: str
    version: str
    method: str
    variants: tuple[VariantRecord, ...]

    def selected(self, ids: Sequence[str] | None) -> list[VariantRecord]:
        """The records named by ``ids`` (all when None/empty), always with fp32 (the reference)."""
        return [r for r in self.variants if not ids or r.id in ids or r.id == "fp32"]


# --------------------------------------------------------------------------------------------
# gate.json (edge-deploy gate)
# --------------------------------------------------------------------------------------------


class BatchInvariance(Record):
    """The same inputs at ``batch_sizes``: worst logit difference and argmax agreement."""

    passed: bool
    max_abs_diff: float
    rel_diff: float
    argmax_agreement: float
    batch_sizes: tuple[int, ...]
    n: int


class ExecutionPrecision(Record):
    """The precision the runtime really executes, read back from it: ONNX Runtime's conv/gemm
    ``kernels`` per precision (and Q/DQ nodes left), or OpenVINO's ``layers`` per runtime
    precision with its precision hint read back."""

    runtime: str
    summary: str
    kernels: dict[str, int] | None = None
    qdq_nodes_left: int | None = None
    layers: dict[str, int] | None = None
    hint_read_back: str | None = None


class GateRunSummary(Record):
    """One run of a variant (``runs`` of its gate.json entry): how, for which families, verdict."""

    method: str
    backend: str
    families: tuple[str, ...]
    passed: bool
    summary: str
    failures: tuple[str, ...]
    execution_precision: str
    seconds: float


class IsaLimitedRun(Record):
    """An OpenVINO run restricted to a lower family (``ONEDNN_MAX_CPU_ISA``) on the device set,
    with the kernels its conv layers compiled to."""

    onednn_max_cpu_isa: str
    n_samples: int
    metrics: dict[str, float]
    failures: tuple[str, ...]
    seconds: float
    kernels: dict[str, int] = {}


class VariantVerdict(Record):
    """gate.json's entry for a variant the gate did not measure (not built, nothing can run it
    here, or every run failed): the verdict and why. :class:`MeasuredVariant` adds the figures.
    ``publishable``/``verdict_note``/``isa_family`` are None only in files from older gates."""

    passed: bool
    publishable: bool | None = None
    verdict_note: str | None = None
    failures: tuple[str, ...] = ()
    isa_verdicts: dict[str, IsaVerdict] = {}
    isa_family: str | None = None
    targets: tuple[str, ...] = ()
    file: str | None = None
    sha256: str | None = None

    @property
    def may_publish(self) -> bool:
        """The gate's publish decision (gates before schema 2 only wrote ``passed``)."""
        return self.publishable if self.publishable is not None else self.passed


class MeasuredVariant(VariantVerdict):
    """gate.json's entry for a variant the gate ran: the primary run's figures (``method``,
    ``metrics`` vs FP32's ``reference``, ``drops`` within ``thresholds``), every run, the
    per-family verdicts, ISA-limited runs and, when it passed, its self-test vector."""

    file: str
    sha256: str
    validated_with: str
    method: str
    backend_reported_precision: str
    execution_precision: ExecutionPrecision
    n_samples: int
    metrics: dict[str, float]
    reference: dict[str, float]
    drops: dict[str, float]
    thresholds: dict[str, float]
    batch_invariance: BatchInvariance
    seconds: float
    timings_ms: dict[str, float] = {}
    runs: tuple[GateRunSummary, ...] = ()
    selftest: SelfTest | None = None
    isa_limited: dict[str, IsaLimitedRun] | None = None
    isa_limited_errors: dict[str, str] | None = None


def _entry_kind(value: Any) -> str:
    # only measured entries have a primary run, hence a "method"
    if isinstance(value, BaseModel):
        return "measured" if isinstance(value, MeasuredVariant) else "verdict"
    return "measured" if isinstance(value, dict) and "method" in value else "verdict"


GateEntry = Annotated[
    Annotated[MeasuredVariant, Tag("measured")] | Annotated[VariantVerdict, Tag("verdict")],
    Discriminator(_entry_kind),
]


class GateValidation(Record):
    """Where the held-out set came from (``seed`` null for a DICOM folder). Copied into the
    manifest as it is, so keys of other gate versions are kept."""

    model_config = ConfigDict(frozen=True, extra="allow")
    nullable: ClassVar[frozenset[str]] = frozenset({"seed"})

    source: str
    seed: int | None
    n: int
    calibration_seed: int
    disjoint_from_calibration: bool


class GateDoc(Document):
    """``gate.json``: the held-out set, FP32's ``reference`` (``deploy.evaluate`` figures), the
    device validation set, every variant's entry, and which ``passed`` (publishable) or not."""

    model: str
    version: str
    task: str
    isa_family: str | None = None  # None only in files from gates before per-family verdicts
    host: str = ""
    validation: GateValidation
    device_validation: ValidationSet | None = None
    thresholds: dict[str, float]
    reference: dict[str, Any]
    drift_outputs: dict[str, Any] = {}
    variants: dict[str, GateEntry]
    passed: tuple[str, ...]
    failed: tuple[str, ...]
    stage_seconds: dict[str, float] = {}
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# bench/report.json (edge-deploy bench)
# --------------------------------------------------------------------------------------------


class BenchRow(Record):
    """One variant (or the ``fp32-ort-default`` baseline) in the benchmark: what the gate said,
    why it was not timed (``skipped``) or failed (``error``), else the worker's figures (best
    round) and the speed-ups :func:`deploy.bench_report.summarise` adds."""

    id: str
    backend: str
    precision: str
    file: str
    size_mb: float
    gate_passed: bool
    gate_metrics: dict[str, float]
    gate_failures: tuple[str, ...]
    execution_precision: str
    skipped: str | None = None
    note: str | None = None
    error: str | None = None
    options: dict[str, Any] | None = None
    threads: int | None = None
    loadavg_before: tuple[float, ...] | None = None
    loadavg_after: tuple[float, ...] | None = None
    latency_ms_median: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_min: float | None = None
    load_s: float | None = None
    backend_precision: str | None = None
    backend_version: str | None = None
    full_volume_ms: float | None = None
    full_volume_runs_ms: tuple[float, ...] | None = None
    full_volume_inference_ms: float | None = None
    full_volume_outside_ms: float | None = None
    full_volume_patches: int | None = None
    peak_rss_mb: float | None = None
    throughput_per_s: float | None = None
    throughput_batch: int | None = None
    peak_rss_mb_batch: float | None = None
    rss_before_load_mb: float | None = None
    round_medians_ms: tuple[float, ...] | None = None
    speedup_latency: float | None = None
    speedup_full_volume: float | None = None
    speedup_full_volume_inference: float | None = None
    speedup_vs_default: float | None = None

    def figure(self, key: str) -> float | None:
        """A timing by name (``latency_ms_median``, ``full_volume_ms``, ...); None when not measured."""
        value = getattr(self, key, None)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class BenchTarget(Record):
    """The speed target of this host's family: ``fastest`` publishable variant vs ``baseline`` on
    ``metric``, and whether it ``met`` ``goal_speedup`` (None: no goal for this family)."""

    nullable: ClassVar[frozenset[str]] = frozenset(
        {"goal_speedup", "baseline", "fastest", "speedup", "met"})

    metric: str
    goal_speedup: float | None
    isa_family: str
    baseline: str | None
    fastest: str | None
    speedup: float | None
    met: bool | None


class LayerTime(Record):
    """One layer of a profile: node name, op type, kernel (or execution provider), ms per run."""

    name: str
    type: str
    kernel: str
    ms: float


class LayerProfile(Record):
    """Where one input's time goes: total ms in layers, the slowest layers, ms per op type
    (slowest first as measured; a report read back from disk has them in key order)."""

    total_ms: float
    top_layers: tuple[LayerTime, ...]
    by_type_ms: dict[str, float]


class BenchReport(Document):
    """``bench/report.json``: the host, the settings, one row per variant and the target verdict."""

    nullable: ClassVar[frozenset[str]] = frozenset({"patch"})

    model: str
    version: str
    task: str
    device: str
    isa_family: str | None = None  # None only in reports from before per-family targets
    platform: str
    threads: int
    iterations: int
    batch: int
    patch: tuple[int, ...] | None
    created_at: str
    variants: tuple[BenchRow, ...]
    target: BenchTarget
    rounds: int = 1
    profiles: dict[str, LayerProfile] = {}

    def row(self, variant_id: str) -> BenchRow | None:
        """The row of ``variant_id``, if it was benchmarked."""
        return next((r for r in self.variants if r.id == variant_id), None)
