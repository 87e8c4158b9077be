"""Series summaries for drift (agent.imaging.summary): one implementation on both sides.

The inference worker's code path (``Executor.run`` with ``drift_edges``) and the reference builder
(``deploy.drift_profile.DriftAccumulator``, as ``edge-deploy calibrate`` feeds it) must produce the
very same ``SeriesSummary`` for the same series; the body mask, the histograms, the entropy and
the metadata allow-list are checked on arrays built here; ``edge-deploy drift-profile`` on the real
MR model; the committed ``models/*/drift.json`` are valid and modest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_pipeline import write_ct_series, write_model_dir
from test_runner import series_of

from agent.core.drift import DriftEdges, SeriesSummary
from agent.core.manifest import DriftProfile
from agent.core.modelspec import load_spec
from agent.core.types import ClassificationOutput, LabelStats, SegmentationOutput, Volume
from agent.imaging.summary import (
    CATEGORICAL_FIELDS,
    MAX_VOXELS,
    NUMERIC_FIELDS,
    body_values,
    histogram,
    reference_edges,
    subsample,
    summarise,
)
from deploy.drift_profile import DriftAccumulator

REPO = Path(__file__).resolve().parents[1]
IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def volume(array: np.ndarray, modality: str = "CT", **meta: Any) -> Volume:
    return Volume(array.astype(np.float32), (2.0, 0.5, 0.5), (0.0, 0.0, 0.0), IDENTITY, modality, meta=meta)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("summary")
    paths = write_ct_series(root / "ct")
    return {"seg": write_model_dir(root / "models", "seg"), "cls": write_model_dir(root / "models", "cls"),
            "paths": paths}


@pytest.mark.parametrize("kind", ["seg", "cls"])
def test_the_worker_and_the_reference_summarise_a_series_identically(env: dict[str, Any], kind: str) -> None:
    from agent.imaging import load_series, prepare
    from agent.inference.executor import Executor
    from agent.inference.runner import InferenceJob

    model_dir, paths = env[kind], env["paths"]
    spec = load_spec(model_dir)
    vol = load_series(paths)
    prepared = prepare(vol, spec.input)
    # the reference decides the edges from its first series, then the job carries them
    reference = DriftAccumulator(spec.input.modality, spec=spec)
    edges = reference.edges_for(vol.array, prepared.array)
    job = InferenceJob(f"job-{kind}", series_of(paths), spec.name, model_dir, model_dir / "model.onnx",
                       drift_edges=edges)
    outcome = Executor(threads=1, memory_limit_mb=0, fault_injection=False).run(job, "")
    assert outcome.ok and outcome.prediction is not None, outcome.error
    worker = outcome.summary
    assert worker is not None
    # calibrate's way: the decoded volume and prepared input, the FP32 model's outputs
    ref = reference.add_series(vol.array, prepared.array, vol.meta, vol.spacing, outputs=outcome.prediction.outputs)
    assert worker == ref
    assert SeriesSummary.from_json(json.loads(json.dumps(worker.to_json()))) == worker
    assert len(worker.intensity_counts) == len(edges.intensity) - 1
    assert len(worker.input_counts) == len(edges.model_input) - 1
    assert sum(worker.input_counts) == prepared.array.size  # small: no subsampling
    if kind == "seg":
        assert set(worker.label_fractions) == set(spec.labels[1:]) and worker.predicted_class is None
        out = outcome.prediction.outputs
        assert isinstance(out, SegmentationOutput)
        assert worker.label_fractions["liver"] == out.labels["liver"].voxels / vol.array.size
    else:
        out = outcome.prediction.outputs
        assert isinstance(out, ClassificationOutput)
        assert (worker.predicted_class, worker.confidence) == (out.label, out.confidence)
        assert worker.entropy is not None and 0.0 < worker.entropy < math.log(4)
    # the profile's aggregates are the sums over its series
    doc = reference.profile("test")
    profile = DriftProfile.model_validate(doc)
    assert list(profile.intensity.counts) == list(ref.intensity_counts)
    assert [SeriesSummary.from_json(s) for s in profile.series] == [ref]


def test_the_body_is_above_minus_500_hu_on_ct_and_above_the_noise_floor_on_mr() -> None:
    ct = np.full((4, 16, 16), -1000.0)  # outside air
    ct[:, 4:12, 4:12] = 40.0  # soft tissue
    ct[:, 4:6, 4:6] = -850.0  # lung: not body either
    ct[:, 10:12, 10:12] = 700.0  # bone
    values = body_values(ct, "CT")
    assert sorted(set(values.tolist())) == [40.0, 700.0]
    assert values.size == 4 * (64 - 4)

    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 10, (1, 64, 64))  # noise floor
    mr[0, 16:48, 16:48] = rng.uniform(400, 1000, (32, 32))  # head
    body = body_values(mr, "MR")
    assert body.size == 32 * 32 and body.min() >= 400

    edges = DriftEdges(tuple(np.linspace(-500, 1900, 65)), (0.0, 0.5, 1.0))
    s = summarise(volume(ct), np.zeros((1, 2, 2), np.float32), edges)
    assert sum(s.intensity_counts) == values.size and s.intensity_counts[0] == 0  # no air in the first bin


def test_histograms_clip_into_the_end_bins_and_both_paths_agree() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 2.0, 100_000)
    uniform = np.linspace(-3.0, 3.0, 13)
    counts = histogram(values, uniform)
    assert sum(counts) == values.size
    inside = np.histogram(values, bins=uniform)[0]
    assert counts[1:-1] == tuple(int(c) for c in inside[1:-1])  # same bins (none of these on an edge)
    assert counts[0] == inside[0] + int((values < -3).sum()) and counts[-1] == inside[-1] + int((values > 3).sum())
    uneven = np.array([-3.0, -1.0, 0.0, 0.5, 3.0])
    assert sum(histogram(values, uneven)) == values.size
    assert histogram([np.nan, 0.1, 5.0], (0.0, 1.0, 2.0)) == (1, 1)  # NaN dropped, 5.0 in the last bin
    with pytest.raises(ValueError):
        histogram(values, (1.0, 0.0))


def test_subsampling_is_deterministic_and_bounded() -> None:
    big = np.arange(3 * MAX_VOXELS + 7, dtype=np.float32)
    a, b = subsample(big), subsample(big.copy())
    assert a.size <= MAX_VOXELS and np.array_equal(a, b) and a.flags.c_contiguous
    small = np.arange(10)
    assert np.array_equal(subsample(small), small)


def test_entropy_confidence_and_label_fractions() -> None:
    edges = DriftEdges((0.0, 1.0), (0.0, 1.0))
    vol = volume(np.zeros((2, 10, 10)), "MR")
    uniform = ClassificationOutput("a", 0.25, {k: 0.25 for k in "abcd"})
    s = summarise(vol, np.zeros(4), edges, uniform)
    assert s.entropy == pytest.approx(math.log(4)) and (s.predicted_class, s.confidence) == ("a", 0.25)
    certain = summarise(vol, np.zeros(4), edges, ClassificationOutput("b", 1.0, {"a": 0.0, "b": 1.0}))
    assert certain.entropy == 0.0 and str(certain.entropy) == "0.0"
    mixed = summarise(vol, np.zeros(4), edges, ClassificationOutput("a", 0.9, {"a": 0.9, "b": 0.1}))
    assert mixed.entropy == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))

    seg = SegmentationOutput({"spleen": LabelStats(10, 0.1, ()), "liver": LabelStats(50, 0.5, ())})
    s = summarise(vol, np.zeros(4), edges, seg)
    assert s.label_fractions == {"spleen": 0.05, "liver": 0.25}
    assert s.predicted_class is None and s.entropy is None


def test_a_summary_holds_no_uid_and_no_patient_data(env: dict[str, Any]) -> None:
    import pydicom

    from agent.imaging import load_series

    paths = env["paths"]
    vol = load_series(paths)
    ds = pydicom.dcmread(paths[0])
    s = summarise(vol, np.zeros(8, np.float32), reference_edges("CT", vol.array, np.zeros(8)))
    assert set(s.numeric) <= set(NUMERIC_FIELDS) and set(s.categorical) <= set(CATEGORICAL_FIELDS)
    assert {"rows", "columns", "n_slices", "pixel_spacing_mm", "spacing_z_mm"} <= set(s.numeric)
    text = json.dumps(s.to_json())
    secrets = [vol.study_uid, vol.series_uid, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
               str(ds.get("PatientName", "")), str(ds.get("PatientID", "")), str(ds.get("StudyDate", "")),
               str(ds.get("InstitutionName", "")), str(ds.get("SeriesDescription", "")),
               str(ds.get("AccessionNumber", "")), str(ds.get("PatientBirthDate", ""))]
    for secret in filter(None, secrets):
        assert secret not in text, secret


def test_drift_profile_command_on_the_mr_model(tmp_path: Path) -> None:
    from deploy.cli import main
    from deploy.drift_cmd import profile_json

    out = tmp_path / "drift.json"
    assert main(["drift-profile", str(REPO / "models/mr-brain-cls"), "--n", "12", "--seed", "123457",
                 "--out", str(out), "--threads", "1"]) == 0
    doc = json.loads(out.read_text())
    profile = DriftProfile.model_validate(doc)
    assert profile.n_series == 12 and len(profile.series) == 12
    summaries = [SeriesSummary.from_json(s) for s in profile.series]
    assert all(s.predicted_class is not None and s.entropy is not None for s in summaries)
    assert sum(profile.outputs["predicted_class_counts"].values()) == 12
    assert list(profile.model_input.counts) == np.sum([s.input_counts for s in summaries], axis=0).tolist()
    assert json.loads(profile_json(doc)) == doc
    # the same seed gives the same profile (phantoms, pipeline and summaries are deterministic)
    again = tmp_path / "again.json"
    assert main(["drift-profile", str(REPO / "models/mr-brain-cls"), "--n", "12", "--seed", "123457",
                 "--out", str(again), "--threads", "1"]) == 0
    assert again.read_text() == out.read_text()


@pytest.mark.parametrize("model", ["ct-abdomen-seg", "mr-brain-cls"])
def test_the_committed_reference_profiles_are_valid_and_modest(model: str) -> None:
    path = REPO / "models" / model / "drift.json"
    assert path.stat().st_size < 1_000_000
    profile = DriftProfile.model_validate_json(path.read_bytes())
    spec = load_spec(path.parent)
    assert profile.n_series == len(profile.series) >= 30
    for doc in profile.series:
        s = SeriesSummary.from_json(doc)
        assert len(s.intensity_counts) == len(profile.intensity.edges) - 1
        assert len(s.input_counts) == len(profile.model_input.edges) - 1
        if spec.task == "classification":
            assert s.predicted_class in spec.labels
        else:
            assert set(s.label_fractions) == set(spec.labels[1:])
