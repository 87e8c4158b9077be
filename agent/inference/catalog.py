"""Backend catalog: the one place that knows which backends exist and which one to use.

Backends are registered lazily: the catalog holds a module path per name and imports the module
only when the backend is listed or asked for. Each backend module declares its class with
``@register("name")`` and checks, at import, that its optional package is installed
(``base.require_package``) without importing it. So:

* ``available_backends()`` -> ``{"onnxruntime": "ok", "openvino": "No module named 'openvino'"}``;
  an unavailable backend is logged once (``backend.unavailable``) and skipped, never fatal.
* ``create("openvino")`` -> a fresh, unloaded backend, or ``BackendUnavailableError`` saying what to
  install (``pip install edge-agent[openvino]``).
* ``select(["openvino", "onnxruntime"])`` -> the first available name; every "use TensorRT if it is
  there" decision goes through here instead of ``if tensorrt:`` checks around the code.

Adding a backend: write ``backends/<name>.py`` (or a package ``backends/<name>/``, as tensorrt)
and add one ``register_module`` line below.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from agent.core.errors import BackendUnavailableError
from agent.core.log import log_event
from agent.inference.base import Backend

logger = logging.getLogger(__name__)

_T = TypeVar("_T", bound=Callable[[], Backend])  # a backend class: called with no arguments


@dataclass(frozen=True)
class _Entry:
    module: str  # module that defines the backend class with @register(name)
    extra: str  # pip extra that installs its optional package ("" when it is a core dependency)


# re-entrant: _resolve imports a module under the lock, and that import runs @register
_lock = threading.RLock()
_modules: dict[str, _Entry] = {}
_classes: dict[str, Callable[[], Backend]] = {}
_failures: dict[str, str] = {}  # name -> import error, cached so the log line appears once


def register(name: str) -> Callable[[_T], _T]:
    """Class decorator: make the decorated backend class the one ``create(name)`` instantiates."""

    def deco(cls: _T) -> _T:
        with _lock:
            _classes[name] = cls
        return cls

    return deco


def register_module(name: str, module: str, *, extra: str = "") -> None:
    """Declare that backend ``name`` lives in ``module`` (imported on first use).

    ``extra`` names the pip extra that installs its optional package, for the error message.
    Re-registering a name replaces it and forgets a cached failure (used by tests).
    """
    with _lock:
        _modules[name] = _Entry(module, extra)
        _classes.pop(name, None)
        _failures.pop(name, None)


def unregister(name: str) -> None:
    """Forget backend ``name`` (tests)."""
    with _lock:
        _modules.pop(name, None)
        _classes.pop(name, None)
        _failures.pop(name, None)


def _install_hint(name: str) -> str:
    entry = _modules.get(name)
    if entry is None or not entry.extra:
        return "reinstall edge-agent (pip install edge-agent)"
    return f"pip install edge-agent[{entry.extra}]"


def _resolve(name: str) -> Callable[[], Backend] | None:
    """Import the backend's module if needed; return its class, or None (reason in ``_failures``)."""
    with _lock:
        if name in _classes:
            return _classes[name]
        if name in _failures:
            return None
        entry = _modules.get(name)
        if entry is None:
            return None
        try:
            importlib.import_module(entry.module)
        except ImportError as exc:
            # An optional package that is absent (or a module that fails to import) makes this one
            # backend unavailable; the agent carries on with the others.
            _failures[name] = str(exc) or type(exc).__name__
            log_event(
                logger,
                "backend.unavailable",
                logging.WARNING,
                backend=name,
                reason=_failures[name],
                fix=_install_hint(name),
            )
            return None
        except Exception as exc:
            # a bug in a backend module (SyntaxError, an error at import time) must not take the
            # other backends down either; log it with the traceback
            _failures[name] = f"backend module {entry.module} failed to import: {type(exc).__name__}: {exc}"
            logger.error(  # log_event's structure, plus the traceback
                "backend.unavailable",
                exc_info=True,
                extra={"ea_fields": {"backend": name, "reason": _failures[name]}},
            )
            return None
        cls = _classes.get(name)
        if cls is None:
            _failures[name] = f"module {entry.module} does not @register({name!r})"
            log_event(logger, "backend.unavailable", logging.ERROR, backend=name, reason=_failures[name])
        return cls


def known_backends() -> tuple[str, ...]:
    """Names of all registered backends, available or not."""
    with _lock:
        return tuple(_modules)


def available_backends() -> dict[str, str]:
    """Map each registered backend name to ``"ok"`` or the reason it cannot be used here.

    Imports the backend modules (light) but not their packages, so it is safe in the listener
    process; a package that is installed but broken is only found by ``create(...).load(...)``.
    """
    out: dict[str, str] = {}
    for name in known_backends():
        out[name] = "ok" if _resolve(name) is not None else _failures.get(name, "not registered")
    return out


def create(name: str) -> Backend:
    """Return a new, unloaded backend ``name``.

    Raises BackendUnavailableError for an unknown name or one whose package is missing; the message
    says what to install.
    """
    cls = _resolve(name)
    if cls is None:
        if name not in known_backends():
            raise BackendUnavailableError(
                f"unknown inference backend {name!r}; known: {', '.join(known_backends()) or 'none'}"
            )
        raise BackendUnavailableError(
            f"inference backend {name!r} is not available on this device ({_failures.get(name)}); "
            f"install it with: {_install_hint(name)}"
        )
    return cls()


def select(preferred: Sequence[str], fallback: str = "onnxruntime") -> str:
    """The first available backend in ``preferred``, else ``fallback`` (if available).

    Raises BackendUnavailableError when none of them is available.
    """
    for name in (*preferred, fallback):
        if _resolve(name) is not None:
            return name
    raise BackendUnavailableError(
        f"none of the inference backends {', '.join((*preferred, fallback))} is available: "
        + "; ".join(f"{n}: {_failures.get(n, 'unknown')}" for n in (*preferred, fallback))
    )


# The built-in backends. onnxruntime is a core dependency; the others are pip extras
# (tensorrt: the "gpu" extra or JetPack).
register_module("onnxruntime", "agent.inference.backends.onnxruntime")
register_module("openvino", "agent.inference.backends.openvino", extra="openvino")
register_module("tensorrt", "agent.inference.backends.tensorrt", extra="gpu")
