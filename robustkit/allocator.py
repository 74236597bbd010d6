"""The C allocator's thresholds for a CPU run (torch-free; Linux with glibc only).

An attack allocates and frees the same activation buffers at every step. glibc serves blocks
above its mmap threshold (128 KiB at first) with fresh ``mmap`` calls and hands the top of the
heap back once more than its trim threshold (128 KiB) is free there, so every step pays page
faults to get the memory back from the kernel. On the PGD-AT CNN, APGD-40 and Square-300 on 180
images (one thread, same load) made 3.8 million minor page faults and spent 5.3–5.6 s of their
17 s of CPU time in the kernel; with the thresholds below, 28 thousand faults, 0.05 s in the
kernel, and a quarter less wall time (22.5–23.3 s → 17.0–17.3 s), the same results.

:func:`tune_allocator` raises both thresholds for the rest of the process: blocks up to 32 MiB
(glibc's largest mmap threshold on 64-bit systems) come from the heap, and up to 1 GiB of free
heap is kept for reuse, so the process holds on to its peak memory until it exits. The CLI
calls it at start; a Python user may call it too. It leaves the allocator alone where glibc is
absent, where the user set either threshold through glibc's environment variables, or where
``ROBUSTKIT_ALLOCATOR=default``. :func:`allocator_description` says which of these holds, for
the manifest: the thresholds change a run's speed, never its numbers.

glibc's own thresholds move: freeing an mmapped block raises the mmap threshold to its size, so
an untuned process may fault as a tuned one does or three times as often, depending on which
block happened to be freed first (158k against 394k faults for the same CLI run, seen here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's ``mallopt`` parameters (``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024
#: Set to ``default`` to keep glibc's own thresholds.
ALLOCATOR_ENV = "ROBUSTKIT_ALLOCATOR"
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
#: Whether :func:`tune_allocator` has raised the thresholds in this process.
_raised = False


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); True when set."""
    if os.environ.get(ALLOCATOR_ENV) == "default" or any(v in os.environ for v in _GLIBC_ENV):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    global _raised
    _raised = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _raised


def allocator_description() -> str:
    """The C allocator's thresholds this process runs with, as the manifest records them."""
    if _raised:
        return (f"glibc, mmap threshold {MMAP_THRESHOLD >> 20} MiB and trim threshold "
                f"{TRIM_THRESHOLD >> 30} GiB (robustkit.allocator)")
    named = [v for v in _GLIBC_ENV if v in os.environ]
    if named:
        return "the user's " + ", ".join(f"{v}={os.environ[v]}" for v in named)
    if os.environ.get(ALLOCATOR_ENV) == "default":
        return f"the C library's own thresholds ({ALLOCATOR_ENV}=default)"
    return "the C library's own thresholds"
