"""Variant descriptors, host capabilities and the build folder's safe-write helpers.

A *variant* is one runnable form of a model: a file (FP32, FP16 or a quantized Q/DQ ONNX graph), the
backend that runs it, the precision it computes in, and what a device needs to run it. The
catalogue :data:`CATALOGUE` lists every variant ``edge-deploy`` knows how to build; each stage
(quantize, gate, bench, publish) walks it, so adding a variant is one entry here plus its builder
in ``deploy/quantize.py``.

Build folder layout (``build/deploy/<model>`` by default), written stage by stage::

    calibration.npz / calibration.json     calibrate: preprocessed calibration tensors + provenance
    model.pre.onnx                         calibrate: FP32 after quant_pre_process (shape inference,
                                           BatchNorm folding); every quantized variant starts here
    ranges.<method>.json                   calibrate: per-tensor ranges, ORT calibration-cache format
    amax.json                              calibrate: per-tensor absolute max (FP8 / TensorRT scales)
    drift.json                             calibrate: drift reference profile
    variants.json + variant files          quantize
    gate.json, selftest/<id>.npz           gate
    bench/report.{md,json,png}             bench

Every file is written to a temporary name in the same folder and renamed into place
(:func:`atomic_write`), so an interrupted stage (Ctrl-C) never leaves a half-written file that a
later stage would trust. ``variants.json``, ``gate.json`` and ``bench/report.json`` are read and
written through their typed records (:mod:`deploy.records`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.core.isa import isa_family
from agent.core.util import atomic_write

logger = logging.getLogger(__name__)

#: a QDQ graph needs opset >= 13 (per-channel) and >= 19 for FLOAT8E4M3FN Q/DQ
ORT_MIN_VERSION = "1.17"
OPENVINO_MIN_VERSION = "2024.0"
TENSORRT_MIN_INT8 = "10.0"
TENSORRT_MIN_FP8 = "10.0"
#: registry name of the backend the gate runs Q/DQ graphs on as exact arithmetic (deploy.gate_runtime)
SIM_BACKEND = "onnxruntime-qdq-sim"


@dataclass(frozen=True)
class VariantSpec:
    """A variant ``edge-deploy`` can build.

    ``file``: its file name in the build folder (several variants may share one file: OpenVINO
    INT8 runs the ONNX Runtime u8s8 Q/DQ graph). ``backend``/``options``/``precision``: how the
    agent loads it on a device. ``gate_backend``/``gate_options``: how the gate runs it on this
    build machine (TensorRT graphs are checked by running their Q/DQ arithmetic in ONNX Runtime
    on the CPU). ``requires``: agent.core.manifest.Requires fields: only what the variant cannot run
    without (architecture, GPU, TensorRT, backend). ``fast_on``: CPU flags of which any makes it
    fast, an ordering hint for devices. ``targets``: the instruction-set families (agent.core.isa) it is
    built for: the gate must show it accurate there (natively, with the backend restricted to that
    family, or, where the build host cannot run that family, by computing its integer arithmetic
    exactly) before it is published. ``builder``: the name of the function in deploy.quantize that
    produces the file.
    """

    id: str
    backend: str
    precision: str
    file: str
    builder: str
    format: str = "onnx"
    options: Mapping[str, Any] = field(default_factory=dict)
    gate_backend: str = ""
    gate_options: Mapping[str, Any] = field(default_factory=dict)
    requires: Mapping[str, Any] = field(default_factory=dict)
    fast_on: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    description: str = ""

    @property
    def validated_with(self) -> str:
        """Which backend runs this variant for the gate here (its own, or the ORT simulation)."""
        return self.gate_backend or self.backend

    @property
    def native_here(self) -> bool:
        """True when the gate runs the variant with its own backend (so it can be benchmarked)."""
        return not self.gate_backend or self.gate_backend == self.backend


_X86 = ("x86_64",)
_ARM = ("aarch64",)
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")

CATALOGUE: tuple[VariantSpec, ...] = (
    VariantSpec(
        id="fp32",
        backend="onnxruntime",
        precision="fp32",
        file="model.fp32.onnx",
        builder="copy_fp32",
        requires={"backend_min_version": ORT_MIN_VERSION},
        description="FP32 reference on ONNX Runtime CPU: the fallback every device can run.",
    ),
    VariantSpec(
        id="ort-int8-u8s8",
        backend="onnxruntime",
        precision="int8",
        file="model.int8-u8s8.qdq.onnx",
        builder="build_ort_u8s8",
        format="onnx-qdq",
        requires={"arch": _X86, "backend_min_version": ORT_MIN_VERSION},
        fast_on=_VNNI,
        targets=("x86-vnni",),
        description="ONNX Runtime INT8 Q/DQ, u8 activations / s8 per-channel symmetric weights: the "
        "x86 VNNI fast path. Without VNNI ONNX Runtime multiplies with VPMADDUBSW, whose 16-bit sums "
        "saturate on 8-bit weights (measured on an AVX2 EPYC: accuracy 0.78 vs 1.00): see ort-int8-u8s8-rr.",
    ),
    VariantSpec(
        id="ort-int8-u8s8-rr",
        backend="onnxruntime",
        precision="int8",
        file="model.int8-u8s8-rr.qdq.onnx",
        builder="build_ort_u8s8_rr",
        format="onnx-qdq",
        requires={"arch": _X86, "backend_min_version": ORT_MIN_VERSION},
        fast_on=("avx2",),
        targets=("x86-avx2",),
        description="ONNX Runtime INT8 Q/DQ, u8 activations / 7-bit (reduce_range) per-channel symmetric "
        "weights: u8 x s7 pair sums fit VPMADDUBSW's 16 bits, so x86 CPUs without VNNI compute it "
        "exactly (ONNX Runtime's documented remedy).",
    ),
    VariantSpec(
        id="ort-int8-s8s8",
        backend="onnxruntime",
        precision="int8",
        file="model.int8-s8s8.qdq.onnx",
        builder="build_ort_s8s8",
        format="onnx-qdq",
        requires={"arch": _ARM, "backend_min_version": ORT_MIN_VERSION},
        fast_on=("asimddp",),
        targets=("arm-dotprod",),
        description="ONNX Runtime INT8 Q/DQ, s8 symmetric activations and weights: the ARM "
        "dot-product (SDOT) path. On x86 ORT runs many of its convs in float, so it is ARM only.",
    ),
    VariantSpec(
        id="ov-int8",
        backend="openvino",
        precision="int8",
        file="model.int8-u8s8.qdq.onnx",
        builder="build_ort_u8s8",
        format="onnx-qdq",
        options={"inference_precision": "f32"},
        requires={"arch": _X86, "backend_min_version": OPENVINO_MIN_VERSION},
        fast_on=_VNNI,
        targets=("x86-vnni", "x86-avx2"),
        description="OpenVINO CPU INT8 running the same u8s8 Q/DQ graph as ort-int8-u8s8 (its "
        "low-precision transformations turn Q/DQ into int8 convolutions); non-quantized ops "
        "pinned to f32. Measured here: a Conv-only Q/DQ layout ran slower in OpenVINO (float "
        "Concat/Interpolate between the int8 convs), so one file serves both.",
    ),
    VariantSpec(
        id="ov-fp32",
        backend="openvino",
        precision="fp32",
        file="model.fp32.onnx",
        builder="copy_fp32",
        options={"inference_precision": "f32"},
        requires={"arch": ("x86_64", "aarch64"), "backend_min_version": OPENVINO_MIN_VERSION},
        description="OpenVINO CPU with INFERENCE_PRECISION_HINT=f32 set explicitly (its default "
        "on AVX512_BF16/AMX CPUs is bf16).",
    ),
    VariantSpec(
        id="ov-bf16",
        backend="openvino",
        precision="bf16",
        file="model.fp32.onnx",
        builder="copy_fp32",
        options={"inference_precision": "bf16"},
        requires={"arch": _X86, "backend_min_version": OPENVINO_MIN_VERSION},
        fast_on=("avx512_bf16", "amx_bf16"),
        description="OpenVINO CPU in bf16 (INFERENCE_PRECISION_HINT=bf16) on CPUs with native bf16.",
    ),
    VariantSpec(
        id="ort-fp16",
        backend="onnxruntime",
        precision="fp16",
        file="model.fp16.onnx",
        builder="build_fp16",
        requires={"arch": _ARM, "cpu_features": ("asimdhp",), "backend_min_version": ORT_MIN_VERSION},
        description="FP16 weights and compute with FP32 inputs/outputs (Cast at the edges), for ARM "
        "CPUs with half-precision arithmetic.",
    ),
    VariantSpec(
        id="trt-fp16",
        backend="tensorrt",
        precision="fp16",
        file="model.fp16.onnx",
        builder="build_fp16",
        gate_backend="onnxruntime",
        requires={
            "gpu": True,
            "gpu_compute_capability_min": "7.5",
            "tensorrt_min": TENSORRT_MIN_INT8,
        },
        description="The FP16 graph for a TensorRT engine built on the device (strongly typed).",
    ),
    VariantSpec(
        id="trt-int8",
        backend="tensorrt",
        precision="int8",
        file="model.trt-int8.qdq.onnx",
        builder="build_trt_int8",
        format="onnx-qdq",
        gate_backend=SIM_BACKEND,
        requires={
            "gpu": True,
            "gpu_compute_capability_min": "7.5",
            "tensorrt_min": TENSORRT_MIN_INT8,
        },
        description="TensorRT explicit-quantization graph: symmetric s8 activations and per-channel "
        "s8 weights (zero point 0) on Conv/Gemm inputs only; ConvTranspose/Resize paths stay float.",
    ),
    VariantSpec(
        id="trt-fp8",
        backend="tensorrt",
        precision="fp8",
        file="model.trt-fp8.qdq.onnx",
        builder="build_trt_fp8",
        format="onnx-qdq",
        gate_backend=SIM_BACKEND,
        requires={
            "gpu": True,
            "gpu_compute_capability_min": "8.9",
            "tensorrt_min": TENSORRT_MIN_FP8,
        },
        description="TensorRT FP8 (E4M3) explicit-quantization graph: per-tensor activation scales "
        "amax/448, per-channel weight scales amax/448, FLOAT8E4M3FN zero points. Needs CC >= 8.9.",
    ),
)


def catalogue_by_id() -> dict[str, VariantSpec]:
    """The catalogue as ``{id: VariantSpec}``."""
    return {v.id: v for v in CATALOGUE}


def select_variants(ids: list[str] | tuple[str, ...] | None) -> list[VariantSpec]:
    """The catalogue entries named by ``ids`` (all when None/empty), in catalogue order.

    Always includes ``fp32``: it is the reference the gate compares with and the published
    fallback. Raises ValueError for an unknown id.
    """
    known = catalogue_by_id()
    if not ids:
        return list(CATALOGUE)
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"unknown variant id(s) {', '.join(unknown)}; known: {', '.join(known)}")
    wanted = set(ids) | {"fp32"}
    return [v for v in CATALOGUE if v.id in wanted]


# --------------------------------------------------------------------------------------------
# Host capabilities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """What this machine offers: arch, CPU flags, model name, core count, GPUs, libraries."""

    arch: str
    cpu_model: str
    cores: int
    cpu_flags: frozenset[str]
    gpus: tuple[tuple[str, str], ...] = ()  # (name, compute capability)
    libraries: Mapping[str, str] = field(default_factory=dict)

    @property
    def isa_family(self) -> str:
        """The instruction-set family (agent.core.isa) whose numerics this host's gate proves."""
        return isa_family(self.arch, self.cpu_flags)

    def describe(self) -> str:
        """One line for reports: CPU model, cores, the ISA extensions that matter here, the family."""
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                           "asimddp", "asimdhp") if f in self.cpu_flags]
        gpu = f", GPU {', '.join(f'{n} (CC {cc})' for n, cc in self.gpus)}" if self.gpus else ", no GPU"
        return (f"{self.cpu_model} ({self.arch}, {self.cores} cores, {' '.join(isa) or 'baseline ISA'}, "
                f"family {self.isa_family}){gpu}")

    def unmet(self, requires: Mapping[str, Any]) -> list[str]:
        """Requirements (agent.core.manifest.Requires fields) this host does not meet, as sentences."""
        missing: list[str] = []
        arch = tuple(requires.get("arch", ()))
        if arch and self.arch not in arch:
            missing.append(f"needs {'/'.join(arch)}, this is {self.arch}")
        for flag in requires.get("cpu_features", ()):
            if flag not in self.cpu_flags:
                missing.append(f"needs CPU feature {flag}")
        any_of = tuple(requires.get("cpu_features_any", ()))
        if any_of and not any(f in self.cpu_flags for f in any_of):
            missing.append(f"needs one of CPU features {', '.join(any_of)}")
        if requires.get("gpu"):
            if not self.gpus:
                missing.append("needs an NVIDIA GPU")
            else:
                lo = requires.get("gpu_compute_capability_min")
                if lo and not any(_cc(cc) >= _cc(lo) for _, cc in self.gpus):
                    missing.append(f"needs GPU compute capability >= {lo}")
            if requires.get("tensorrt_min") and "tensorrt" not in self.libraries:
                missing.append("needs TensorRT (not installed here)")
        return missing


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def _cpu_info() -> tuple[str, frozenset[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (x86 'flags', ARM 'Features')."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as exc:  # not Linux: no flags, variants with CPU requirements are skipped
        logger.warning("cannot read /proc/cpuinfo (%s); CPU features unknown", exc)
        return model, frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, frozenset(flags)


def _gpus() -> tuple[tuple[str, str], ...]:
    """(name, compute capability) of each NVIDIA GPU nvidia-smi reports; () without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed (%s); assuming no GPU", exc)
        return ()
    rows = []
    for line in out.strip().splitlines():
        name, _, cc = line.rpartition(",")
        rows.append((name.strip(), cc.strip()))
    return tuple(rows)


def _library_versions() -> dict[str, str]:
    """Versions of the inference libraries importable here (by metadata, without importing them)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist, name in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("tensorrt", "tensorrt"),
                       ("onnx", "onnx"), ("onnxconverter-common", "onnxconverter_common")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue  # not installed: absent from the map, which is the answer
    return out


_HOST: Host | None = None


def host() -> Host:
    """This machine's capabilities (computed once)."""
    global _HOST
    if _HOST is None:
        model, flags = _cpu_info()
        arch = platform.machine().lower()
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
        _HOST = Host(arch=arch, cpu_model=model, cores=os.cpu_count() or 1, cpu_flags=flags,
                     gpus=_gpus(), libraries=_library_versions())
    return _HOST


# --------------------------------------------------------------------------------------------
# Safe writes
# --------------------------------------------------------------------------------------------


def write_json(final: Path | str, doc: Any) -> Path:
    """Write ``doc`` as indented JSON atomically; returns the path."""
    return atomic_write(final, json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: Path | str) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, paths, dataclasses: what stage results contain
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def cleanup_on_interrupt(*paths: Path) -> Iterator[None]:
    """Remove ``paths`` (files or folders) if the block raises (Ctrl-C included); re-raise.

    For outputs that a library writes itself (quantize_static, openvino) and that cannot go
    through :func:`atomic_path` directly.
    """
    try:
        yield
    except BaseException:
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment plus ``extra``, with this checkout first on the import path: a worker
    subprocess (bench, ISA-limited gate run) must run the same agent/deploy code, installed or not."""
    env = {**os.environ, **(extra or {})}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def default_build_dir(model_name: str) -> Path:
    """``build/deploy/<model>``: where stages read and write unless ``--build`` says otherwise."""
    return Path("build") / "deploy" / model_name
