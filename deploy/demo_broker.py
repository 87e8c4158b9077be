"""Embedded MQTT broker for ``make demo`` (amqtt, optional dependency ``edge-agent[demo]``).

amqtt 0.12.1 speaks MQTT 3.1.1 only: it refuses an MQTT 5 CONNECT, so an agent that uses this
broker must be configured with ``mqtt.protocol = "3.1.1"``. It keeps retained messages and
sessions in memory only; this is a demo convenience, never a production broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

from agent.core.errors import PublishError
from agent.core.log import log_event

logger = logging.getLogger(__name__)


def broker_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when an MQTT broker on ``host:port`` answers a CONNECT within ``timeout`` seconds.

    Sends a minimal MQTT 3.1.1 CONNECT (clean session, random client id), waits for the
    CONNACK (a refusal counts: a broker is there), then DISCONNECTs. A bare TCP probe is not
    enough and is not polite: amqtt 0.12.1 logs an error for a connection that sends nothing
    and leaks its stream writer (an unclosed-transport ResourceWarning at garbage collection).
    """
    client_id = f"edge-agent-probe-{os.urandom(4).hex()}".encode()
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 10)  # protocol 3.1.1, clean, keepalive 10
    payload = struct.pack("!H", len(client_id)) + client_id
    body = variable + payload
    connect = bytes([0x10, len(body)]) + body  # remaining length < 128: one byte
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(connect)
            answer = b""
            while len(answer) < 4:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    return False
                answer += chunk
            if answer[0] != 0x20:  # not a CONNACK
                return False
            if answer[3] == 0:
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker drops the session quietly
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` running in a background thread with its own event loop.

    ``start()`` returns once the port accepts connections (raises PublishError otherwise);
    ``stop()`` shuts the broker down and joins the thread. Usable as a context manager.
    Anonymous clients are allowed; only loopback use is intended.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _config(self) -> dict[str, Any]:
        # Only the anonymous-auth plugin: amqtt's default set also loads the packet logger (which
        # would log message payloads at DEBUG) and the $SYS publisher, neither wanted here.
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    async def _main(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise PublishError("the embedded broker needs amqtt: pip install 'edge-agent[demo]'") from exc
        self._stop_event = asyncio.Event()
        broker = Broker(self._config())
        await broker.start()
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await broker.shutdown()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to start() / stop() to raise there
            self._error = exc
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
            self._ready.set()

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker; returns when ``host:port`` accepts connections."""
        if self._thread is not None:
            raise PublishError("embedded broker already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None or not self._thread.is_alive():
            err = self._error
            self._thread.join(1.0)
            self._thread = None
            raise PublishError(f"embedded broker on {self.host}:{self.port} failed to start: {err}") from err
        if not self._ready.is_set():
            self.stop()
            raise PublishError(f"embedded broker on {self.host}:{self.port} did not start in {timeout}s")
        # No probe needed: _ready is set after amqtt's start(), i.e. after asyncio.start_server()
        # is listening.
        log_event(logger, "broker.started", host=self.host, port=self.port, protocol="3.1.1")

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down (disconnecting its clients) and join its thread."""
        thread, loop, ev = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and ev is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError as exc:  # the loop closed on its own meanwhile
                log_event(logger, "broker.stop_race", logging.DEBUG, error=str(exc))
        thread.join(timeout)
        if thread.is_alive():
            raise PublishError(f"embedded broker on {self.host}:{self.port} did not stop in {timeout}s")
        self._thread = None
        self._loop = None
        self._stop_event = None
        if self._error is not None:
            log_event(logger, "broker.stopped_with_error", logging.WARNING, error=str(self._error))
        log_event(logger, "broker.stopped", host=self.host, port=self.port)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
