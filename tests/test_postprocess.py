"""agent.imaging.postprocess: components, label statistics, softmax, Dice."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.core.errors import BackendError, EdgeAgentError, ModelSpecError
from agent.core.types import ClassificationOutput, LabelStats, SegmentationOutput
from agent.imaging import classification_outputs, dice, largest_component, segmentation_outputs

LABELS = ("background", "liver", "spleen", "kidney_left", "kidney_right")


def test_largest_component_uses_26_connectivity() -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # diagonal chain: one component in 26-conn
    mask[4, 4, 0] = mask[4, 4, 1] = True  # two face-connected voxels, a separate component
    kept = largest_component(mask)
    expected = np.zeros_like(mask)
    expected[0, 0, 0] = expected[1, 1, 1] = expected[2, 2, 2] = True
    np.testing.assert_array_equal(kept, expected)


def test_largest_component_2d_and_empty() -> None:
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = True
    mask[3:6, 3:6] = True
    kept = largest_component(mask)
    assert kept.sum() == 9 and not kept[0, 0]
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()
    single = np.zeros((3, 3), bool)
    single[1, 1] = True
    np.testing.assert_array_equal(largest_component(single), single)


def test_segmentation_outputs_volumes_and_bboxes() -> None:
    label_map = np.zeros((10, 12, 14), np.int64)
    label_map[2:5, 3:7, 4:9] = 1  # liver: 3*4*5 = 60 voxels
    label_map[8, 0, 0] = 1  # a stray liver voxel, removed by largest-component filtering
    label_map[6:8, 10:12, 12:14] = 3  # kidney_left: 2*2*2 = 8 voxels
    spacing = (2.0, 0.5, 0.8)  # 0.8 mm^3 per voxel
    out, filtered = segmentation_outputs(label_map, LABELS, spacing)
    assert isinstance(out, SegmentationOutput)
    assert list(out.labels) == ["liver", "spleen", "kidney_left", "kidney_right"]
    liver = out.labels["liver"]
    assert liver == LabelStats(voxels=60, volume_ml=pytest.approx(60 * 0.8 / 1000), bbox=(2, 3, 4, 5, 7, 9))
    assert isinstance(liver.voxels, int) and isinstance(liver.volume_ml, float)
    assert all(type(v) is int for v in liver.bbox)
    kidney = out.labels["kidney_left"]
    assert (kidney.voxels, kidney.bbox) == (8, (6, 10, 12, 8, 12, 14))
    assert kidney.volume_ml == pytest.approx(8 * 0.8 / 1000)
    assert out.labels["spleen"] == LabelStats(voxels=0, volume_ml=0.0, bbox=())
    assert out.labels["kidney_right"] == LabelStats(voxels=0, volume_ml=0.0, bbox=())
    assert filtered.dtype == np.uint8 and filtered.shape == label_map.shape
    assert filtered[8, 0, 0] == 0
    expected = label_map.copy()
    expected[8, 0, 0] = 0
    np.testing.assert_array_equal(filtered, expected)
    assert label_map[8, 0, 0] == 1  # input untouched


def test_segmentation_outputs_without_filtering_counts_every_voxel() -> None:
    label_map = np.zeros((4, 4, 4), np.uint8)
    label_map[0, 0, 0] = 2
    label_map[3, 3, 3] = 2
    out, filtered = segmentation_outputs(label_map, LABELS, (1.0, 1.0, 1.0), keep_largest=False)
    assert out.labels["spleen"] == LabelStats(voxels=2, volume_ml=0.002, bbox=(0, 0, 0, 4, 4, 4))
    np.testing.assert_array_equal(filtered, label_map)
    out, filtered = segmentation_outputs(label_map, LABELS, (1.0, 1.0, 1.0), keep_largest=True)
    assert out.labels["spleen"].voxels == 1
    assert out.labels["spleen"].bbox == (0, 0, 0, 1, 1, 1)  # tie: first in raster order


def test_segmentation_outputs_rejects_unknown_values() -> None:
    label_map = np.zeros((2, 2, 2), np.int64)
    label_map[0, 0, 0] = 5
    with pytest.raises(ModelSpecError, match="5 labels"):
        segmentation_outputs(label_map, LABELS, (1.0, 1.0, 1.0))
    with pytest.raises(ModelSpecError, match="spacing"):
        segmentation_outputs(np.zeros((2, 2, 2), np.int64), LABELS, (1.0, 1.0))


def test_classification_outputs_softmax() -> None:
    labels = ("no_tumour", "glioma", "meningioma", "pituitary")
    out = classification_outputs(np.array([1.0, 3.0, 0.0, -1.0], np.float32), labels)
    assert isinstance(out, ClassificationOutput)
    exp = [math.exp(v) for v in (1.0, 3.0, 0.0, -1.0)]
    expected = {name: e / sum(exp) for name, e in zip(labels, exp, strict=True)}
    assert out.label == "glioma"
    assert out.confidence == pytest.approx(expected["glioma"])
    assert out.probabilities == pytest.approx(expected)
    assert all(type(p) is float for p in out.probabilities.values()) and type(out.confidence) is float
    assert list(out.probabilities) == list(labels)


def test_classification_outputs_is_stable_for_huge_logits_and_accepts_a_batch_of_one() -> None:
    out = classification_outputs(np.array([[1000.0, 999.0, -1000.0]]), ("a", "b", "c"))
    assert out.label == "a"
    assert out.probabilities["a"] == pytest.approx(1 / (1 + math.exp(-1)))
    assert out.probabilities["c"] == 0.0
    assert sum(out.probabilities.values()) == pytest.approx(1.0)


def test_classification_outputs_errors() -> None:
    with pytest.raises(ModelSpecError):
        classification_outputs(np.zeros(3), ("a", "b"))
    with pytest.raises(BackendError):
        classification_outputs(np.array([0.0, np.nan]), ("a", "b"))


def test_dice() -> None:
    a = np.zeros((4, 4), np.int64)
    b = np.zeros((4, 4), np.int64)
    a[0, :] = 1  # 4 voxels
    b[0, :2] = 1  # 2 voxels, both in a
    a[3, 3] = 2
    b[2, 2] = 2  # disjoint
    scores = dice(a, b, [1, 2, 3])
    assert scores == {1: pytest.approx(2 * 2 / 6), 2: 0.0, 3: 1.0}
    assert dice(a, a, [1, 2]) == {1: 1.0, 2: 1.0}
    with pytest.raises(EdgeAgentError):
        dice(a, b[:3], [1])
