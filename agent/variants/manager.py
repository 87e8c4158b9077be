"""VariantManager: which variant of each model runs here, and what happens when it misbehaves.

    activate(model, version)   self-test + time every compatible installed variant (in the inference
                               worker), gate the unproven ones, choose, persist (activation.py); a
                               stored choice for the same key is reused without measuring
    plan(model), run_job(...)  one job on the active variant, with FP32 fallback, shadow validation,
                               demotion and automatic rollback (jobs.py, rules: guard.py)
    selftest(...)              re-run the self-tests now (MQTT cmd/selftest) -> list[SelfTestReport]
    summary()                  the status message's models[] -> list[ModelSummary] (report.py)
    describe()                 what `edge-agent models` prints -> list[ModelStatus] (report.py)
    drift_profile(model)       (version, DriftProfile) of what serves the model now, for the drift
                               monitor; the jobs' outcomes carry each series' summary on its edges
    shadow_agreement(model)    the active variant's agreement rate with FP32 over the shadow window

Takes the configuration, the ModelStore, the state database's path and an ``on_event`` callback
for operator events (``engine.*``); the records it returns are agent.core.status's. The parts it
wires together share the installed models (installed.py), the persisted choices (choices.py), the
job-time counters (guard.py) and one event notifier (events.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from agent.core.config import Config
from agent.core.errors import ActivationError, BackendError, RegistryError
from agent.core.events import EngineSelftest, EngineSelftestFailed
from agent.core.log import log_event
from agent.core.manifest import DriftProfile
from agent.core.modelspec import ModelSpec
from agent.core.status import ModelStatus, ModelSummary, SelfTestReport
from agent.core.types import Event, Series
from agent.device.probe import Probe
from agent.device.probe import probe as run_probe
from agent.inference.runner import InferenceRunner, JobOutcome
from agent.updates.store import ModelStore
from agent.variants import report
from agent.variants.activation import Activation, Activator
from agent.variants.choices import ChoiceStore
from agent.variants.events import Notifier
from agent.variants.guard import JobGuard
from agent.variants.installed import InstalledModels
from agent.variants.jobs import JobPath, Submit, VariantPlan

__all__ = ["Activation", "SelfTestReport", "Submit", "VariantManager", "VariantPlan"]

logger = logging.getLogger(__name__)


class VariantManager:
    """See the module docstring. ``on_event`` receives operator events (engine.*) and may be
    replaced after construction.

    ``runner``: the inference runner trials run in (the service's own, so trials are serialised with
    jobs and measured in the same process); without one, a private runner is started on first use
    and stopped by ``close()``. ``probe``: the device probe (default: probed on first use).
    """

    def __init__(self, cfg: Config, store: ModelStore, db_path: Path, on_event: Callable[[Event], None], *,
                 runner: InferenceRunner | None = None, probe: Probe | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.choices = ChoiceStore(db_path)
        self.guard = JobGuard(cfg.engines)
        self._notify = Notifier(on_event)
        self._probe = probe
        self.models = InstalledModels(cfg, store)
        self.activator = Activator(cfg, self.models, self.choices, self._notify, lambda: self.probe, runner)
        self.jobs = JobPath(cfg, self.models, self.choices, self.guard, self.activator, self._notify)

    # ---- set-up --------------------------------------------------------------------------------
    @property
    def local(self) -> dict[str, tuple[ModelSpec, Path]]:
        """models.dir models served: name -> (spec, folder)."""
        return self.models.local

    def attach_runner(self, runner: InferenceRunner) -> None:
        """Use ``runner`` for trials from now on (the service's, once started)."""
        self.activator.runner = runner

    def close(self) -> None:
        self.activator.close()
        self.choices.close()

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = run_probe(self.cfg.storage.dir)
        return self._probe

    def registry_models(self) -> list[str]:
        """Models with an installed current version (filtered by models.enabled)."""
        return self.models.registry_models()

    def specs(self) -> dict[str, ModelSpec]:
        """Every model this agent serves, by name: models.dir specs, overridden by the spec in the
        current registry version's manifest. ModelSpecError when there is none at all or
        ``models.enabled`` names a model that is nowhere."""
        return self.models.specs()

    def start(self) -> None:
        """Activate the current version of every installed model (stored choices are reused)."""
        for model in self.registry_models():
            try:
                self.plan(model)
            except (ActivationError, BackendError, RegistryError) as exc:
                log_event(logger, "engine.start_failed", logging.ERROR, model=model, error=str(exc))

    # ---- activation ----------------------------------------------------------------------------
    def activate(self, model: str, version: str, *, correlation_id: str | None = None) -> Activation:
        """Self-test and time the installed variants of ``model`` ``version``, choose, persist
        (activation.py). Does not switch ``current``. ActivationError when FP32 fails."""
        return self.activator.activate(model, version, correlation_id=correlation_id)

    def selftest(self, model: str | None = None, *, correlation_id: str | None = None) -> list[SelfTestReport]:
        """Re-run the self-tests of every tried variant of the current version(s) now. An active
        variant that fails is demoted; an FP32 that fails raises an error event."""
        models = [model] if model else self.registry_models()
        reports: list[SelfTestReport] = []
        for m in models:
            version = self.store.current_version(m)
            if version is None:
                raise ActivationError(f"{m}: no registry version installed; nothing to self-test")
            inst = self.models.installed(m, version)
            with self.activator.lock:
                trials = [t for t in self.activator.measure(inst) if t.tried]
            reports += [SelfTestReport(m, version, t.id, t.passed, t.error, t.max_abs_err) for t in trials]
            act = self.activator.activations.get((m, version))
            for t in trials:
                if t.passed:
                    continue
                if t.id == inst.manifest.fallback:
                    self._notify(EngineSelftestFailed(model=m, version=version, variant=t.id,
                                                      correlation_id=correlation_id or None, error=t.error))
                elif act is not None and act.variant == t.id:
                    self.jobs.demote(m, version, t.id, f"self-test failed: {t.error}", correlation_id)
        self._notify(EngineSelftest(results=tuple(reports), correlation_id=correlation_id or None))
        return reports

    # ---- the job path --------------------------------------------------------------------------
    def plan(self, model: str) -> VariantPlan:
        """How the next job of ``model`` runs (activating the current version if not done yet)."""
        return self.jobs.plan(model)

    def run_job(self, job_id: str, series: Series, model: str, submit: Submit) -> JobOutcome:
        """Run one job of ``model`` with ``submit`` (the runner's) under the job-time rules
        (jobs.py). Returns the outcome whose prediction is published (or the last failure)."""
        return self.jobs.run_job(job_id, series, model, submit)

    # ---- reporting -----------------------------------------------------------------------------
    def summary(self) -> list[ModelSummary]:
        """What each model ran (or will run) with, from memory only: cheap enough for the MQTT birth
        message. Models not planned yet show their models.dir FP32 (or no variant, for a registry
        version not activated yet)."""
        return report.summary(self.models, self.activator.activations, self.jobs.plans)

    def describe(self) -> list[ModelStatus]:
        """Installed models, versions, every variant with its trial on this device, the active one and
        why (``edge-agent models``; ``to_json()`` for ``--json``)."""
        return report.describe(self.models, self.activator, self.choices, self.guard)

    # ---- drift ---------------------------------------------------------------------------------
    def drift_profile(self, model: str) -> tuple[str, DriftProfile] | None:
        """The version and drift reference profile of what serves ``model`` now: the version the
        last job ran (its manifest's ``drift``), or models.dir's ``drift.json`` (re-read when it
        changes) with the spec's version; before any job, the current registry version's or
        models.dir's, without activating anything. None when that has no profile (or the model is
        unknown). A job's ``JobOutcome.summary`` is binned on this profile's edges."""
        plan = self.jobs.plans.get(model)
        if plan is not None and plan.version:
            return None if plan.drift is None else (plan.version, plan.drift)
        if plan is None and model in self.registry_models():
            try:
                version = self.store.current_version(model)
                if version is not None:
                    drift = self.models.installed(model, version).manifest.drift
                    return None if drift is None else (version, drift)
            except (ActivationError, RegistryError) as exc:
                log_event(logger, "engine.drift_profile_unreadable", logging.WARNING, model=model, error=str(exc))
                return None
        drift = self.models.local_drift(model)
        return None if drift is None else (self.models.local[model][0].version, drift)

    def shadow_agreement(self, model: str) -> float | None:
        """The share of shadow comparisons over the guard's window in which the variant running
        ``model`` agreed with FP32; None before the first comparison in this process (or when FP32
        itself runs: nothing to shadow)."""
        stats = self.guard.stats(model)
        return None if stats is None else stats.shadow_agreement
