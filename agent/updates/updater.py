"""Keep installed models up to date: poll the registry, install, self-test, switch, roll back.

``ModelUpdater`` is the policy on top of ``RegistryClient`` (transport, signatures, digests,
atomic install) and ``ModelStore`` (the on-disk layout). For each followed model, one update is::

    index.json + signature      verified against the pinned key(s) before anything in it is read
    target = index latest       nothing to do when it is current; refused when it is older than
                                the newest version this device ever activated (a replayed, older
                                signed index must not downgrade the device); on automatic polls,
                                skipped when this device rejected it before (rolled back from it,
                                or its self-test failed)
    manifest + signature        verified, variants compatible with the probe selected
    download, verify, commit    <version>/ written next to the running one; ``current`` untouched
    activate(model, version)    the variant manager self-tests (and times) the installed variants
    current -> version          only now; the old current becomes ``previous`` (rollback target)

Any failure (unreachable registry, bad signature, digest mismatch, truncated download, full disk,
failed self-test) is logged, reported through ``on_event`` and returned as an ``UpdateOutcome``;
the running model is never touched. Interrupted downloads stay in ``<version>.partial/`` and the
next pull resumes them with HTTP Range.

Bookkeeping that must survive restarts (highest version activated, rejected versions) lives in
``models/<model>/updates.json`` (``ModelStore.update_state``). The updater calls ``activate`` and
``on_event`` it was given and imports neither the engines nor the publisher.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from agent.core.config import Config, RegistryConfig
from agent.core.errors import EdgeAgentError, RegistryError
from agent.core.events import (
    ModelDowngradeRefused,
    ModelRollbackFailed,
    ModelRolledBack,
    ModelUpdated,
    ModelUpdateFailed,
    RollbackOutcome,
    TypedEvent,
    UpdateOutcome,
)
from agent.core.log import log_event
from agent.core.types import Event
from agent.device.probe import Probe
from agent.updates.client import PullResult, RegistryClient
from agent.updates.store import ModelStore, UpdateState, version_key

logger = logging.getLogger(__name__)

class ModelUpdater:
    """Pulls and activates model versions from one registry (see the module docstring).

    ``cfg``: the ``[registry]`` section (models to follow, poll interval); ``store``: the models
    tree; ``client``: the registry client (its probe decides which variants are downloaded);
    ``activate(model, version, correlation_id=...)``: self-tests the *installed* version and makes
    it the one the engines run, raising EdgeAgentError when it cannot (VariantManager.activate);
    ``on_event``: receives operator events (the service puts them in the outbox).

    Pulls are serialised (the poll thread and an MQTT command never interleave), and so are
    activation, switching and rollback; but a rollback never waits for a download: it cancels
    the download in progress (``client.cancel``; the pull is reported failed, the partial files
    stay for the next pull) and goes ahead. Another process is kept out by the store's locks.
    """

    def __init__(self, cfg: RegistryConfig, store: ModelStore, client: RegistryClient,
                 activate: Callable[..., Any], on_event: Callable[[Event], None]) -> None:
        self.cfg = cfg
        self.store = store
        self.client = client
        self._activate = activate
        self._on_event = on_event
        self._lock = threading.Lock()  # one pull at a time
        self._switch_lock = threading.Lock()  # activation, switch, rollback
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: set[tuple[str, str]] = set()  # (model, version) downgrades already reported

    # ------------------------------------------------------------------------------- update

    def pull_now(self, models: Sequence[str] | None = None, *, correlation_id: str | None = None,
                 automatic: bool = False) -> list[UpdateOutcome]:
        """Bring ``models`` (default: ``registry.models``, or every model in the index) to the
        registry's latest version now. Returns one outcome per model; never raises for registry,
        download or activation failures (they are outcomes and events).

        ``automatic``: a scheduled poll; it skips versions this device rejected before and does
        not report an up-to-date model. An explicit pull (CLI, ``cmd/update``) retries them.
        """
        with self._lock:
            self.client.cancel.clear()
            wanted = list(models) if models else list(self.cfg.models)
            try:
                index = self.client.fetch_index()
            except EdgeAgentError as exc:
                # the models this pull was for: the followed ones, else those installed here
                names = wanted or self.store.models() or ["*"]
                self._failed_event(",".join(names), None, "index", str(exc), correlation_id)
                return [UpdateOutcome(m, False, "failed", self._current(m), stage="index", error=str(exc))
                        for m in names]
            outcomes = []
            for model in wanted or sorted(index.models):
                entry = index.models.get(model)
                if entry is None:
                    err = (f"registry has no model {model!r} (it has: "
                           f"{', '.join(sorted(index.models)) or 'none'})")
                    self._failed_event(model, None, "index", err, correlation_id)
                    outcomes.append(UpdateOutcome(model, False, "failed", self._current(model),
                                                  stage="index", error=err))
                    continue
                outcomes.append(self._update(model, entry.latest, correlation_id, automatic))
            return outcomes

    def _previous(self, model: str) -> str | None:
        try:
            return self.store.previous_version(model)
        except RegistryError:
            return None

    def _current(self, model: str) -> str | None:
        try:
            return self.store.current_version(model)
        except RegistryError:
            return None

    def _update(self, model: str, target: str, cid: str | None, automatic: bool) -> UpdateOutcome:
        try:
            current = self.store.current_version(model)
            state = self.store.update_state(model)
        except RegistryError as exc:
            self._failed_event(model, target, "index", str(exc), cid)
            return UpdateOutcome(model, False, "failed", None, target, stage="index", error=str(exc))
        if target == current:
            if not automatic:
                log_event(logger, "update.up_to_date", model=model, version=current)
            return UpdateOutcome(model, True, "up-to-date", current, target)
        newest = max((v for v in (current, state.highest) if v), key=version_key, default=None)
        if newest is not None and version_key(target) < version_key(newest):
            refused = ModelDowngradeRefused(model=model, offered=target, current=current, newest=newest,
                                            correlation_id=cid)
            err = refused.message()
            if (model, target) not in self._refused or not automatic:
                self._refused.add((model, target))
                self._emit(refused)
            log_event(logger, "update.downgrade_refused", logging.WARNING, model=model, offered=target,
                      current=current or "", newest=newest)
            return UpdateOutcome(model, False, "failed", current, target, stage="downgrade", error=err)
        rejected = dict(state.rejected)
        if current is not None and target == self._previous(model) and version_key(target) > version_key(current):
            # whoever rolled back (an operator, or the variant manager after failed jobs), the
            # newer version sitting in `previous` was given up on: polls must not undo that
            rejected.setdefault(target, "rolled back from it on this device")
        if automatic and target in rejected:
            log_event(logger, "update.skipped", model=model, version=target, reason=rejected[target])
            return UpdateOutcome(model, True, "skipped", current, target, reason=str(rejected[target]))

        stage = "manifest"
        try:
            manifest = self.client.fetch_manifest(model, target)
            chosen = self.client.select_variants(manifest)
            if not chosen:
                reasons = "; ".join(f"{c.variant.id}: {c.reason}" for c in self.client.explain_variants(manifest))
                raise RegistryError(f"{model} {target}: no variant can run on this device ({reasons})")
            stage = "download"
            pulled = self.client.install(model, target, chosen, switch=False)
        except EdgeAgentError as exc:
            self._failed_event(model, target, stage, str(exc), cid, current)
            return UpdateOutcome(model, False, "failed", current, target, stage=stage, error=str(exc))

        with self._switch_lock:
            return self._switch(model, target, cid, current, pulled)

    def _switch(self, model: str, target: str, cid: str | None, current: str | None, pulled: PullResult) -> UpdateOutcome:
        """Self-test the committed ``target`` and make it current (under the switch lock)."""
        if self.store.current_version(model) != current:
            err = "a rollback ran during the download; not switching (pull again to install it)"
            self._failed_event(model, target, "switch", err, cid, current)
            return UpdateOutcome(model, False, "failed", self._current(model), target, stage="switch", error=err,
                                 downloaded_bytes=pulled.downloaded_bytes)
        try:
            activation = self._activate(model, target, correlation_id=cid)
        except EdgeAgentError as exc:
            self._reject(model, target, f"self-test failed: {exc}")
            self._discard(model, target)
            self._failed_event(model, target, "activate", str(exc), cid, current)
            return UpdateOutcome(model, False, "failed", current, target, stage="activate", error=str(exc),
                                 downloaded_bytes=pulled.downloaded_bytes)

        variant = getattr(activation, "variant", None)
        reason = str(getattr(activation, "reason", ""))
        try:
            with self.store.lock(model):
                previous = self.store.activate(model, target)
                self.store.prune(model)
            self._record_success(model, target)
        except EdgeAgentError as exc:
            self._failed_event(model, target, "switch", str(exc), cid, current)
            return UpdateOutcome(model, False, "failed", self._current(model), target, stage="switch",
                                 error=str(exc), downloaded_bytes=pulled.downloaded_bytes)
        self._emit(ModelUpdated(model=model, version=target, previous=previous, variant=variant, reason=reason,
                                variants=tuple(pulled.variants), downloaded_bytes=pulled.downloaded_bytes,
                                correlation_id=cid))
        log_event(logger, "update.activated", model=model, version=target, previous=previous or "",
                  variant=variant or "", bytes=pulled.downloaded_bytes)
        return UpdateOutcome(model, True, "installed", target, target, previous, variant, reason,
                             downloaded_bytes=pulled.downloaded_bytes)

    def _record_success(self, model: str, version: str) -> None:
        state = self.store.update_state(model)
        highest = state.highest
        if highest is None or version_key(version) > version_key(highest):
            highest = version
        rejected = {v: why for v, why in state.rejected.items() if v != version}
        self.store.write_update_state(model, UpdateState(highest, rejected))

    def _reject(self, model: str, version: str, why: str) -> None:
        """Remember that ``version`` must not come back on an automatic poll."""
        try:
            state = self.store.update_state(model)
            self.store.write_update_state(model, UpdateState(state.highest, {**state.rejected, version: why}))
        except RegistryError as exc:  # bookkeeping only: the failure itself is reported anyway
            log_event(logger, "update.bookkeeping_failed", logging.ERROR, model=model, error=str(exc))

    def _discard(self, model: str, version: str) -> None:
        """Delete a committed version that failed activation (disk on a device is scarce), unless it
        is the current or the rollback version."""
        try:
            if version not in (self.store.current_version(model), self.store.previous_version(model)):
                with self.store.lock(model):
                    self.store.remove(model, version)
        except (RegistryError, OSError) as exc:
            log_event(logger, "update.discard_failed", logging.WARNING, model=model, version=version,
                      error=str(exc))

    # ------------------------------------------------------------------------------ rollback

    def rollback(self, model: str | None, *, correlation_id: str | None = None) -> RollbackOutcome:
        """Make ``model``'s previous version current again, after it passes activation; the version
        rolled back from is then skipped by automatic polls (an explicit pull reinstalls it).

        ``model`` may be None when exactly one model is installed. Raises RegistryError (and
        reports an event) when there is no previous version or it fails its self-test; the
        current version then stays. A download in progress is cancelled, not waited for.
        """
        self.client.cancel.set()
        with self._switch_lock:
            try:
                model = model or self._only_model()
                current = self.store.current_version(model)
                prev = self.store.previous_version(model)
                if prev is None or self.store.installed(model, prev) is None:
                    raise RegistryError(f"{model}: no previous version to roll back to")
                activation = self._activate(model, prev, correlation_id=correlation_id)
                with self.store.lock(model):
                    now = self.store.rollback(model)
            except EdgeAgentError as exc:
                self._emit(ModelRollbackFailed(model=model, error=str(exc), correlation_id=correlation_id))
                raise
            if current is not None:
                self._reject(model, current, "rolled back")
            variant = getattr(activation, "variant", None)
            self._emit(ModelRolledBack(model=model, version=now, from_version=current, variant=variant,
                                       correlation_id=correlation_id))
            return RollbackOutcome(model, now, current, variant)

    def _only_model(self) -> str:
        installed = self.store.models()
        if len(installed) != 1:
            raise RegistryError("name the model to roll back (installed: "
                                f"{', '.join(installed) or 'none'})")
        return installed[0]

    # ------------------------------------------------------------------------------- polling

    def start_polling(self) -> None:
        """Poll now and then every ``registry.poll_interval_s`` in a daemon thread (0: never)."""
        if self.cfg.poll_interval_s <= 0:
            log_event(logger, "update.polling_off")
            return
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, name="model-updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling; an update in progress finishes first (bounded by ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.pull_now(automatic=True)
            except Exception:  # noqa: BLE001 - the poll thread must survive a bug; logged with traceback
                logger.exception("update.poll_crashed")
            self._stop.wait(self.cfg.poll_interval_s)

    # -------------------------------------------------------------------------------- events

    def _failed_event(self, model: str, target: str | None, stage: str, error: str, cid: str | None,
                      current: str | None = None) -> None:
        log_event(logger, "update.failed", logging.ERROR, model=model, target=target or "", stage=stage,
                  error=error, current=current or "")
        self._emit(ModelUpdateFailed(model=model, target=target, stage=stage, error=error, current=current,
                                     correlation_id=cid))

    def _emit(self, event: TypedEvent) -> None:
        try:
            self._on_event(event.to_event())
        except EdgeAgentError as exc:  # an event that cannot be queued must not undo the update
            log_event(logger, "update.event_lost", logging.ERROR, kind=event.KIND, error=str(exc))


def updater_from_config(cfg: Config, activate: Callable[..., Any], on_event: Callable[[Event], None],
                        probe: Probe | None = None) -> ModelUpdater:
    """A ModelUpdater for ``cfg`` (``[registry]`` + ``storage.dir``). RegistryError when pulling is
    not configured or a trusted key cannot be read. ``probe``: this device (None: probed on first use)."""
    reg = cfg.registry
    if not reg.enabled():
        raise RegistryError("pulling needs registry.url and registry.public_key in the configuration "
                            "(see docs/configuration.md, [registry])")
    client = RegistryClient(reg.url, reg.public_key, cfg.storage.dir, probe, timeout_s=reg.timeout_s,
                            retries=reg.retries, min_free_mb=reg.min_free_mb, cafile=reg.cafile,
                            deadline_s=reg.download_deadline_s)
    return ModelUpdater(reg, client.store, client, activate, on_event)
