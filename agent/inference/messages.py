"""What the service and the inference worker say to each other: requests in, outcomes out.

Every message is a frozen dataclass, pickled over the runner's ``Pipe`` (``spawn`` context), so
both processes import it from here under the same name. Requests, parent -> worker:

    InferenceJob (wrapped in JobRequest)   one series through one model variant -> JobOutcome
    TrialRequest                           load one model file, run and time it -> TrialOutcome
    ValidationRequest                      one model file over a validation set -> ValidationOutcome
    PrefetchRequest                        decode a series ahead of its job     -> PrefetchOutcome
    StopRequest                            exit the main loop

Worker -> parent, besides the outcome of each request: ``Ready`` / ``StartFailed`` once at start,
and ``ReplyError`` when the outcome itself could not be pickled. ``JobKind`` and ``FailureKind``
are explained in ``agent.inference.runner``'s docstring; the parent turns a missing reply (crash,
timeout, stop) into the same outcome types, so callers see one shape whatever happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.core.drift import DriftEdges, SeriesSummary
from agent.core.modelspec import ModelSpec
from agent.core.types import Prediction, Series

JobKind = Literal["ok", "error", "timeout", "crash", "oom", "refused", "cancelled"]
#: JobOutcome.failure: whose fault a failed job was. "model": the model/backend failed (load error,
#: exception, non-finite output, a crash by a signal other than SIGKILL): another variant may
#: succeed. "input": the series cannot be read or prepared, or is over a size limit: any variant would
#: fail the same way. "resource": the job ran out of time (its budget) or was killed by the kernel's
#: OOM killer (SIGKILL): the device's limits, not the model. "": ok, cancelled or out of memory. Only
#: "model" failures lead to fallback, demotion or rollback (agent/variants/jobs.py).
FailureKind = Literal["", "model", "input", "resource"]


# ---- requests ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFile:
    """One runnable model file: what ``Backend.load`` needs, and the variant id it reports."""

    variant_file: Path
    backend: str = "onnxruntime"
    precision: str = "fp32"
    variant: str = ""
    backend_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesLimits:
    """The largest series a job may take (``series_limits``; 0: no limit): checked in the worker
    from the headers, before any pixel data is decoded. Over a limit the job ends ``refused``."""

    max_instances: int = 0
    max_rows: int = 0
    max_columns: int = 0
    max_frames: int = 0
    #: compressed pixel data (``dicom.limits``; 0: agent.core.limits.DEFAULT_LIMITS), checked per
    #: instance from its declared size before the codec runs
    max_decompressed_mb: int = 0
    max_decompression_ratio: float = 0.0


@dataclass(frozen=True)
class InferenceJob:
    """One series to run through one model variant (picklable: it crosses the process boundary).

    ``model_dir`` holds ``model.toml``; ``variant_file`` is the ONNX file to run (absolute, or
    relative to the current directory). ``variant`` names it in ``ModelRef.variant`` (default:
    ``precision``). ``backend_options`` go to ``Backend.load`` (e.g. ``{"providers": [...]}``).
    ``spec``: the model spec when it does not come from ``model_dir/model.toml`` (a registry
    version carries it in its manifest). ``version``: the installed version the file belongs to
    ("" for models.dir). ``shadow``: also run this model file and report agreement (see
    ``agent.inference.runner``). ``drift_edges``: the histogram edges of the version's drift
    reference profile; when set, a successful job also returns the series' ``SeriesSummary``.
    ``label_map_path``: a segmentation job also writes its label map there before answering (export).
    """

    job_id: str
    series: Series
    model_name: str
    model_dir: Path
    variant_file: Path
    backend: str = "onnxruntime"
    precision: str = "fp32"
    variant: str = ""
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None
    version: str = ""
    shadow: ModelFile | None = None
    drift_edges: DriftEdges | None = None
    limits: SeriesLimits | None = None
    #: segmentation: write the source-grid label map here (agent/core/labelmap.py) for the export stage
    label_map_path: Path | None = None


@dataclass(frozen=True)
class JobRequest:
    """A job on the wire, with the fault to inject ("" unless the runner honours EDGE_AGENT_FAULT)."""

    job: InferenceJob
    fault: str = ""


@dataclass(frozen=True)
class TrialRequest:
    """Load ``model`` and run ``inputs`` once (output returned), then time ``bench_runs`` runs of its
    first sample: jobs run one slice or one sliding-window patch at a time, so batch 1 is the speed
    that decides (at batch 4 two variants measured 1.2x apart at batch 1 came out even)."""

    model: ModelFile
    inputs: npt.NDArray[np.float32]
    bench_runs: int = 5


@dataclass(frozen=True)
class ValidationRequest:
    """Load ``model`` and predict every sample of the validation set file ``set_path`` with it
    (``agent.inference.validation.predict``: logits per slice, or a label map per volume)."""

    model: ModelFile
    set_path: Path
    spec: ModelSpec


@dataclass(frozen=True)
class PrefetchRequest:
    """Decode the series made of these files (absolute paths) and keep it for the next job."""

    paths: tuple[str, ...]


@dataclass(frozen=True)
class StopRequest:
    """Leave the main loop and exit."""


Request = JobRequest | TrialRequest | ValidationRequest | PrefetchRequest | StopRequest


# ---- outcomes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShadowOutcome:
    """The shadow run of a job: ``agreement`` (see ``agent.inference.runner``) or the ``error`` that
    stopped the shadow run (then ``agreement`` is None)."""

    variant: str
    agreement: float | None
    error: str = ""


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended (see ``agent.inference.runner`` for ``kind``). ``error`` is a one-line reason.
    ``summary``: the series in aggregate for drift monitoring (``agent.imaging.summary``), from the
    run whose prediction this is; None unless the job carried ``drift_edges`` and summarising
    worked (its failure never fails the job). ``limit``: for ``refused``, the configuration key of
    the limit the series is over (``series_limits.max_frames``, ...)."""

    kind: JobKind
    prediction: Prediction | None = None
    error: str = ""
    duration_ms: float = 0.0
    failure: FailureKind = ""
    shadow: ShadowOutcome | None = None
    summary: SeriesSummary | None = None
    limit: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial did. ``kind`` as for jobs (ok, error, timeout, crash, oom, cancelled).
    ``output``: the first run's output; ``latency_ms``: fastest of the timed runs; ``precision``:
    what the backend reports it computed in (``BackendInfo.precision``)."""

    kind: JobKind
    output: npt.NDArray[np.float32] | None = None
    load_ms: float = 0.0
    latency_ms: float = 0.0
    backend_version: str = ""
    precision: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


@dataclass(frozen=True)
class ValidationOutcome:
    """What a validation did: ``predictions`` per sample, in the set's order (float32 logits per
    slice, or a uint8 label map per volume), and how long it took."""

    kind: JobKind
    predictions: tuple[npt.NDArray[Any], ...] = ()
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


@dataclass(frozen=True)
class PrefetchOutcome:
    """Whether the worker now holds the prefetched series (``kind`` "ok") or why not ("error")."""

    kind: JobKind
    error: str = ""


@dataclass(frozen=True)
class ReplyError:
    """Sent instead of an outcome that could not be pickled back to the parent."""

    error: str


Reply = JobOutcome | TrialOutcome | ValidationOutcome | PrefetchOutcome | ReplyError
#: the reply types, for ``isinstance`` (a union alias is not a class)
REPLY_TYPES = (JobOutcome, TrialOutcome, ValidationOutcome, PrefetchOutcome, ReplyError)


# ---- start-up handshake ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """The worker started, set its limits and imported the inference code."""

    pid: int


@dataclass(frozen=True)
class StartFailed:
    """The worker could not start (an import or thread failed, typically under its memory limit)."""

    reason: str
