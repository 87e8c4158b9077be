"""What the job thread does for export (issue 15), kept out of job_loop.py: the worker's label-map
path for a job, and the ``ExportRequest`` of a result, which job_loop.py writes with
``ExportQueue.enqueue`` in the transaction that commits the result (docs/export.md)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from agent.core.config import Config
from agent.core.errors import EdgeAgentError
from agent.core.types import ClassificationOutput, Instance, Result, SegmentationOutput
from agent.export.request import ExportRequest, derived_uid, figures_of, not_for_diagnostic_use
from agent.variants import VariantManager

log = logging.getLogger(__name__)


def export_dir(cfg: Config) -> Path:
    return cfg.storage.dir / "export"


def label_map_path(cfg: Config, job_id: str) -> Path:
    """Where the worker writes a job's label map (a name derived from the job id)."""
    return export_dir(cfg) / "labelmaps" / f"{derived_uid('labelmap', job_id)[5:]}.npz"


def export_request(cfg: Config, variants: VariantManager, result: Result, instances: Sequence[Instance],
                   label_map: Path | None) -> ExportRequest:
    """The export record of ``result``: the model's identity and labels, the published figures,
    the job's source files, the label map (when the worker wrote one)."""
    pred = result.prediction
    ref = pred.model
    outputs = pred.outputs
    if isinstance(outputs, SegmentationOutput):
        labels: tuple[str, ...] = ("background", *outputs.labels)
    elif isinstance(outputs, ClassificationOutput):
        labels = tuple(outputs.probabilities)
    else:  # pragma: no cover - Outputs is the union above
        raise TypeError(type(outputs).__name__)
    try:
        spec = variants.specs().get(ref.name)
        restricted = not_for_diagnostic_use(spec.description) if spec is not None else True
        if spec is not None and tuple(spec.labels) != labels and set(spec.labels) == set(labels):
            labels = tuple(spec.labels)
    except EdgeAgentError:  # no spec to read: say "not for diagnostic use", the safe side
        restricted = True
    figures, predicted, probability = figures_of(outputs)
    written = label_map is not None and label_map.exists()
    return ExportRequest(
        result_id=result.result_id, revision=result.revision, device_id=result.device_id, model=ref.name,
        version=ref.version, variant=ref.variant, backend=ref.backend, precision=ref.precision, task=pred.task,
        labels=labels, study_uid=result.study_uid, series_uid=result.series_uid,
        sources=tuple(str(i.path) for i in instances), created_at=result.created_at,
        not_for_diagnostic_use=restricted, label_map=str(label_map) if written else "", figures=figures,
        predicted=predicted, probability=probability)
