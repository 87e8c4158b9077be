"""Commands to the device over MQTT: ``{prefix}/{device_id}/cmd/{name}``, answered on ``events``.

The publisher hands every message on ``cmd/#`` to ``CommandDispatcher`` (paho's network thread).
The dispatcher only parses and queues there; handlers (a pull, a rollback, self-tests: seconds to
minutes) run one at a time on the dispatcher's own thread, so MQTT keeps flowing meanwhile.

Payload (UTF-8 JSON object, at most 64 KiB)::

    {"correlation_id": "op-42", "model": "ct-abdomen-seg"}     # model optional

Every command is answered on ``events`` with its ``correlation_id`` in ``fields``:
``command.accepted`` (queued), then ``command.completed`` or ``command.failed``; a command that
cannot be run is answered with ``command.rejected`` and the reason (unknown command, malformed
payload, a correlation id seen before, queue full). Retained messages on ``cmd/#`` are never run
(the publisher drops them: a stale command must not re-run at every reconnect). Duplicates matter:
MQTT QoS 1 delivers at least once, and running ``rollback`` twice rolls forward again.

A handler takes the ``Command`` and returns what it did, a ``CommandResult`` (agent/core/events/:
one dataclass or mapping, a sequence of them, or None; the outcomes of ``update``, ``rollback`` and
``selftest`` are ``UpdateOutcome``, ``RollbackOutcome`` and ``SelfTestReport`` there). It reports
failure by raising EdgeAgentError, or by returning results of which one has ``ok`` (or ``passed``)
false. The answers are the typed events ``CommandAccepted``, ``CommandRejected``,
``CommandCompleted`` and ``CommandFailed`` of agent/core/events/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from agent.core import events
from agent.core.errors import EdgeAgentError
from agent.core.events import CommandResult, plain
from agent.core.log import log_event
from agent.core.topics import Topics
from agent.core.types import Event

logger = logging.getLogger(__name__)

MAX_PAYLOAD = 64 * 1024
#: correlation ids remembered to answer duplicates (QoS 1 re-deliveries) instead of re-running
SEEN_IDS = 1024
_CORRELATION_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_FIELDS = {"correlation_id", "model"}


@dataclasses.dataclass(frozen=True)
class Command:
    """One accepted command: its ``name`` (the topic's last level), the sender's
    ``correlation_id``, the ``model`` it targets (None: the handler's default) and when it arrived."""

    name: str
    correlation_id: str
    model: str | None
    received_at: float


class CommandRejected(EdgeAgentError):
    """A command message that cannot be run; the message is the reason sent back."""

    def __init__(self, reason: str, correlation_id: str | None = None) -> None:
        super().__init__(reason)
        self.correlation_id = correlation_id


#: runs one command; what it returns is the ``result`` of the answer
Handler = Callable[[Command], CommandResult]


def parse_command(topics: Topics, topic: str, payload: bytes, known: set[str] | frozenset[str]) -> Command:
    """Validate one message on ``cmd/#``; returns the Command or raises CommandRejected.

    The correlation id is read first (when the payload is a JSON object), so even a rejection of
    an otherwise broken command can be matched by the sender.
    """
    prefix = topics.base + "/cmd/"
    name = topic[len(prefix):] if topic.startswith(prefix) else ""
    cid: str | None = None
    doc: Any = None
    if len(payload) > MAX_PAYLOAD:
        raise CommandRejected(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
    try:
        doc = json.loads(payload.decode("utf-8")) if payload.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandRejected(f"payload is not UTF-8 JSON: {exc}") from exc
    if isinstance(doc, dict) and isinstance(doc.get("correlation_id"), str):
        cid = doc["correlation_id"] if _CORRELATION_ID.match(doc["correlation_id"]) else None
    if name not in known:
        raise CommandRejected(f"unknown command {name!r} (known: {', '.join(sorted(known))})", cid)
    if not isinstance(doc, dict):
        raise CommandRejected('payload must be a JSON object like {"correlation_id": "..."}', cid)
    extra = sorted(set(doc) - _FIELDS)
    if extra:
        raise CommandRejected(f"unknown field(s) {', '.join(extra)} (allowed: correlation_id, model)", cid)
    if cid is None:
        raise CommandRejected("correlation_id missing or not 1-128 printable ASCII characters without spaces")
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not _MODEL.match(model)):
        raise CommandRejected(f"model {model!r} is not a model name", cid)
    return Command(name, cid, model, time.time())


class CommandDispatcher:
    """Parses, de-duplicates and queues commands; runs their handlers on one worker thread.

    ``topics``: this device's topics; ``handlers``: command name -> handler; ``on_event``: where
    answers go (the service's outbox). Call ``start()`` before wiring ``self`` as the publisher's
    ``on_command`` and ``stop()`` on shutdown. ``max_pending``: queued commands beyond the one
    running; more are rejected (``busy``) rather than piling up.
    """

    def __init__(self, topics: Topics, handlers: Mapping[str, Handler], on_event: Callable[[Event], None],
                 *, max_pending: int = 16) -> None:
        self.topics = topics
        self.handlers = dict(handlers)
        self._on_event = on_event
        self._queue: queue.Queue[Command | None] = queue.Queue(max_pending)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ paho thread side

    def __call__(self, topic: str, payload: bytes) -> None:
        """The publisher's ``on_command``: validate and queue; answer rejections at once."""
        try:
            cmd = parse_command(self.topics, topic, payload, frozenset(self.handlers))
        except CommandRejected as exc:
            self._reject(topic, str(exc), exc.correlation_id)
            return
        with self._seen_lock:
            duplicate = cmd.correlation_id in self._seen
            if not duplicate:
                self._seen[cmd.correlation_id] = None
                while len(self._seen) > SEEN_IDS:
                    self._seen.popitem(last=False)
        if duplicate:
            self._reject(topic, "duplicate correlation_id: this command was already received (a QoS 1 "
                         "re-delivery, or reuse an id only once)", cmd.correlation_id, cmd.name)
            return
        try:
            self._queue.put_nowait(cmd)
        except queue.Full:
            self._reject(topic, "busy: too many commands queued; try again later", cmd.correlation_id, cmd.name)
            return
        self._emit(events.CommandAccepted(command=cmd.name, correlation_id=cmd.correlation_id, model=cmd.model))

    def _reject(self, topic: str, reason: str, cid: str | None, name: str | None = None) -> None:
        name = name or topic.rsplit("/", 1)[-1]
        log_event(logger, "command.rejected", logging.WARNING, topic=topic, reason=reason,
                  correlation_id=cid or "")
        self._emit(events.CommandRejected(command=name, topic=topic, correlation_id=cid, reason=reason))

    # ------------------------------------------------------------------------ worker side

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mqtt-commands", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running command; queued ones are answered as failed (not run)."""
        if self._thread is None:
            return
        pending: list[Command] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                pending.append(item)
        for cmd in pending:
            self._answer(cmd, "not run: the agent is shutting down", None)
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            cmd = self._queue.get()
            if cmd is None:
                return
            self.run_one(cmd)

    def run_one(self, cmd: Command) -> None:
        """Run ``cmd``'s handler and answer it (completed / failed)."""
        log_event(logger, "command.started", command=cmd.name, correlation_id=cmd.correlation_id,
                  model=cmd.model or "")
        try:
            result = self.handlers[cmd.name](cmd)
        except EdgeAgentError as exc:
            self._answer(cmd, str(exc), None)
            return
        except Exception as exc:  # noqa: BLE001 - a handler bug is answered, not left unanswered
            logger.exception("command.crashed", extra={"ea_fields": {"command": cmd.name}})
            self._answer(cmd, f"internal error: {type(exc).__name__}: {exc}", None)
            return
        failures = _failures(plain(result))
        self._answer(cmd, "; ".join(failures) if failures else None, result)

    def _answer(self, cmd: Command, error: str | None, result: CommandResult) -> None:
        """Answer ``cmd``: ``command.completed``, or ``command.failed`` when ``error`` is not None."""
        duration_s = round(time.time() - cmd.received_at, 3)
        answer: events.CommandCompleted | events.CommandFailed
        if error is None:
            answer = events.CommandCompleted(command=cmd.name, correlation_id=cmd.correlation_id, model=cmd.model,
                                             duration_s=duration_s, result=result)
        else:
            answer = events.CommandFailed(command=cmd.name, correlation_id=cmd.correlation_id, model=cmd.model,
                                          duration_s=duration_s, result=result, error=error)
        log_event(logger, answer.KIND, logging.INFO if error is None else logging.ERROR, command=cmd.name,
                  correlation_id=cmd.correlation_id, error=error or "")
        self._emit(answer)

    def _emit(self, answer: events.TypedEvent) -> None:
        event = answer.to_event()
        try:
            self._on_event(event)
        except EdgeAgentError as exc:
            log_event(logger, "command.answer_lost", logging.ERROR, kind=event.kind, error=str(exc))


def _failures(doc: object) -> list[str]:
    """Reasons of the items that say ``ok``/``passed`` is false (top level or one list down);
    ``doc`` is a handler's result as ``plain`` data."""
    items = doc if isinstance(doc, list) else [doc]
    out: list[str] = []
    for item in items:
        if isinstance(item, dict) and (item.get("ok") is False or item.get("passed") is False):
            what = " ".join(str(item[k]) for k in ("model", "variant", "id") if item.get(k))
            out.append(f"{what or 'item'}: {item.get('error') or 'failed'}")
    return out
