"""Ed25519 keys and signatures, written once for everything the agent verifies.

The model registry (``agent.core.manifest``: ``index.json`` and manifests) and operator commands
(``agent.core.envelope``: signed MQTT commands) use the same primitives and the same key format
(``edge-deploy keygen``): PEM SubjectPublicKeyInfo public keys, PKCS#8 private keys, signatures of
64 raw bytes over the exact bytes signed. A key is named by ``key_id`` (16 hex digits of SHA-256
of its raw 32 bytes). Callers pick the error type their edge reports (``RegistryError`` for the
registry, ``SignatureError`` by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.core.errors import EdgeAgentError
from agent.core.util import sha256_bytes

__all__ = ["SIGNATURE_SIZE", "SignatureError", "key_id", "load_public_key", "read_public_keys", "verify_signature"]

#: Ed25519 signatures are always 64 bytes
SIGNATURE_SIZE = 64


class SignatureError(EdgeAgentError):
    """A key that is not an Ed25519 key, or a signature that no trusted key verifies."""


def load_public_key(pem: bytes, error: type[EdgeAgentError] = SignatureError) -> Any:
    """Parse a PEM Ed25519 public key; ``error`` if it is not one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise error(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise error(f"keys must be Ed25519, got {type(key).__name__}")
    return key


def key_id(pem: bytes) -> str:
    """Short, stable id of a public key: first 16 hex digits of SHA-256 of its raw 32 bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = load_public_key(pem).public_bytes(Encoding.Raw, PublicFormat.Raw)
    return sha256_bytes(raw)[:16]


def read_public_keys(paths: Sequence[Path], what: str,
                     error: type[EdgeAgentError] = SignatureError) -> list[bytes]:
    """The PEM bytes of each file in ``paths``, each checked to be an Ed25519 public key now (a
    bad key fails at start-up, not at the first verification). ``what`` names them in errors."""
    out = []
    for path in paths:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise error(f"cannot read {what} {path}: {exc}") from exc
        try:
            load_public_key(pem, error)
        except EdgeAgentError as exc:
            raise error(f"{what} {path}: {exc}") from exc
        out.append(pem)
    return out


def verify_signature(data: bytes, sig: bytes, public_keys: Sequence[bytes],
                     error: type[EdgeAgentError] = SignatureError) -> str:
    """Check an Ed25519 signature over ``data`` against any of the trusted PEM ``public_keys``.

    Returns the key_id of the key that verified; raises ``error`` when the signature is malformed
    or no trusted key verifies it (more than one key is allowed so keys can rotate).
    """
    from cryptography.exceptions import InvalidSignature

    if not public_keys:
        raise error("no trusted public keys configured: cannot verify the signature")
    if len(sig) != SIGNATURE_SIZE:
        raise error(f"signature is {len(sig)} bytes; an Ed25519 signature is {SIGNATURE_SIZE}")
    for pem in public_keys:
        key = load_public_key(pem, error)
        try:
            key.verify(sig, data)
        except InvalidSignature:
            continue  # try the next trusted key (rotation); failure is reported below
        return key_id(pem)
    raise error(f"signature does not verify with any of the {len(public_keys)} trusted key(s)")
