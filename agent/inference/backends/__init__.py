"""Inference backends, one module each. Import them through ``agent.inference.registry``, which
imports a module only when its backend is listed or asked for; each module imports its heavy package
(onnxruntime, openvino, ...) only inside ``load()``."""
