"""The model registry manifest: schema (pydantic) and Ed25519 verification helpers.

Written by ``edge-deploy publish`` and read by the agent's registry client, so both share this one
definition (docs/manifest.md describes it for humans). Only numpy-free, torch-free imports:
pydantic and cryptography.

A registry is a static tree::

    index.json                      models -> versions -> manifest path and digest
    index.json.sig                  Ed25519 signature over the exact bytes of index.json
    <model>/<version>/manifest.json the signed manifest (this module's :class:`Manifest`)
    <model>/<version>/manifest.json.sig   64 raw bytes: Ed25519 over the exact manifest bytes
    <model>/<version>/<variant files, self-test vectors>

Trust comes from the manifest signature only: :func:`verify_manifest` checks the signature over
the bytes as downloaded *before* parsing them, then each file is checked against the manifest's
``sha256`` and ``size`` (:func:`verify_file`). ``index.json`` is a convenience for discovery; it is
signed too, but the agent must not trust anything in it that the manifest does not repeat.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.core import signing
from agent.core.errors import RegistryError
from agent.core.util import sha256_bytes, sha256_file

__all__ = [
    "SCHEMA_VERSION",
    "BenchFigures",
    "DriftProfile",
    "GateResult",
    "Index",
    "IsaVerdict",
    "IndexEntry",
    "Manifest",
    "Requires",
    "SelfTest",
    "ValidationSet",
    "Variant",
    "canonical_json",
    "key_id",
    "load_public_key",
    "parse_manifest",
    "sha256_bytes",
    "sha256_file",
    "verify_file",
    "verify_index",
    "verify_manifest",
    "verify_signature",
]

#: bumped on incompatible changes; the agent refuses manifests with a newer major schema.
#: 2: per-family gate verdicts (``Variant.isa_gates``), ``fast_on`` hints, the signed validation set
SCHEMA_VERSION = 2
SIGNATURE_SIZE = signing.SIGNATURE_SIZE

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CC = re.compile(r"^\d+\.\d+$")
# variant files live next to the manifest: plain relative paths, no "..", no absolute paths
_REL_PATH = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.(?:/|$))[A-Za-z0-9._/-]+$")


class _Strict(BaseModel):
    # extra="forbid": a typo in a manifest (or a field from a newer schema) is an error, not a
    # silently ignored key the agent might have needed to honour
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_rel_path(value: str) -> str:
    if not _REL_PATH.match(value):
        raise ValueError(f"{value!r} is not a plain relative path inside the model version folder")
    return value


def _check_sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"{value!r} is not a lower-case hex SHA-256 digest")
    return value


class _FileRef(_Strict):
    """A file of the version folder, named by its manifest entry and pinned by size and digest."""

    file: str = Field(description="Relative path inside the model version folder.")
    sha256: str = Field(description="Lower-case hex SHA-256 of the file.")
    size: int = Field(ge=1, description="Size in bytes.")

    @field_validator("file")
    @classmethod
    def _file_ok(cls, value: str) -> str:
        return _check_rel_path(value)

    @field_validator("sha256")
    @classmethod
    def _digest_ok(cls, value: str) -> str:
        return _check_sha256(value)


class Requires(_Strict):
    """What a device needs to run a variant. Every listed condition must hold.

    ``arch`` lists acceptable ``platform.machine()`` values (normalised: ``x86_64``, ``aarch64``);
    empty means any. ``cpu_features`` must all be present (``/proc/cpuinfo`` flag names, e.g.
    ``avx512_vnni``, ``asimddp``); ``cpu_features_any`` needs at least one of them (empty: no
    condition). ``gpu`` variants need an NVIDIA GPU whose compute capability lies in
    [``gpu_compute_capability_min``, ``gpu_compute_capability_max``] (``"8.9"`` style strings, max
    inclusive, None: unbounded) and, for TensorRT, a TensorRT of at least ``tensorrt_min``.
    ``backend_min_version`` is the oldest version of the backend's library the variant was
    validated with or needs (e.g. opset / QDQ support).
    """

    arch: tuple[str, ...] = Field((), description="Acceptable CPU architectures; empty: any.")
    cpu_features: tuple[str, ...] = Field((), description="CPU flags that must all be present.")
    cpu_features_any: tuple[str, ...] = Field((), description="CPU flags of which one must be present.")
    gpu: bool = Field(False, description="Needs an NVIDIA GPU.")
    gpu_compute_capability_min: str | None = Field(None, description="Lowest GPU compute capability.")
    gpu_compute_capability_max: str | None = Field(None, description="Highest GPU compute capability.")
    tensorrt_min: str | None = Field(None, description="Oldest TensorRT version that can build it.")
    backend_min_version: str | None = Field(None, description="Oldest backend library version.")

    @field_validator("gpu_compute_capability_min", "gpu_compute_capability_max")
    @classmethod
    def _cc(cls, value: str | None) -> str | None:
        if value is not None and not _CC.match(value):
            raise ValueError(f"compute capability {value!r} is not of the form '8.9'")
        return value


class SelfTest(_FileRef):
    """A known input and the output this variant produced on the build machine.

    The ``.npz`` file holds ``input`` (float32, N C *spatial) and ``expected`` (float32, the
    model's output on it). On the device, run ``input`` and require
    ``allclose(out, expected, rtol, atol)`` for at least ``min_close_fraction`` of the elements
    and argmax agreement over the class axis of at least ``min_argmax_agreement``: quantized
    kernels differ slightly between CPUs, so exact equality is not a fair test, but a wrong
    or corrupted model misses by far more.
    """

    input_shape: tuple[int, ...] = Field(description="Shape of `input`.")
    atol: float = Field(ge=0, description="Absolute tolerance on logits.")
    rtol: float = Field(ge=0, description="Relative tolerance on logits.")
    min_close_fraction: float = Field(0.99, ge=0, le=1, description="Share of elements within tolerance.")
    min_argmax_agreement: float = Field(0.99, ge=0, le=1, description="Share of argmax equal to expected.")


class IsaVerdict(_Strict):
    """The accuracy gate's verdict for one instruction-set family (``agent.core.isa``).

    ``method``: ``native`` (run on a CPU of that family), ``isa-limited`` (run on a higher family
    with the backend restricted to this one's instructions, ``ONEDNN_MAX_CPU_ISA``) or
    ``simulated`` (the Q/DQ arithmetic computed exactly in float on the CPU: what an exact
    integer path such as VNNI or SDOT computes, but not proof of any particular CPU's kernels).
    Only ``native`` and ``isa-limited`` passes spare a device of that family its own gate; a failed
    verdict of any method refuses the variant there.
    """

    passed: bool
    method: Literal["native", "isa-limited", "simulated"]
    summary: str = Field("", description="The figures, e.g. 'accuracy 0.7812 vs FP32 1.0000 (drop limit 0.01)'.")
    host: str = Field("", description="The build host's CPU the verdict was measured on.")


class GateResult(_Strict):
    """The accuracy gate's verdict on this variant (see deploy/gate.py).

    ``metrics`` holds the variant's figures (accuracy, per-class recall, mean/label Dice, argmax
    agreement with FP32, ...) and ``reference`` FP32's on the same data; ``drops`` the
    differences that the thresholds (``thresholds``) apply to. ``validated_with`` says which
    runtime executed the variant for the gate (a TensorRT QDQ graph is validated by simulating its
    Q/DQ arithmetic in ONNX Runtime on the CPU; the engine itself is checked on the device by
    the self-test).
    """

    passed: bool
    validated_with: str
    n_samples: int = Field(ge=0)
    metrics: dict[str, float]
    reference: dict[str, float] = Field(default_factory=dict)
    drops: dict[str, float] = Field(default_factory=dict)
    thresholds: dict[str, float] = Field(default_factory=dict)
    failures: tuple[str, ...] = ()
    batch_invariant: bool | None = None
    isa_family: str = Field("", description="The instruction-set family of the CPU this gate ran on (agent.core.isa).")


class BenchFigures(_Strict):
    """Benchmark figures measured by ``edge-deploy bench`` on the build machine (``device``)."""

    device: str = Field(description="Where it was measured (CPU model, cores, threads).")
    threads: int = Field(ge=0)
    latency_ms_median: float | None = None
    latency_ms_p95: float | None = None
    throughput_per_s: float | None = None
    throughput_batch: int | None = None
    peak_rss_mb: float | None = None
    full_volume_ms: float | None = Field(None, description="3D models: one preprocessed volume, sliding window.")
    speedup_vs_fp32: float | None = None
    note: str = ""


class Variant(_FileRef):
    """One runnable form of the model: a file, the backend that runs it and what it needs."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    backend: Literal["onnxruntime", "openvino", "tensorrt"]
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"]
    format: str = Field("onnx", description="'onnx' (FP32/FP16), 'onnx-qdq' (quantized Q/DQ graph).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Backend load options (e.g. OpenVINO inference_precision)."
    )
    execution_precision: str = Field(
        description="What the build machine's runtime actually computed in, read back from it."
    )
    requires: Requires = Requires()
    fast_on: tuple[str, ...] = Field(
        (), description="CPU flags of which any makes this variant fast (e.g. avx512_vnni): an ordering hint, "
        "never a requirement; the device's own timing decides.")
    targets: tuple[str, ...] = Field((), description="The instruction-set families this variant is built for.")
    isa_gates: dict[str, IsaVerdict] = Field(
        default_factory=dict, description="The accuracy gate's verdict per instruction-set family, where known.")
    description: str = ""
    priority: int = Field(
        0, ge=0, description="Preference among variants a device can run: lower first (set from the benchmarks)."
    )
    gate: GateResult
    bench: BenchFigures | None = None
    selftest: SelfTest | None = None


class Histogram(_Strict):
    """A histogram: ``counts[i]`` values fell in ``[edges[i], edges[i+1])``."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    @field_validator("counts")
    @classmethod
    def _nonneg(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 0 for c in value):
            raise ValueError("histogram counts must be >= 0")
        return value


class DriftProfile(_Strict):
    """Reference statistics of the data the model was calibrated and validated on.

    The agent compares live traffic against these (KS / PSI / chi-square) to flag drift:
    ``intensity``: histogram of raw modality values (HU for CT) over the body;
    ``model_input``: histogram of the preprocessed input (what the network sees);
    ``metadata``: numeric DICOM-derived fields (min/max/quantiles) and categorical ones (counts);
    ``outputs``: predicted class frequencies and confidence histogram (classification), or
    label volume fractions (segmentation).
    """

    n_series: int = Field(ge=0)
    source: str = Field(description="Where the reference data came from (synthetic seeds or DICOM folder).")
    intensity: Histogram
    model_input: Histogram
    metadata_numeric: dict[str, dict[str, float]] = Field(default_factory=dict)
    metadata_categorical: dict[str, dict[str, int]] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    series: list[dict[str, Any]] = Field(
        default_factory=list,
        description="One ``agent.core.drift.SeriesSummary`` per reference series (aggregates only): the "
        "device resamples windows of its own size from these to calibrate each signal's thresholds.",
    )


class ValidationSet(_FileRef):
    """A small signed validation set the device runs its own accuracy gate on (synthetic data).

    The ``.npz`` (format: ``agent.core.accuracy.load_validation_set``) holds preprocessed model inputs
    and their truth: class indices (classification) or label maps (segmentation). ``reference``
    is FP32's score on it on the build host, for reports; the device compares each variant with
    FP32 *as computed on the device*, on the same samples, with the thresholds of ``spec.gate``.
    """

    n_samples: int = Field(ge=1, description="Slices (classification) or volumes (segmentation).")
    source: str = Field(description="Where the samples came from (synthetic seeds).")
    reference: dict[str, float] = Field(default_factory=dict, description="FP32's metrics on the build host.")


class Manifest(_Strict):
    """The signed description of one model version and all its published variants."""

    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str
    created_at: str = Field(description="ISO 8601 UTC.")
    task: Literal["segmentation", "classification"]
    spec: dict[str, Any] = Field(description="The model.toml content (agent.core.modelspec.ModelSpec).")
    input_name: str = "input"
    output_name: str = "logits"
    fallback: str = Field(description="Variant id to use when nothing faster qualifies (FP32).")
    variants: tuple[Variant, ...]
    calibration: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    drift: DriftProfile | None = None
    validation_set: ValidationSet | None = Field(
        None, description="The set a device gates variants on that are not proven for its instruction-set family.")
    toolchain: dict[str, str] = Field(default_factory=dict)
    signing_key_id: str = Field("", description="key_id() of the key that signed this manifest.")

    @field_validator("variants")
    @classmethod
    def _unique_ids(cls, value: tuple[Variant, ...]) -> tuple[Variant, ...]:
        ids = [v.id for v in value]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate variant ids: {', '.join(dupes)}")
        if not value:
            raise ValueError("a manifest needs at least one variant")
        return value

    def variant(self, variant_id: str) -> Variant:
        """The variant with this id; RegistryError if there is none."""
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise RegistryError(f"{self.name} {self.version}: no variant {variant_id!r}")

    @model_validator(mode="after")
    def _fallback_exists(self) -> Manifest:
        # the fallback must be one of the variants, or an agent that cannot run anything faster
        # would have nothing to run
        if self.fallback not in {v.id for v in self.variants}:
            raise ValueError(f"fallback {self.fallback!r} is not one of the variants")
        return self


class IndexEntry(_Strict):
    """One published version of a model in ``index.json``."""

    manifest: str = Field(description="Path of manifest.json relative to the registry root.")
    sha256: str = Field(description="SHA-256 of manifest.json.")
    created_at: str
    variants: tuple[str, ...] = ()

    @field_validator("manifest")
    @classmethod
    def _manifest_ok(cls, value: str) -> str:
        return _check_rel_path(value)

    @field_validator("sha256")
    @classmethod
    def _digest_ok(cls, value: str) -> str:
        return _check_sha256(value)


class IndexModel(_Strict):
    latest: str
    versions: dict[str, IndexEntry]


class Index(_Strict):
    """``index.json``: which models and versions the registry holds."""

    schema_version: int = SCHEMA_VERSION
    updated_at: str
    models: dict[str, IndexModel] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Digests and canonical bytes
# --------------------------------------------------------------------------------------------


def verify_file(path: Path | str, sha256: str, size: int | None = None) -> None:
    """Raise RegistryError unless the file at ``path`` has this size (if given) and SHA-256.

    The size is checked first: it is free and catches truncated downloads without hashing.
    """
    p = Path(path)
    try:
        actual_size = p.stat().st_size
    except FileNotFoundError as exc:
        raise RegistryError(f"{p}: missing") from exc
    if size is not None and actual_size != size:
        raise RegistryError(f"{p.name}: size {actual_size} bytes, manifest says {size}")
    digest = sha256_file(p)
    if digest != sha256:
        raise RegistryError(f"{p.name}: sha256 {digest} does not match the manifest's {sha256}")


def canonical_json(doc: Any) -> bytes:
    """The bytes we sign: sorted keys, 2-space indent, UTF-8, trailing newline.

    Verification never re-serialises: it checks the signature over the bytes as stored, so this
    format only has to be deterministic for reproducible builds, not for verification.
    """
    return (json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


# --------------------------------------------------------------------------------------------
# Keys and signatures
# --------------------------------------------------------------------------------------------


def load_public_key(pem: bytes) -> Any:
    """Parse a PEM Ed25519 public key; RegistryError if it is not one (agent.core.signing)."""
    return signing.load_public_key(pem, RegistryError)


def key_id(pem: bytes) -> str:
    """Short, stable id of a public key (agent.core.signing.key_id)."""
    return signing.key_id(pem)


def verify_signature(data: bytes, sig: bytes, public_keys: Sequence[bytes]) -> str:
    """Check an Ed25519 signature over ``data`` against any of the trusted PEM ``public_keys``
    (agent.core.signing); returns the verifying key's id, RegistryError when none verifies."""
    return signing.verify_signature(data, sig, public_keys, RegistryError)


def parse_manifest(manifest_bytes: bytes) -> Manifest:
    """Parse manifest bytes (UTF-8 JSON) into a Manifest; RegistryError naming the field if invalid.

    Does NOT check a signature: use :func:`verify_manifest` for anything downloaded.
    """
    try:
        doc = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"manifest is not valid UTF-8 JSON: {exc}") from exc
    if isinstance(doc, dict) and int(doc.get("schema_version", 0) or 0) > SCHEMA_VERSION:
        raise RegistryError(
            f"manifest schema_version {doc.get('schema_version')} is newer than this agent's {SCHEMA_VERSION}"
        )
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise RegistryError(f"manifest does not validate: {problems}") from exc


def verify_manifest(manifest_bytes: bytes, sig_bytes: bytes, public_keys: Sequence[bytes]) -> Manifest:
    """Verify the Ed25519 signature over the exact ``manifest_bytes``, then parse them.

    ``sig_bytes`` is the content of ``manifest.json.sig`` (64 raw bytes); ``public_keys`` the
    trusted PEM public keys. Returns the parsed :class:`Manifest`; raises RegistryError when the
    signature is missing, malformed or not from a trusted key, or the manifest does not validate.
    The signature is checked before the JSON is even parsed, so untrusted input never reaches
    the parser.
    """
    verify_signature(manifest_bytes, sig_bytes, public_keys)
    return parse_manifest(manifest_bytes)


def verify_index(index_bytes: bytes, sig_bytes: bytes, public_keys: Sequence[bytes]) -> Index:
    """Verify ``index.json`` like :func:`verify_manifest` and parse it into an :class:`Index`."""
    verify_signature(index_bytes, sig_bytes, public_keys)
    try:
        return Index.model_validate_json(index_bytes)
    except ValidationError as exc:
        raise RegistryError(f"index.json does not validate: {exc.error_count()} error(s): {exc}") from exc
