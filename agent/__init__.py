"""edge-agent: the exam-room daemon (DICOM in, inference, results over MQTT).

Importing ``agent`` never needs torch, monai or onnx; inference backends import their engines
inside the worker process only.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
