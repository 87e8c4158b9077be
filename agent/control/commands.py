"""Commands to the device over MQTT: ``{prefix}/{device_id}/cmd/{name}``, answered on ``events``.

The publisher hands every message on ``cmd/#`` to ``CommandDispatcher`` (paho's network thread).
The dispatcher only parses and queues there; handlers (a pull, a rollback, self-tests: seconds to
minutes) run one at a time on the dispatcher's own thread, so MQTT keeps flowing meanwhile.

Payload (UTF-8 JSON object, at most 64 KiB): a command signed by an operator key this device
trusts (agent/core/envelope.py; checked by agent/control/auth.py: signature, target device,
freshness, nonce never seen)::

    {"signed": "{\"args\":{\"model\":\"ct-abdomen-seg\"},\"command\":\"rollback\",...}", "signature": "..."}

or, only where ``[control] allow_unsigned`` (labs), ``{"correlation_id": "op-42", "model": "..."}``.
A command may name only a model this device follows.

Every command is answered on ``events`` with its ``correlation_id`` in ``fields``:
``command.accepted`` (queued), then ``command.completed`` or ``command.failed``; a command that
cannot be run is answered with ``command.rejected``, its ``code`` and the reason (unsigned, bad
signature, unknown key, stale, replay, not for this device, model not followed, unknown command,
malformed payload, a correlation id seen before, busy: queue full). Retained messages on ``cmd/#`` are never run
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

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Mapping

from agent.control.auth import CommandAuth
from agent.control.message import MAX_PAYLOAD, Command, CommandRejected, RejectCode, parse_command
from agent.core import events
from agent.core.errors import EdgeAgentError
from agent.core.events import CommandResult, plain
from agent.core.log import log_event
from agent.core.topics import Topics
from agent.core.types import Event

__all__ = ["MAX_PAYLOAD", "SEEN_IDS", "Command", "CommandDispatcher", "CommandRejected", "Handler", "parse_command"]

logger = logging.getLogger(__name__)

#: correlation ids remembered to answer duplicates (QoS 1 re-deliveries) instead of re-running
SEEN_IDS = 1024


#: runs one command; what it returns is the ``result`` of the answer
Handler = Callable[[Command], CommandResult]


class CommandDispatcher:
    """Verifies, de-duplicates and queues commands; runs their handlers on one worker thread.

    ``topics``: this device's topics; ``handlers``: command name -> handler; ``on_event``: where
    answers go (the service's outbox); ``auth``: who may command (signatures, freshness, nonces);
    ``followed``: the models a command may name (None: any). Call ``start()`` before wiring
    ``self`` as the publisher's ``on_command`` and ``stop()`` on shutdown. ``max_pending``: queued
    commands beyond the one running, ``max_pending_per_command`` of one name; more are rejected
    (``busy``, the correlation id and nonce stay unused so the same command can be sent again).
    ``rejections_per_minute``: ``command.rejected`` events published at most (the rest are logged
    and counted in the next one's ``suppressed``). ``urgent``: commands (rollback) that run on a
    second thread, never queued behind a slow update.
    """

    def __init__(self, topics: Topics, handlers: Mapping[str, Handler], on_event: Callable[[Event], None],
                 *, auth: CommandAuth, followed: Callable[[], Collection[str]] | None = None,
                 max_pending: int = 4, max_pending_per_command: int = 1, rejections_per_minute: int = 20,
                 urgent: Collection[str] = ()) -> None:
        self.topics = topics
        self.handlers = dict(handlers)
        self.auth = auth
        self._followed = followed
        self._on_event = on_event
        # commands run one at a time in arrival order; ``urgent`` ones (rollback) on a lane of their
        # own, so a rollback never waits behind a slow update or self-test
        self._queue: queue.Queue[Command | None] = queue.Queue()
        self._urgent = frozenset(urgent)
        self._lanes: dict[str, queue.Queue[Command | None]] = {"main": self._queue}
        if self._urgent:
            self._lanes["urgent"] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._max_pending = max_pending
        self._max_per_name = max_pending_per_command
        self._pending: Counter[str] = Counter()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._reject_budget = rejections_per_minute
        self._reject_window = (0.0, 0)  # (window start, events published in it)
        self._suppressed = 0

    # ------------------------------------------------------------------ paho thread side

    def __call__(self, topic: str, payload: bytes) -> None:
        """The publisher's ``on_command``: verify and queue; answer refusals at once."""
        try:
            cmd = self.auth.admit(self.topics, topic, payload, frozenset(self.handlers))
            self._check_followed(cmd)
            with self._lock:
                lane = self._admit(cmd)
                # answered before the command can run, so its answers always follow the acceptance
                self._emit(events.CommandAccepted(command=cmd.name, correlation_id=cmd.correlation_id,
                                                  model=cmd.model))
                lane.put_nowait(cmd)
        except CommandRejected as exc:
            self._reject(topic, str(exc), exc.correlation_id, exc.code)

    def _check_followed(self, cmd: Command) -> None:
        if cmd.model is None or self._followed is None:
            return
        followed = self._followed()
        if cmd.model not in followed:
            raise CommandRejected(f"model {cmd.model!r} is not one this device follows "
                                  f"({', '.join(sorted(followed)) or 'none'})", cmd.correlation_id, "model_not_followed")

    def _admit(self, cmd: Command) -> queue.Queue[Command | None]:
        """Under the lock: refuse a replay, a duplicate id or a full queue (nothing recorded then);
        else record the nonce (durably) and the id; returns the lane to queue the command on."""
        cid = cmd.correlation_id
        if self.auth.seen(cmd):
            raise CommandRejected("replay: this signed command (its nonce) was already received", cid, "replay")
        if cid in self._seen:
            raise CommandRejected("duplicate correlation_id: this command was already received (a QoS 1 "
                                  "re-delivery, or reuse an id only once)", cid, "duplicate")
        if sum(self._pending.values()) >= self._max_pending or self._pending[cmd.name] >= self._max_per_name:
            raise CommandRejected(f"busy: too many {cmd.name} commands queued; try again later", cid, "busy")
        self.auth.remember(cmd)
        self._seen[cid] = None
        while len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        self._pending[cmd.name] += 1
        return self._lanes["urgent" if cmd.name in self._urgent else "main"]

    def _reject(self, topic: str, reason: str, cid: str | None, code: RejectCode) -> None:
        name = topic.rsplit("/", 1)[-1]
        log_event(logger, "command.rejected", logging.WARNING, topic=topic, code=code, reason=reason,
                  correlation_id=cid or "")
        now = time.monotonic()
        with self._lock:
            start, sent = self._reject_window
            if now - start >= 60.0:
                start, sent = now, 0
            if sent >= self._reject_budget:
                self._suppressed += 1
                self._reject_window = (start, sent)
                return
            self._reject_window = (start, sent + 1)
            suppressed, self._suppressed = self._suppressed, 0
        self._emit(events.CommandRejected(command=name, topic=topic, correlation_id=cid, code=code, reason=reason,
                                          suppressed=suppressed))

    # ------------------------------------------------------------------------ worker side

    def start(self) -> None:
        if not self._threads:
            for lane, q in self._lanes.items():
                t = threading.Thread(target=self._run, args=(q,), name=f"mqtt-commands-{lane}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the running commands; queued ones are answered as failed (not run)."""
        if not self._threads:
            return
        pending: list[Command] = []
        for q in self._lanes.values():
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pending.append(item)
                    self._taken(item)
        for cmd in pending:
            self._answer(cmd, "not run: the agent is shutting down", None)
        for q in self._lanes.values():
            q.put(None)
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def _run(self, q: queue.Queue[Command | None]) -> None:
        while True:
            cmd = q.get()
            if cmd is None:
                return
            self._taken(cmd)
            self.run_one(cmd)

    def _taken(self, cmd: Command) -> None:
        with self._lock:
            self._pending[cmd.name] -= 1

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
