"""Device-matched engines: which variant of an installed model runs here, chosen by measurement.

    manager.py    EngineManager: activate (self-test + time + choose + persist), the guarded job
                  path (FP32 fallback, shadow validation, demotion, rollback), describe()
    selection.py  the one rule that picks a variant from the trials
    selftest.py   judging outputs: the manifest's self-test vector, agreement with FP32 (numpy only)
    guard.py      job-time counters: consecutive failures, shadow agreement window
    choices.py    what is persisted in the state database (trials, choices, demotions, job counts)

Sits between the service and the stages: it uses agent.registry (store, probe) and agent.inference
(the worker runs trials and jobs); neither of those imports it. docs/engines.md explains the rules.
"""

from __future__ import annotations

from agent.engines.choices import VariantTrial
from agent.engines.manager import Activation, EngineManager, EnginePlan, SelfTestReport

__all__ = ["Activation", "EngineManager", "EnginePlan", "SelfTestReport", "VariantTrial"]
