"""Pull client: fetch a signed manifest, pick the variants this device can run, download them with
resume, verify every byte, install atomically, roll back on request.

Trust model (see agent/core/manifest.py and docs/manifest.md): the Ed25519 signature of
``manifest.json`` is checked against the pinned public key(s) over the exact bytes downloaded,
*before* anything else reads them; then every file is checked against the manifest's ``size`` and
``sha256``. ``index.json`` (also signed) is only used to find the latest version. Nothing that
failed a check is ever installed, and ``current`` is only switched after the whole version folder
is verified and durably on disk, so every failure leaves the running model untouched.

Typical use (the service's poll loop or ``edge-agent pull``)::

    client = RegistryClient(cfg.registry.url, cfg.registry.public_key, cfg.storage.dir, probe)
    result = client.pull("ct-abdomen-seg")           # latest version, variants chosen for this device
    ...self-test / shadow validation (not here)...; client.rollback("ct-abdomen-seg") on failure

Network errors, HTTP errors, bad signatures, digest or size mismatches, truncated downloads and
a full disk all raise RegistryError with a message that says which and where.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import re
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.core.errors import RegistryError
from agent.core.isa import proof_needed, refusal
from agent.core.log import log_event
from agent.core.manifest import (
    Index,
    Manifest,
    Variant,
    load_public_key,
    parse_manifest,
    verify_index,
    verify_signature,
)
from agent.core.util import fsync_dir, sha256_file
from agent.device.probe import Probe, compatible
from agent.device.probe import probe as run_probe
from agent.updates.store import InstalledVersion, ModelStore, check_name

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
#: index.json, manifest.json and signatures are small; refuse to buffer more than this of them
MAX_METADATA_BYTES = 16 << 20
#: precision preference when published figures do not separate two variants (INT8 first: FP8
#: convolutions are often no faster than FP16 on TensorRT; the device measures and decides)
_PRECISION_ORDER = {"int8": 0, "fp8": 1, "fp16": 2, "bf16": 3, "fp32": 4}


class _Interrupted(Exception):
    """A transfer that stopped early or could not start; retried (resuming) by download_file.

    ``status``: the HTTP status when the server answered (416: our partial file is not a prefix).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class VariantChoice:
    """One variant judged against this device: ``ok`` and, when not, the ``reason``."""

    variant: Variant
    ok: bool
    reason: str


@dataclass(frozen=True)
class PullResult:
    """What ``pull``/``install`` did: the installed version and the version it replaced."""

    installed: InstalledVersion
    previous: str | None
    variants: tuple[str, ...]
    downloaded_bytes: int


@dataclass(frozen=True)
class _Fetched:
    manifest: Manifest
    raw: bytes
    signature: bytes
    key_id: str


def _write(f: IO[bytes], data: bytes) -> None:
    """One chunk to disk (a seam for the disk-full test)."""
    f.write(data)


class RegistryClient:
    """Client of one registry (``http://``, ``https://`` or ``file://`` URL of its root).

    ``public_keys``: PEM files (or PEM bytes) of the trusted Ed25519 keys; several allowed so the
    publisher can rotate keys. ``state_dir``: the agent's state directory (models go to
    ``state_dir/models``). ``probe``: this device's capabilities (None: probed on first use).
    ``timeout_s``: per network operation; ``retries``: attempts per file download, each resuming
    where the last stopped; ``min_free_mb``: space that must remain free after an install;
    ``deadline_s``: the whole download of one install, all files and attempts together (a peer
    that trickles bytes never trips ``timeout_s``). ``cancel``: set it to abandon a download at
    its next block (a rollback takes precedence).
    """

    def __init__(self, url: str, public_keys: Sequence[Path | str | bytes], state_dir: Path,
                 probe: Probe | None = None, *, timeout_s: float = 30.0, retries: int = 3,
                 retry_wait_s: float = 2.0, min_free_mb: int = 200, cafile: Path | None = None,
                 deadline_s: float = 1800.0, cancel: threading.Event | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in {"http", "https", "file"}:
            raise RegistryError(f"registry url {url!r}: expected http://, https:// or file://")
        self.url = url.rstrip("/") + "/"
        self.state_dir = Path(state_dir)
        self.store = ModelStore(self.state_dir)
        self.timeout_s = timeout_s
        self.retries = max(1, retries)
        self.retry_wait_s = retry_wait_s
        self.min_free_mb = min_free_mb
        self.deadline_s = deadline_s
        self.cancel = cancel or threading.Event()
        self._deadline = float("inf")  # monotonic; set per install
        self._probe = probe
        self._keys = [self._read_key(k) for k in public_keys]
        if not self._keys:
            raise RegistryError("no trusted registry public key configured (registry.public_key)")
        self._ssl = ssl.create_default_context(cafile=str(cafile) if cafile else None) \
            if parts.scheme == "https" else None
        self._fetched: dict[tuple[str, str], _Fetched] = {}

    @staticmethod
    def _read_key(key: Path | str | bytes) -> bytes:
        if isinstance(key, bytes):
            pem = key
        else:
            try:
                pem = Path(key).read_bytes()
            except OSError as exc:
                raise RegistryError(f"cannot read registry public key {key}: {exc}") from exc
        load_public_key(pem)  # fail now, not at the first pull
        return pem

    @property
    def probe(self) -> Probe:
        """The device probe (run once, lazily, when none was given)."""
        if self._probe is None:
            self._probe = run_probe(self.state_dir)
        return self._probe

    # ------------------------------------------------------------------------------ transport

    def _url(self, rel: str) -> str:
        return self.url + urllib.parse.quote(rel)

    def _open(self, rel: str, headers: dict[str, str] | None = None) -> Any:
        """Open ``rel`` under the registry root; returns a response-like object (status, headers, read).

        http.client/urllib errors are mapped: HTTPError -> RegistryError (the server answered no);
        unreachable / reset / timeout -> _Interrupted (worth retrying).
        """
        url = self._url(rel)
        req = urllib.request.Request(url, headers={"User-Agent": "edge-agent", **(headers or {})})
        try:
            timeout = max(0.5, min(self.timeout_s, self._deadline - time.monotonic()))
            return urllib.request.urlopen(req, timeout=timeout, context=self._ssl)
        except urllib.error.HTTPError as exc:
            exc.close()  # the error response holds the connection open otherwise
            if exc.code == 416:
                raise _Interrupted(f"{url}: range not satisfiable (HTTP 416)", status=416) from exc
            raise RegistryError(f"registry: {url} answered HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Interrupted(f"registry unreachable at {url}: {reason}") from exc

    def _get_small(self, rel: str) -> bytes:
        """Fetch a metadata file (index, manifest, signature) into memory, size-capped."""
        if self.url.startswith("file:"):
            path = self._local_path(rel)
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_METADATA_BYTES + 1)
            except OSError as exc:
                raise RegistryError(f"registry: cannot read {path}: {exc}") from exc
        else:
            try:
                with self._open(rel) as resp:
                    data = resp.read(MAX_METADATA_BYTES + 1)
            except _Interrupted as exc:
                raise RegistryError(str(exc)) from exc
            except (http.client.HTTPException, OSError) as exc:
                raise RegistryError(f"registry: reading {self._url(rel)} failed: {exc}") from exc
        if len(data) > MAX_METADATA_BYTES:
            raise RegistryError(f"registry: {rel} is larger than {MAX_METADATA_BYTES} bytes; refusing it")
        return data

    def _local_path(self, rel: str) -> Path:
        root = Path(urllib.request.url2pathname(urllib.parse.urlsplit(self.url).path))
        return root / rel

    # ------------------------------------------------------------------------------- metadata

    def fetch_index(self) -> Index:
        """``index.json``, signature-checked against the pinned keys. RegistryError on any failure."""
        data = self._get_small("index.json")
        sig = self._get_small("index.json.sig")
        return verify_index(data, sig, self._keys)

    def latest_version(self, model: str) -> str:
        """The version ``index.json`` calls latest for ``model``."""
        index = self.fetch_index()
        entry = index.models.get(model)
        if entry is None:
            raise RegistryError(f"registry has no model {model!r} (it has: {', '.join(sorted(index.models)) or 'none'})")
        return entry.latest

    def fetch_manifest(self, model: str, version: str | None = None) -> Manifest:
        """Download ``<model>/<version>/manifest.json`` and its signature, verify the signature over
        the exact bytes with the pinned key(s), and only then parse it. ``version`` None: latest.

        Also refuses a validly signed manifest of *another* model or version served at this path
        (a replayed manifest). Returns the Manifest; RegistryError on any failure.
        """
        check_name("model", model)
        version = check_name("version", version or self.latest_version(model))
        base = f"{model}/{version}/"
        raw = self._get_small(base + "manifest.json")
        sig = self._get_small(base + "manifest.json.sig")
        key_id = verify_signature(raw, sig, self._keys)  # before any parsing
        manifest = parse_manifest(raw)
        if manifest.name != model or manifest.version != version:
            raise RegistryError(f"{base}manifest.json is signed but describes {manifest.name} "
                                f"{manifest.version}, not {model} {version}")
        self._fetched[(model, version)] = _Fetched(manifest, raw, sig, key_id)
        log_event(logger, "registry.manifest_verified", model=model, version=version, key_id=key_id,
                  variants=",".join(v.id for v in manifest.variants))
        return manifest

    # ------------------------------------------------------------------------------ selection

    def explain_variants(self, manifest: Manifest, probe: Probe | None = None) -> list[VariantChoice]:
        """Every variant of ``manifest`` with whether it can run here and why not."""
        p = probe or self.probe
        out = []
        for v in manifest.variants:
            ok, reason = compatible(v.requires.model_dump(), p, backend=v.backend)
            if ok and v.backend == "tensorrt":
                ok, reason = _tensorrt_precision_ok(v, p)
            if ok and not v.gate.passed:
                ok, reason = False, "did not pass the accuracy gate"
            if ok:
                why = refusal(proof_needed(v, manifest.fallback, p.cpu.isa_family), manifest.validation_set is not None)
                ok, reason = not why, why
            out.append(VariantChoice(v, ok, reason))
        return out

    def select_variants(self, manifest: Manifest, probe: Probe | None = None) -> list[Variant]:
        """The variants this device can run, fastest expected first, the fallback last.

        Expected speed from what was published: a GPU variant before any CPU variant (a GPU's FP32
        already outruns a CPU's INT8), then the published ``speedup_vs_fp32`` (higher first), then
        the median latency, then INT8 > FP8 > FP16 > BF16 > FP32. These figures come from the build
        machine; timing the candidates on this device is the caller's job (the service).
        """
        choices = self.explain_variants(manifest, probe)
        for c in choices:
            if not c.ok:
                log_event(logger, "registry.variant_skipped", variant=c.variant.id, reason=c.reason)
        ok = [c.variant for c in choices if c.ok]
        return sorted(ok, key=lambda v: _speed_key(v, manifest.fallback))

    # ------------------------------------------------------------------------------ download

    def download_file(self, rel: str, dest: Path, *, sha256: str, size: int) -> int:
        """Download registry file ``rel`` to ``dest``, resuming a ``dest.partial`` left by an earlier
        attempt (HTTP Range), retrying interrupted transfers; verify size and SHA-256; fsync; rename.

        Returns the bytes transferred. An already present ``dest`` with the right digest is kept
        (0 bytes). A digest mismatch deletes the partial file (a tampered or corrupted source must
        not be resumed) and raises RegistryError; so do HTTP errors and a full disk. A transfer
        still incomplete after ``retries`` attempts raises RegistryError and keeps the partial file
        so the next call resumes it.
        """
        dest = Path(dest)
        if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256:
            return 0
        partial = dest.with_name(dest.name + ".partial")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create {dest.parent}: {exc}") from exc
        moved = 0
        last = ""
        for attempt in range(1, self.retries + 1):
            self._check_deadline(rel, partial, size)
            try:
                moved += self._transfer(rel, partial, size)
                break
            except _Interrupted as exc:
                last = str(exc)
                have = partial.stat().st_size if partial.exists() else 0
                log_event(logger, "registry.download_interrupted", logging.WARNING, file=rel,
                          attempt=attempt, have=have, size=size, reason=last)
                if attempt < self.retries:
                    self.cancel.wait(min(self.retry_wait_s * (2 ** (attempt - 1)),
                                         max(0.0, self._deadline - time.monotonic())))
        else:
            have = partial.stat().st_size if partial.exists() else 0
            raise RegistryError(f"download of {rel} incomplete after {self.retries} attempt(s) "
                                f"({have} of {size} bytes kept; the next pull resumes): {last}")
        got = partial.stat().st_size
        if got != size:
            partial.unlink()
            raise RegistryError(f"{rel}: downloaded {got} bytes, the manifest says {size} (truncated or "
                                "padded file on the registry)")
        digest = sha256_file(partial)
        if digest != sha256:
            partial.unlink()
            raise RegistryError(f"{rel}: sha256 {digest} does not match the signed manifest's {sha256}: "
                                "the file on the registry was modified or corrupted; not installed")
        try:
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            raise RegistryError(f"cannot move {partial.name} into place: {exc}") from exc
        log_event(logger, "registry.downloaded", file=rel, size=size, transferred=moved)
        return moved

    def _transfer(self, rel: str, partial: Path, size: int) -> int:
        """One attempt: append the missing tail of ``rel`` to ``partial``. Returns bytes written."""
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:  # a bigger partial cannot be a prefix of this file
            partial.unlink()
            have = 0
        if have == size:
            return 0
        if self.url.startswith("file:"):
            return self._copy_local(rel, partial, have, size)
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = self._open(rel, headers)
        except _Interrupted as exc:
            if exc.status == 416:
                partial.unlink(missing_ok=True)  # not a prefix of the file: start over next attempt
            raise
        with resp:
            status = getattr(resp, "status", 200)
            mode = "ab"
            if have and status == 206:
                start = _content_range_start(resp.headers.get("Content-Range", ""))
                if start != have:
                    raise RegistryError(f"{rel}: asked for bytes from {have}, server sent from {start}")
            elif status == 200:
                have, mode = 0, "wb"  # server ignored Range (or none asked): start over
            else:
                raise RegistryError(f"{rel}: unexpected HTTP status {status}")
            want = size - have
            written = 0
            try:
                with open(partial, mode) as f:
                    read = getattr(resp, "read1", resp.read)  # read1: returns what arrived (a trickle too)
                    while written < want:
                        self._check_deadline(rel, partial, size)
                        try:
                            block = read(min(CHUNK, want - written))
                        except (http.client.HTTPException, OSError) as exc:
                            raise _Interrupted(f"connection lost after {have + written} bytes: {exc}") from exc
                        if not block:
                            break
                        _write(f, block)
                        written += len(block)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise _disk_error(exc, partial) from exc
            if written < want:
                raise _Interrupted(f"connection closed after {have + written} of {size} bytes")
            try:
                extra = resp.read(1)
            except (http.client.HTTPException, OSError):
                extra = b""  # the tail is complete; what happens after it does not matter
            if extra:
                partial.unlink()
                raise RegistryError(f"{rel}: the registry serves more than the {size} bytes the manifest says")
            return written

    def _check_deadline(self, rel: str, partial: Path, size: int) -> None:
        """RegistryError (not retried) once the install's deadline passed or ``cancel`` was set; the
        partial file stays for the next pull to resume."""
        over = time.monotonic() > self._deadline
        if over or self.cancel.is_set():
            have = partial.stat().st_size if partial.exists() else 0
            why = (f"passed registry.download_deadline_s ({self.deadline_s:g} s)" if over
                   else "cancelled (a rollback took precedence)")
            log_event(logger, "registry.download_abandoned", logging.WARNING, file=rel, have=have, size=size,
                      reason="deadline" if over else "cancelled")
            raise RegistryError(f"download of {rel} {why} with {have} of {size} bytes; the next pull resumes it")

    def _copy_local(self, rel: str, partial: Path, have: int, size: int) -> int:
        src = self._local_path(rel)
        written = 0
        try:
            with open(src, "rb") as fin:
                fin.seek(have)
                with open(partial, "ab") as f:
                    while True:
                        block = fin.read(CHUNK)
                        if not block:
                            break
                        _write(f, block)
                        written += len(block)
                        if have + written > size:
                            break
                    f.flush()
                    os.fsync(f.fileno())
        except FileNotFoundError as exc:
            raise RegistryError(f"registry: {src} does not exist") from exc
        except OSError as exc:
            raise _disk_error(exc, partial) from exc
        return written

    # ------------------------------------------------------------------------------- install

    def install(self, model: str, version: str, variants: Iterable[Variant | str], *,
                switch: bool = True) -> PullResult:
        """Download ``variants`` (plus the manifest's fallback, always) of ``model`` ``version`` into
        ``models/<model>/<version>.partial/``, verify everything, commit the folder, switch
        ``current`` to it and keep the old current as ``previous``.

        ``switch=False`` stops after the commit: ``current`` is left alone so the caller can
        self-test the installed version first and switch with ``store.activate`` (ModelUpdater);
        ``previous`` in the result is then the version that is still current.

        Uses the manifest from the last ``fetch_manifest`` of this version (fetched now if none).
        On any failure ``current`` is untouched and RegistryError says what failed; downloaded
        parts stay in the staging folder so a retry resumes them.
        """
        fetched = self._fetched.get((model, version))
        if fetched is None:
            self.fetch_manifest(model, version)
            fetched = self._fetched[(model, version)]
        manifest = fetched.manifest
        ids = [v if isinstance(v, str) else v.id for v in variants]
        if manifest.fallback not in ids:
            ids.append(manifest.fallback)  # the FP32 safety net travels with every install
        chosen = [manifest.variant(i) for i in dict.fromkeys(ids)]
        files = _files_of(chosen)
        family = self.probe.cpu.isa_family
        vset = manifest.validation_set
        if vset is not None and any(proof_needed(v, manifest.fallback, family).decision == "gate" for v in chosen):
            files[vset.file] = (vset.sha256, vset.size)  # the device gate runs on it at activation

        # downloading holds the download lock only: a rollback (the switch lock) is never kept
        # waiting by a slow registry; commit and switch take the switch lock briefly at the end
        self._deadline = time.monotonic() + self.deadline_s
        with self.store.lock(model, "download"):
            # files an installed copy of this version already has (verified when it was committed)
            final = self.store.version_dir(model, version)
            todo = {rel: spec for rel, spec in files.items()
                    if not ((final / rel).is_file() and (final / rel).stat().st_size == spec[1])}
            staging = self.store.begin(model, version)
            self._check_space(staging, todo)

            moved = 0
            try:
                for rel, (digest, size) in sorted(todo.items()):
                    dest = (staging / rel).resolve()
                    if not dest.is_relative_to(staging.resolve()):
                        raise RegistryError(f"manifest file path {rel!r} escapes the version folder")
                    moved += self.download_file(f"{model}/{version}/{rel}", dest, sha256=digest, size=size)
            finally:
                self._deadline = float("inf")

            with self.store.lock(model):
                installed = self.store.commit(model, version, todo.keys(), variants=[v.id for v in chosen],
                                              key_id=fetched.key_id, manifest_bytes=fetched.raw,
                                              signature=fetched.signature)
                if switch:
                    previous = self.store.activate(model, version)
                    self.store.prune(model)
                else:
                    previous = self.store.current_version(model)
        log_event(logger, "registry.installed", model=model, version=version,
                  variants=",".join(v.id for v in chosen), previous=previous or "", bytes=moved,
                  switched=switch)
        return PullResult(installed=installed, previous=previous, variants=tuple(v.id for v in chosen),
                          downloaded_bytes=moved)

    def _check_space(self, staging: Path, todo: dict[str, tuple[str, int]]) -> None:
        """Refuse to start when the download would leave less than ``min_free_mb`` free."""
        need = 0
        for rel, (_digest, size) in todo.items():
            partial = (staging / rel).with_name(Path(rel).name + ".partial")
            have = partial.stat().st_size if partial.is_file() else 0
            need += max(0, size - have)
        free = shutil.disk_usage(staging).free
        reserve = self.min_free_mb << 20
        if free - need < reserve:
            raise RegistryError(
                f"not enough disk space under {staging.parent}: the download needs {need >> 20} MB and "
                f"{self.min_free_mb} MB must stay free, {free >> 20} MB are free")

    def pull(self, model: str, version: str | None = None) -> PullResult:
        """fetch_manifest + select_variants + install: the whole update for one model.

        Raises RegistryError when nothing in the manifest can run here (not even the fallback).
        """
        manifest = self.fetch_manifest(model, version)
        chosen = self.select_variants(manifest)
        if not chosen:
            reasons = "; ".join(f"{c.variant.id}: {c.reason}" for c in self.explain_variants(manifest))
            raise RegistryError(f"{model} {manifest.version}: no variant can run on this device ({reasons})")
        return self.install(model, manifest.version, chosen)

    def rollback(self, model: str) -> str:
        """Switch ``model`` back to its previous version; returns that version (RegistryError if none)."""
        with self.store.lock(model):
            return self.store.rollback(model)


# ------------------------------------------------------------------------------------- helpers


def _content_range_start(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value)
    return int(m.group(1)) if m else None


def _disk_error(exc: OSError, partial: Path) -> RegistryError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RegistryError(f"disk full while writing {partial.name} ({exc.strerror}); "
                             "the installed model is untouched")
    return RegistryError(f"cannot write {partial}: {exc}")


def _files_of(variants: Sequence[Variant]) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, size) of every file the variants need (model files and self-test
    vectors). Several variants may share one file; one path with two digests is an error."""
    files: dict[str, tuple[str, int]] = {}
    for v in variants:
        entries = [(v.file, v.sha256, v.size)]
        if v.selftest is not None:
            entries.append((v.selftest.file, v.selftest.sha256, v.selftest.size))
        for rel, digest, size in entries:
            if rel in files and files[rel] != (digest, size):
                raise RegistryError(f"manifest lists {rel} twice with different digests")
            files[rel] = (digest, size)
    return files


def _tensorrt_precision_ok(v: Variant, p: Probe) -> tuple[bool, str]:
    """A TensorRT INT8/FP8 engine needs a GPU with that precision (belt and braces: the manifest's
    compute-capability range should already say so)."""
    gpus = p.nvidia.gpus
    if v.precision == "fp8" and not any(g.fp8 for g in gpus):
        have = ", ".join(g.compute_capability or "?" for g in gpus) or "no GPU"
        return False, f"FP8 needs compute capability >= 8.9 (found {have})"
    if v.precision == "int8" and not any(g.int8 for g in gpus):
        return False, "INT8 TensorRT needs compute capability >= 6.1"
    return True, ""


def _speed_key(v: Variant, fallback: str) -> tuple[int, int, float, float, int, str]:
    gpu = 0 if (v.backend == "tensorrt" or v.requires.gpu) else 1
    speedup = v.bench.speedup_vs_fp32 if v.bench and v.bench.speedup_vs_fp32 else 0.0
    latency = v.bench.latency_ms_median if v.bench and v.bench.latency_ms_median else float("inf")
    return (1 if v.id == fallback else 0, gpu, -speedup, latency, _PRECISION_ORDER.get(v.precision, 9), v.id)
