"""C-STORE of one object to one ``[[export]]`` destination (pynetdicom).

``store(dest, calling_ae, path)`` opens an association (TLS when ``dest.tls.enabled``), proposes
the object's SOP class in Explicit and Implicit VR Little Endian, sends it and returns the
destination's status. Only Success (0x0000) and the storage warnings the standard defines
(0xB000 coercion of data elements, 0xB006 elements discarded, 0xB007 data set does not match the
SOP class) count as stored (``agent.core.errors.STORED_STATUSES``); anything else (0xA700 out of resources, 0xA900, 0xC000...)
is a failure that stays queued. An association that is rejected, aborted or times out raises
``SendError``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from agent.core.errors import EdgeAgentError
from agent.core.export_config import ExportDestination


class SendError(EdgeAgentError):
    """No C-STORE status: the association was refused, aborted or timed out."""


def _tls(dest: ExportDestination) -> tuple[ssl.SSLContext, str] | None:
    t = dest.tls
    if not t.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(t.cafile) if t.cafile else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = t.check_hostname
    if t.certfile is not None and t.keyfile is not None:
        ctx.load_cert_chain(str(t.certfile), str(t.keyfile))
    return ctx, dest.host


def store(dest: ExportDestination, calling_ae: str, path: Path) -> int:
    """Send the DICOM file ``path`` to ``dest``; its C-STORE status (see the module docstring)."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    ae.connection_timeout = dest.timeout_s
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        tls = _tls(dest)
    except (OSError, ssl.SSLError) as exc:
        raise SendError(f"TLS setup failed: {exc}") from exc
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.called_ae, tls_args=tls)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise SendError(f"association {why} by {dest.called_ae}@{dest.host}:{dest.port}")
    try:
        reply = assoc.send_c_store(ds)
    finally:
        assoc.release()
    status = getattr(reply, "Status", None)
    if status is None:
        raise SendError("no C-STORE response (timeout or aborted association)")
    return int(status)
