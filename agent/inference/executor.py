"""What the inference worker does with each request, inside the worker process only.

``Executor`` takes the requests of ``agent.inference.messages`` and returns their outcomes; it never
raises for a request's failure (a bug in one model's code path becomes an ``error`` outcome, not a
dead warm worker):

    run(job, fault)       -> JobOutcome         the job's model (cached), the pipeline, the shadow,
                                                the drift summary (when the job carries edges)
    trial(request)        -> TrialOutcome       a fresh load, one run, ``bench_runs`` timed runs
    validate(request)     -> ValidationOutcome  a fresh load, ``validation.predict`` over the set
    prefetch(paths)       -> PrefetchOutcome    the decoded series, kept for the next job on it

Loaded models are cached by (model name, backend, precision, variant) and reloaded when the model
file or its spec changes. A job's shadow run (``agreement``) compares the job's logits with the
shadow model's on the same series: classification 1.0/0.0 for the same/another label,
segmentation the mean Dice of the foreground labels of the two argmax maps (in model space).

This module imports the inference libraries and the imaging code at import time: only the worker
imports it (``worker.worker_main``), never the service process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.core.errors import (
    BackendError,
    DicomError,
    EdgeAgentError,
    LimitExceededError,
    PreprocessError,
    VolumeError,
)
from agent.core.labelmap import save_label_map
from agent.core.limits import DecodeLimits
from agent.core.log import log_event
from agent.core.modelspec import ModelSpec, load_spec
from agent.core.types import ModelRef, Volume
from agent.imaging.volume import load_series, use_decode_limits
from agent.inference import catalog, pipeline
from agent.inference.base import Backend, BackendInfo
from agent.inference.faults import FaultyBackend, fault_applies
from agent.inference.limits import over_limit
from agent.inference.messages import (
    FailureKind,
    InferenceJob,
    JobOutcome,
    PrefetchOutcome,
    ShadowOutcome,
    TrialOutcome,
    TrialRequest,
    ValidationOutcome,
    ValidationRequest,
)

# the runner's logger, as before the split: log filters and dashboards select on its name
logger = logging.getLogger("agent.inference.runner")

#: what identifies a loaded model's files: (path, mtime_ns, size, spec stamp, backend options)
Fingerprint = tuple[str, int, int, str | int, str]
#: the model cache's key: (model name, backend, precision, variant)
ModelKey = tuple[str, str, str, str]


class Executor:
    """Job execution inside the worker process, with a cache of loaded models."""

    def __init__(self, threads: int, memory_limit_mb: int, fault_injection: bool) -> None:
        self.threads = threads
        self.memory_limit_mb = memory_limit_mb
        self.fault_injection = fault_injection
        self._models: dict[ModelKey, tuple[Fingerprint, ModelSpec, Backend]] = {}
        #: the one prefetched series: its exact file list and the decoded Volume (see prefetch)
        self._prefetched: tuple[tuple[str, ...], Volume] | None = None

    def run(self, job: InferenceJob, fault: str) -> JobOutcome:
        """Run one job (see the module docstring). Never raises."""
        if job.limits is not None:
            over = over_limit([inst.path for inst in job.series.instances], job.limits)
            if over is not None:
                return JobOutcome("refused", error=over[1], failure="input", limit=over[0])
            if job.limits.max_decompressed_mb:
                use_decode_limits(DecodeLimits.from_mb(job.limits.max_decompressed_mb,
                                                       job.limits.max_decompression_ratio))
        try:
            spec, backend = self._model(job, job)
            info = backend.describe()
            ref = _model_ref(spec, job, info)
            if self.fault_injection and fault_applies(fault, job):
                backend = FaultyBackend(backend, fault.partition("@")[0], self.memory_limit_mb)
            paths = [inst.path for inst in job.series.instances]
            volume = self._take_prefetched(paths)
            run = pipeline.run_model_detailed(paths, spec, backend, ref, want_label_map=job.label_map_path is not None,
                                              volume=volume, drift_edges=job.drift_edges)
            if job.label_map_path is not None and run.label_map is not None:
                _keep_label_map(job.label_map_path, run.label_map)
            if job.shadow is None:
                return JobOutcome("ok", run.prediction, summary=run.summary)
            return JobOutcome("ok", run.prediction, shadow=self._shadow(job, spec, paths, run.logits, volume),
                              summary=run.summary)
        except MemoryError as exc:
            limit = self.memory_limit_mb or "none"
            why = exc or "allocation failed"
            return JobOutcome("oom", error=f"out of memory (worker limit {limit} MB): {why}")
        except LimitExceededError as exc:  # a codec bomb, or more than dicom.limits allows
            return JobOutcome("refused", error=str(exc), failure="input", limit="dicom.limits.max_decompressed_mb")
        except EdgeAgentError as exc:
            if _looks_like_oom(str(exc)):
                return JobOutcome("oom", error=f"{type(exc).__name__}: {exc}")
            return JobOutcome("error", error=f"{type(exc).__name__}: {exc}", failure=_failure_of(exc))
        except Exception as exc:
            # a bug in one model's code path must become an outcome, not kill the warm worker
            logger.exception("worker.job_failed")
            return JobOutcome("error", error=f"internal error: {type(exc).__name__}: {exc}", failure="model")

    def prefetch(self, paths: Sequence[str]) -> PrefetchOutcome:
        """Decode the series made of ``paths`` and keep it for the next job on exactly these files
        (spooled files never change, so the same list means the same volume). One series is kept;
        a newer prefetch replaces it."""
        self._prefetched = None  # free the previous one before decoding the next
        try:
            self._prefetched = (tuple(str(p) for p in paths), load_series([Path(p) for p in paths]))
        except (EdgeAgentError, MemoryError) as exc:
            # not a job failure: the job decodes the series itself and reports its own error
            return PrefetchOutcome("error", f"{type(exc).__name__}: {exc}")
        return PrefetchOutcome("ok")

    def _take_prefetched(self, paths: Sequence[Path]) -> Volume | None:
        """The prefetched Volume when it was decoded from exactly ``paths``, else None (and dropped
        either way: a job consumes it)."""
        held, self._prefetched = self._prefetched, None
        if held is not None and held[0] == tuple(str(p) for p in paths):
            return held[1]
        return None

    def _shadow(self, job: InferenceJob, spec: ModelSpec, paths: list[Path], logits: npt.NDArray[np.float32],
                volume: Volume | None = None) -> ShadowOutcome:
        """Run the job's shadow model on the same series; agreement of the two outputs."""
        assert job.shadow is not None
        shadow = replace(job, variant_file=job.shadow.variant_file, backend=job.shadow.backend,
                         precision=job.shadow.precision, variant=job.shadow.variant,
                         backend_options=job.shadow.backend_options, shadow=None)
        name = shadow.variant or shadow.precision
        try:
            _, backend = self._model(shadow, job)
            ref = _model_ref(spec, shadow, backend.describe())
            run = pipeline.run_model_detailed(paths, spec, backend, ref, volume=volume)
        except (EdgeAgentError, MemoryError) as exc:
            log_event(logger, "worker.shadow_failed", logging.WARNING, job_id=job.job_id, variant=name,
                      error=str(exc))
            return ShadowOutcome(name, None, f"{type(exc).__name__}: {exc}")
        return ShadowOutcome(name, agreement(spec.task, logits, run.logits))

    def trial(self, request: TrialRequest) -> TrialOutcome:
        """Load a model file fresh, run the request's input, time ``bench_runs`` more runs."""
        m = request.model
        try:
            timed = np.ascontiguousarray(request.inputs[:1])
            # warmed up (and, for OpenVINO, compiled statically) for the timed shape, as jobs run
            options = {**dict(m.backend_options), "warmup_shape": tuple(timed.shape)}
            backend = catalog.create(m.backend)
            t0 = time.perf_counter()
            backend.load(Path(m.variant_file), precision=m.precision, threads=self.threads, options=options)
            load_ms = (time.perf_counter() - t0) * 1000
            output = np.asarray(backend.run(request.inputs), dtype=np.float32)
            backend.run(timed)  # once untimed: the first run of a shape may still allocate
            times = []
            for _ in range(max(1, request.bench_runs)):
                t0 = time.perf_counter()
                backend.run(timed)
                times.append((time.perf_counter() - t0) * 1000)
            info = backend.describe()
            del backend  # free the session before the reply: trials load many variants in a row
            # best of N: other processes on the device only ever add time, so the minimum is the
            # steadiest estimate of the variant's own speed (medians flipped choices on a busy box)
            return TrialOutcome("ok", output, round(load_ms, 1), round(min(times), 3), info.version,
                                info.precision)
        except MemoryError as exc:
            return TrialOutcome("oom", error=f"out of memory: {exc or 'allocation failed'}")
        except EdgeAgentError as exc:
            return TrialOutcome("error", error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            logger.exception("worker.trial_failed")
            return TrialOutcome("error", error=f"internal error: {type(exc).__name__}: {exc}")

    def validate(self, request: ValidationRequest) -> ValidationOutcome:
        """Load a model file fresh and predict every sample of a validation set with it."""
        # the validation set reader and the gate's predict are only ever needed here
        from agent.core.accuracy import load_validation_set
        from agent.inference.validation import CLASSIFICATION_BATCH, predict

        m, spec = request.model, request.spec
        t0 = time.perf_counter()
        try:
            samples = load_validation_set(Path(request.set_path))
            first = samples.inputs[0]
            if spec.task == "classification":
                warm: tuple[int, ...] = (min(CLASSIFICATION_BATCH, len(samples)), *first.shape)
            else:
                warm = _warmup_shape(spec) or (1, *first.shape)
            backend = catalog.create(m.backend)
            backend.load(Path(m.variant_file), precision=m.precision, threads=self.threads,
                         options={**dict(m.backend_options), "warmup_shape": warm})
            predictions = predict(backend.run, samples, spec)
            del backend  # free the session before the reply: a gate loads several variants in a row
            return ValidationOutcome("ok", tuple(predictions), round(time.perf_counter() - t0, 2))
        except MemoryError as exc:
            return ValidationOutcome("oom", error=f"out of memory: {exc or 'allocation failed'}")
        except (EdgeAgentError, ValueError) as exc:
            return ValidationOutcome("error", error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            logger.exception("worker.validate_failed")
            return ValidationOutcome("error", error=f"internal error: {type(exc).__name__}: {exc}")

    def _model(self, job: InferenceJob, owner: InferenceJob) -> tuple[ModelSpec, Backend]:
        """The loaded (spec, backend) for the job, from the cache when the files did not change.
        ``owner``: the job whose spec / model folder applies (a shadow run borrows its job's)."""
        variant = Path(job.variant_file)
        try:
            vstat = variant.stat()
            spec_stamp: str | int = (owner.spec.model_dump_json() if owner.spec is not None
                                     else (Path(owner.model_dir) / "model.toml").stat().st_mtime_ns)
        except OSError as exc:
            raise BackendError(f"model file missing: {exc}") from exc
        options = dict(job.backend_options)
        fingerprint: Fingerprint = (str(variant), vstat.st_mtime_ns, vstat.st_size, spec_stamp,
                                    repr(sorted(options.items())))
        key = (job.model_name, job.backend, job.precision, job.variant)
        cached = self._models.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1], cached[2]
        # a new or updated model: drop the old one first so both are never in memory together
        self._models.pop(key, None)
        spec = owner.spec if owner.spec is not None else load_spec(owner.model_dir)
        if spec.name != job.model_name:
            raise BackendError(f"the spec of {owner.model_dir} declares model {spec.name!r}, "
                               f"the job asked for {job.model_name!r}")
        if "warmup_shape" not in options:
            shape = _warmup_shape(spec)
            if shape is not None:
                options["warmup_shape"] = shape
        backend = catalog.create(job.backend)
        t0 = time.monotonic()
        backend.load(variant, precision=job.precision, threads=self.threads, options=options)
        info = backend.describe()
        log_event(
            logger,
            "worker.model_loaded",
            model=spec.name,
            version=spec.version,
            variant=job.variant or job.precision,
            backend=info.name,
            precision=info.precision,
            device=info.device,
            ms=round((time.monotonic() - t0) * 1000),
        )
        self._models[key] = (fingerprint, spec, backend)
        return spec, backend


def agreement(task: str, a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    """How far two logits arrays of one series agree. Classification (K,): 1.0 when the argmax
    (label) is the same, else 0.0. Segmentation (K, *spatial): mean Dice over the foreground labels
    (1..K-1) present in either argmax map; 1.0 when neither has any foreground."""
    if a.shape != b.shape:
        return 0.0
    if task == "classification":
        return 1.0 if int(np.argmax(a)) == int(np.argmax(b)) else 0.0
    la, lb = np.argmax(a, axis=0), np.argmax(b, axis=0)
    dices = []
    for label in range(1, a.shape[0]):
        ina, inb = la == label, lb == label
        total = int(ina.sum()) + int(inb.sum())
        if total:
            dices.append(2.0 * int(np.logical_and(ina, inb).sum()) / total)
    return round(float(np.mean(dices)), 6) if dices else 1.0


def _failure_of(exc: EdgeAgentError) -> FailureKind:
    """Whose fault: the series (unreadable, or one the model's input spec cannot take), or the model."""
    return "input" if isinstance(exc, (DicomError, PreprocessError, VolumeError)) else "model"


def _model_ref(spec: ModelSpec, job: InferenceJob, info: BackendInfo) -> ModelRef:
    return ModelRef(
        name=spec.name,
        version=spec.version,
        variant=job.variant or job.precision,
        backend=info.name,
        precision=info.precision,
    )


def _warmup_shape(spec: ModelSpec) -> tuple[int, ...] | None:
    """The input shape of one inference call for this model, when the spec fixes it."""
    inp = spec.input
    if inp.dims == 3 and inp.patch_size is not None:
        return (1, inp.channels, *inp.patch_size)
    if inp.dims == 2 and inp.target_size is not None:
        return (1, inp.channels, *inp.target_size)
    return None


def _looks_like_oom(message: str) -> bool:
    """Native allocation failures reach us as backend errors (ORT: 'bad allocation', OpenVINO:
    'std::bad_alloc'); they are out-of-memory outcomes, not model errors."""
    m = message.lower()
    return "bad_alloc" in m or "bad allocation" in m or "failed to allocate" in m


def _keep_label_map(path: Path, label_map: npt.NDArray[np.uint8]) -> None:
    """Write the label map for the export stage; a failure is logged, not the job's: the export
    of that result is then refused with its reason (no label map)."""
    try:
        save_label_map(path, label_map)
    except OSError as exc:
        log_event(logger, "worker.label_map_unwritten", logging.WARNING, error=str(exc))
