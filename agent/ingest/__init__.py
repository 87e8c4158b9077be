"""DICOM ingest stage: receive instances over DICOM, make them durable, journal them.

Takes C-STORE requests from PACS and modalities (``DicomListener``), writes the bytes exactly as
sent to the spool and its SQLite journal (``Spool``), and hands each new ``Instance`` to the service;
``send_files`` is the SCU behind ``edge-agent send``.
"""

from __future__ import annotations

from agent.ingest.scp import DicomListener
from agent.ingest.scu import SendReport, send_files
from agent.ingest.sopclasses import (
    ALL_STORAGE_SOP_CLASSES,
    DEFAULT_STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    resolve_sop_class,
)
from agent.ingest.spool import QuarantinedError, Spool
from agent.ingest.tls import server_ssl_context

__all__ = [
    "ALL_STORAGE_SOP_CLASSES",
    "DEFAULT_STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "DicomListener",
    "QuarantinedError",
    "SendReport",
    "Spool",
    "resolve_sop_class",
    "send_files",
    "server_ssl_context",
]
