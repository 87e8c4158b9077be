"""The MQTT side of ``edge-agent fleet``: one subscriber for every device's status, telemetry, drift
and events.

``FleetSubscriber(BrokerSettings, prefix)``: ``start(timeout)`` connects and returns once the broker
acknowledged the subscriptions (PublishError when it cannot be reached or refuses us); ``drain(wait)``
returns the ``(topic, payload)`` messages received since the last call, waiting up to ``wait``
seconds for the first; ``connected`` says whether the connection is up now; ``close()`` disconnects.
paho's network thread only queues messages: the caller merges and renders on its own thread, so a
slow terminal never holds up the connection's keep-alive.
"""

from __future__ import annotations

import os
import queue
import ssl
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.core.errors import PublishError

#: the message kinds the fleet view reads, each subscribed as {prefix}/+/{kind}
SUBSCRIBED = ("status", "telemetry", "drift", "events")


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"  # "5" or "3.1.1"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    cafile: str | None = None  # None with tls: the system CAs
    certfile: str | None = None
    keyfile: str | None = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


class FleetSubscriber:
    """See the module docstring."""

    def __init__(self, broker: BrokerSettings, prefix: str) -> None:
        self.broker = broker
        self.filters = [(f"{prefix}/+/{kind}", 1) for kind in SUBSCRIBED]
        self.connected = False
        self._early: list[tuple[str, bytes]] = []
        self._inbox: queue.Queue[tuple[str, str | bytes]] = queue.Queue()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"edge-agent-fleet-{os.urandom(4).hex()}",
            protocol=mqtt.MQTTv5 if broker.protocol == "5" else mqtt.MQTTv311,
            clean_session=None if broker.protocol == "5" else True,
        )
        if broker.username is not None:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls or broker.cafile is not None:
            self._client.tls_set(ca_certs=broker.cafile, certfile=broker.certfile, keyfile=broker.keyfile,
                                 cert_reqs=ssl.CERT_REQUIRED)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # paho callbacks (network thread): only queue what happened
    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            self._inbox.put(("refused", str(rc)))
            return
        self.connected = True
        # subscribed again on every (re)connect: the session is clean, the broker forgot the last one.
        # Retained status messages are replayed on each subscribe, so the view re-learns who is offline.
        c.subscribe(self.filters)

    def _on_disconnect(self, c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self.connected = False

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        refused = [str(r) for r in rcs if r.is_failure]
        self._inbox.put(("refused", f"subscription refused: {', '.join(refused)}") if refused else ("subscribed", ""))

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put((msg.topic, bytes(msg.payload)))

    def start(self, timeout: float = 10.0) -> None:
        """Connect and wait for the SUBACK; raises PublishError (unreachable, refused, no answer)."""
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise PublishError(f"cannot reach the MQTT broker at {self.broker.where}: {exc}") from exc
        self._client.loop_start()
        try:
            kind, value = self._inbox.get(timeout=timeout)
            while kind not in ("refused", "subscribed"):
                # a retained message handed to us before the SUBACK: keep it for the first drain
                if isinstance(value, bytes):
                    self._early.append((kind, value))
                kind, value = self._inbox.get(timeout=timeout)
        except queue.Empty as exc:
            self.close()
            raise PublishError(f"no answer from the MQTT broker at {self.broker.where} in {timeout:g}s") from exc
        if kind == "refused":
            self.close()
            raise PublishError(f"MQTT broker at {self.broker.where} refused: {value!s}")

    def drain(self, wait: float) -> list[tuple[str, bytes]]:
        """Messages received since the last call (waits up to ``wait`` s for the first)."""
        out, self._early = self._early, []
        try:
            item = self._inbox.get(timeout=0.0 if out else max(0.0, wait))
            while True:
                topic, payload = item
                if isinstance(payload, bytes):  # control notes (a resubscription's SUBACK) are not messages
                    out.append((topic, payload))
                item = self._inbox.get_nowait()
        except queue.Empty:
            return out

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
