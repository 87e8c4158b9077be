"""Activation: which variant of an installed model version runs on this device, chosen by measurement.

``Activator.activate(model, version) -> Activation``:

1. every variant of the manifest is sorted into this device's order (the manifest's priority, with
   variants whose ``fast_on`` hint this CPU lacks last) and either tried or marked untried with the
   reason (incompatible with the probe, refused for this instruction-set family, not installed, no
   self-test vector);
2. the tried ones are self-tested and timed in the inference worker, round robin, ``trial_rounds``
   passes, each keeping its fastest passing pass (``measure``);
3. a passing variant whose accuracy is not proven for this family runs the device accuracy gate
   (device_gate.py) over the manifest's validation set;
4. ``selection.choose`` picks the variant, and trials + choice are persisted (choices.py) under the
   choice key (model, version, manifest digest, backend versions, hardware fingerprint).

A stored choice for the same key is reused without measuring. ``activate`` does not switch the
store's ``current`` link; ActivationError when the FP32 fallback fails (``engine.activation_failed``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from agent.core.accuracy import headline, load_validation_set
from agent.core.config import Config
from agent.core.errors import ActivationError, RegistryError
from agent.core.events import (
    EngineActivated,
    EngineActivationFailed,
    EngineDeviceGate,
    EngineDeviceGateStarted,
)
from agent.core.isa import Proof, proof_needed, refusal
from agent.core.log import log_event
from agent.core.manifest import Manifest, Variant, verify_file
from agent.core.modelspec import ModelSpec
from agent.device.probe import Probe, compatible
from agent.inference.runner import InferenceRunner, TrialRequest, ValidationRequest
from agent.updates.store import InstalledVersion
from agent.variants.choices import ChoiceStore, VariantTrial, choice_key
from agent.variants.device_gate import judge_predictions
from agent.variants.events import Notifier
from agent.variants.installed import InstalledManifest, InstalledModels, model_file
from agent.variants.selection import choose
from agent.variants.selftest import judge, load_vector

logger = logging.getLogger(__name__)


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


class Activator:
    """Measures and chooses (see the module docstring); remembers the activations of this process.

    ``activations``: the last activation per (model, version); ``failed``: versions whose activation
    failed, with the reason (not re-measured until activated again); ``lock``: held while measuring,
    so one activation runs at a time. ``runner``: the inference runner trials run in (the service's
    own, so trials are serialised with jobs and measured in the same process); while there is none,
    a private runner is started on first use and stopped by ``close()``. ``probe``: returns the
    device probe.
    """

    def __init__(self, cfg: Config, models: InstalledModels, choices: ChoiceStore, notify: Notifier,
                 probe: Callable[[], Probe], runner: InferenceRunner | None = None) -> None:
        self.cfg = cfg
        self.models = models
        self.choices = choices
        self.notify = notify
        self.probe = probe
        self.runner = runner
        self._own_runner: InferenceRunner | None = None
        self.lock = threading.RLock()
        self.activations: dict[tuple[str, str], Activation] = {}
        self.failed: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        if self._own_runner is not None:
            self._own_runner.stop()
            self._own_runner = None

    def key(self, inst: InstalledManifest) -> tuple[str, dict[str, Any]]:
        """The choice key of ``inst`` on this device, and the document it digests."""
        p = self.probe()
        backends = {b.name: b.version for b in p.backends if b.installed}
        hardware = {"arch": p.cpu.arch, "cpu": p.cpu.model, "flags": sorted(p.cpu.features),
                    "cores": p.cpu.usable_cores, "threads": self.cfg.pipeline.threads,
                    "gpus": [[g.name, g.compute_capability] for g in p.nvidia.gpus],
                    "tensorrt": p.nvidia.tensorrt_version, "driver": p.nvidia.driver_version}
        return choice_key(inst.version.model, inst.version.version, inst.manifest_sha256, backends, hardware)

    def activate(self, model: str, version: str, *, correlation_id: str | None = None) -> Activation:
        """Self-test and time the installed variants of ``model`` ``version``, choose, persist (see
        the module docstring). Does not switch ``current``. ActivationError when FP32 fails."""
        with self.lock:
            inst = self.models.installed(model, version)
            key, key_doc = self.key(inst)
            stored = self.choices.load(key)
            if stored is not None:
                trials, variant, reason, measured = stored.trials, stored.variant, stored.reason, False
            else:
                trials = tuple(self.measure(inst))
                if any(t.error.startswith("cancelled:") for t in trials):  # the agent is stopping
                    raise ActivationError(f"{model} {version}: activation interrupted by a stop; nothing stored")
                try:
                    variant, reason = choose(model, version, inst.manifest.fallback, trials,
                                             self.cfg.engines.prefer_margin)
                except ActivationError as exc:
                    self.notify(EngineActivationFailed(model=model, version=version, trials=tuple(trials),
                                                       correlation_id=correlation_id or None, error=str(exc)))
                    raise
                self.choices.save(key, key_doc, model, version, variant, reason, trials)
                measured = True
            v = inst.manifest.variant(variant)
            act = Activation(model, version, variant, v.backend, v.precision, reason, trials, measured)
            self.activations[(model, version)] = act
            self.failed.pop((model, version), None)
        self.notify(EngineActivated(model=model, version=version, variant=variant, backend=v.backend,
                                    precision=v.precision, measured=measured,
                                    correlation_id=correlation_id or None, reason=reason))
        return act

    # ---- measuring -----------------------------------------------------------------------------
    def measure(self, inst: InstalledManifest) -> list[VariantTrial]:
        """One trial per variant of the manifest, in this device's order (untried ones say why).

        Variants are timed round robin, ``engines.trial_rounds`` passes, keeping each one's fastest
        pass: timed one after the other, a burst of other load lands on whichever variant runs then
        and can flip the choice. A variant that fails any pass is out, with that pass's reason.
        Then every passing variant not proven on this CPU's instruction-set family runs the device
        accuracy gate (``device_gate``); one that fails it is out, with its figures.
        """
        ordered = self._ordered(inst.manifest)
        family = self.probe().cpu.isa_family
        trials, candidates, proofs = self._sort_out(inst, ordered, family)
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

    def _sort_out(self, inst: InstalledManifest, ordered: list[Variant], family: str
                  ) -> tuple[dict[str, VariantTrial], list[Variant], dict[str, Proof]]:
        """Split ``ordered`` into untried variants (their trial says why) and the candidates to
        measure, each with how its accuracy on ``family`` is (to be) shown."""
        trials: dict[str, VariantTrial] = {}
        proofs: dict[str, Proof] = {}
        candidates: list[Variant] = []
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
        return trials, candidates, proofs

    def _compatible(self, v: Variant) -> tuple[bool, str]:
        p = self.probe()
        ok, why = compatible(v.requires, p, backend=v.backend)
        if ok and v.backend == "tensorrt" and v.precision == "fp8" and not any(g.fp8 for g in p.nvidia.gpus):
            return False, "FP8 needs GPU compute capability >= 8.9"
        if ok and not v.gate.passed:
            return False, "did not pass the accuracy gate"
        return ok, why

    def _ordered(self, manifest: Manifest) -> list[Variant]:
        """The manifest's priority order, except that variants whose speed hints (``fast_on``) this
        CPU lacks go after those it has: the hint orders, the measurement decides."""
        flags = set(self.probe().cpu.flags)

        def hinted(v: Variant) -> int:
            return 0 if not v.fast_on or flags.intersection(v.fast_on) else 1

        return sorted(manifest.variants, key=lambda v: (hinted(v), v.priority))

    def _device_gate(self, inst: InstalledManifest, variants: list[Variant], family: str
                     ) -> dict[str, tuple[bool, str]]:
        """Run FP32 and each of ``variants`` over the manifest's validation set in the worker and
        judge each against FP32 with the model's thresholds: ``{id: (passed, figures)}``. When the
        set itself or FP32's run fails, every variant fails with that reason (nothing unproven runs)."""
        vset = inst.manifest.validation_set
        assert vset is not None
        m, version = inst.version.model, inst.version.version
        spec = ModelSpec.model_validate(inst.manifest.spec)
        path = inst.version.path / vset.file
        self.notify(EngineDeviceGateStarted(model=m, version=version, variants=tuple(v.id for v in variants),
                                            family=family, n_samples=vset.n_samples))
        try:
            verify_file(path, vset.sha256, vset.size)
            samples = load_validation_set(path)
        except (RegistryError, ValueError) as exc:
            return {v.id: (False, f"validation set unusable: {exc}") for v in variants}
        runner = self._trial_runner()
        timeout = self.cfg.engines.gate_timeout_s
        fb = inst.manifest.variant(inst.manifest.fallback)
        ref = runner.validate(ValidationRequest(model_file(inst.version, fb), path, spec), timeout_s=timeout)
        if not ref.ok:
            return {v.id: (False, f"FP32 could not run the validation set: {ref.kind}: {ref.error}") for v in variants}
        log_event(logger, "engine.device_gate_progress", model=m, version=version, variant=fb.id, done=1,
                  total=len(variants) + 1, seconds=ref.seconds)
        out: dict[str, tuple[bool, str]] = {}
        for n, v in enumerate(variants, start=2):
            res = runner.validate(ValidationRequest(model_file(inst.version, v), path, spec), timeout_s=timeout)
            if not res.ok:
                out[v.id] = (False, f"{res.kind}: {res.error}")
            else:
                verdict = judge_predictions(samples, ref.predictions, res.predictions, spec)
                out[v.id] = (verdict.passed, f"{headline(verdict)} ({len(samples)} samples)")
            log_event(logger, "engine.device_gate_progress", model=m, version=version, variant=v.id, done=n,
                      total=len(variants) + 1, seconds=res.seconds, passed=out[v.id][0])
            self.notify(EngineDeviceGate(model=m, version=version, variant=v.id, passed=out[v.id][0],
                                         family=family, result=out[v.id][1], seconds=res.seconds))
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
            TrialRequest(model_file(inst, v), vector.input, self.cfg.engines.bench_runs),
            timeout_s=self.cfg.engines.trial_timeout_s)
        if not outcome.ok or outcome.output is None:
            return VariantTrial(v.id, v.backend, v.precision, False, f"{outcome.kind}: {outcome.error}")
        verdict = judge(outcome.output, vector.expected, v.selftest)
        log_event(logger, "engine.trial", model=inst.model, version=inst.version, variant=v.id,
                  passed=verdict.passed, max_abs_err=verdict.max_abs_err, ms=outcome.latency_ms,
                  reason=verdict.reason or "-")
        return VariantTrial(v.id, v.backend, outcome.precision or v.precision, verdict.passed, verdict.reason,
                            verdict.max_abs_err, outcome.latency_ms, outcome.load_ms)

    def _trial_runner(self) -> InferenceRunner:
        if self.runner is not None:
            return self.runner
        if self._own_runner is None:
            pc = self.cfg.pipeline
            self._own_runner = InferenceRunner(self.cfg.models.dir, threads=pc.threads,
                                               job_timeout_s=self.cfg.engines.trial_timeout_s,
                                               memory_limit_mb=pc.worker_memory_mb)
        return self._own_runner


def _faster_of(a: VariantTrial, b: VariantTrial) -> VariantTrial:
    """Two passing trials of one variant as one: the faster time, the larger self-test error."""
    fastest = min((a, b), key=lambda t: t.latency_ms if t.latency_ms is not None else float("inf"))
    errs = [e for e in (a.max_abs_err, b.max_abs_err) if e is not None]
    return replace(fastest, max_abs_err=max(errs) if errs else None)
