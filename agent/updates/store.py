"""Installed models on disk: versioned folders, an atomic ``current`` switch, and rollback.

Layout under the state directory::

    models/<model>/
        <version>/                 one installed version (read-only once committed)
            manifest.json          the signed manifest, exact bytes as downloaded
            manifest.json.sig      its Ed25519 signature
            <variant files>        paths as in the manifest (``file`` / ``selftest.file``)
            installed.json         which variants were installed, when, verified by which key
        <version>.partial/         an install in progress (kept across restarts so downloads resume)
        current -> <version>       the version the agent runs (relative symlink)
        previous -> <version>      the version before it, kept for rollback

Why this shape: a committed version folder is never modified in place except by *adding* new files
under new names (installing more variants of the same version), so a worker that has a model open
is never disturbed; ``current`` is switched by creating a temporary symlink and ``os.replace``-ing
it over the old one, which is atomic on POSIX: after a crash it points at the old or the new
version, never at nothing. Everything written is fsynced, and so is each directory entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.core.errors import RegistryError
from agent.core.log import log_event
from agent.core.util import PRIVATE_FILE, atomic_write, fsync_dir, fsync_file

logger = logging.getLogger(__name__)

CURRENT = "current"
PREVIOUS = "previous"
PARTIAL_SUFFIX = ".partial"
INSTALLED_FILE = "installed.json"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.json.sig"

#: per-model update bookkeeping (highest version activated, versions rejected); see ModelUpdater
UPDATES_FILE = "updates.json"

# versions and model names become path components: keep them boring
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a version string: dotted numeric parts compare as numbers (1.10 > 1.9).

    The same rule ``edge-deploy publish`` uses to pick an index's ``latest``, so the agent and the
    publisher agree on which of two versions is newer.
    """
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version))


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe single path component (model name, version); else RegistryError."""
    if not _NAME.match(value) or value.endswith(PARTIAL_SUFFIX) or value in {CURRENT, PREVIOUS} or ".." in value:
        raise RegistryError(f"{kind} {value!r} is not a safe name (letters, digits, '.', '_', '+', '-')")
    return value


def write_atomic(path: Path, data: bytes) -> None:
    """``util.atomic_write`` with the registry's error: a failed write names the file."""
    try:
        atomic_write(path, data, mode=PRIVATE_FILE)
    except OSError as exc:
        raise RegistryError(f"cannot write {path}: {exc}") from exc


@dataclass(frozen=True)
class UpdateState:
    """``models/<model>/updates.json``: the ``highest`` version ever activated here (a lower one
    offered later is a downgrade) and the versions automatic polls must not reinstall, with why."""

    highest: str | None = None
    rejected: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstalledVersion:
    """One committed version folder. ``variants``: ids installed; ``key_id``: the signing key that
    verified its manifest; ``installed_at``: epoch seconds."""

    model: str
    version: str
    path: Path
    variants: tuple[str, ...]
    key_id: str
    installed_at: float

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def signature_path(self) -> Path:
        return self.path / SIGNATURE_FILE


class ModelStore:
    """The ``models/`` tree under a state directory (see the module docstring for the layout)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "models"

    # ------------------------------------------------------------------------------- reading

    def model_dir(self, model: str) -> Path:
        return self.root / check_name("model", model)

    def version_dir(self, model: str, version: str) -> Path:
        return self.model_dir(model) / check_name("version", version)

    def staging_dir(self, model: str, version: str) -> Path:
        return self.model_dir(model) / (check_name("version", version) + PARTIAL_SUFFIX)

    def _link(self, model: str, name: str) -> str | None:
        link = self.model_dir(model) / name
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"{link} is not a symlink ({exc}); fix or remove it by hand") from exc
        return Path(target).name

    def current_version(self, model: str) -> str | None:
        """The version ``current`` points at, or None when nothing is installed."""
        return self._link(model, CURRENT)

    def previous_version(self, model: str) -> str | None:
        """The version kept for rollback, or None."""
        return self._link(model, PREVIOUS)

    def versions(self, model: str) -> list[str]:
        """Committed versions on disk (sorted by name)."""
        d = self.model_dir(model)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir()
                      if p.is_dir() and not p.is_symlink() and not p.name.endswith(PARTIAL_SUFFIX)
                      and (p / INSTALLED_FILE).is_file())

    def models(self) -> list[str]:
        """Models with a ``current`` version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CURRENT).is_symlink())

    def installed(self, model: str, version: str | None = None) -> InstalledVersion | None:
        """The committed ``version`` (default: current) as recorded in its installed.json, or None."""
        version = version or self.current_version(model)
        if version is None:
            return None
        path = self.version_dir(model, version)
        try:
            doc = json.loads((path / INSTALLED_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path / INSTALLED_FILE} is unreadable: {exc}") from exc
        return InstalledVersion(model=model, version=version, path=path,
                                variants=tuple(doc.get("variants", ())), key_id=str(doc.get("key_id", "")),
                                installed_at=float(doc.get("installed_at", 0.0)))

    def current(self, model: str) -> InstalledVersion | None:
        """The installed version the agent should run, or None."""
        return self.installed(model)

    # ------------------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def lock(self, model: str, purpose: str = "switch") -> Iterator[None]:
        """Hold ``<model>/.lock`` (flock) to commit, switch or roll back (``purpose`` "switch"), or
        ``<model>/.download.lock`` to download into the staging folder ("download"): the daemon's
        poll and an operator's ``edge-agent pull`` must not interleave, and a slow download must not
        keep a rollback out. RegistryError when it is held elsewhere; the kernel drops the lock if
        the holder dies, so a crash never leaves it stuck."""
        mdir = self.model_dir(model)
        name = ".lock" if purpose == "switch" else f".{purpose}.lock"
        try:
            mdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(mdir / name, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        except OSError as exc:
            raise RegistryError(f"cannot create {mdir / '.lock'}: {exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                what = "install or rollback" if purpose == "switch" else purpose
                raise RegistryError(f"another {what} of {model} is in progress") from exc
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def begin(self, model: str, version: str) -> Path:
        """Create (or reuse, to resume downloads) ``<version>.partial/`` and return it."""
        staging = self.staging_dir(model, version)
        try:
            staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create {staging}: {exc}") from exc
        return staging

    def commit(self, model: str, version: str, files: Iterable[str], *, variants: Sequence[str],
               key_id: str, manifest_bytes: bytes, signature: bytes) -> InstalledVersion:
        """Turn the staged ``<version>.partial/`` into ``<version>/``.

        ``files``: relative paths (already downloaded and verified into the staging folder).
        Writes manifest.json, its signature and installed.json, fsyncs every file and directory,
        then renames the folder. If ``<version>/`` already exists (more variants of an installed
        version), new files are *added* to it one rename at a time and installed.json is replaced
        last; an existing file with other content is refused (the same signed version must not
        change). Returns the committed InstalledVersion.
        """
        staging = self.staging_dir(model, version)
        final = self.version_dir(model, version)
        rel_files = sorted(set(files))
        self._drop_strays(staging, set(rel_files))
        write_atomic(staging / MANIFEST_FILE, manifest_bytes)
        write_atomic(staging / SIGNATURE_FILE, signature)
        merged = set(variants)
        all_files = set(rel_files)
        if (final / INSTALLED_FILE).is_file():
            try:
                old_doc = json.loads((final / INSTALLED_FILE).read_text())
            except (OSError, ValueError) as exc:
                raise RegistryError(f"{final / INSTALLED_FILE} is unreadable: {exc}") from exc
            merged |= set(old_doc.get("variants", ()))
            all_files |= set(old_doc.get("files", ()))
        doc = {"model": model, "version": version, "variants": sorted(merged), "key_id": key_id,
               "installed_at": time.time(), "files": sorted(all_files)}
        write_atomic(staging / INSTALLED_FILE, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        try:
            for rel in rel_files:
                fsync_file(staging / rel)
            for d in sorted({(staging / rel).parent for rel in rel_files} | {staging}):
                fsync_dir(d)
            if not final.exists():
                os.rename(staging, final)
                fsync_dir(final.parent)
            else:
                self._merge_into(staging, final, rel_files)
        except OSError as exc:
            raise RegistryError(f"cannot commit {model} {version}: {exc}") from exc
        log_event(logger, "registry.committed", model=model, version=version, variants=",".join(sorted(merged)))
        installed = self.installed(model, version)
        assert installed is not None  # just written
        return installed

    @staticmethod
    def _drop_strays(staging: Path, keep: set[str]) -> None:
        """Remove leftovers of an earlier, abandoned attempt (``.partial`` downloads, files of
        variants no longer wanted) so only verified files reach the version folder."""
        for p in sorted(staging.rglob("*"), reverse=True):
            rel = p.relative_to(staging).as_posix()
            if p.is_file() and rel not in keep:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()

    def _merge_into(self, staging: Path, final: Path, rel_files: Sequence[str]) -> None:
        """Add the staged files to an existing version folder, never replacing a different file."""
        for name in (MANIFEST_FILE, SIGNATURE_FILE):
            if (final / name).exists() and not _same_content(staging / name, final / name):
                raise RegistryError(f"{final.name}/{name} differs from the installed one: the signed "
                                    "manifest of a published version must not change")
        for rel in rel_files:
            src, dst = staging / rel, final / rel
            if dst.exists():
                if not _same_content(src, dst):
                    raise RegistryError(
                        f"{final.name}/{rel} is already installed with other content: a published version "
                        "must not change; publish a new version instead")
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            fsync_dir(dst.parent)
        # installed.json last: it is what says the new variants are there
        os.replace(staging / INSTALLED_FILE, final / INSTALLED_FILE)
        fsync_dir(final)
        shutil.rmtree(staging)

    def _set_link(self, model: str, name: str, version: str | None) -> None:
        """Point ``<model>/<name>`` at ``version`` atomically (temp symlink + os.replace); None removes it."""
        mdir = self.model_dir(model)
        link = mdir / name
        if version is None:
            link.unlink(missing_ok=True)
            fsync_dir(mdir)
            return
        tmp = mdir / f".{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(check_name("version", version), tmp)  # relative: the tree can be moved
        os.replace(tmp, link)
        fsync_dir(mdir)

    def activate(self, model: str, version: str) -> str | None:
        """Make ``version`` current; the old current becomes ``previous``. Returns the old current.

        ``previous`` is switched first: a crash between the two leaves current unchanged and
        previous pointing at... the same old current, i.e. still consistent.
        """
        if not (self.version_dir(model, version) / INSTALLED_FILE).is_file():
            raise RegistryError(f"{model} {version} is not installed")
        old = self.current_version(model)
        try:
            if old is not None and old != version:
                self._set_link(model, PREVIOUS, old)
            self._set_link(model, CURRENT, version)
        except OSError as exc:
            raise RegistryError(f"cannot switch {model} to {version}: {exc}") from exc
        log_event(logger, "registry.activated", model=model, version=version, previous=old or "")
        return old

    def rollback(self, model: str) -> str:
        """Switch ``current`` back to ``previous`` (and ``previous`` to the version rolled back from,
        so a second rollback rolls forward). Returns the version now current.

        RegistryError when there is no previous version.
        """
        prev = self.previous_version(model)
        cur = self.current_version(model)
        if prev is None or not (self.version_dir(model, prev) / INSTALLED_FILE).is_file():
            raise RegistryError(f"{model}: no previous version to roll back to")
        try:
            if cur is not None:
                self._set_link(model, PREVIOUS, cur)
            self._set_link(model, CURRENT, prev)
        except OSError as exc:
            raise RegistryError(f"cannot roll {model} back to {prev}: {exc}") from exc
        log_event(logger, "registry.rolled_back", logging.WARNING, model=model, version=prev, from_version=cur or "")
        return prev

    def remove(self, model: str, version: str) -> None:
        """Delete an installed version; refused for the current one."""
        if version == self.current_version(model):
            raise RegistryError(f"{model} {version} is current; roll back or install another first")
        if version == self.previous_version(model):
            self._set_link(model, PREVIOUS, None)
        path = self.version_dir(model, version)
        if path.exists():
            shutil.rmtree(path)
            fsync_dir(path.parent)

    def prune(self, model: str) -> list[str]:
        """Delete committed versions other than current and previous; returns the removed ones.

        Stale ``.partial`` folders of other versions are removed too (their downloads are abandoned).
        """
        keep = {self.current_version(model), self.previous_version(model)}
        removed: list[str] = []
        d = self.model_dir(model)
        if not d.is_dir():
            return removed
        for p in d.iterdir():
            if p.is_symlink() or not p.is_dir() or p.name.startswith("."):
                continue
            name = p.name.removesuffix(PARTIAL_SUFFIX)
            if p.name.endswith(PARTIAL_SUFFIX) or name not in keep:
                shutil.rmtree(p)
                removed.append(p.name)
        if removed:
            fsync_dir(d)
            log_event(logger, "registry.pruned", model=model, removed=",".join(sorted(removed)))
        return sorted(removed)

    def update_state(self, model: str) -> UpdateState:
        """The model's update bookkeeping (``updates.json``); empty when none was written yet."""
        path = self.model_dir(model) / UPDATES_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return UpdateState()
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path} is unreadable: {exc}; fix or delete it") from exc
        highest = doc.get("highest") if isinstance(doc, dict) else None
        rejected = doc.get("rejected", {}) if isinstance(doc, dict) else None
        if (not isinstance(doc, dict) or not isinstance(highest, (str, type(None)))
                or not isinstance(rejected, dict)):
            raise RegistryError(f"{path} is not an updates record ({{\"highest\": ..., \"rejected\": {{...}}}}); "
                                "fix or delete it")
        return UpdateState(highest, {str(k): str(v) for k, v in rejected.items()})

    def write_update_state(self, model: str, state: UpdateState) -> None:
        """Replace ``updates.json`` atomically (it decides what a later poll may install)."""
        mdir = self.model_dir(model)
        try:
            mdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create {mdir}: {exc}") from exc
        doc = {"highest": state.highest, "rejected": dict(state.rejected)}
        write_atomic(mdir / UPDATES_FILE, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def _same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True
