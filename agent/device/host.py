"""The host around the processors: memory, free disk under the state directory, the OS.

``probe_memory() -> MemoryInfo``, ``probe_disk(state_dir) -> DiskInfo`` and
``probe_os(sources) -> OsInfo``: cheap reads (psutil, ``statvfs``, ``/etc/os-release``) that never
raise for a missing file.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.device.sources import ProbeSources, read_text


@dataclass(frozen=True)
class MemoryInfo:
    total_mb: int
    available_mb: int


@dataclass(frozen=True)
class DiskInfo:
    """Space on the file system holding ``path`` (the state directory, or its nearest existing parent)."""

    path: str
    total_mb: int
    free_mb: int


@dataclass(frozen=True)
class OsInfo:
    system: str
    release: str
    distro: str
    python: str


def probe_memory() -> MemoryInfo:
    """System RAM: total and available now."""
    vm = psutil.virtual_memory()
    return MemoryInfo(total_mb=vm.total // 2**20, available_mb=vm.available // 2**20)


def probe_os(sources: ProbeSources) -> OsInfo:
    distro = ""
    for line in read_text(sources.os_release).splitlines():
        if line.startswith("PRETTY_NAME="):
            distro = line.partition("=")[2].strip().strip('"')
    return OsInfo(system=platform.system(), release=platform.release(), distro=distro,
                  python=platform.python_version())


def probe_disk(state_dir: Path) -> DiskInfo:
    """Free space where the state directory lives (its nearest existing ancestor if not created yet)."""
    path = Path(state_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    return DiskInfo(path=str(Path(state_dir)), total_mb=usage.total // 2**20, free_mb=usage.free // 2**20)
