"""``edge-deploy command sign|send``: an operator command, signed with an operator key.

The key pair comes from ``edge-deploy keygen --out DIR --name operator``; its ``operator.pub``
goes into each device's ``[control] operator_keys``. ``sign`` prints the wire message (for
``mosquitto_pub -q 1 -t {prefix}/{device}/cmd/{command} -s``); ``send`` publishes it (QoS 1) and
prints the device's answers on ``events`` until the final one (``command.completed``, ``.failed``
or ``.rejected``). The envelope format is agent/core/envelope.py; docs/mqtt.md "Commands".
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.core.envelope import encode_signed, new_envelope
from agent.core.errors import EdgeAgentError
from agent.core.signing import key_id
from deploy.sign import load_private_key, public_pem

COMMANDS = ("update", "rollback", "selftest")
FINAL = ("command.completed", "command.failed", "command.rejected")


def signed_command(key_path: Path, command: str, device: str, *, model: str | None = None,
                   correlation_id: str | None = None, issued_at: float | None = None) -> tuple[str, bytes]:
    """(correlation id, wire message) of ``command`` for ``device`` ("*": every device), signed now."""
    key = load_private_key(key_path)
    cid = correlation_id or f"op-{secrets.token_hex(6)}"
    env = new_envelope(command, device, cid, {"model": model} if model else {}, issued_at=issued_at)
    return cid, encode_signed(env, key.sign, key_id(public_pem(key)))


def send(message: bytes, topic: str, events_topic: str, cid: str, *, host: str, port: int, timeout: float,
         username: str | None = None, password: str | None = None) -> list[dict[str, Any]]:
    """Publish ``message`` on ``topic`` (QoS 1) and collect the answers with ``cid`` until a final one."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    answers: list[dict[str, Any]] = []
    done, subscribed = threading.Event(), threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(doc, dict) and doc.get("fields", {}).get("correlation_id") == cid:
            answers.append(doc)
            print(json.dumps(doc), flush=True)
            if doc.get("kind") in FINAL:
                done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    if username is not None:
        client.username_pw_set(username, password)
    client.on_message = on_message
    client.on_subscribe = lambda *_a, **_k: subscribed.set()
    client.on_connect = lambda c, *_a, **_k: c.subscribe(events_topic, qos=1)
    try:
        client.connect(host, port)
    except OSError as exc:
        raise EdgeAgentError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise EdgeAgentError(f"no subscription to {events_topic} within 10 s")
        client.publish(topic, message, qos=1).wait_for_publish(10)
        if not done.wait(timeout):
            raise EdgeAgentError(f"no final answer for {cid} within {timeout:g} s")
    finally:
        client.loop_stop()
        client.disconnect()
    return answers


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("command", help="sign (and send) an operator command to a device",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    sub = p.add_subparsers(dest="command_action", metavar="ACTION", required=True)
    for action in ("sign", "send"):
        a = sub.add_parser(action, help="print the signed message" if action == "sign"
                           else "publish it and print the device's answers")
        a.add_argument("name", choices=COMMANDS, help="the command")
        a.add_argument("--key", type=Path, required=True, help="operator private key (edge-deploy keygen --name operator)")
        a.add_argument("--device", required=True, help='device id, or "*" for every device trusting the key')
        a.add_argument("--model", help="the model it is for (default: the device decides)")
        a.add_argument("--correlation-id", help="default: op-<random>")
        if action == "send":
            a.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (default 127.0.0.1:1883)")
            a.add_argument("--prefix", default="edge", help="topic prefix (default edge)")
            a.add_argument("--username")
            a.add_argument("--password-env", metavar="VAR", help="environment variable holding the broker password")
            a.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the final answer")
        a.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cid, message = signed_command(args.key, args.name, args.device, model=args.model,
                                  correlation_id=args.correlation_id)
    if args.command_action == "sign":
        sys.stdout.write(message.decode() + "\n")
        return 0
    if args.device == "*":
        raise EdgeAgentError("send needs one --device (answers come per device); use sign for a broadcast")
    host, _, port = args.broker.rpartition(":")
    password = os.environ.get(args.password_env) if args.password_env else None
    base = f"{args.prefix}/{args.device}"
    started = time.monotonic()
    answers = send(message, f"{base}/cmd/{args.name}", f"{base}/events", cid, host=host or "127.0.0.1",
                   port=int(port), timeout=args.timeout, username=args.username, password=password)
    final = answers[-1]["kind"]
    print(f"{cid}: {final} after {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0 if final == "command.completed" else 1
