"""The models the variant manager serves, as installed: registry versions and models.dir folders.

``InstalledModels(cfg, store)`` answers, from the ModelStore and ``models.dir``:

* ``registry_models()``: models with an installed current version (filtered by ``models.enabled``);
* ``installed(model, version) -> InstalledManifest``: an installed version with its signed manifest,
  read once per install record (committed versions never change), ActivationError when it is not
  installed or unreadable;
* ``local``: models.dir folders holding a ``model.toml`` and its FP32 ONNX, by model name;
* ``specs()``: the spec of every model served (the current registry version's overrides models.dir);
* ``local_drift(model)``: a models.dir model's drift reference profile, ``drift.json`` beside its
  ONNX file (``agent.core.manifest.DriftProfile`` JSON, what ``edge-deploy drift-profile`` writes);
  None when absent or invalid (logged once per file version). A registry version's profile is its
  manifest's ``drift``.

``model_file(version, variant)`` is what the inference worker is handed to run one variant;
``drift_edges(profile)`` the histogram edges a job carries to have the worker summarise its series.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.core.config import Config
from agent.core.drift import DriftEdges
from agent.core.errors import ActivationError, ModelSpecError, RegistryError
from agent.core.log import log_event
from agent.core.manifest import DriftProfile, Manifest, Variant, parse_manifest
from agent.core.modelspec import ModelSpec, load_spec
from agent.core.util import sha256_bytes
from agent.inference.runner import ModelFile
from agent.updates.store import InstalledVersion, ModelStore

logger = logging.getLogger(__name__)

#: a models.dir model's drift reference profile, beside its ONNX file
DRIFT_FILE = "drift.json"


@dataclass(frozen=True)
class InstalledManifest:
    """An installed registry version, its parsed manifest and the manifest file's SHA-256."""

    version: InstalledVersion
    manifest: Manifest
    manifest_sha256: str


def model_file(inst: InstalledVersion, v: Variant) -> ModelFile:
    """Variant ``v`` of the installed version ``inst``, as the inference worker runs it."""
    return ModelFile(inst.path / v.file, v.backend, v.precision, v.id, dict(v.options))


def drift_edges(profile: DriftProfile) -> DriftEdges:
    """The histogram edges of a reference profile, as a job carries them to the worker."""
    return DriftEdges(tuple(profile.intensity.edges), tuple(profile.model_input.edges))


class InstalledModels:
    """See the module docstring. ``local`` is scanned once, at construction (ModelSpecError when a
    model.toml is invalid)."""

    def __init__(self, cfg: Config, store: ModelStore) -> None:
        self.cfg = cfg
        self.store = store
        self._manifests: dict[tuple[str, str], InstalledManifest] = {}
        #: models.dir drift.json files read: path -> ((mtime_ns, size), profile or None if invalid)
        self._drift: dict[Path, tuple[tuple[int, int], DriftProfile | None]] = {}
        self.local = self._scan_models_dir()

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

    def local_drift(self, model: str) -> DriftProfile | None:
        """The drift profile beside models.dir ``model``'s ONNX file, re-read when the file changes
        (regenerating it needs no restart); None when the model, the file or a valid profile is missing."""
        if model not in self.local:
            return None
        spec, folder = self.local[model]
        path = (folder / spec.onnx).parent / DRIFT_FILE
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._drift.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        profile: DriftProfile | None = None
        try:
            profile = DriftProfile.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log_event(logger, "model.drift_profile_invalid", logging.WARNING, model=model, path=str(path),
                      error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self._drift[path] = (stamp, profile)
        return profile

    def registry_models(self) -> list[str]:
        """Models with an installed current version (filtered by models.enabled)."""
        enabled = self.cfg.models.enabled
        return [m for m in self.store.models() if not enabled or m in enabled]

    def installed(self, model: str, version: str) -> InstalledManifest:
        """``model`` ``version`` as installed, with its manifest; ActivationError when it is not there."""
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
        found = InstalledManifest(inst, parse_manifest(raw), sha256_bytes(raw))
        self._manifests[(model, version)] = found
        return found

    def specs(self) -> dict[str, ModelSpec]:
        """Every model this agent serves, by name: models.dir specs, overridden by the spec in the
        current registry version's manifest. ModelSpecError when there is none at all or
        ``models.enabled`` names a model that is nowhere."""
        specs = {name: spec for name, (spec, _) in self.local.items()}
        for model in self.registry_models():
            try:
                inst = self.installed(model, self.store.current_version(model) or "")
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
