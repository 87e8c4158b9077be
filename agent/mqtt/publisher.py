"""MQTT publisher: drains the durable outbox to the broker, keeps the device's status topic true.

How it works (see docs/mqtt.md for the consumer's view):

* paho-mqtt 2.x with ``CallbackAPIVersion.VERSION2``, ``connect_async`` + ``loop_start``: paho's
  network thread connects, reconnects with exponential backoff (``reconnect_delay_set``) and runs
  our callbacks. ``connected`` becomes true only on a CONNACK whose reason code is success: a
  refused CONNECT (bad credentials, not authorised) leaves us disconnected and touches nothing.
* Before every (re)connect attempt we take the next persistent status ``seq`` and set the Last
  Will: retained ``state: offline`` on ``{prefix}/{device_id}/status``. On every successful
  connect we publish the retained birth (``state: online``, same ``seq``) before any result.
* A drain thread sends outbox rows strictly in ``seq`` order with at most ``cfg.max_inflight``
  unacknowledged QoS 1 messages per connection. The row is deleted only in ``on_publish`` for a
  success PUBACK. On disconnect the window and cursor are reset: after reconnecting, the drain
  re-sends from the oldest row still in the outbox, so every message arrives at least once and
  first arrivals keep ``seq`` order; consumers de-duplicate on ``(result_id, revision)``.
* paho itself keeps unacknowledged QoS 1 messages in memory across reconnects and re-sends them
  after the next CONNACK (with DUP set). We keep their mid -> seq mapping, so their PUBACK still
  deletes the right row; it only means a message in flight during a disconnect may arrive twice.
  paho's own queue is bounded (``max_queued_messages_set``) and we publish only while connected,
  so nothing piles up in memory during an outage: it stays on disk in the outbox.

Publish latency (outbox row created -> its PUBACK, so an outage's backlog shows as latency) and
each acknowledged row are reported to the ``Metrics`` given (``observe("publish", s)``,
``count("messages_published")``). Telemetry and drift go through the outbox as its bounded kinds.

Payloads are never logged (they may carry patient identifiers when configured to); logs name the
topic, seq, mid and sizes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.core.config import MqttConfig
from agent.core.drift import DriftReport
from agent.core.errors import EdgeAgentError, PublishError
from agent.core.events import TypedEvent
from agent.core.log import log_event
from agent.core.metrics import NO_METRICS, Metrics
from agent.core.status import PublisherHealth
from agent.core.telemetry import TelemetrySnapshot
from agent.core.topics import Topics
from agent.core.types import Event, Result
from agent.mqtt.monitoring import drift_payload, telemetry_payload
from agent.mqtt.outbox import Outbox, OutboxMessage
from agent.mqtt.payloads import event_payload, restamp_status, result_payload

logger = logging.getLogger(__name__)

# PUBACKs that arrive before the drain thread has recorded the mid (loopback brokers answer
# faster than publish() returns) wait here this long to be claimed; anything older is dropped.
_EARLY_ACK_TTL_S = 60.0
_MAX_RETRY_DELAY_S = 60.0


def result_dedup_key(result: Result) -> str:
    """Outbox de-duplication key of a result: ``f"{result_id}:{revision}"``."""
    return f"{result.result_id}:{result.revision}"


class MqttPublisher:
    """Publishes the outbox over MQTT and keeps the retained status message of the device.

    Takes the MQTT configuration, the device id, the outbox (on a connection of its own, see
    ``Outbox``), ``birth`` (returns the status payload, ``payloads.status_payload``; the publisher
    stamps ``seq``, ``state`` and ``reason`` itself) and optionally ``on_command(topic, payload)``,
    called from paho's thread for messages on ``{prefix}/{device_id}/cmd/#`` (never for retained
    ones; it must return quickly: ``commands.CommandDispatcher`` queues and runs elsewhere).

    ``reconnect_delay_s`` (min, max) bounds paho's exponential reconnect backoff;
    ``poll_interval_s`` is how often the drain looks at the outbox without a ``wake()`` (rows put
    by another connection or process). ``metrics`` receives the publish latency of every
    acknowledged outbox row (see the module docstring).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        device_id: str,
        outbox: Outbox,
        *,
        birth: Callable[[], bytes],
        on_command: Callable[[str, bytes], None] | None = None,
        reconnect_delay_s: tuple[float, float] = (1.0, 60.0),
        poll_interval_s: float = 1.0,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.topics = Topics(cfg.topic_prefix, device_id)
        self.outbox = outbox
        self._birth = birth
        self._on_command = on_command
        self._reconnect_delay_s = reconnect_delay_s
        self._poll_s = poll_interval_s
        self._metrics = metrics

        # Everything below is shared between the caller, paho's network thread and the drain
        # thread; guarded by _cv. Never call into paho while holding _cv: paho calls on_publish
        # with its own message lock held, and on_publish takes _cv (lock-order deadlock).
        self._cv = threading.Condition()
        self._connected = False
        self._gen = 0  # connection generation: bumped on every successful CONNACK
        self._window = 0  # outbox rows in flight on the current connection
        self._cursor = 0  # highest seq handed to paho on the current connection
        # mid -> (seq or None=status, gen, the row's created_at for the publish latency)
        self._inflight: dict[int, tuple[int | None, int, float]] = {}
        self._early: dict[int, tuple[ReasonCode, float]] = {}  # mid -> (reason, monotonic time)
        self._wake = True
        self._stopping = False
        self._blocked_until: float | None = None  # after a rejected PUBACK: pause, then rewind
        self._retry_delay = 1.0
        self._status_seq = 0
        self._birth_bytes: bytes | None = None
        self._last_error: str | None = None
        self._cmd_subscribed = False  # the broker acknowledged our cmd/# subscription on this connection

        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self.last_beat = time.monotonic()  # the drain thread's last round (the service's watchdog reads it)

    # ------------------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        with self._cv:
            return self._connected

    @property
    def commands_subscribed(self) -> bool:
        """True once the broker granted the ``cmd/#`` subscription on the current connection
        (commands sent before that are not delivered to this device)."""
        with self._cv:
            return self._connected and self._cmd_subscribed

    @property
    def last_error(self) -> str | None:
        """Why the last connect was refused or the connection dropped; None once connected."""
        with self._cv:
            return self._last_error

    @property
    def status_seq(self) -> int:
        """``seq`` of the current (or last attempted) connection's status messages."""
        with self._cv:
            return self._status_seq

    def health(self) -> PublisherHealth:
        """Publishing health for device telemetry: connection, backlog and its age."""
        with self._cv:
            connected, seq, inflight, error = self._connected, self._status_seq, self._window, self._last_error
        return PublisherHealth(connected, seq, inflight, error, self.outbox.count(),
                               round(self.outbox.oldest_age_s(), 1))

    def start(self) -> None:
        """Configure paho, start connecting in the background and start the drain thread.

        Returns at once; the connection comes up (and comes back) on its own. Raises
        PublishError for a configuration paho refuses (bad TLS files, ...).
        """
        if self._client is not None:
            raise PublishError("publisher already started")
        cfg = self.cfg
        v5 = cfg.protocol == "5"
        client_id = cfg.client_id or f"edge-agent-{self.device_id}"
        try:
            client = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                # MQTT 3.1.1 brokers keep a persistent session forever; we do not need one (the
                # outbox is our session state), so ask for a clean one. MQTT 5 uses clean_start
                # and an explicit expiry instead (see connect_async below).
                clean_session=None if v5 else True,
            )
            # paho's window: ours plus room for the status messages; its queue: a reconnect can
            # leave one window of old in-flight messages (paho re-sends them) beside a new one.
            client.max_inflight_messages_set(cfg.max_inflight + 2)
            client.max_queued_messages_set(2 * cfg.max_inflight + 8)
            lo, hi = self._reconnect_delay_s
            # paho annotates whole seconds; it sleeps with whatever it is given, and tests use 0.2 s
            client.reconnect_delay_set(min_delay=lo, max_delay=hi)  # type: ignore[arg-type]
            if cfg.username is not None:
                client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
            if cfg.tls.enabled:
                client.tls_set(
                    ca_certs=str(cfg.tls.cafile) if cfg.tls.cafile else None,
                    certfile=str(cfg.tls.certfile) if cfg.tls.certfile else None,
                    keyfile=str(cfg.tls.keyfile) if cfg.tls.keyfile else None,
                )
        except (ValueError, OSError) as exc:
            raise PublishError(f"MQTT client configuration refused: {exc}") from exc

        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe

        props: Properties | None = None
        if v5:
            # Without an explicit SessionExpiryInterval an MQTT 5 broker ends the session at
            # disconnect. clean_start is "first connect only": a restart starts clean (commands
            # queued for a previous run are stale), a reconnect within one run resumes the
            # session, so commands sent during a network blip are still delivered.
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho 2.2: unannotated
            props.SessionExpiryInterval = cfg.session_expiry_s
        try:
            client.connect_async(
                cfg.host,
                cfg.port,
                keepalive=cfg.keepalive_s,
                clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except ValueError as exc:
            raise PublishError(f"MQTT connect parameters refused: {exc}") from exc
        self._client = client
        with self._cv:
            # A new paho client numbers its mids from 1 again: bookkeeping of a previous run
            # must not match them (it would acknowledge the wrong rows).
            self._inflight.clear()
            self._early.clear()
            self._stopping = False
            self._connected = False
            self._window = 0
            self._cursor = 0
            self._blocked_until = None
            self._wake = True
        client.loop_start()
        self._thread = threading.Thread(target=self._drain_loop, name="mqtt-drain", daemon=True)
        self._thread.start()
        log_event(logger, "mqtt.starting", host=cfg.host, port=cfg.port, protocol=cfg.protocol,
                  client_id=client_id, tls=cfg.tls.enabled, pending=self.outbox.count())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop draining, publish the retained offline status, disconnect cleanly.

        Waits up to ``timeout`` seconds for the offline message's PUBACK. Rows not yet
        acknowledged stay in the outbox for the next start. A clean MQTT disconnect makes the
        broker discard the Last Will, which is why we publish ``offline`` ourselves first.
        """
        client = self._client
        if client is None:
            return
        deadline = time.monotonic() + timeout
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
            if self._thread.is_alive():
                log_event(logger, "mqtt.drain_stuck", logging.WARNING)
            self._thread = None
        with self._cv:
            connected, seq, birth = self._connected, self._status_seq, self._birth_bytes
        if connected and birth is not None:
            try:
                payload = restamp_status(self._birth(), seq=seq, state="offline", reason="shutdown")  # models now
                info = client.publish(self.topics.status, payload, qos=1, retain=True)
                self._register(info.mid, None, self._gen)
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                if not info.is_published():
                    log_event(logger, "mqtt.offline_unacknowledged", logging.WARNING, seq=seq)
            except (ValueError, RuntimeError, EdgeAgentError) as exc:
                log_event(logger, "mqtt.offline_failed", logging.WARNING, seq=seq, error=str(exc))
        client.disconnect()
        client.loop_stop()
        with self._cv:
            self._connected = False
        self._client = None
        log_event(logger, "mqtt.stopped", pending=self.outbox.count(), seq=seq)

    def wake(self) -> None:
        """Tell the drain thread that new outbox rows are waiting."""
        with self._cv:
            self._wake = True
            self._cv.notify_all()

    def publish_event(self, event: Event | TypedEvent) -> int:
        """Put ``event`` (a typed event kind of agent/core/events/, or the Event it made) into the
        outbox (QoS 1, durable like results) and wake the drain.

        Returns the outbox seq. Raises StorageError when the row cannot be written.
        """
        seq = self.outbox.put(self.topics.events, event_payload(event, self.device_id), qos=1, kind="event")
        self.wake()
        return seq

    def publish_result(
        self,
        result: Result,
        *,
        patient: Mapping[str, Any] | None = None,
        include_patient_identifiers: bool = False,
    ) -> int:
        """Put ``result`` into the outbox (idempotent per result_id and revision) and wake the drain.

        Returns the outbox seq; the row is durable when this returns.
        """
        payload = result_payload(result, patient=patient, include_patient_identifiers=include_patient_identifiers)
        seq = self.outbox.put(self.topics.results, payload, qos=1, kind="result",
                              dedup_key=result_dedup_key(result))
        self.wake()
        return seq

    def publish_telemetry(self, snapshot: TelemetrySnapshot, *, max_queued: int | None = None) -> int:
        """Put the telemetry message of ``snapshot`` into the outbox and wake the drain; returns
        the outbox seq. Beyond ``max_queued`` (default: the outbox's cap) the oldest telemetry rows
        are dropped in the same transaction; results and events never are."""
        payload = telemetry_payload(snapshot, self.device_id)
        seq = self.outbox.put(self.topics.telemetry, payload, qos=1, kind="telemetry", max_queued=max_queued)
        self.wake()
        return seq

    def publish_drift(self, report: DriftReport, seq: int, *, max_queued: int | None = None) -> int:
        """Put ``report``'s drift message (``seq``: ``outbox.next_seq("drift")``) into the outbox,
        bounded like telemetry, and wake the drain; returns the outbox seq."""
        payload = drift_payload(report, self.device_id, seq)
        row = self.outbox.put(self.topics.drift, payload, qos=1, kind="drift", max_queued=max_queued)
        self.wake()
        return row

    # ------------------------------------------------------------------------ paho callbacks
    # Each callback catches everything: an exception escaping a callback would end paho's
    # network thread (suppress_exceptions is off), and the device would silently stop
    # publishing until restarted.

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        with self._cv:
            # paho does not always report the end of the previous connection before it
            # reconnects; we are not connected until the next successful CONNACK.
            self._connected = False
        try:
            seq = self.outbox.next_status_seq()
            birth = self._birth()
            will = restamp_status(birth, seq=seq, state="offline", reason="connection-lost")
            client.will_set(self.topics.status, will, qos=1, retain=True)
            with self._cv:
                self._status_seq = seq
                self._birth_bytes = birth
        except Exception:  # noqa: BLE001 - logged; the previous Will stays set
            logger.exception("mqtt.will_failed", extra={"ea_fields": {"topic": self.topics.status}})

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        try:
            if reason_code.is_failure:
                # A refused CONNECT: not connected, nothing sent, nothing deleted. paho retries
                # with backoff; credentials errors will keep failing and keep being logged.
                with self._cv:
                    self._connected = False
                    self._last_error = f"connection refused: {reason_code}"
                log_event(logger, "mqtt.connect_refused", logging.ERROR, host=self.cfg.host,
                          port=self.cfg.port, reason=str(reason_code))
                return
            with self._cv:
                self._gen += 1
                gen, seq, birth = self._gen, self._status_seq, self._birth_bytes
            if birth is not None:
                # Birth first, before marking connected, so it precedes any result on the wire.
                payload = restamp_status(birth, seq=seq, state="online")
                info = client.publish(self.topics.status, payload, qos=1, retain=True)
                self._register(info.mid, None, gen)
            with self._cv:
                self._cmd_subscribed = False
            if self._on_command is not None:
                self._subscribe_commands(client)
            with self._cv:
                self._connected = True
                self._last_error = None
                self._window = 0
                self._cursor = 0
                self._blocked_until = None
                self._wake = True
                self._cv.notify_all()
            log_event(logger, "mqtt.connected", host=self.cfg.host, port=self.cfg.port,
                      protocol=self.cfg.protocol, seq=seq,
                      session_present=bool(getattr(flags, "session_present", False)))
        except Exception:  # noqa: BLE001 - logged; paho's thread must survive
            logger.exception("mqtt.on_connect_failed")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        try:
            with self._cv:
                was = self._connected
                self._connected = False
                if was and not self._stopping:
                    # Only a lost connection: after a refused CONNACK paho reports a disconnect
                    # too, which must not hide the refusal's reason.
                    self._last_error = f"disconnected: {reason_code}"
                self._cv.notify_all()
            if was:
                level = logging.INFO if self._stopping else logging.WARNING
                log_event(logger, "mqtt.disconnected", level, reason=str(reason_code))
        except Exception:  # noqa: BLE001 - logged; paho's thread must survive
            logger.exception("mqtt.on_disconnect_failed")

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        try:
            with self._cv:
                entry = self._inflight.pop(mid, None)
                if entry is None:
                    # The drain thread has not recorded this mid yet (publish() has not even
                    # returned to it): park the PUBACK for _register to claim.
                    self._early[mid] = (reason_code, time.monotonic())
                    return
            self._settle(mid, entry[0], entry[1], reason_code, entry[2])
        except Exception:  # noqa: BLE001 - logged; paho's thread must survive
            logger.exception("mqtt.on_publish_failed", extra={"ea_fields": {"mid": mid}})

    def _subscribe_commands(self, client: mqtt.Client) -> None:
        """Subscribe to ``cmd/#``. A command runs once, when it is sent: MQTT 5 asks the broker
        not to replay retained messages at subscribe time (retain handling 2); MQTT 3.1.1 cannot,
        so ``_on_message`` drops messages that arrive flagged retained."""
        if self.cfg.protocol == "5":
            client.subscribe(self.topics.cmd, options=SubscribeOptions(qos=1, retainHandling=2))
        else:
            client.subscribe(self.topics.cmd, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        try:
            refused = [str(rc) for rc in reason_codes if rc.is_failure]
            with self._cv:
                self._cmd_subscribed = not refused
            if refused:
                # e.g. an ACL that denies cmd/#: the device keeps publishing but takes no commands
                log_event(logger, "mqtt.commands_refused", logging.ERROR, topic=self.topics.cmd,
                          reason=",".join(refused))
            else:
                log_event(logger, "mqtt.commands_subscribed", topic=self.topics.cmd)
        except Exception:  # noqa: BLE001 - logged; paho's thread must survive
            logger.exception("mqtt.on_subscribe_failed")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_command is None:
            return
        if msg.retain:
            log_event(logger, "mqtt.command_retained_ignored", logging.WARNING, topic=msg.topic,
                      size=len(msg.payload))
            return
        try:
            self._on_command(msg.topic, bytes(msg.payload))
        except Exception:  # noqa: BLE001 - a failing command handler must not end paho's thread
            logger.exception("mqtt.command_failed", extra={"ea_fields": {"topic": msg.topic,
                                                                         "size": len(msg.payload)}})

    # ------------------------------------------------------------------------- bookkeeping

    def _register(self, mid: int, seq: int | None, gen: int, created_at: float = 0.0) -> None:
        """Record that ``mid`` carries outbox row ``seq`` (None: a status message) made at ``created_at``."""
        with self._cv:
            early = self._early.pop(mid, None)
            if early is None:
                self._inflight[mid] = (seq, gen, created_at)
                return
        self._settle(mid, seq, gen, early[0], created_at)

    def _settle(self, mid: int, seq: int | None, gen: int, reason: ReasonCode, created_at: float = 0.0) -> None:
        """Handle the PUBACK of ``mid``: delete the row on success, schedule a retry otherwise."""
        failed = reason.is_failure
        with self._cv:
            if gen == self._gen and seq is not None:
                self._window = max(0, self._window - 1)
            if failed and seq is not None:
                # Keep the row; stop sending new rows, then rewind to the oldest row after a
                # delay (growing to a minute), so a rejected message is retried, not lost.
                self._blocked_until = time.monotonic() + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, _MAX_RETRY_DELAY_S)
            self._cv.notify_all()
        if seq is None:
            if failed:
                log_event(logger, "mqtt.status_rejected", logging.WARNING, mid=mid, reason=str(reason))
            return
        if failed:
            log_event(logger, "mqtt.publish_rejected", logging.ERROR, seq=seq, mid=mid, reason=str(reason))
            return
        if self.outbox.ack(seq):
            # only the first PUBACK of a row: paho's re-send after a reconnect may bring a second
            self._metrics.observe("publish", max(0.0, time.time() - created_at))
            self._metrics.count("messages_published")
        with self._cv:
            self._retry_delay = 1.0
        logger.debug("mqtt.acked", extra={"ea_fields": {"seq": seq, "mid": mid}})

    def _prune_early(self, now: float) -> None:
        stale = [mid for mid, (_, t) in self._early.items() if now - t > _EARLY_ACK_TTL_S]
        for mid in stale:
            del self._early[mid]
        if stale:
            log_event(logger, "mqtt.unclaimed_acks", logging.WARNING, count=len(stale))

    # ------------------------------------------------------------------------------ drain

    def _sendable(self, now: float) -> bool:
        """Connected, window open, not paused by a rejected PUBACK (caller holds _cv)."""
        if not self._connected or self._window >= self.cfg.max_inflight:
            return False
        if self._blocked_until is not None:
            if self._window > 0 or now < self._blocked_until:
                return False
            # Paused long enough and nothing in flight: re-send from the oldest row.
            self._blocked_until = None
            self._cursor = 0
        return True

    def _drain_loop(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            with self._cv:
                now = time.monotonic()
                if not (self._wake and self._sendable(now)):
                    timeout = self._poll_s
                    if self._blocked_until is not None:
                        timeout = min(timeout, max(0.01, self._blocked_until - now))
                    self._cv.wait(timeout)
                    now = time.monotonic()
                if self._stopping:
                    return
                self._prune_early(now)
                if not self._sendable(now):
                    continue
                self._wake = False
                gen, free, cursor = self._gen, self.cfg.max_inflight - self._window, self._cursor
            try:
                rows = self.outbox.pending(free, after=cursor)
                for row in rows:
                    if not self._send(row, gen):
                        break
            except EdgeAgentError as exc:
                # Database trouble (locked, disk full): keep the thread alive, try again later.
                log_event(logger, "mqtt.drain_error", logging.ERROR, error=str(exc))
                self._last_error = str(exc)
                with self._cv:
                    self._cv.wait(self._poll_s)
            except Exception as exc:  # noqa: BLE001 - a bug must not end the only sending thread
                logger.exception("mqtt.drain_crashed")
                self._last_error = f"{type(exc).__name__}: {exc}"
                with self._cv:
                    self._cv.wait(max(self._poll_s, 1.0))

    def _send(self, row: OutboxMessage, gen: int) -> bool:
        """Hand ``row`` to paho; returns False when the drain should stop this round."""
        client = self._client
        with self._cv:
            if client is None or self._stopping or not self._connected or gen != self._gen:
                return False
        try:
            info = client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
        except ValueError as exc:
            # paho refuses the row itself (invalid topic, payload over 256 MB): it can never be
            # sent. Skip it on this connection so the rows behind it flow; it stays in the outbox
            # (visible as outbox age) for an operator, and is retried after a reconnect.
            log_event(logger, "mqtt.publish_invalid", logging.ERROR, seq=row.seq, topic=row.topic,
                      size=len(row.payload), error=str(exc))
            with self._cv:
                if gen == self._gen:
                    self._cursor = max(self._cursor, row.seq)
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            # paho's bounded queue is full (old in-flight messages after a reconnect); wait for
            # PUBACKs to free it. The drain is woken by each PUBACK.
            logger.debug("mqtt.queue_full", extra={"ea_fields": {"seq": row.seq}})
            return False
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log_event(logger, "mqtt.publish_error", logging.WARNING, seq=row.seq, rc=int(info.rc))
            return False
        # MQTT_ERR_NO_CONN: the connection dropped under us; paho kept the QoS 1 message and
        # sends it after the next CONNACK, so record it like any other.
        with self._cv:
            if gen == self._gen:
                self._window += 1
                self._cursor = max(self._cursor, row.seq)
        self._register(info.mid, row.seq, gen, row.created_at)
        self.outbox.mark_attempt(row.seq)
        logger.debug("mqtt.sent", extra={"ea_fields": {"seq": row.seq, "mid": info.mid, "topic": row.topic,
                                                       "size": len(row.payload)}})
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
