"""``edge-deploy calibrate``: build the calibration set and measure every tensor's range.

Takes a model folder (``model.toml`` + FP32 ONNX) and writes the build folder's calibration
artefacts (see :mod:`deploy.variants` for the layout):

1. **Calibration set**, through the agent's own code path: DICOM (a folder of series, or phantoms
   from :mod:`deploy.synth`) -> ``agent.imaging.build_volume`` -> ``agent.imaging.prepare``. 2D
   models take whole prepared slices, balanced across classes and difficulty levels (obvious,
   subtle, artefact); 3D models take ``patches_per_volume`` patches per volume from the very
   sliding-window grid the agent runs at inference (so calibration sees what inference sees,
   background-heavy border patches included).
2. ``model.pre.onnx``: ``quant_pre_process`` of the FP32 model (BatchNorm folded), the graph all
   quantized variants start from.
3. **Ranges**: the calibration tensors go through a ``CalibrationDataReader`` into ONNX Runtime's
   calibration graph (every float tensor exposed); ranges are computed with ORT's own
   histogram algorithms (percentile, entropy) or exact min/max, streaming one sample at a time
   so 3D models at 96^3 fit in memory. Written as ORT's calibration cache
   (``ranges.<method>.json``, consumed by ``quantize_static(calibration_cache_path=...)``) and as
   ``amax.json`` (method amax and plain max per tensor, for the TensorRT INT8/FP8 graphs).
4. ``drift.json``: the drift reference profile's input side (intensities, metadata).

Model options come from an optional ``[quantization]`` table in ``model.toml`` (keys:
:class:`QuantConfig`); command-line flags override them. The range computation (step 3) is
``deploy.calibrate_ranges``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.core.errors import ModelSpecError
from agent.core.modelspec import ModelSpec, load_spec
from agent.core.util import atomic_path, sha256_file
from deploy.calibrate_ranges import METHODS, ArrayCalibrationReader, CalibrationError, collect_ranges
from deploy.drift_profile import DriftAccumulator
from deploy.variants import default_build_dir, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "METHODS",
    "ArrayCalibrationReader",
    "CalibrationError",
    "QuantConfig",
    "build_calibration_set",
    "calibrate",
    "collect_ranges",
    "config_from_args",
    "load_quant_config",
    "resolve_method",
    "sliding_window_patches",
]

logger = logging.getLogger(__name__)

#: activation range method when model.toml does not name one. Classification: percentile 99.99
#: (clips rare outliers, finer steps for the bulk). Segmentation: minmax. Measured on an early
#: ct-abdomen-seg checkpoint (spleen Dice 0.55; 3 held-out volumes): percentile-99.99 INT8 lost
#: 0.07 spleen Dice (clipping the rare large activations that decide a weak organ's boundary)
#: while minmax kept every label within 0.015, and entropy (KL) clipped so hard that the kidneys
#: vanished. On the trained model both minmax and percentile stay within 0.003; minmax is the
#: one that also held on the fragile checkpoint. The gate catches all of these either way.
DEFAULT_METHOD = {"classification": "percentile", "segmentation": "minmax"}


# --------------------------------------------------------------------------------------------
# Configuration ([quantization] in model.toml)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """The ``[quantization]`` table of model.toml (all keys optional).

    method: "minmax" | "entropy" | "percentile" (activation ranges for INT8); default by task
        (:data:`DEFAULT_METHOD`: percentile for classification, minmax for segmentation)
    percentile: float, percentile of activation values kept (default 99.99)
    calibration_seed / validation_seed: seeds of the synthetic sets; different seeds give
        disjoint sets (per-series seeds are hashed from (seed, index))
    calibration_samples: 2D: slices (balanced over classes x difficulties)
    calibration_volumes / patches_per_volume: 3D: volumes, and sliding-window patches per volume
    validation_samples (2D slices) / validation_volumes (3D volumes): the gate's held-out set
    device_validation_samples / device_validation_volumes: the first slices (classes round robin,
        so 240 stay balanced) / volumes of that set shipped signed in the manifest, on which a
        device gates variants not proven for its instruction-set family
    variants: variant ids to build (default: all of deploy.variants.CATALOGUE)
    exclude_nodes: node names kept in float in every quantized variant
    threads: intra-op threads for calibration, gate and benchmark (default 2)
    """

    method: str = ""
    percentile: float = 99.99
    calibration_seed: int = 200001
    validation_seed: int = 300001
    calibration_samples: int = 240
    calibration_volumes: int = 25
    patches_per_volume: int = 4
    validation_samples: int = 480
    validation_volumes: int = 6
    device_validation_samples: int = 240
    device_validation_volumes: int = 3
    variants: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    threads: int = 2

    def __post_init__(self) -> None:
        if self.method and self.method not in METHODS:
            raise ModelSpecError(f"[quantization] method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ModelSpecError(f"[quantization] percentile must be in (50, 100], got {self.percentile}")
        if self.calibration_seed == self.validation_seed:
            raise ModelSpecError("[quantization] calibration_seed and validation_seed must differ (disjoint sets)")
        for name in ("calibration_samples", "calibration_volumes", "patches_per_volume",
                     "validation_samples", "validation_volumes", "device_validation_samples",
                     "device_validation_volumes"):
            if int(getattr(self, name)) < 1:
                raise ModelSpecError(f"[quantization] {name} must be >= 1")


def load_quant_config(model_dir: Path) -> QuantConfig:
    """Read the optional ``[quantization]`` table of ``model_dir/model.toml``; defaults otherwise.

    Raises ModelSpecError for an unknown key or an invalid value (a typo must not silently fall
    back to a default).
    """
    path = Path(model_dir) / "model.toml"
    try:
        table = tomllib.loads(path.read_text()).get("quantization", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelSpecError(f"{path}: {exc}") from exc
    known = {f.name for f in fields(QuantConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ModelSpecError(f"{path}: unknown [quantization] key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in table.items()}
    try:
        return QuantConfig(**values)
    except TypeError as exc:
        raise ModelSpecError(f"{path}: [quantization]: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Cases: DICOM -> agent preprocessing
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One series after the agent's preprocessing, with its ground truth when known.

    ``image``: prepared (C, *spatial) float32; ``geometry``: agent.imaging Geometry (to restore
    label maps); ``spacing``: source voxel spacing (z, y, x); ``truth_class``: class index
    (classification); ``truth_labels``: uint8 label map on the source grid (segmentation);
    ``group``: the stratum it was drawn for (``"glioma/subtle"``, ``"noise=1.5"``).
    """

    case_id: str
    group: str
    image: np.ndarray
    geometry: Any
    spacing: tuple[float, float, float]
    truth_class: int | None = None
    truth_labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


#: CT phantom noise levels cycled through (the CT generator has no difficulty knob; image noise is
#: what varies most between scanners and protocols)
CT_NOISE_LEVELS = (1.0, 1.5, 0.75)


def _prepare(datasets: Sequence[Any], spec: ModelSpec, drift: DriftAccumulator | None) -> tuple[Any, Any]:
    """DICOM datasets -> (Volume, PreparedInput) with the agent's own functions; feeds ``drift``."""
    from agent.imaging import build_volume, prepare

    volume = build_volume(list(datasets))
    prepared = prepare(volume, spec.input)
    if drift is not None:
        drift.add_series(volume.array, prepared.array, volume.meta, volume.spacing)
    return volume, prepared


def synthetic_cases(
    spec: ModelSpec, seed: int, n: int, drift: DriftAccumulator | None = None
) -> Iterator[Case]:
    """``n`` synthetic series for ``spec``'s task, generated from ``seed`` and preprocessed.

    Series ``i`` is the phantom ``deploy.synth.generate_mr/generate_ct`` would write as series
    ``i`` of set ``seed`` (``derive_seed(seed, i)``; sets with different seeds are disjoint).
    Classification (MR): classes round-robin and difficulty advances every 4 series
    (``mr_assignment``), so any n that is a multiple of 12 is exactly balanced over
    class x difficulty. Segmentation (CT): the noise level cycles over :data:`CT_NOISE_LEVELS`.
    Raises CalibrationError when a series seed would be one reserved for training.
    """
    from deploy.evaluate import TRAINING_SEEDS
    from deploy.synth import derive_seed, make_ct_phantom, make_mr_slice, mr_assignment

    modality = spec.input.modality.upper()
    if modality not in ("MR", "CT"):
        raise CalibrationError(f"no synthetic generator for modality {spec.input.modality!r}")
    for i in range(n):
        s = derive_seed(seed, i)
        if s in TRAINING_SEEDS:  # 63-bit hashes: astronomically unlikely, cheap to rule out
            raise CalibrationError(f"set seed {seed}: series {i} would reuse a training phantom seed")
        if modality == "MR":
            cls, difficulty = mr_assignment(i)
            ph = make_mr_slice(s, cls=cls, difficulty=difficulty, index=i)
            volume, prepared = _prepare([ph.dataset], spec, drift)
            truth_class = spec.labels.index(ph.cls) if ph.cls in spec.labels else ph.class_index
            yield Case(f"mr-{seed}-{i}", f"{cls}/{difficulty}", prepared.array, prepared.geometry,
                       volume.spacing, truth_class=truth_class, meta={"seed": s})
        else:
            noise = CT_NOISE_LEVELS[i % len(CT_NOISE_LEVELS)]
            ct = make_ct_phantom(s, noise=noise, index=i)
            volume, prepared = _prepare(ct.datasets, spec, drift)
            yield Case(f"ct-{seed}-{i}", f"noise={noise:g}", prepared.array, prepared.geometry,
                       volume.spacing, truth_labels=ct.labels, meta={"seed": s})


def dicom_cases(spec: ModelSpec, folder: Path, drift: DriftAccumulator | None = None,
                limit: int | None = None) -> Iterator[Case]:
    """Series from a folder tree: every directory holding ``*.dcm`` files is one series.

    Ground truth is read when present, as ``deploy.synth`` writes it: ``labels.npy`` (uint8 label
    map, source grid) for segmentation, ``truth.json`` with ``class`` for classification. With a
    ``limit``, series are taken round-robin over the (class, difficulty) strata the truth files
    name, so a folder sorted by class still gives a balanced subset.
    """
    import json

    from agent.imaging import read_datasets

    dirs = sorted({p.parent for p in Path(folder).rglob("*.dcm")})
    if not dirs:
        raise CalibrationError(f"{folder}: no *.dcm files found")
    strata: dict[str, list[Path]] = {}
    for d in dirs:
        key = "?"
        if (d / "truth.json").exists():
            t = json.loads((d / "truth.json").read_text())
            key = f"{t.get('class', '?')}/{t.get('difficulty', '?')}"
        strata.setdefault(key, []).append(d)
    queues = list(strata.values())
    ordered = [q[i] for i in range(max(len(q) for q in queues)) for q in queues if i < len(q)]
    for k, d in enumerate(ordered[:limit] if limit else ordered):
        datasets = read_datasets(sorted(d.glob("*.dcm")))
        volume, prepared = _prepare(datasets, spec, drift)
        truth_class = None
        labels = None
        group = "dicom"
        if (d / "truth.json").exists():
            truth = json.loads((d / "truth.json").read_text())
            if truth.get("class") in spec.labels:
                truth_class = spec.labels.index(truth["class"])
                group = f"{truth['class']}/{truth.get('difficulty', '?')}"
        if (d / "labels.npy").exists():
            labels = np.load(d / "labels.npy", allow_pickle=False)
        yield Case(f"dicom-{k}", group, prepared.array, prepared.geometry, volume.spacing,
                   truth_class=truth_class, truth_labels=labels, meta={"folder": str(d)})


def _padded(image: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Pad ``image`` (C, Z, Y, X) to at least ``patch`` exactly as the agent's sliding window
    does (centred, with each channel's minimum)."""
    spatial = image.shape[1:]
    pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch, strict=True)]
    if not any(b or a for b, a in pad):
        return image
    return np.stack([np.pad(image[c], pad, mode="constant", constant_values=float(image[c].min()))
                     for c in range(image.shape[0])])


def sliding_window_patches(image: np.ndarray, patch: Sequence[int], overlap: float, k: int,
                           rng: np.random.Generator) -> list[np.ndarray]:
    """``k`` distinct patches (C, *patch) drawn from the sliding-window grid of ``image``."""
    from agent.imaging import patch_starts

    img = _padded(image, patch)
    full = img.shape[1:]
    starts = [(z, y, x) for z in patch_starts(full[0], patch[0], overlap)
              for y in patch_starts(full[1], patch[1], overlap)
              for x in patch_starts(full[2], patch[2], overlap)]
    chosen = rng.choice(len(starts), size=min(k, len(starts)), replace=False)
    return [np.ascontiguousarray(img[:, z:z + patch[0], y:y + patch[1], x:x + patch[2]])
            for z, y, x in (starts[int(i)] for i in sorted(chosen))]


def build_calibration_set(
    spec: ModelSpec, cfg: QuantConfig, dicom: Path | None = None, drift: DriftAccumulator | None = None
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The calibration tensors (N, C, *spatial) float32 and one provenance record per tensor."""
    from tqdm import tqdm

    is_3d = spec.input.dims == 3
    n_series = cfg.calibration_volumes if is_3d else cfg.calibration_samples
    cases = (dicom_cases(spec, dicom, drift, limit=n_series) if dicom is not None
             else synthetic_cases(spec, cfg.calibration_seed, n_series, drift))
    rng = np.random.default_rng(cfg.calibration_seed)
    tensors: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    for case in tqdm(cases, total=n_series, desc="calibration set", unit="series", file=sys.stderr):
        if is_3d:
            assert spec.input.patch_size is not None  # validated by ModelSpec for 3D
            for j, p in enumerate(sliding_window_patches(case.image, spec.input.patch_size, spec.input.overlap,
                                                         cfg.patches_per_volume, rng)):
                tensors.append(p)
                records.append({"case": case.case_id, "group": case.group, "patch": j,
                                "seed": case.meta.get("seed")})
        else:
            tensors.append(np.ascontiguousarray(case.image, dtype=np.float32))
            records.append({"case": case.case_id, "group": case.group, "seed": case.meta.get("seed")})
    if not tensors:
        raise CalibrationError("empty calibration set")
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise CalibrationError(f"calibration tensors differ in shape: {sorted(shapes)}")
    return np.stack(tensors).astype(np.float32, copy=False), records


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def calibrate(model_dir: Path, build: Path, cfg: QuantConfig, dicom: Path | None = None) -> dict[str, Any]:
    """Run the whole calibrate stage for ``model_dir`` into ``build``; return calibration.json's doc.

    Every output is written atomically; an interrupted run leaves earlier complete files and no
    partial ones.
    """
    from onnxruntime.quantization.calibrate import save_tensors_data

    from deploy.quantize_graph import preprocess_model

    t0 = time.perf_counter()
    spec = load_spec(model_dir)
    cfg = resolve_method(cfg, spec)
    src = Path(model_dir) / spec.onnx
    if not src.exists():
        raise CalibrationError(f"{src}: FP32 model not found")
    build.mkdir(parents=True, exist_ok=True)
    with atomic_path(build / "model.source.onnx") as tmp:
        shutil.copyfile(src, tmp)
    # the spec as calibrated travels with the build: publish reads it from here, so a model.toml
    # edited after calibration cannot end up in a manifest describing other files
    with atomic_path(build / "model.toml") as tmp:
        shutil.copyfile(Path(model_dir) / "model.toml", tmp)
    pre_notes = preprocess_model(build / "model.source.onnx", build / "model.pre.onnx")

    drift = DriftAccumulator(spec.input.modality)
    data, records = build_calibration_set(spec, cfg, dicom, drift)
    with atomic_path(build / "calibration.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, data, allow_pickle=False)
    reader = ArrayCalibrationReader(np.load(build / "calibration.npy", mmap_mode="r"), _input_name(src))
    tensors_data, method_amax, max_amax = collect_ranges(build / "model.pre.onnx", reader, cfg.method,
                                                         cfg.percentile, cfg.threads)
    ranges_path = build / f"ranges.{cfg.method}.json"
    save_tensors_data(tensors_data, ranges_path)  # ORT writes it via temp file + rename itself
    write_json(build / "amax.json", {"method": cfg.method, "method_amax": method_amax, "max_amax": max_amax})
    source = (f"DICOM folder {dicom}" if dicom is not None
              else f"deploy.synth seed {cfg.calibration_seed}, {len(set(r['case'] for r in records))} series")
    write_json(build / "drift.json", drift.profile(source))

    groups = Counter(r["group"] for r in records)
    doc = {
        "model": spec.name,
        "version": spec.version,
        "task": spec.task,
        "source_onnx": str(src),
        "source_sha256": sha256_file(src),
        "method": cfg.method,
        "percentile": cfg.percentile if cfg.method == "percentile" else None,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "source": source,
        "n_tensors": int(len(data)),
        "tensor_shape": list(data.shape[1:]),
        "n_series": len({r["case"] for r in records}),
        "series_seeds": sorted({int(r["seed"]) for r in records if r.get("seed") is not None}),
        "groups": dict(sorted(groups.items())),
        "input_range": [float(data.min()), float(data.max())],
        "preprocess": pre_notes,
        "ranges_file": ranges_path.name,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(build / "calibration.json", doc)
    return doc


def resolve_method(cfg: QuantConfig, spec: ModelSpec) -> QuantConfig:
    """``cfg`` with an empty ``method`` replaced by the task's default (:data:`DEFAULT_METHOD`)."""
    return cfg if cfg.method else replace(cfg, method=DEFAULT_METHOD[spec.task])


def _input_name(onnx_path: Path) -> str:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    names: list[str] = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise CalibrationError(f"{onnx_path.name}: expected one input, found {names}")
    return names[0]


def config_from_args(model_dir: Path, args: argparse.Namespace) -> QuantConfig:
    """model.toml's [quantization] table with the command-line overrides applied."""
    cfg = load_quant_config(model_dir)
    overrides: dict[str, Any] = {}
    for name in ("method", "percentile", "threads"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "seed", None) is not None:
        overrides["calibration_seed"] = args.seed
    if getattr(args, "samples", None) is not None:
        overrides["calibration_samples"] = args.samples
        overrides["calibration_volumes"] = args.samples
    if getattr(args, "patches_per_volume", None) is not None:
        overrides["patches_per_volume"] = args.patches_per_volume
    return replace(cfg, **overrides) if overrides else cfg


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``calibrate`` and ``build``."""
    p.add_argument("--method", choices=METHODS, default=None, help="activation range method (default: percentile for classification, minmax for segmentation)")
    p.add_argument("--percentile", type=float, default=None, help="percentile for --method percentile (default 99.99)")
    p.add_argument("--samples", type=int, default=None, help="calibration slices (2D) or volumes (3D)")
    p.add_argument("--patches-per-volume", type=int, default=None, help="3D: sliding-window patches per volume")
    p.add_argument("--seed", type=int, default=None, help="seed of the synthetic calibration set")
    p.add_argument("--dicom", type=Path, default=None, help="calibrate on this folder of DICOM series instead of phantoms")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default 2)")


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy calibrate``."""
    p = subparsers.add_parser(
        "calibrate",
        help="build the calibration set through the agent's preprocessing and compute tensor ranges",
        description="Calibration set (DICOM or phantoms -> agent preprocessing), quant_pre_process, "
        "per-tensor ranges (minmax / entropy / percentile) and the drift reference profile.",
    )
    p.add_argument("model_dir", type=Path, help="model folder with model.toml")
    p.add_argument("--build", type=Path, default=None, help="build folder (default build/deploy/<model>)")
    add_calibration_flags(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    spec = load_spec(args.model_dir)
    cfg = config_from_args(args.model_dir, args)
    build = args.build or default_build_dir(spec.name)
    doc = calibrate(args.model_dir, build, cfg, args.dicom)
    print(f"{spec.name}: {doc['n_tensors']} calibration tensors {tuple(doc['tensor_shape'])} from "
          f"{doc['n_series']} series ({doc['method']}), ranges in {build / doc['ranges_file']}")
    return 0
