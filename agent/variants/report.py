"""What the variant manager reports: the status message's ``models[]`` and ``edge-agent models``.

``summary(models, activations, plans) -> list[ModelSummary]``: what each model ran (or will run)
with, from memory only, cheap enough for the MQTT birth message.
``describe(models, activator, choices, guard) -> list[ModelStatus]``: installed models, versions,
every variant with its trial on this device, the active one and why (reads the state database).
Both return agent.core.status records; their ``to_json()`` is the documented JSON (docs/mqtt.md,
docs/engines.md).
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.core.errors import ActivationError, RegistryError
from agent.core.status import (
    ActiveVariant,
    JobCounts,
    ModelStatus,
    ModelSummary,
    TrialStatus,
    VariantStatus,
)
from agent.variants.activation import Activation, Activator
from agent.variants.choices import ChoiceStore, StoredChoice, VariantTrial
from agent.variants.guard import JobGuard
from agent.variants.installed import InstalledManifest, InstalledModels
from agent.variants.jobs import VariantPlan

MODELS_DIR_REASON = "no registry model installed: running the FP32 ONNX from models.dir"
NOT_MEASURED_REASON = "not measured on this device with these backends yet (measured when the agent starts)"


def summary(models: InstalledModels, activations: Mapping[tuple[str, str], Activation],
            plans: Mapping[str, VariantPlan]) -> list[ModelSummary]:
    """What each model ran (or will run) with (see the module docstring). Models not planned yet
    show their models.dir FP32 (or no variant, for a registry version not activated yet)."""
    out = []
    registry = models.registry_models()
    for name in registry:
        if name not in plans:  # not activated (yet): no variant to name
            out.append(ModelSummary(name=name, version=models.store.current_version(name) or "", variant="",
                                    backend="", precision="", accuracy="", source="registry"))
    for name, (spec, _) in sorted(models.local.items()):
        if name not in plans and name not in registry:
            out.append(ModelSummary(name=name, version=spec.version, variant="fp32", backend="onnxruntime",
                                    precision="fp32", accuracy="", source="models.dir"))
    for name, plan in sorted(plans.items()):
        p = plan.primary
        act = activations.get((name, plan.version))
        proof = next((t.proof for t in act.results if t.id == p.variant), "") if act else ""
        out.append(ModelSummary(name=name, version=plan.version or plan.spec.version, variant=p.variant,
                                backend=p.backend, precision=p.precision, accuracy=proof,
                                source="registry" if plan.version else "models.dir"))
    return out


def describe(models: InstalledModels, activator: Activator, choices: ChoiceStore,
             guard: JobGuard) -> list[ModelStatus]:
    """Every model served, registry and models.dir, by name (see the module docstring)."""
    out: list[ModelStatus] = []
    registry = set(models.registry_models())
    for model in sorted(registry | set(models.local)):
        if model in registry:
            out.append(_describe_registry(model, models, activator, choices, guard))
        else:
            spec, folder = models.local[model]
            out.append(ModelStatus(
                name=model, source="models.dir", version=spec.version, task=spec.task,
                path=str(folder / spec.onnx),
                active=ActiveVariant(variant="fp32", backend="onnxruntime", precision="fp32",
                                     reason=MODELS_DIR_REASON)))
    return out


def _describe_registry(model: str, models: InstalledModels, activator: Activator, choices: ChoiceStore,
                       guard: JobGuard) -> ModelStatus:
    store = models.store
    version = store.current_version(model) or ""
    previous, versions = store.previous_version(model), tuple(store.versions(model))
    try:
        inst = models.installed(model, version)
    except (ActivationError, RegistryError) as exc:
        return ModelStatus(name=model, source="registry", version=version, previous=previous, versions=versions,
                           active=None, error=str(exc))
    key, _ = activator.key(inst)
    stored = choices.load(key)
    demoted = choices.demotions(model, version)
    ok_jobs, failed_jobs = choices.job_counts(model, version)
    return ModelStatus(
        name=model, source="registry", version=version, previous=previous, versions=versions,
        task=inst.manifest.task, manifest_sha256=inst.manifest_sha256, choice_key=key,
        active=_active(inst, stored, demoted), jobs=JobCounts(ok=ok_jobs, failed=failed_jobs),
        variants=_variants(inst, stored, demoted), guard=guard.stats(model))


def _variants(inst: InstalledManifest, stored: StoredChoice | None,
              demoted: Mapping[str, str]) -> tuple[VariantStatus, ...]:
    """The manifest's variants in priority order, each with its stored trial and demotion."""
    trials = {t.id: t for t in stored.trials} if stored else {}
    return tuple(
        VariantStatus(id=v.id, backend=v.backend, precision=v.precision, installed=v.id in inst.version.variants,
                      priority=v.priority, fast_on=tuple(v.fast_on), targets=tuple(v.targets),
                      trial=_trial_status(trials.get(v.id)), demoted=demoted.get(v.id))
        for v in sorted(inst.manifest.variants, key=lambda v: v.priority))


def _trial_status(t: VariantTrial | None) -> TrialStatus | None:
    if t is None:
        return None
    return TrialStatus(tried=t.tried, passed=t.passed, error=t.error, max_abs_err=t.max_abs_err,
                       latency_ms=t.latency_ms, load_ms=t.load_ms, measured_precision=t.precision, proof=t.proof)


def _active(inst: InstalledManifest, stored: StoredChoice | None, demoted: Mapping[str, str]) -> ActiveVariant:
    """The variant running: the stored choice, or FP32 when that was demoted; none before a measurement."""
    if stored is None:
        return ActiveVariant(variant=None, reason=NOT_MEASURED_REASON)
    fb = inst.manifest.fallback
    running = fb if stored.variant in demoted else stored.variant
    rv = inst.manifest.variant(running)
    why = stored.reason if running == stored.variant else \
        f"{stored.variant} demoted ({demoted[stored.variant]}); running the FP32 fallback"
    return ActiveVariant(variant=running, backend=rv.backend, precision=rv.precision, reason=why,
                         chosen=stored.variant, measured_at=stored.chosen_at)
