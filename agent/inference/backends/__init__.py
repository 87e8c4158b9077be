"""Inference backends, one module each (tensorrt: a package, its backend in ``__init__``). Import
them through ``agent.inference.catalog``, which imports a module only when its backend is listed or
asked for; each module imports its heavy package (onnxruntime, openvino, ...) only inside ``load()``."""
