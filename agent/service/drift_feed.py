"""Feeding the drift monitor: each inferred series' summary in, drift messages and events out.

Runs on the job thread after a result is committed (drift can never delay or fail a result: an
error is logged and the series is skipped). The reference follows what serves the model
(``VariantManager.drift_profile``; a new version or profile starts a fresh window). A drift message
is published on every state change and otherwise at most every ``drift.min_publish_interval_s``
per model; a state change is also an event (``drift.state_changed``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.core.config import DriftConfig
from agent.core.drift import DriftReport, DriftTransition, SeriesSummary
from agent.core.events import DriftStateChanged
from agent.core.log import log_event
from agent.core.types import Event
from agent.drift import DriftMonitor
from agent.mqtt.publisher import MqttPublisher
from agent.variants import VariantManager

log = logging.getLogger(__name__)


class DriftFeed:
    def __init__(self, cfg: DriftConfig, monitor: DriftMonitor, variants: VariantManager,
                 publisher: MqttPublisher, on_event: Callable[[Event], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.monitor = monitor
        self.variants = variants
        self.publisher = publisher
        self.on_event = on_event
        self.clock = clock
        self._published: dict[str, float] = {}  # model -> clock of its last drift message
        self.states: dict[str, str] = {}  # model -> its last published drift state (for STATUS=)

    def start(self, models: list[str]) -> None:
        """Load each model's reference (so a report exists from the start) and publish it."""
        for model in models:
            try:
                if self._reference(model):
                    report = self.monitor.report(model)
                    if report is not None:
                        self._publish(report)
            except Exception:  # noqa: BLE001 - a bad profile must not stop the agent
                log.exception("drift.reference_failed")

    def series(self, model: str, version: str, summary: SeriesSummary) -> None:
        """One inferred series of ``model``."""
        try:
            self._reference(model)
            update = self.monitor.add(model, version, summary, self.variants.shadow_agreement(model))
            if update.transition is not None:
                self._announce(update.transition, update.report)
            last = self._published.get(model)
            if (update.transition is not None or last is None
                    or self.clock() - last >= self.cfg.min_publish_interval_s):
                self._publish(update.report)
        except Exception:  # noqa: BLE001 - drift observes; it never fails the job
            log.exception("drift.failed")

    def _reference(self, model: str) -> bool:
        found = self.variants.drift_profile(model)
        if found is None:
            return False
        version, profile = found
        transition = self.monitor.set_reference(model, version, profile)
        if transition is not None:
            report = self.monitor.report(model)
            self._announce(transition, report)
        return True

    def _announce(self, t: DriftTransition, report: DriftReport | None) -> None:
        n = report.series_in_window if report is not None else 0
        log_event(log, "drift.state_changed", model=t.model, version=t.version, old=t.old, new=t.new,
                  reason=t.reason, signals=",".join(t.signals) or "-")
        self.on_event(DriftStateChanged(model=t.model, version=t.version, from_state=t.old, to_state=t.new,
                                        signals=t.signals, series_in_window=n).to_event())

    def _publish(self, report: DriftReport) -> None:
        outbox = self.publisher.outbox
        self.publisher.publish_drift(report, outbox.next_seq("drift"), max_queued=self.cfg.max_queued)
        self.states[report.model] = report.state if report.phase != "collecting" else "collecting"
        self._published[report.model] = self.clock()
