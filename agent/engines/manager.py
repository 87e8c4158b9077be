"""EngineManager: which variant of each model runs here, and what happens when it misbehaves.

    activate(model, version)   self-test + time every compatible installed variant (in the inference
                               worker), choose (selection.py), persist (choices.py); a stored choice
                               for the same key is reused without measuring
    run_job(...)               one job on the active variant, with FP32 fallback, shadow validation,
                               demotion and automatic rollback (rules: guard.py and below)
    selftest(...)              re-run the self-tests now (MQTT cmd/selftest)
    describe()                 what `edge-agent models` prints

The job path always follows the store's ``current`` link: whoever switches it (the updater after a
successful ``activate``, a rollback, an operator's ``edge-agent pull``) is picked up at the next job.
A model with no installed registry version runs the FP32 ONNX from ``models.dir`` as before.

Job-time rules (thresholds in ``[engines]``):
* the active variant fails (load error, exception, non-finite output, worker crash or timeout):
  the job is re-run at once on the version's FP32 variant, ``engine.fallback`` is published, and the
  result names FP32 as its producer. ``max_consecutive_failures`` in a row demote the variant
  (``engine.demoted``) for this version: FP32 runs until the next update.
* every ``shadow_every``-th job also runs FP32 in the same worker call; agreement below
  ``shadow_min_agreement`` over the window demotes the variant (``engine.shadow_disagreement``).
* a version none of whose first ``rollback_after_failures`` jobs produced a result (even FP32
  failed) is rolled back: the previous version is activated, ``current`` switched back
  (``engine.rolled_back``), and the job re-run on it.
Failures caused by the series itself (unreadable DICOM, a volume the spec cannot take) count
against nobody. Demotions and the per-version job counts are persisted; the counters behind them
are not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.accuracy import headline, load_validation_set
from agent.config import Config
from agent.engines.choices import ChoiceStore, VariantTrial, choice_key
from agent.engines.device_gate import judge_predictions
from agent.engines.guard import JobGuard
from agent.engines.selection import choose
from agent.engines.selftest import agrees, judge, load_vector
from agent.errors import ActivationError, BackendError, ModelSpecError, RegistryError
from agent.inference.runner import (
    InferenceJob,
    InferenceRunner,
    JobOutcome,
    ModelFile,
    TrialRequest,
    ValidationRequest,
)
from agent.isa import Proof, proof_needed, refusal
from agent.log import log_event
from agent.manifest import Manifest, Variant, parse_manifest, sha256_bytes, verify_file
from agent.modelspec import ModelSpec, load_spec
from agent.registry.probe import Probe, compatible
from agent.registry.probe import probe as run_probe
from agent.registry.store import InstalledVersion, ModelStore
from agent.types import Event, Series

logger = logging.getLogger(__name__)

Submit = Callable[[InferenceJob], JobOutcome]
MODELS_DIR_REASON = "no registry model installed: running the FP32 ONNX from models.dir"


@dataclass(frozen=True)
class Activation:
    """The outcome of ``activate``: the chosen variant, why, and every variant's trial.
    ``measured``: False when a stored choice for the same key was reused."""

    model: str
    version: str
    variant: str
    backend: str
    precision: str
    reason: str
    results: tuple[VariantTrial, ...]
    measured: bool = True


@dataclass(frozen=True)
class SelfTestReport:
    """One variant's self-test, re-run on request."""

    model: str
    version: str
    variant: str
    passed: bool
    error: str = ""
    max_abs_err: float | None = None


@dataclass(frozen=True)
class EnginePlan:
    """How the next job of ``model`` runs: ``primary`` first, ``fallback`` (FP32) when it fails."""

    model: str
    version: str  # "" for a models.dir model
    spec: ModelSpec
    model_dir: Path
    primary: ModelFile
    fallback: ModelFile | None

    def job(self, job_id: str, series: Series, model: ModelFile, shadow: ModelFile | None = None) -> InferenceJob:
        return InferenceJob(job_id, series, self.model, self.model_dir, model.variant_file, model.backend,
                            model.precision, model.variant, model.backend_options,
                            spec=self.spec if self.version else None, version=self.version, shadow=shadow)


@dataclass(frozen=True)
class _Installed:
    version: InstalledVersion
    manifest: Manifest
    manifest_sha256: str


def _model_file(inst: InstalledVersion, v: Variant) -> ModelFile:
    return ModelFile(inst.path / v.file, v.backend, v.precision, v.id, dict(v.options))


class EngineManager:
    """See the module docstring. ``on_event`` receives operator events (engine.*).

    ``runner``: the inference runner trials run in (the service's own, so trials are serialised with
    jobs and measured in the same process); without one, a private runner is started on first use
    and stopped by ``close()``. ``probe``: the device probe (default: probed on first use).
    """

    def __init__(self, cfg: Config, store: ModelStore, db_path: Path, on_event: Callable[[Event], None], *,
                 runner: InferenceRunner | None = None, probe: Probe | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.on_event = on_event
        self.choices = ChoiceStore(db_path)
        self.guard = JobGuard(cfg.engines)
        self._runner = runner
        self._own_runner: InferenceRunner | None = None
        self._probe = probe
        self._lock = threading.RLock()  # one activation at a time
        self._activations: dict[tuple[str, str], Activation] = {}
        self._failed: dict[tuple[str, str], str] = {}  # versions whose activation failed: not re-measured
        self._proven: set[tuple[str, str]] = set()  # versions with a successful job: out of probation
        self._plans: dict[str, EnginePlan] = {}  # the last plan per model, for summary()
        self._manifests: dict[tuple[str, str], _Installed] = {}  # committed versions never change
        self.local = self._scan_models_dir()

    # ---- set-up --------------------------------------------------------------------------------
    def attach_runner(self, runner: InferenceRunner) -> None:
        """Use ``runner`` for trials from now on (the service's, once started)."""
        self._runner = runner

    def close(self) -> None:
        if self._own_runner is not None:
            self._own_runner.stop()
            self._own_runner = None
        self.choices.close()

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = run_probe(self.cfg.storage.dir)
        return self._probe

    def _scan_models_dir(self) -> dict[str, tuple[ModelSpec, Path]]:
        """models.dir folders with a model.toml and its FP32 ONNX (filtered by models.enabled)."""
        found: dict[str, tuple[ModelSpec, Path]] = {}
        root = self.cfg.models.dir
        if not root.is_dir():
            return found
        for toml in sorted(root.glob("*/model.toml")):
            spec = load_spec(toml.parent)
            if self.cfg.models.enabled and spec.name not in self.cfg.models.enabled:
                continue
            if not (toml.parent / spec.onnx).is_file():
                log_event(logger, "model.skipped", logging.WARNING, model=spec.name,
                          reason=f"{toml.parent / spec.onnx} missing")
                continue
            found[spec.name] = (spec, toml.parent)
        return found

    def registry_models(self) -> list[str]:
        """Models with an installed current version (filtered by models.enabled)."""
        enabled = self.cfg.models.enabled
        return [m for m in self.store.models() if not enabled or m in enabled]

    def specs(self) -> dict[str, ModelSpec]:
        """Every model this agent serves, by name: models.dir specs, overridden by the spec in the
        current registry version's manifest. ModelSpecError when there is none at all or
        ``models.enabled`` names a model that is nowhere."""
        specs = {name: spec for name, (spec, _) in self.local.items()}
        for model in self.registry_models():
            try:
                inst = self._installed(model, self.store.current_version(model) or "")
                specs[model] = ModelSpec.model_validate(inst.manifest.spec)
            except (RegistryError, ActivationError, ValueError) as exc:
                log_event(logger, "engine.spec_unreadable", logging.ERROR, model=model, error=str(exc))
        missing = set(self.cfg.models.enabled) - set(specs)
        if missing:
            raise ModelSpecError(f"models.enabled names unknown model(s): {', '.join(sorted(missing))}")
        if not specs and not self.cfg.models.dir.is_dir():
            raise ModelSpecError(f"models.dir {self.cfg.models.dir} is not a directory and no registry "
                                 "model is installed")
        return specs

    def start(self) -> None:
        """Activate the current version of every installed model (stored choices are reused)."""
        for model in self.registry_models():
            try:
                self.plan(model)
            except (ActivationError, BackendError, RegistryError) as exc:
                log_event(logger, "engine.start_failed", logging.ERROR, model=model, error=str(exc))

    # ---- reading installed versions ------------------------------------------------------------
    def _installed(self, model: str, version: str) -> _Installed:
        inst = self.store.installed(model, version) if version else None
        if inst is None:
            raise ActivationError(f"{model} {version or '(no version)'} is not installed")
        cached = self._manifests.get((model, version))
        if cached is not None and cached.version == inst:  # same install record: same signed manifest
            return cached
        try:
            raw = inst.manifest_path.read_bytes()
        except OSError as exc:
            raise ActivationError(f"{inst.manifest_path} is unreadable: {exc}") from exc
        # verified against the pinned key when it was installed; the store is the agent's own state
        found = _Installed(inst, parse_manifest(raw), sha256_bytes(raw))
        self._manifests[(model, version)] = found
        return found

    def _key(self, inst: _Installed) -> tuple[str, dict[str, Any]]:
        p = self.probe
        backends = {b.name: b.version for b in p.backends if b.installed}
        hardware = {"arch": p.cpu.arch, "cpu": p.cpu.model, "flags": sorted(p.cpu.features),
                    "cores": p.cpu.usable_cores, "threads": self.cfg.pipeline.threads,
                    "gpus": [[g.name, g.compute_capability] for g in p.nvidia.gpus],
                    "tensorrt": p.nvidia.tensorrt_version, "driver": p.nvidia.driver_version}
        return choice_key(inst.version.model, inst.version.version, inst.manifest_sha256, backends, hardware)

    def _compatible(self, v: Variant) -> tuple[bool, str]:
        ok, why = compatible(v.requires, self.probe, backend=v.backend)
        if ok and v.backend == "tensorrt" and v.precision == "fp8" and not any(g.fp8 for g in self.probe.nvidia.gpus):
            return False, "FP8 needs GPU compute capability >= 8.9"
        if ok and not v.gate.passed:
            return False, "did not pass the accuracy gate"
        return ok, why

    # ---- activation ----------------------------------------------------------------------------
    def activate(self, model: str, version: str, *, correlation_id: str | None = None) -> Activation:
        """Self-test and time the installed variants of ``model`` ``version``, choose, persist (see
        the module docstring). Does not switch ``current``. ActivationError when FP32 fails."""
        with self._lock:
            inst = self._installed(model, version)
            key, key_doc = self._key(inst)
            stored = self.choices.load(key)
            if stored is not None:
                trials, variant, reason, measured = stored.trials, stored.variant, stored.reason, False
            else:
                trials = tuple(self._measure(inst))
                try:
                    variant, reason = choose(model, version, inst.manifest.fallback, trials,
                                             self.cfg.engines.prefer_margin)
                except ActivationError as exc:
                    self._event("engine.activation_failed", "error", str(exc), correlation_id, model=model,
                                version=version, trials=[t.__dict__ for t in trials])
                    raise
                self.choices.save(key, key_doc, model, version, variant, reason, trials)
                measured = True
            v = inst.manifest.variant(variant)
            act = Activation(model, version, variant, v.backend, v.precision, reason, trials, measured)
            self._activations[(model, version)] = act
            self._failed.pop((model, version), None)
        self._event("engine.activated", "info", f"{model} {version}: {variant} ({reason})", correlation_id,
                    model=model, version=version, variant=variant, backend=v.backend, precision=v.precision,
                    measured=measured)
        return act

    def _measure(self, inst: _Installed) -> list[VariantTrial]:
        """One trial per variant of the manifest, in this device's order (untried ones say why).

        Variants are timed round robin, ``engines.trial_rounds`` passes, keeping each one's fastest
        pass: timed one after the other, a burst of other load lands on whichever variant runs then
        and can flip the choice. A variant that fails any pass is out, with that pass's reason.
        Then every passing variant not proven on this CPU's instruction-set family runs the device
        accuracy gate (``device_gate``); one that fails it is out, with its figures.
        """
        trials: dict[str, VariantTrial] = {}
        proofs: dict[str, Proof] = {}
        candidates: list[Variant] = []
        ordered = self._ordered(inst.manifest)
        family = self.probe.cpu.isa_family
        for v in ordered:
            ok, skip = self._compatible(v)
            proof = proof_needed(v, inst.manifest.fallback, family)
            refused = refusal(proof, inst.manifest.validation_set is not None)
            if ok and refused:  # first: the pull did not download it for this reason
                skip = refused
            elif ok and v.id not in inst.version.variants:
                skip = "not installed on this device"
            elif ok and v.selftest is None:
                skip = "the manifest has no self-test vector for it"
            if skip:
                trials[v.id] = VariantTrial(v.id, v.backend, v.precision, False, skip, tried=False)
            else:
                candidates.append(v)
                proofs[v.id] = proof
        for _ in range(self.cfg.engines.trial_rounds):
            for v in candidates:
                before = trials.get(v.id)
                if before is not None and not before.passed:
                    continue
                now = self._trial(inst.version, v)
                trials[v.id] = now if before is None or not now.passed else _faster_of(before, now)
        gate = [v for v in candidates if trials[v.id].passed and proofs[v.id].decision == "gate"]
        verdicts = self._device_gate(inst, gate, family) if gate else {}
        for v in candidates:
            t = trials[v.id]
            if v.id in verdicts:
                passed, text = verdicts[v.id]
                trials[v.id] = replace(t, passed=passed, error="" if passed else f"device accuracy gate: {text}",
                                       proof=f"device accuracy gate on {family}: {text}")
            else:
                trials[v.id] = replace(t, proof=proofs[v.id].reason)
        return [trials[v.id] for v in ordered]

    def _ordered(self, manifest: Manifest) -> list[Variant]:
        """The manifest's priority order, except that variants whose speed hints (``fast_on``) this
        CPU lacks go after those it has: the hint orders, the measurement decides."""
        flags = set(self.probe.cpu.flags)

        def hinted(v: Variant) -> int:
            return 0 if not v.fast_on or flags.intersection(v.fast_on) else 1

        return sorted(manifest.variants, key=lambda v: (hinted(v), v.priority))

    def _device_gate(self, inst: _Installed, variants: list[Variant], family: str) -> dict[str, tuple[bool, str]]:
        """Run FP32 and each of ``variants`` over the manifest's validation set in the worker and
        judge each against FP32 with the model's thresholds: ``{id: (passed, figures)}``. When the
        set itself or FP32's run fails, every variant fails with that reason (nothing unproven runs)."""
        vset = inst.manifest.validation_set
        assert vset is not None
        m, version = inst.version.model, inst.version.version
        spec = ModelSpec.model_validate(inst.manifest.spec)
        path = inst.version.path / vset.file
        self._event("engine.device_gate_started", "info", f"{m} {version}: gating {', '.join(v.id for v in variants)} "
                    f"on this device ({family}) with {vset.n_samples} validation samples", None, model=m,
                    version=version, variants=[v.id for v in variants], family=family, n_samples=vset.n_samples)
        try:
            verify_file(path, vset.sha256, vset.size)
            samples = load_validation_set(path)
        except (RegistryError, ValueError) as exc:
            return {v.id: (False, f"validation set unusable: {exc}") for v in variants}
        runner = self._trial_runner()
        timeout = self.cfg.engines.gate_timeout_s
        fb = inst.manifest.variant(inst.manifest.fallback)
        ref = runner.validate(ValidationRequest(_model_file(inst.version, fb), path, spec), timeout_s=timeout)
        if not ref.ok:
            return {v.id: (False, f"FP32 could not run the validation set: {ref.kind}: {ref.error}") for v in variants}
        log_event(logger, "engine.device_gate_progress", model=m, version=version, variant=fb.id, done=1,
                  total=len(variants) + 1, seconds=ref.seconds)
        out: dict[str, tuple[bool, str]] = {}
        for n, v in enumerate(variants, start=2):
            res = runner.validate(ValidationRequest(_model_file(inst.version, v), path, spec), timeout_s=timeout)
            if not res.ok:
                out[v.id] = (False, f"{res.kind}: {res.error}")
            else:
                verdict = judge_predictions(samples, ref.predictions, res.predictions, spec)
                out[v.id] = (verdict.passed, f"{headline(verdict)} ({len(samples)} samples)")
            log_event(logger, "engine.device_gate_progress", model=m, version=version, variant=v.id, done=n,
                      total=len(variants) + 1, seconds=res.seconds, passed=out[v.id][0])
            self._event("engine.device_gate", "info" if out[v.id][0] else "warning",
                        f"{m} {version}: {v.id} {'passed' if out[v.id][0] else 'refused by'} the device accuracy "
                        f"gate on {family}: {out[v.id][1]}", None, model=m, version=version, variant=v.id,
                        passed=out[v.id][0], family=family, result=out[v.id][1], seconds=res.seconds)
        return out

    def _trial(self, inst: InstalledVersion, v: Variant) -> VariantTrial:
        assert v.selftest is not None
        try:
            verify_file(inst.path / v.file, v.sha256, v.size)  # a file damaged on disk fails here
            verify_file(inst.path / v.selftest.file, v.selftest.sha256, v.selftest.size)
            vector = load_vector(inst.path / v.selftest.file)
        except (RegistryError, ActivationError) as exc:
            return VariantTrial(v.id, v.backend, v.precision, False, str(exc))
        outcome = self._trial_runner().trial(
            TrialRequest(_model_file(inst, v), vector.input, self.cfg.engines.bench_runs),
            timeout_s=self.cfg.engines.trial_timeout_s)
        if not outcome.ok or outcome.output is None:
            return VariantTrial(v.id, v.backend, v.precision, False, f"{outcome.kind}: {outcome.error}")
        assert v.selftest is not None
        verdict = judge(outcome.output, vector.expected, v.selftest)
        log_event(logger, "engine.trial", model=inst.model, version=inst.version, variant=v.id,
                  passed=verdict.passed, max_abs_err=verdict.max_abs_err, ms=outcome.latency_ms,
                  reason=verdict.reason or "-")
        return VariantTrial(v.id, v.backend, outcome.precision or v.precision, verdict.passed, verdict.reason,
                            verdict.max_abs_err, outcome.latency_ms, outcome.load_ms)

    def _trial_runner(self) -> InferenceRunner:
        if self._runner is not None:
            return self._runner
        if self._own_runner is None:
            pc = self.cfg.pipeline
            self._own_runner = InferenceRunner(self.cfg.models.dir, threads=pc.threads,
                                               job_timeout_s=self.cfg.engines.trial_timeout_s,
                                               memory_limit_mb=pc.worker_memory_mb)
        return self._own_runner

    def selftest(self, model: str | None = None, *, correlation_id: str | None = None) -> list[SelfTestReport]:
        """Re-run the self-tests of every tried variant of the current version(s) now. An active
        variant that fails is demoted; an FP32 that fails raises an error event."""
        models = [model] if model else self.registry_models()
        reports: list[SelfTestReport] = []
        for m in models:
            version = self.store.current_version(m)
            if version is None:
                raise ActivationError(f"{m}: no registry version installed; nothing to self-test")
            inst = self._installed(m, version)
            with self._lock:
                trials = [t for t in self._measure(inst) if t.tried]
            reports += [SelfTestReport(m, version, t.id, t.passed, t.error, t.max_abs_err) for t in trials]
            act = self._activations.get((m, version))
            for t in trials:
                if t.passed:
                    continue
                if t.id == inst.manifest.fallback:
                    self._event("engine.selftest_failed", "error", f"{m} {version}: the FP32 fallback failed its "
                                f"self-test: {t.error}", correlation_id, model=m, version=version, variant=t.id)
                elif act is not None and act.variant == t.id:
                    self._demote(m, version, t.id, f"self-test failed: {t.error}", correlation_id)
        passed = sum(r.passed for r in reports)
        self._event("engine.selftest", "info" if passed == len(reports) else "warning",
                    f"{passed} of {len(reports)} variant self-test(s) passed", correlation_id,
                    results=[r.__dict__ for r in reports])
        return reports

    # ---- the job path --------------------------------------------------------------------------
    def plan(self, model: str) -> EnginePlan:
        """How the next job of ``model`` runs (activating the current version if not done yet)."""
        try:
            version = self.store.current_version(model)
        except RegistryError as exc:
            log_event(logger, "engine.store_unreadable", logging.ERROR, model=model, error=str(exc))
            version = None
        if version is None or (self.cfg.models.enabled and model not in self.cfg.models.enabled):
            return self._local_plan(model)
        act = self._activations.get((model, version))
        if act is None:
            act = self._recover(model, version)
            if act is None:
                return self._local_plan(model)
            version = act.version
        inst = self._installed(model, version)
        demoted = self.choices.demotions(model, version)
        fb = inst.manifest.fallback
        chosen = inst.manifest.variant(fb if act.variant in demoted else act.variant)
        spec = ModelSpec.model_validate(inst.manifest.spec)
        fallback = None if chosen.id == fb else _model_file(inst.version, inst.manifest.variant(fb))
        plan = EnginePlan(model, version, spec, inst.version.path, _model_file(inst.version, chosen), fallback)
        self._plans[model] = plan
        return plan

    def _local_plan(self, model: str) -> EnginePlan:
        if model not in self.local:
            raise BackendError(f"model {model!r} has no usable registry version and is not in models.dir "
                               f"{self.cfg.models.dir}")
        spec, folder = self.local[model]
        plan = EnginePlan(model, "", spec, folder, ModelFile(folder / spec.onnx, "onnxruntime", "fp32", "fp32"),
                          None)
        self._plans[model] = plan
        return plan

    def summary(self) -> list[dict[str, Any]]:
        """What each model ran (or will run) with, from memory only: cheap enough for the MQTT birth
        message. Models not planned yet show their models.dir FP32 (or no variant, for a registry
        version not activated yet)."""
        out = []
        registry = self.registry_models()
        for name in registry:
            if name not in self._plans:  # not activated (yet): no variant to name
                out.append({"name": name, "version": self.store.current_version(name) or "", "variant": "",
                            "backend": "", "precision": "", "accuracy": "", "source": "registry"})
        for name, (spec, _) in sorted(self.local.items()):
            if name not in self._plans and name not in registry:
                out.append({"name": name, "version": spec.version, "variant": "fp32", "backend": "onnxruntime",
                            "precision": "fp32", "accuracy": "", "source": "models.dir"})
        for name, plan in sorted(self._plans.items()):
            p = plan.primary
            act = self._activations.get((name, plan.version))
            proof = next((t.proof for t in act.results if t.id == p.variant), "") if act else ""
            out.append({"name": name, "version": plan.version or plan.spec.version, "variant": p.variant,
                        "backend": p.backend, "precision": p.precision, "accuracy": proof,
                        "source": "registry" if plan.version else "models.dir"})
        return out

    def _recover(self, model: str, version: str) -> Activation | None:
        """Activate ``version``; when it cannot be, roll back to the previous version if there is one
        that activates, else None (the caller serves models.dir)."""
        if (model, version) not in self._failed:
            try:
                return self.activate(model, version)
            except (ActivationError, RegistryError) as exc:
                self._failed[(model, version)] = str(exc)
        if self._rollback(model, version, f"activation failed: {self._failed[(model, version)]}"):
            return self._activations.get((model, self.store.current_version(model) or ""))
        if model in self.local:
            self._event("engine.serving_models_dir", "warning", f"{model} {version} cannot be activated; "
                        "serving the FP32 ONNX from models.dir", None, model=model, version=version)
        return None

    def run_job(self, job_id: str, series: Series, model: str, submit: Submit) -> JobOutcome:
        """Run one job of ``model`` with ``submit`` (the runner's), applying the rules in the module
        docstring. Returns the outcome whose prediction is published (or the last failure)."""
        outcome, rolled_back = self._attempt(self.plan(model), job_id, series, submit)
        if rolled_back:
            outcome, _ = self._attempt(self.plan(model), job_id, series, submit)
        return outcome

    def _attempt(self, plan: EnginePlan, job_id: str, series: Series, submit: Submit) -> tuple[JobOutcome, bool]:
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
            self._event("engine.fallback", "warning", f"{plan.model} {plan.version}: {plan.primary.variant} failed, "
                        f"job re-run on {plan.fallback.variant}: {outcome.error}", None, model=plan.model,
                        version=plan.version, variant=plan.primary.variant, job_id=job_id, kind=outcome.kind)
            verdict = self.guard.failed(plan.model, gkey)
            if verdict.demote:
                self._demote(plan.model, plan.version, plan.primary.variant, verdict.reason, None)
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
            return outcome, self._rollback(plan.model, plan.version, reason)
        return outcome, False

    def _version_ok(self, plan: EnginePlan) -> None:
        if plan.version and (plan.model, plan.version) not in self._proven:
            self.choices.count_job(plan.model, plan.version, ok=True)
            self._proven.add((plan.model, plan.version))

    def _shadow_compared(self, plan: EnginePlan, gkey: str, outcome: JobOutcome) -> None:
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
            self._demote(plan.model, plan.version, plan.primary.variant, verdict.reason, None,
                         kind="engine.shadow_disagreement", severity="error")

    def _demote(self, model: str, version: str, variant: str, reason: str, correlation_id: str | None, *,
                kind: str = "engine.demoted", severity: str = "warning") -> None:
        self.choices.demote(model, version, variant, reason)
        self._event(kind, severity, f"{model} {version}: {variant} demoted to FP32 until the next update: {reason}",
                    correlation_id, model=model, version=version, variant=variant, reason=reason)

    def _rollback(self, model: str, version: str, reason: str) -> bool:
        """Activate the previous version, then switch ``current`` back to it. False when there is
        no previous version or it cannot be activated either (events say so)."""
        previous = self.store.previous_version(model)
        if previous is None or previous == version:
            self._event("engine.rollback_impossible", "error", f"{model} {version}: {reason}; no previous version "
                        "to roll back to", None, model=model, version=version)
            return False
        try:
            self.activate(model, previous)
            with self.store.lock(model):
                now = self.store.rollback(model)
        except (ActivationError, RegistryError) as exc:
            self._event("engine.rollback_failed", "error", f"{model}: rollback from {version} to {previous} "
                        f"failed: {exc}", None, model=model, version=version, previous=previous)
            return False
        self._event("engine.rolled_back", "error", f"{model}: rolled back from {version} to {now}: {reason}", None,
                    model=model, from_version=version, to_version=now, reason=reason)
        return True

    def _event(self, kind: str, severity: str, message: str, correlation_id: str | None, /, **fields: Any) -> None:
        if correlation_id:
            fields["correlation_id"] = correlation_id
        log_event(logger, kind, logging.INFO if severity == "info" else logging.WARNING, message=message)
        self.on_event(Event(kind, severity, message, fields))  # type: ignore[arg-type]

    # ---- reporting -----------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Installed models, versions, every variant with its trial on this device, the active one and
        why (JSON-able; ``edge-agent models --json``)."""
        out: list[dict[str, Any]] = []
        registry = set(self.registry_models())
        for model in sorted(registry | set(self.local)):
            if model in registry:
                out.append(self._describe_registry(model))
            else:
                spec, folder = self.local[model]
                out.append({"name": model, "source": "models.dir", "version": spec.version, "task": spec.task,
                            "path": str(folder / spec.onnx),
                            "active": {"variant": "fp32", "backend": "onnxruntime", "precision": "fp32",
                                       "reason": MODELS_DIR_REASON},
                            "variants": []})
        return out

    def _describe_registry(self, model: str) -> dict[str, Any]:
        version = self.store.current_version(model) or ""
        doc: dict[str, Any] = {"name": model, "source": "registry", "version": version,
                               "previous": self.store.previous_version(model), "versions": self.store.versions(model)}
        try:
            inst = self._installed(model, version)
        except (ActivationError, RegistryError) as exc:
            return {**doc, "active": None, "error": str(exc), "variants": []}
        key, _ = self._key(inst)
        stored = self.choices.load(key)
        demoted = self.choices.demotions(model, version)
        ok_jobs, failed_jobs = self.choices.job_counts(model, version)
        trials = {t.id: t for t in stored.trials} if stored else {}
        variants = []
        for v in sorted(inst.manifest.variants, key=lambda v: v.priority):
            t = trials.get(v.id)
            row: dict[str, Any] = {"id": v.id, "backend": v.backend, "precision": v.precision,
                                   "installed": v.id in inst.version.variants, "priority": v.priority,
                                   "fast_on": list(v.fast_on), "targets": list(v.targets)}
            if t is not None:
                row.update(tried=t.tried, passed=t.passed, error=t.error, max_abs_err=t.max_abs_err,
                           latency_ms=t.latency_ms, load_ms=t.load_ms, measured_precision=t.precision, proof=t.proof)
            if v.id in demoted:
                row["demoted"] = demoted[v.id]
            variants.append(row)
        active: dict[str, Any] | None = None
        if stored is not None:
            fb = inst.manifest.fallback
            running = fb if stored.variant in demoted else stored.variant
            rv = inst.manifest.variant(running)
            why = stored.reason if running == stored.variant else \
                f"{stored.variant} demoted ({demoted[stored.variant]}); running the FP32 fallback"
            active = {"variant": running, "backend": rv.backend, "precision": rv.precision, "reason": why,
                      "chosen": stored.variant, "measured_at": stored.chosen_at}
        return {**doc, "task": inst.manifest.task, "manifest_sha256": inst.manifest_sha256, "choice_key": key,
                "active": active if active else {"variant": None, "reason": "not measured on this device with "
                                                 "these backends yet (measured when the agent starts)"},
                "jobs": {"ok": ok_jobs, "failed": failed_jobs}, "variants": variants,
                "guard": self.guard.stats(model)}


def _faster_of(a: VariantTrial, b: VariantTrial) -> VariantTrial:
    """Two passing trials of one variant as one: the faster time, the larger self-test error."""
    fastest = min((a, b), key=lambda t: t.latency_ms if t.latency_ms is not None else float("inf"))
    errs = [e for e in (a.max_abs_err, b.max_abs_err) if e is not None]
    return replace(fastest, max_abs_err=max(errs) if errs else None)
