"""Operator events of the variant manager (``engine.*``: the wire names stay those of the protocol).

``Notifier(on_event)(event)`` logs a typed event (``agent.core.events``) and hands its
``agent.core.types.Event`` to ``on_event``; every part of the manager shares one Notifier.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.core.events import TypedEvent
from agent.core.log import log_event
from agent.core.types import Event

logger = logging.getLogger(__name__)


class Notifier:
    """Logs an operator event, then passes it on (see the module docstring)."""

    def __init__(self, on_event: Callable[[Event], None]) -> None:
        self.on_event = on_event

    def __call__(self, event: TypedEvent) -> None:
        level = logging.INFO if event.severity() == "info" else logging.WARNING
        log_event(logger, event.KIND, level, message=event.message())
        self.on_event(event.to_event())
