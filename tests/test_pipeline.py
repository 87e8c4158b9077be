"""The per-series pipeline end to end: real DICOM files (pydicom), real tiny ONNX models, real
backends; fakes only at the backend boundary (NaN outputs, wrong class count).

The helpers here (tiny models, model folders, synthetic CT series) are also used by
test_backends.py and test_runner.py.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# ---- helpers shared with test_backends.py / test_runner.py ---------------------------------------

SEG_LABELS = ("background", "liver", "spleen", "kidney_left", "kidney_right")
CLS_LABELS = ("no_tumour", "glioma", "meningioma", "pituitary")


def make_seg_model(path: Path, *, static_batch: bool = False) -> Path:
    """A Conv3d 1->5 segmentation 'model' (opset 17, dynamic batch and spatial dims).

    Channel 0 (background) is a constant 0.5; channel 1 (liver) the 3x3x3 local mean of the input;
    channels 2-4 are -10. With window-normalised input in [0, 1] the argmax is "liver wherever the
    local mean exceeds 0.5": deterministic, so the tests can check real label maps.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((5, 1, 3, 3, 3), np.float32)
    w[1] = 1.0 / 27.0
    b = np.array([0.5, 0.0, -10.0, -10.0, -10.0], np.float32)
    batch: Any = 1 if static_batch else "N"
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W", "B"], ["logits"], pads=[1] * 6, kernel_shape=[3, 3, 3])],
        "seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, "D", "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5, "D", "H", "W"])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime / openvino we support
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_cls_model(path: Path) -> Path:
    """A 2D classifier: GlobalAveragePool -> Flatten -> Gemm to 4 classes (dynamic batch, opset 17)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[1.0], [-1.0], [0.5], [0.0]], np.float32)  # Gemm B: (K=4, C=1) with transB
    b = np.array([0.0, 0.2, 0.1, -0.3], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
        ],
        "cls",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


SEG_TOML = """\
name = "tiny-seg"
version = "0.0.1"
task = "segmentation"
labels = ["background", "liver", "spleen", "kidney_left", "kidney_right"]

[input]
modality = "CT"
sop_classes = ["1.2.840.10008.5.1.4.1.1.2"]
dims = 3
target_spacing_mm = [5.0, 2.0, 2.0]
normalisation = "window"
window = [-200.0, 200.0]
patch_size = [8, 32, 32]
overlap = 0.25

[output]
kind = "label_map"
largest_component = {largest}

[routing]
modalities = ["CT"]
"""

CLS_TOML = """\
name = "tiny-cls"
version = "0.0.2"
task = "classification"
labels = ["no_tumour", "glioma", "meningioma", "pituitary"]

[input]
modality = "CT"
sop_classes = ["1.2.840.10008.5.1.4.1.1.2"]
dims = 2
target_size = [32, 32]
normalisation = "zscore"

[output]
kind = "class_probabilities"

[routing]
modalities = ["CT"]
"""


def write_model_dir(root: Path, kind: str, *, largest_component: bool = False) -> Path:
    """A model folder ``root/<name>`` with model.toml and model.onnx; ``kind`` is 'seg' or 'cls'."""
    if kind == "seg":
        d = root / "tiny-seg"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.toml").write_text(SEG_TOML.format(largest=str(largest_component).lower()))
        make_seg_model(d / "model.onnx")
    else:
        d = root / "tiny-cls"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.toml").write_text(CLS_TOML)
        make_cls_model(d / "model.onnx")
    return d


def write_ct_series(folder: Path, n_slices: int = 6, spacing_z: float = 5.0) -> list[Path]:
    """``n_slices`` CT slices (CT_small.dcm, 128x128, 0.66 mm pixels) stacked ``spacing_z`` mm apart
    along z, with fresh Study/Series/SOP Instance UIDs and slightly different pixels per slice, plus
    a bright square in the air of the top-left corner (a small object apart from the body).
    Returns the file paths (in reverse z order, so loading has to sort them)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    x, y, z0 = (float(v) for v in base.ImagePositionPatient)
    paths = []
    for i in range(n_slices):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x, y, z0 + i * spacing_z]
        ds.SliceLocation = z0 + i * spacing_z
        pixels = ds.pixel_array.astype(np.int32)
        # a detached bright square in the air at the top-left corner: a second "liver" component
        pixels[4:24, 4:24] = 500 - int(ds.RescaleIntercept)  # +500 HU
        pixels = np.roll(pixels, i, axis=1)  # a little variation along z
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        path = folder / f"slice_{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths[::-1]


class FakeBackend:
    """Backend stand-in at the seam: returns ``fn(inputs)``."""

    name = "fake"

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def load(self, model_path: Path, *, precision: str, threads: int, options: Mapping[str, Any]) -> None:
        """Nothing to load."""

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return self._fn(inputs)

    def describe(self) -> Any:
        from agent.inference.base import BackendInfo

        return BackendInfo("fake", "0", "cpu", "fp32")


def loaded(name: str, model: Path, precision: str = "fp32", **options: Any) -> Any:
    """A backend from the registry, loaded with one thread."""
    from agent.inference import catalog

    backend = catalog.create(name)
    backend.load(model, precision=precision, threads=1, options=options)
    return backend


# ---- tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Any:
    from agent.inference import pipeline as module  # imports agent.imaging (numpy/scipy)

    return module


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    # largest_component on: the returned label map must be the filtered one the stats describe
    return {"seg": write_model_dir(root, "seg", largest_component=True), "cls": write_model_dir(root, "cls")}


def _ref(spec: Any, backend: Any) -> Any:
    from agent.core.types import ModelRef

    info = backend.describe()
    return ModelRef(spec.name, spec.version, "fp32", info.name, info.precision)


def test_segmentation_end_to_end_onnxruntime(
    pipeline: Any, ct_series: list[Path], models: dict[str, Path]
) -> None:
    from agent.core.modelspec import load_spec
    from agent.core.types import SegmentationOutput

    spec = load_spec(models["seg"])
    backend = loaded("onnxruntime", models["seg"] / "model.onnx", warmup_shape=(1, 1, 8, 32, 32))
    run = pipeline.run_model_detailed(ct_series, spec, backend, _ref(spec, backend))
    pred, label_map, logits = run.prediction, run.label_map, run.logits
    assert run.summary is None  # no drift edges given

    assert pred.task == "segmentation" and pred.model.name == "tiny-seg"
    assert pred.model.backend == "onnxruntime" and pred.model.precision == "fp32"
    assert set(pred.timings_ms) == {"load", "preprocess", "inference", "postprocess"}
    assert all(v >= 0 for v in pred.timings_ms.values())
    assert isinstance(pred.outputs, SegmentationOutput)
    # the label map is on the SOURCE grid: 6 slices of 128 x 128
    assert label_map is not None and label_map.shape == (6, 128, 128) and label_map.dtype == np.uint8
    assert logits.shape[0] == 5 and logits.dtype == np.float32
    # the model says "liver" where the local mean of window-normalised HU is above 0.5 (HU > 0):
    # about half of this CT image; no other foreground label can win
    liver = pred.outputs.labels["liver"]
    assert 0.2 < liver.voxels / label_map.size < 0.8
    assert set(np.unique(label_map)) <= {0, 1}
    # largest_component is on: the corner square is a second component the model labels liver
    # (its logits say so) but the returned map and the stats are the filtered ones
    assert logits[1, 1:-1, 3:6, 3:6].min() > 0.5  # model space: 2 mm voxels
    assert not label_map[:, 4:24, 4:24].any()
    assert liver.voxels == int((label_map == 1).sum())
    # volumes use the source spacing (5 x 0.661 x 0.661 mm)
    assert liver.volume_ml == pytest.approx(liver.voxels * 5.0 * 0.661468**2 / 1000, rel=1e-3)


def test_openvino_f32_matches_onnxruntime(
    pipeline: Any, ct_series: list[Path], models: dict[str, Path]
) -> None:
    pytest.importorskip("openvino", reason="openvino not installed (pip install edge-agent[openvino])")
    from agent.core.modelspec import load_spec

    spec = load_spec(models["seg"])
    ort = loaded("onnxruntime", models["seg"] / "model.onnx", warmup_shape=(1, 1, 8, 32, 32))
    ov = loaded("openvino", models["seg"] / "model.onnx", warmup_shape=(1, 1, 8, 32, 32))
    run_ort = pipeline.run_model_detailed(ct_series, spec, ort, _ref(spec, ort))
    run_ov = pipeline.run_model_detailed(ct_series, spec, ov, _ref(spec, ov), sw_batch_size=2)
    map_ort, logits_ort = run_ort.label_map, run_ort.logits
    pred_ov, map_ov, logits_ov = run_ov.prediction, run_ov.label_map, run_ov.logits
    assert pred_ov.model.backend == "openvino" and pred_ov.model.precision == "fp32"
    np.testing.assert_allclose(logits_ov, logits_ort, atol=1e-4)
    assert (map_ov != map_ort).mean() < 1e-3  # ties at exactly 0.5 may break either way


def test_classification_end_to_end(pipeline: Any, ct_series: list[Path], models: dict[str, Path]) -> None:
    from agent.core.modelspec import load_spec
    from agent.core.types import ClassificationOutput

    spec = load_spec(models["cls"])
    backend = loaded("onnxruntime", models["cls"] / "model.onnx", warmup_shape=(1, 1, 32, 32))
    # one slice: what a 2D model takes
    run = pipeline.run_model_detailed(ct_series[:1], spec, backend, _ref(spec, backend))
    pred, label_map, logits = run.prediction, run.label_map, run.logits
    assert pred.task == "classification" and label_map is None
    assert logits.shape == (4,)
    out = pred.outputs
    assert isinstance(out, ClassificationOutput)
    assert set(out.probabilities) == set(CLS_LABELS)
    assert sum(out.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert out.label == CLS_LABELS[int(np.argmax(logits))]
    assert out.confidence == pytest.approx(max(out.probabilities.values()))
    assert set(pred.timings_ms) == {"load", "preprocess", "inference", "postprocess"}
    assert pipeline.run_model(ct_series[:1], spec, backend, _ref(spec, backend)).outputs == out


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_outputs_are_rejected(
    pipeline: Any, ct_series: list[Path], models: dict[str, Path], bad: float
) -> None:
    from agent.core.errors import BackendError
    from agent.core.modelspec import load_spec

    spec = load_spec(models["seg"])

    def fn(x: np.ndarray) -> np.ndarray:
        out = np.zeros((x.shape[0], 5, *x.shape[2:]), np.float32)
        out[..., 0, 0, 0] = bad
        return out

    backend = FakeBackend(fn)
    with pytest.raises(BackendError, match="non-finite"):
        pipeline.run_model(ct_series, spec, backend, _ref(spec, backend))


def test_wrong_class_count_is_a_backend_error(
    pipeline: Any, ct_series: list[Path], models: dict[str, Path]
) -> None:
    from agent.core.errors import BackendError
    from agent.core.modelspec import load_spec

    spec = load_spec(models["cls"])
    backend = FakeBackend(lambda x: np.zeros((x.shape[0], 3), np.float32))
    with pytest.raises(BackendError, match="K=4"):
        pipeline.run_model(ct_series[:1], spec, backend, _ref(spec, backend))


def test_drift_summary_comes_with_the_run_and_its_failure_never_fails_it(
    pipeline: Any, ct_series: list[Path], models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from agent.core.drift import DriftEdges
    from agent.core.modelspec import load_spec

    spec = load_spec(models["seg"])
    backend = loaded("onnxruntime", models["seg"] / "model.onnx", warmup_shape=(1, 1, 8, 32, 32))
    edges = DriftEdges(tuple(np.linspace(-500, 1900, 65)), tuple(np.linspace(-0.25, 1.25, 65)))
    run = pipeline.run_model_detailed(ct_series, spec, backend, _ref(spec, backend), want_label_map=False,
                                      drift_edges=edges)
    assert run.summary is not None and len(run.summary.intensity_counts) == 64
    assert set(run.summary.label_fractions) == set(SEG_LABELS[1:])
    assert set(run.prediction.timings_ms) == {"load", "preprocess", "inference", "postprocess"}  # unchanged

    broken = DriftEdges((1.0, 0.0), (0.0, 1.0))  # decreasing: summarising raises inside
    with caplog.at_level("WARNING", logger="agent.inference.pipeline"):
        bad = pipeline.run_model_detailed(ct_series, spec, backend, _ref(spec, backend), want_label_map=False,
                                          drift_edges=broken)
    assert bad.summary is None and bad.prediction.outputs == run.prediction.outputs
    assert any(r.getMessage() == "pipeline.summary_failed" for r in caplog.records)
