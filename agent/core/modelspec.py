"""The model spec: what ``models/<name>/model.toml`` declares (documented in docs/model-spec.md).

Shared by the daemon (routing, preprocessing, postprocessing) and by ``deploy`` (training
validation, calibration, evaluation, the accuracy gate), so both read one definition.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.core.errors import ModelSpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (Jetson images)
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    modality: str = Field(description="DICOM Modality the model takes (CT, MR, ...).")
    sop_classes: tuple[str, ...] = Field(
        description="Storage SOP Class UIDs the listener must accept for this model."
    )
    channels: int = Field(1, ge=1, description="Input channels.")
    dims: Literal[2, 3] = Field(description="2 for slice models, 3 for volume models.")
    target_spacing_mm: tuple[float, ...] | None = Field(
        None, description="Resample to this spacing, (z, y, x) for 3D or (y, x) for 2D, in mm."
    )
    target_size: tuple[int, ...] | None = Field(
        None, description="Resize to this size in voxels, (y, x) for 2D; used when no spacing is set."
    )
    normalisation: Literal["window", "zscore"] = Field(
        description="'window': clip to `window` then scale to [0, 1]; 'zscore': (x - mean) / std "
        "over the foreground (voxels above the 5th percentile)."
    )
    window: tuple[float, float] | None = Field(
        None, description="(low, high) in modality units (HU for CT) for 'window' normalisation."
    )
    patch_size: tuple[int, int, int] | None = Field(
        None, description="Sliding-window patch (z, y, x) for 3D models."
    )
    overlap: float = Field(0.25, ge=0.0, lt=1.0, description="Fraction of overlap between patches.")

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if self.normalisation == "window" and self.window is None:
            raise ValueError("normalisation = 'window' needs `window = [low, high]`")
        if self.dims == 3 and self.patch_size is None:
            raise ValueError("3D models need `patch_size = [z, y, x]`")
        if self.target_spacing_mm is None and self.target_size is None:
            raise ValueError("set `target_spacing_mm` or `target_size`")
        return self


class OutputSpec(_Strict):
    kind: Literal["label_map", "class_probabilities"] = Field(
        description="'label_map': per-voxel class logits (N, C, *spatial); "
        "'class_probabilities': logits (N, C)."
    )
    largest_component: bool = Field(
        True, description="Segmentation: keep only the largest connected component per label."
    )


class RoutingSpec(_Strict):
    modalities: tuple[str, ...] = Field(description="Series Modality values this model takes.")
    body_parts: tuple[str, ...] = Field(
        (), description="BodyPartExamined values accepted (case-insensitive); empty: any."
    )
    series_description_patterns: tuple[str, ...] = Field(
        (), description="Regular expressions on SeriesDescription (case-insensitive); empty: any."
    )
    min_slices: int = Field(1, ge=1, description="Minimum instances (slices) in the series.")
    max_slices: int = Field(100000, ge=1, description="Maximum instances in the series.")


class GateSpec(_Strict):
    max_accuracy_drop: float = Field(0.01, description="Largest accuracy drop vs FP32 (fraction).")
    max_recall_drop: float = Field(0.02, description="Largest drop of any class's recall.")
    max_mean_dice_drop: float = Field(0.01, description="Largest mean Dice drop.")
    max_label_dice_drop: float = Field(0.02, description="Largest drop of any label's Dice.")
    min_argmax_agreement: float = Field(
        0.97, description="Smallest share of samples (or voxels) whose argmax matches FP32."
    )


class ModelSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Model name, used in topics.")
    version: str = Field(description="Semantic version of the trained weights.")
    task: Literal["segmentation", "classification"]
    labels: tuple[str, ...] = Field(
        description="Class names in output-channel order; segmentation starts with 'background'."
    )
    description: str = ""
    onnx: str = Field("model.onnx", description="FP32 ONNX file, relative to the model folder.")
    input: InputSpec
    output: OutputSpec
    routing: RoutingSpec
    gate: GateSpec = GateSpec()

    @property
    def foreground_labels(self) -> tuple[str, ...]:
        return tuple(label for label in self.labels if label != "background")

    def accepts(self, modality: str, body_part: str, description: str, n_slices: int) -> bool:
        """Routing: does this model want a series with these (non-PHI) attributes?"""
        r = self.routing
        if modality.upper() not in {m.upper() for m in r.modalities}:
            return False
        if r.body_parts and body_part.upper() not in {b.upper() for b in r.body_parts}:
            return False
        if r.series_description_patterns and not any(
            re.search(p, description or "", re.IGNORECASE) for p in r.series_description_patterns
        ):
            return False
        return r.min_slices <= n_slices <= r.max_slices


def load_spec(model_dir: Path | str) -> ModelSpec:
    """Read and validate ``model_dir/model.toml``; raise ModelSpecError naming the key."""
    path = Path(model_dir) / "model.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelSpecError(f"{path}: not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelSpecError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ModelSpecError(f"{path}: {problems}") from exc
