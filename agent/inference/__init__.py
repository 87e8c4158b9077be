"""Inference: backends behind one protocol, a catalog of them, the per-series pipeline and the
worker process that runs it.

    base.py       Backend protocol, BackendInfo
    catalog.py    register / available_backends / create / select (lazy: imports on demand)
    backends/     onnxruntime.py, openvino.py, tensorrt.py (each imports its package inside load())
    pipeline.py   run_model / run_model_detailed: series files -> Prediction
    runner.py     InferenceRunner: jobs in a spawned worker process (crash / timeout / oom safe)
    messages.py   what the runner and its worker exchange: requests and outcomes
    worker.py     the worker process: spawn / kill (parent side), main loop (child side)
    executor.py   what the worker does with a request (model cache, shadow runs); worker only
    faults.py     test-only fault injection (EDGE_AGENT_FAULT)

Importing this package is light: no onnxruntime, openvino or imaging code is loaded until a backend
is created or the pipeline is used (``run_model`` here imports ``pipeline`` on first access).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.inference.base import Backend, BackendInfo
from agent.inference.catalog import available_backends, create, register, select
from agent.inference.runner import InferenceJob, InferenceRunner, JobOutcome

if TYPE_CHECKING:
    from agent.inference.pipeline import ModelRun, run_model, run_model_detailed

__all__ = [
    "Backend",
    "BackendInfo",
    "InferenceJob",
    "InferenceRunner",
    "JobOutcome",
    "ModelRun",
    "available_backends",
    "create",
    "register",
    "run_model",
    "run_model_detailed",
    "select",
]

_LAZY = {"run_model", "run_model_detailed", "ModelRun"}


def __getattr__(name: str) -> Any:
    # the pipeline pulls in agent.imaging (scipy): only where inference actually runs
    if name in _LAZY:
        from agent.inference import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
