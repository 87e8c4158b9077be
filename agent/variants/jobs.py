"""The guarded job path: each job on the active variant, with FP32 fallback, shadow validation,
demotion and automatic rollback.

``JobPath.plan(model) -> VariantPlan`` says how the next job of a model runs (activating its current
version first if needed); ``JobPath.run_job(job_id, series, model, submit) -> JobOutcome`` runs one
job with ``submit`` (the runner's) and returns the outcome whose prediction is published (or the
last failure).

The job path always follows the store's ``current`` link: whoever switches it (the updater after a
successful ``activate``, a rollback, an operator's ``edge-agent pull``) is picked up at the next job.
A model with no installed registry version runs the FP32 ONNX from ``models.dir`` as before.

Job-time rules (thresholds in ``[engines]``):
* the active variant fails (load error, exception, non-finite output, a worker crash by a signal):
  the job is re-run at once on the version's FP32 variant, ``engine.fallback`` is published, and the
  result names FP32 as its producer. ``max_consecutive_failures`` in a row demote the variant
  (``engine.demoted``) for this version: FP32 runs until the next update.
* every ``shadow_every``-th job also runs FP32 in the same worker call; agreement below
  ``shadow_min_agreement`` over the window demotes the variant (``engine.shadow_disagreement``).
* a version none of whose first ``rollback_after_failures`` jobs produced a result (even FP32
  failed) is rolled back: the previous version is activated, ``current`` switched back
  (``engine.rolled_back``), and the job re-run on it.
Failures caused by the series itself (unreadable DICOM, a volume the spec cannot take, a series
over ``series_limits``) and by the device's limits (the job's time budget ran out, the worker's
memory limit or the kernel's OOM killer: ``JobOutcome.failure`` "resource") count against nobody:
no fallback, no demotion, no rollback. Demotions and the per-version job counts are persisted; the counters behind them
are not (guard.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.core.config import Config
from agent.core.drift import DriftEdges
from agent.core.errors import ActivationError, BackendError, RegistryError
from agent.core.events import (
    EngineDemoted,
    EngineFallback,
    EngineRollbackFailed,
    EngineRollbackImpossible,
    EngineRolledBack,
    EngineServingModelsDir,
    EngineShadowDisagreement,
)
from agent.core.log import log_event
from agent.core.manifest import DriftProfile
from agent.core.modelspec import ModelSpec
from agent.core.types import Series
from agent.inference.runner import InferenceJob, JobOutcome, ModelFile
from agent.variants.activation import Activation, Activator
from agent.variants.choices import ChoiceStore
from agent.variants.events import Notifier
from agent.variants.guard import JobGuard
from agent.variants.installed import InstalledModels, drift_edges, model_file
from agent.variants.selftest import agrees

logger = logging.getLogger(__name__)

Submit = Callable[[InferenceJob], JobOutcome]


@dataclass(frozen=True)
class VariantPlan:
    """How the next job of ``model`` runs: ``primary`` first, ``fallback`` (FP32) when it fails.
    ``drift``: the version's drift reference profile (the manifest's, or models.dir's ``drift.json``),
    whose edges every job carries so the worker summarises the series on them."""

    model: str
    version: str  # "" for a models.dir model
    spec: ModelSpec
    model_dir: Path
    primary: ModelFile
    fallback: ModelFile | None
    drift: DriftProfile | None = None

    @property
    def drift_edges(self) -> DriftEdges | None:
        return None if self.drift is None else drift_edges(self.drift)

    def job(self, job_id: str, series: Series, model: ModelFile, shadow: ModelFile | None = None) -> InferenceJob:
        return InferenceJob(job_id, series, self.model, self.model_dir, model.variant_file, model.backend,
                            model.precision, model.variant, model.backend_options,
                            spec=self.spec if self.version else None, version=self.version, shadow=shadow,
                            drift_edges=self.drift_edges)


class JobPath:
    """Plans and runs jobs under the rules of the module docstring. ``plans``: the last plan per
    model (what ``summary()`` reports)."""

    def __init__(self, cfg: Config, models: InstalledModels, choices: ChoiceStore, guard: JobGuard,
                 activator: Activator, notify: Notifier) -> None:
        self.cfg = cfg
        self.models = models
        self.store = models.store
        self.choices = choices
        self.guard = guard
        self.activator = activator
        self.notify = notify
        self.plans: dict[str, VariantPlan] = {}
        self._proven: set[tuple[str, str]] = set()  # versions with a successful job: out of probation

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, model: str) -> VariantPlan:
        """How the next job of ``model`` runs (activating the current version if not done yet)."""
        try:
            version = self.store.current_version(model)
        except RegistryError as exc:
            log_event(logger, "engine.store_unreadable", logging.ERROR, model=model, error=str(exc))
            version = None
        if version is None or (self.cfg.models.enabled and model not in self.cfg.models.enabled):
            return self._local_plan(model)
        act = self.activator.activations.get((model, version))
        if act is None:
            act = self._recover(model, version)
            if act is None:
                return self._local_plan(model)
            version = act.version
        inst = self.models.installed(model, version)
        demoted = self.choices.demotions(model, version)
        fb = inst.manifest.fallback
        chosen = inst.manifest.variant(fb if act.variant in demoted else act.variant)
        spec = ModelSpec.model_validate(inst.manifest.spec)
        fallback = None if chosen.id == fb else model_file(inst.version, inst.manifest.variant(fb))
        plan = VariantPlan(model, version, spec, inst.version.path, model_file(inst.version, chosen), fallback,
                           inst.manifest.drift)
        self.plans[model] = plan
        return plan

    def _local_plan(self, model: str) -> VariantPlan:
        if model not in self.models.local:
            raise BackendError(f"model {model!r} has no usable registry version and is not in models.dir "
                               f"{self.cfg.models.dir}")
        spec, folder = self.models.local[model]
        plan = VariantPlan(model, "", spec, folder, ModelFile(folder / spec.onnx, "onnxruntime", "fp32", "fp32"),
                           None, self.models.local_drift(model))
        self.plans[model] = plan
        return plan

    def _recover(self, model: str, version: str) -> Activation | None:
        """Activate ``version``; when it cannot be, roll back to the previous version if there is one
        that activates, else None (the caller serves models.dir)."""
        failed = self.activator.failed
        if (model, version) not in failed:
            try:
                return self.activator.activate(model, version)
            except (ActivationError, RegistryError) as exc:
                failed[(model, version)] = str(exc)
        if self.rollback(model, version, f"activation failed: {failed[(model, version)]}"):
            return self.activator.activations.get((model, self.store.current_version(model) or ""))
        if model in self.models.local:
            self.notify(EngineServingModelsDir(model=model, version=version))
        return None

    # ---- running -------------------------------------------------------------------------------
    def run_job(self, job_id: str, series: Series, model: str, submit: Submit) -> JobOutcome:
        """Run one job of ``model`` with ``submit`` (the runner's), applying the rules in the module
        docstring. Returns the outcome whose prediction is published (or the last failure)."""
        outcome, rolled_back = self._attempt(self.plan(model), job_id, series, submit)
        if rolled_back:
            outcome, _ = self._attempt(self.plan(model), job_id, series, submit)
        return outcome

    def _attempt(self, plan: VariantPlan, job_id: str, series: Series, submit: Submit) -> tuple[JobOutcome, bool]:
        gkey = f"{plan.version}/{plan.primary.variant}"
        shadow = plan.fallback if plan.fallback and self.guard.next_job_shadowed(plan.model, gkey) else None
        outcome = submit(plan.job(job_id, series, plan.primary, shadow))
        if outcome.ok:
            self.guard.succeeded(plan.model, gkey)
            self._version_ok(plan)
            if outcome.shadow is not None:
                self._shadow_compared(plan, gkey, outcome)
            return outcome, False
        if outcome.failure != "model":
            return outcome, False  # the series, not the model (or we are stopping): nobody's variant to blame
        if plan.fallback is not None:
            self.notify(EngineFallback(model=plan.model, version=plan.version, variant=plan.primary.variant,
                                       job_id=job_id, kind=outcome.kind, fallback_variant=plan.fallback.variant,
                                       error=outcome.error))
            verdict = self.guard.failed(plan.model, gkey)
            if verdict.demote:
                self.demote(plan.model, plan.version, plan.primary.variant, verdict.reason, None)
            outcome = submit(plan.job(job_id, series, plan.fallback))
            if outcome.ok:
                self._version_ok(plan)
                return outcome, False
            if outcome.failure != "model":
                return outcome, False
        if not plan.version:
            return outcome, False
        ok_jobs, failed_jobs = self.choices.count_job(plan.model, plan.version, ok=False)
        limit = self.cfg.engines.rollback_after_failures
        if ok_jobs == 0 and failed_jobs >= limit:
            reason = f"its first {failed_jobs} job(s) all failed (limit {limit}); last: {outcome.error}"
            return outcome, self.rollback(plan.model, plan.version, reason)
        return outcome, False

    def _version_ok(self, plan: VariantPlan) -> None:
        if plan.version and (plan.model, plan.version) not in self._proven:
            self.choices.count_job(plan.model, plan.version, ok=True)
            self._proven.add((plan.model, plan.version))

    def _shadow_compared(self, plan: VariantPlan, gkey: str, outcome: JobOutcome) -> None:
        shadow = outcome.shadow
        assert shadow is not None
        if shadow.agreement is None:  # FP32 itself failed on this series: no comparison
            log_event(logger, "engine.shadow_failed", logging.WARNING, model=plan.model, error=shadow.error)
            return
        agreed = agrees(plan.spec.task, shadow.agreement, self.cfg.engines.shadow_min_dice)
        verdict, rate = self.guard.compared(plan.model, gkey, agreed)
        log_event(logger, "engine.shadow", model=plan.model, variant=plan.primary.variant,
                  agreement=shadow.agreement, agreed=agreed, rate=round(rate, 4))
        if verdict.demote:
            self.choices.demote(plan.model, plan.version, plan.primary.variant, verdict.reason)
            self.notify(EngineShadowDisagreement(model=plan.model, version=plan.version,
                                                 variant=plan.primary.variant, reason=verdict.reason))

    # ---- taking a variant or a version out of service -------------------------------------------
    def demote(self, model: str, version: str, variant: str, reason: str, correlation_id: str | None) -> None:
        """Take ``variant`` out of service for ``version`` (persisted): FP32 runs until the next update."""
        self.choices.demote(model, version, variant, reason)
        self.notify(EngineDemoted(model=model, version=version, variant=variant, reason=reason,
                                  correlation_id=correlation_id or None))

    def rollback(self, model: str, version: str, reason: str) -> bool:
        """Activate the previous version, then switch ``current`` back to it. False when there is
        no previous version or it cannot be activated either (events say so)."""
        previous = self.store.previous_version(model)
        if previous is None or previous == version:
            self.notify(EngineRollbackImpossible(model=model, version=version, reason=reason))
            return False
        try:
            self.activator.activate(model, previous)
            with self.store.lock(model):
                now = self.store.rollback(model)
        except (ActivationError, RegistryError) as exc:
            self.notify(EngineRollbackFailed(model=model, version=version, previous=previous, error=str(exc)))
            return False
        self.notify(EngineRolledBack(model=model, from_version=version, to_version=now, reason=reason))
        return True
