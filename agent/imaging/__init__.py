"""The one implementation of DICOM series -> model input -> outputs (numpy/scipy/pydicom only).

Used by the daemon's inference stage and by the deploy toolkit (training validation,
calibration, evaluation), so both prepare inputs and measure outputs identically. Never imports
torch, monai or onnx.

* :mod:`.volume`: DICOM instances -> :class:`~agent.core.types.Volume` (sorted, checked, rescaled)
* :mod:`.preprocess`: Volume -> model input (reorient, resample, normalise) and back
* :mod:`.sliding_window`: patch-wise 3D inference with Gaussian blending
* :mod:`.postprocess`: label statistics, class probabilities, Dice
"""

from __future__ import annotations

from agent.imaging.postprocess import (
    classification_outputs,
    dice,
    largest_component,
    segmentation_outputs,
)
from agent.imaging.preprocess import Geometry, PreparedInput, prepare, restore_label_map
from agent.imaging.sliding_window import (
    gaussian_importance_map,
    patch_starts,
    sliding_window_inference,
)
from agent.imaging.volume import build_volume, load_series, read_datasets

__all__ = [
    "Geometry",
    "PreparedInput",
    "build_volume",
    "classification_outputs",
    "dice",
    "gaussian_importance_map",
    "largest_component",
    "load_series",
    "patch_starts",
    "prepare",
    "read_datasets",
    "restore_label_map",
    "segmentation_outputs",
    "sliding_window_inference",
]
