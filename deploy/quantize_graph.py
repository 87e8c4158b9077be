"""The ONNX graph every quantized variant starts from, and the graph helpers the builders share.

:func:`preprocess_model` takes the FP32 model and writes ``model.pre.onnx`` (ORT's
``quant_pre_process``: shape inference, BatchNorm folded into Conv), the graph ``calibrate``
measures and every ``quantize`` builder starts from. The helpers load a graph, read and prune
its opset imports, and save it atomically after the ONNX checker accepted it
(:class:`QuantizeError` otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.errors import EdgeAgentError
from agent.core.util import atomic_path

if TYPE_CHECKING:  # onnx is imported where a graph is built, not when the CLI starts
    from onnx import ModelProto

__all__ = ["QuantizeError", "default_opset", "load_model", "preprocess_model", "prune_opset_imports", "save_checked"]

logger = logging.getLogger(__name__)


class QuantizeError(EdgeAgentError):
    """A variant could not be built (bad inputs, a converter failure)."""


def preprocess_model(fp32_path: Path, out_path: Path) -> dict[str, Any]:
    """Run ORT's ``quant_pre_process`` (shape inference + graph optimisation, BatchNorm folded
    into Conv) on ``fp32_path`` and write ``out_path`` atomically. Returns notes for the record.

    Symbolic shape inference is tried first; models with Resize/Pad chains (MONAI UNets) make it
    fail with "Incomplete symbolic shape inference", then the ONNX shape inference alone is used,
    which is all a convolutional network needs.
    """
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: dict[str, Any] = {"symbolic_shape_inference": True}
    src = Path(fp32_path).resolve()
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(prefix="edge-deploy-pre-") as scratch:
        # when symbolic shape inference gives up it first dumps "sym_shape_infer_temp.onnx" (plus an
        # external-data file) into the current directory: run it from a scratch directory
        with _working_directory(Path(scratch)):
            try:
                quant_pre_process(str(src), str(tmp.resolve()))
            except Exception as exc:  # noqa: BLE001 - SymbolicShapeInference raises a bare Exception
                logger.info("symbolic shape inference failed (%s); using ONNX shape inference only", exc)
                notes = {"symbolic_shape_inference": False, "reason": str(exc)}
                quant_pre_process(str(src), str(tmp.resolve()), skip_symbolic_shape=True)
    return notes


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """chdir into ``path`` for the block (contextlib.chdir is Python >= 3.11 only)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_model(path: Path) -> ModelProto:
    """The ONNX graph at ``path``."""
    import onnx

    return onnx.load(str(path))


def save_checked(model: ModelProto, out_path: Path) -> None:
    """Check ``model`` with the ONNX checker and save it atomically to ``out_path``."""
    import onnx

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise QuantizeError(f"{out_path.name}: generated graph is not valid ONNX: {exc}") from exc
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))


def default_opset(model: ModelProto) -> int:
    """The version of the default (``ai.onnx``) domain the graph imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise QuantizeError("model has no default-domain opset import")


def prune_opset_imports(model: ModelProto) -> None:
    """Drop opset imports of domains no node uses (quant_pre_process adds ORT's internal ones,
    which TensorRT's parser and other runtimes have no business seeing)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [imp for imp in model.opset_import if imp.domain in used or imp.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
