"""The memory allocator the service runs with (``MALLOC``): tcmalloc when it is installed.

Why: glibc's malloc gives blocks above its mmap threshold (at most 32 MiB) straight back to the
kernel when they are freed. A ResNet-18 forward at batch 16 allocates activations that large
on every call, so each forward maps fresh zeroed pages again: 17,750-28,977 minor page faults
and 42-58 ms of system time per forward on 2 cores. Under tcmalloc the same forward took
0 faults and 31.8-34.6 instead of 34.5-41.6 ms per image; in alternating rounds of the
benchmark the ResNet-18 LIMIT went from 48.0 to 54.4 img/s, and the service at C=32 from 47.6
to 51.2 img/s with p99 1152 -> 891 ms (bench/NOTES.md: what was changed). jemalloc with its
default decay was worse than glibc. PyTorch's CPU performance guide recommends tcmalloc too.

An allocator is chosen when a process starts (``LD_PRELOAD``), before Python runs, so
``python -m service`` executes itself again once with the library preloaded (``exec``: the
process id stays, so PID 1 in a container still receives SIGTERM). ``MALLOC=auto`` (default)
falls back to the system allocator where the library is missing (``apt-get install
libtcmalloc-minimal4``; the Docker image has it); ``MALLOC=tcmalloc`` refuses to start without
it; ``MALLOC=system`` never preloads. The benchmark's LIMIT uses the same function, so the
service and the LIMIT always run on the same allocator.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("service.allocator")

TCMALLOC = "tcmalloc_minimal"  # the library without the debugging/profiling hooks
MARKER = "IMGSERVE_MALLOC_EXEC"  # set on the re-executed process: never exec twice


class AllocatorMissing(RuntimeError):
    """``MALLOC=tcmalloc`` but the library is not installed."""


def find_tcmalloc() -> str | None:
    """The installed tcmalloc's file name (``libtcmalloc_minimal.so.4``), or None."""
    return ctypes.util.find_library(TCMALLOC)


def preload_env(
    mode: str, env: Mapping[str, str], find: Callable[[], str | None] = find_tcmalloc
) -> dict[str, str] | None:
    """The environment to execute the process again with, or None to go on as it is.

    None when ``mode`` is ``system``, when tcmalloc is already preloaded (by us or by the
    user), after one re-execution, or (``auto``) when tcmalloc is not installed.
    """
    if mode == "system" or env.get(MARKER) or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return None
    library = find()
    if library is None:
        if mode == "tcmalloc":
            raise AllocatorMissing(
                "MALLOC=tcmalloc but libtcmalloc_minimal is not installed "
                "(apt-get install libtcmalloc-minimal4), or set MALLOC=auto"
            )
        return None
    preload = " ".join(part for part in (library, env.get("LD_PRELOAD", "")) if part)
    return {**env, "LD_PRELOAD": preload, MARKER: library}


def exec_with_allocator(mode: str) -> None:
    """Execute this process again with tcmalloc preloaded when ``preload_env`` says so.

    Returns only when nothing is to be done or the exec failed (then the system allocator
    serves, with a warning).
    """
    env = preload_env(mode, os.environ)
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as exc:
        log.warning("could not restart with %s preloaded (%s); using the system allocator",
                    env[MARKER], exc)  # fmt: skip


def active_allocator() -> str:
    """``tcmalloc`` when it is mapped into this process, else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "tcmalloc" if "libtcmalloc" in maps else "system"
