"""Drift stage: live traffic of each model against its reference profile (docs/drift.md).

Takes one ``agent.core.drift.SeriesSummary`` per inferred series; keeps a rolling window per model
(persisted in the state database), computes each signal against thresholds calibrated for that
window size from the reference itself, and runs a per-model ok -> warn -> alert state machine with
hysteresis. Gives ``DriftReport``s (the drift topic) and state changes (``drift.state_changed``).

Public API: ``DriftMonitor`` (``agent.drift.monitor``); the records it takes and returns are in
``agent.core.drift``. Modules: ``table`` (summaries as arrays), ``stats`` (the statistics,
vectorised), ``signals`` (which signals a reference supports), ``calibrate`` (bootstrap
thresholds), ``evaluate`` (the live verdict and its aggregate detail), ``machine`` (state machine),
``store`` (tables), ``synthetic`` (generators for tests and benchmarks).
"""

from agent.drift.monitor import DriftMonitor

__all__ = ["DriftMonitor"]
