"""edge-deploy: the model toolkit (synthetic phantoms, training support, calibration,
quantization, the accuracy gate, benchmarks, signing and registry publishing).

Heavy dependencies (torch, monai, onnx) live here only; ``agent`` never imports ``deploy``.
"""

__version__ = "0.1.0"
