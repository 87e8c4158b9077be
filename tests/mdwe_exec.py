"""Run a command under systemd 252's ``MemoryDenyWriteExecute=yes`` filter, without systemd.

``python tests/mdwe_exec.py CMD ARGS...`` installs the seccomp filter systemd 252 installs for
``MemoryDenyWriteExecute=yes`` (src/shared/seccomp-util.c, seccomp_memory_deny_write_execute) and
execs CMD under it; the filter and no_new_privs persist across exec and into every child:

* ``mmap``/``mmap2`` with both PROT_WRITE and PROT_EXEC -> EPERM
* ``mprotect``/``pkey_mprotect`` adding PROT_EXEC -> EPERM
* ``shmat`` with SHM_EXEC -> EPERM

through libseccomp (the library systemd uses, a dependency of the systemd package) by ctypes.
Exit 125 when the filter could not be installed (no libseccomp, not Linux).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_EPERM = 0x00050000 | 1
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def install_filter() -> None:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ScmpArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    rules = [("mmap", 2, PROT_WRITE | PROT_EXEC), ("mmap2", 2, PROT_WRITE | PROT_EXEC),
             ("mprotect", 2, PROT_EXEC), ("pkey_mprotect", 2, PROT_EXEC), ("shmat", 2, SHM_EXEC)]
    for syscall, arg, mask in rules:
        nr = lib.seccomp_syscall_resolve_name(syscall.encode())
        if nr < 0:
            continue  # not on this architecture (mmap2 on 64-bit, shmat on some)
        cmp = ScmpArgCmp(arg, SCMP_CMP_MASKED_EQ, mask, mask)
        rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_EPERM, nr, 1, ctypes.byref(cmp))
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add({syscall})")
    rc = lib.seccomp_load(ctx)  # libseccomp sets no_new_privs first, as systemd's NoNewPrivileges would
    if rc < 0:
        raise OSError(-rc, "seccomp_load")


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        install_filter()
    except OSError as exc:
        print(f"mdwe_exec: cannot install the filter: {exc}", file=sys.stderr)
        return 125
    os.execvp(sys.argv[1], sys.argv[1:])
    return 127  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    sys.exit(main())
