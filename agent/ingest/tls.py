"""Server-side TLS for the DICOM listener (``dicom.tls``).

Takes the ``TlsConfig`` section; returns the ``ssl.SSLContext`` the listener's server wraps each
accepted socket with, or raises ``ConfigError`` naming the key that is wrong. The context defers
each handshake to the association's own thread, so one silent client cannot stall the accept loop.
"""

from __future__ import annotations

import ssl
from socket import socket as Socket

from agent.core.config import TlsConfig
from agent.core.errors import ConfigError

__all__ = ["server_ssl_context"]


def server_ssl_context(tls: TlsConfig, *, handshake_timeout: float | None = 30.0) -> ssl.SSLContext:
    """Server-side TLS context from ``dicom.tls`` (TLS >= 1.2; client certificates when required).

    Raises ConfigError naming the key when a file is missing or unusable.
    """
    if tls.certfile is None or tls.keyfile is None:
        raise ConfigError("dicom.tls: certfile and keyfile are required when tls.enabled is true")
    ctx = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.handshake_timeout = handshake_timeout
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.certfile), str(tls.keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"dicom.tls.certfile/keyfile: cannot load: {exc}") from exc
    if tls.require_client_cert:
        if tls.cafile is None:
            raise ConfigError("dicom.tls.cafile: required when require_client_cert is true")
        try:
            ctx.load_verify_locations(cafile=str(tls.cafile))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"dicom.tls.cafile: cannot load: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _LazyHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets do the TLS handshake on first read, not in accept().

    pynetdicom wraps each accepted socket in the server's accept loop with the default
    ``do_handshake_on_connect=True``: one client that connects and sends nothing would block every
    other peer until it gives up. Deferring the handshake moves it into the association's own
    thread (OpenSSL performs it inside the first ``recv``), bounded by the socket timeout.
    """

    handshake_timeout: float | None = None

    def wrap_socket(self, sock: Socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.handshake_timeout)
            do_handshake_on_connect = False
        return super().wrap_socket(sock, server_side=server_side,
                                   do_handshake_on_connect=do_handshake_on_connect,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=server_hostname, session=session)
