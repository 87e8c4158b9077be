"""``edge-deploy keygen`` and the Ed25519 signing helpers ``publish`` uses.

Keys are Ed25519 in PEM: ``signing.key`` (PKCS#8 private key, unencrypted, file mode 0600, keep
it off the registry host) and ``signing.pub`` (SubjectPublicKeyInfo; goes into the agent's trusted
keys). A signature is the 64 raw bytes of Ed25519 over the exact bytes of the signed file.
Verification lives in :mod:`agent.core.manifest` (shared with the agent).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.errors import EdgeAgentError
from agent.core.manifest import key_id
from agent.core.util import atomic_write

if TYPE_CHECKING:  # cryptography is imported where a key is used, not when the CLI starts
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SigningError(EdgeAgentError):
    """A key could not be created, read or used."""


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte (never world-readable, even briefly: the
    temp file is created 0600); removed again if anything (Ctrl-C included) interrupts."""
    atomic_write(path, data, mode=mode)


def keygen(out_dir: Path, force: bool = False, name: str = "signing") -> tuple[Path, Path]:
    """Create ``out_dir/<name>.key`` (0600) and ``out_dir/<name>.pub`` (0644); ``name`` "signing"
    for the registry, e.g. "operator" for a key that signs commands (``edge-deploy command``).

    Refuses to overwrite an existing key unless ``force`` (a lost key cannot be recovered and
    every agent trusting it would need the new public key). Returns (private, public) paths.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    if not name or "/" in name or name.startswith("."):
        raise SigningError(f"key name {name!r}: expected a plain file name without extension")
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not force and (priv_path.exists() or pub_path.exists()):
        raise SigningError(f"{priv_path} or {pub_path} already exists; pass --force to replace the key pair")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    _write_new(priv_path, priv, 0o600)
    _write_new(pub_path, pub, 0o644)
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 PEM private key; SigningError if unreadable, not Ed25519, or readable by
    group/others (a leaked signing key lets anyone publish models to every device)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path}: {exc}") from exc
    if mode & 0o077:
        raise SigningError(f"{path} is readable by group/others (mode {mode:o}); chmod 600 it")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def public_pem(private_key: Ed25519PrivateKey) -> bytes:
    """The PEM public key of an Ed25519 private key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Ed25519 signature (64 raw bytes) over ``data``."""
    return private_key.sign(data)


def add_parser(subparsers: Any) -> None:
    """Register ``edge-deploy keygen``."""
    p = subparsers.add_parser(
        "keygen",
        help="create an Ed25519 key pair: registry signing, or an operator key for commands",
        description="Write DIR/NAME.key (Ed25519 private key, PEM, mode 0600) and DIR/NAME.pub "
        "(PEM public key to install on the agents: [registry] public_key, or [control] operator_keys).",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for NAME.key and NAME.pub")
    p.add_argument("--name", default="signing",
                   help="file name of the pair (default signing: the registry key; e.g. operator for commands)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    priv, pub = keygen(args.out, args.force, args.name)
    print(f"private key: {priv} (mode 600; keep it secret)\npublic key:  {pub} (key id {key_id(pub.read_bytes())})")
    return 0
