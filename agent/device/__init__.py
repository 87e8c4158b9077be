"""What this device is: CPU, instruction-set family, GPUs, TensorRT and the installed backends
(``probe``), and which variant requirements it meets (``compatible()``).

    probe.py     the Probe record, ``probe()``, ``compatible()``; every probe name is importable here
    cpu.py       /proc/cpuinfo: architecture, cores, features, INT8 path, bf16, instruction-set family
    nvidia.py    GPUs (NVML, nvidia-smi, Jetson tables), driver, CUDA and TensorRT versions
    host.py      memory, free disk under the state directory, the OS
    backends.py  installed inference backends; their providers/devices from a child interpreter
    sources.py   where the probe reads from (ProbeSources) and its bounded, import-free readers
"""
