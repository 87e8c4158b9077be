"""``edge-agent fleet``: watch every device under a topic prefix, as a live table or as JSON lines.

``add_fleet_parser(subparsers)`` registers the command; ``cmd_fleet(args)`` runs it and returns the
exit code. ``watch(subscriber, state, sink, duration)`` is the loop both modes share: it drains the
subscriber, feeds ``agent.cli.fleet_state.FleetState`` and hands the view to ``sink`` at most once a
second. ``JsonLines`` is the ``--json`` sink: it writes one JSON object per line for each device,
group list or summary that changed since the last write (docs/fleet.md); ``LiveTable`` (rich) redraws
the table in place. The broker connection is ``agent.cli.fleet_mqtt.FleetSubscriber``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from agent.cli.fleet_state import FleetState, FleetView
from agent.core.util import iso_utc

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

    from agent.cli.fleet_mqtt import BrokerSettings, FleetSubscriber

JSON_SCHEMA = "edge-agent/fleet/1"
#: the view is recomputed and shown at most this often (and at least this often, for ages and staleness)
TICK_S = 1.0


class Sink(Protocol):
    def show(self, view: FleetView, now: float, connected: bool) -> None: ...


class JsonLines:
    """Writes what changed since the last ``show``: ``device`` lines, ``removed`` lines, one
    ``groups`` line when the verdicts changed, one ``summary`` line when the counts changed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._devices: dict[str, dict[str, Any]] = {}
        self._groups: list[dict[str, Any]] | None = None
        self._summary: dict[str, Any] | None = None

    def _write(self, doc: dict[str, Any], now: float) -> None:
        self.out.write(json.dumps({"schema": JSON_SCHEMA, "at": iso_utc(now), **doc},
                                  separators=(",", ":"), sort_keys=False) + "\n")

    def show(self, view: FleetView, now: float, connected: bool) -> None:
        seen = set()
        for row in view.rows:
            doc = row.to_json()
            seen.add(row.device_id)
            if self._devices.get(row.device_id) != doc:
                self._devices[row.device_id] = doc
                self._write(doc, now)
        for gone in sorted(set(self._devices) - seen):
            del self._devices[gone]
            self._write({"type": "removed", "device_id": gone}, now)
        groups = [v.to_json() for v in view.groups]
        if groups != self._groups:
            self._groups = groups
            self._write({"type": "groups", "groups": groups}, now)
        summary = {**view.summary.to_json(), "connected": connected}
        if summary != self._summary:
            self._summary = summary
            self._write(summary, now)
        self.out.flush()


class LiveTable:
    """Redraws the table in place, cut to the terminal's height (``agent.cli.fleet_view``)."""

    def __init__(self, live: Live, console: Console, where: str) -> None:
        self.live, self.console, self.where = live, console, where

    def show(self, view: FleetView, now: float, connected: bool) -> None:
        from rich.console import Group
        from rich.text import Text

        from agent.cli.fleet_view import render, rows_that_fit

        broker = Text(f"broker {self.where} " + ("connected" if connected else "DISCONNECTED, reconnecting"),
                      style="dim" if connected else "bold red")
        # one line for the broker note, the rest for the view
        body = render(view, now, rows_that_fit(self.console.size.height - 1, view))
        self.live.update(Group(broker, body), refresh=True)


def watch(subscriber: FleetSubscriber, state: FleetState, sink: Sink, *, duration: float | None = None,
          clock: Callable[[], float] = time.time) -> None:
    """Merge and show until ``duration`` seconds passed (None: until interrupted)."""
    start = time.monotonic()
    next_show = 0.0
    while True:
        elapsed = time.monotonic() - start
        if duration is not None and elapsed >= duration:
            break
        wait = max(0.0, min(next_show - elapsed, (duration - elapsed) if duration is not None else TICK_S))
        for topic, payload in subscriber.drain(wait):
            state.feed(topic, payload, clock())
        if time.monotonic() - start >= next_show:
            sink.show(state.view(clock()), clock(), subscriber.connected)
            next_show = time.monotonic() - start + TICK_S
    sink.show(state.view(clock()), clock(), subscriber.connected)


def broker_settings(args: argparse.Namespace) -> tuple[BrokerSettings, str]:
    """Broker and topic prefix: the agent's ``[mqtt]`` section when ``--config`` is given, each
    overridden by the command line's own options."""
    from agent.cli.fleet_mqtt import BrokerSettings
    from agent.core.config import load_config

    base = BrokerSettings()
    prefix = "edge"
    if args.config is not None:
        m = load_config(args.config).mqtt
        base = BrokerSettings(m.host, m.port, m.protocol, m.username,
                              m.password.get_secret_value() if m.password is not None else None, m.tls.enabled,
                              None if m.tls.cafile is None else str(m.tls.cafile),
                              None if m.tls.certfile is None else str(m.tls.certfile),
                              None if m.tls.keyfile is None else str(m.tls.keyfile))
        prefix = m.topic_prefix
    host, port = args.broker if args.broker is not None else (base.host, base.port)
    settings = BrokerSettings(
        host, port, args.protocol or base.protocol,
        args.username if args.username is not None else base.username,
        args.password if args.password is not None else base.password,
        args.tls or base.tls, args.cafile or base.cafile, args.certfile or base.certfile,
        args.keyfile or base.keyfile)
    return settings, args.prefix or prefix


def cmd_fleet(args: argparse.Namespace) -> int:
    """Run the fleet view; 0 when stopped (Ctrl-C or ``--duration``), 2 when the broker cannot be used."""
    from agent.cli.fleet_mqtt import FleetSubscriber
    from agent.core.errors import ConfigError
    from agent.core.topics import Topics

    settings, prefix = broker_settings(args)
    try:
        Topics(prefix, "+")  # a bad prefix fails here with the reason, before any connection
    except ValueError as exc:
        raise ConfigError(f"--prefix: {exc}") from exc
    state = FleetState(prefix, stale_after_s=args.stale_after)
    subscriber = FleetSubscriber(settings, prefix)
    subscriber.start()
    try:
        if args.json:
            watch(subscriber, state, JsonLines(sys.stdout), duration=args.duration)
        else:
            from rich.console import Console
            from rich.live import Live

            console = Console()
            with Live(console=console, auto_refresh=False, vertical_overflow="crop") as live:
                watch(subscriber, state, LiveTable(live, console, settings.where), duration=args.duration)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view is left
    finally:
        subscriber.close()
    return 0


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_fleet_parser(sub: Any) -> None:
    """Register ``fleet`` on the ``edge-agent`` subparsers (``argparse._SubParsersAction``)."""
    p = sub.add_parser("fleet", help="watch every device: status, telemetry, drift, events (docs/fleet.md)")
    p.add_argument("--broker", type=_host_port, metavar="HOST:PORT",
                   help="MQTT broker (default: --config's [mqtt], else 127.0.0.1:1883)")
    p.add_argument("--config", type=Path, help="take broker, prefix and credentials from an agent TOML file")
    p.add_argument("--prefix", help="topic prefix (default: --config's mqtt.topic_prefix, else edge)")
    p.add_argument("--protocol", choices=["5", "3.1.1"])
    p.add_argument("--username")
    p.add_argument("--password", help="visible to other local users in the process list: prefer --config")
    p.add_argument("--tls", action="store_true", help="TLS, server verified against --cafile or the system CAs")
    p.add_argument("--cafile")
    p.add_argument("--certfile", help="client certificate (with --keyfile)")
    p.add_argument("--keyfile")
    p.add_argument("--json", action="store_true", help="stream JSON lines of what changed, at most once a second")
    p.add_argument("--stale-after", type=float, metavar="S",
                   help="mark an online device stale after S seconds without telemetry "
                   "(default: 3 of its telemetry intervals)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.set_defaults(func=cmd_fleet)
