"""Model registry stage: what this device can run and how models get onto it.

``probe``   capability probe (CPU features, GPUs, TensorRT, backends) and ``compatible()``
``client``  pull client: signed manifest -> variant selection -> resumable download -> install
``store``   installed versions under ``<state dir>/models``: atomic ``current`` switch, rollback
``updater`` the update policy: poll, refuse downgrades, install, activate (self-test), then switch
``config``  the proposed ``[registry]`` configuration section

Import the submodules directly; this package imports nothing so ``import agent.registry`` stays free.
"""
