"""Model updates: how signed model versions get onto this device and become current.

``client``  pull client: signed manifest -> variant selection -> resumable download -> install
``store``   installed versions under ``<state dir>/models``: atomic ``current`` switch, rollback
``updater`` the update policy: poll, refuse downgrades, install, activate (self-test), then switch

The hardware probe that decides which variants a device downloads is ``agent.device``; the
``[registry]`` configuration section is ``agent.core.config.RegistryConfig``. Import the
submodules directly; this package imports nothing so ``import agent.updates`` stays free.
"""
