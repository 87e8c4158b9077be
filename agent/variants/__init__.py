"""Device-matched variants: which variant of an installed model runs here, chosen by measurement.

    manager.py      VariantManager: the one object the service, the updater and the CLI use
    activation.py   activate: self-test + time + device gate + choose + persist (Activator, Activation)
    jobs.py         the guarded job path: FP32 fallback, shadow validation, demotion, rollback (VariantPlan)
    report.py       summary() / describe(): agent.core.status records (status message, `edge-agent models`)
    installed.py    installed registry versions (manifest read once) and models.dir models
    events.py       operator events (engine.*), logged and handed to the service
    selection.py    the one rule that picks a variant from the trials
    selftest.py     judging outputs: the manifest's self-test vector, agreement with FP32 (numpy only)
    device_gate.py  the accuracy gate run on the device (shared with deploy.gate)
    guard.py        job-time counters: consecutive failures, shadow agreement window
    choices.py      what is persisted in the state database (trials, choices, demotions, job counts)

Sits between the service and the stages: it uses agent.updates (store), agent.device (probe) and
agent.inference (the worker runs trials and jobs); none of those imports it. docs/engines.md
explains the rules.
"""

from __future__ import annotations

from agent.core.status import SelfTestReport
from agent.variants.activation import Activation
from agent.variants.choices import VariantTrial
from agent.variants.jobs import VariantPlan
from agent.variants.manager import VariantManager

__all__ = ["Activation", "VariantManager", "VariantPlan", "SelfTestReport", "VariantTrial"]
