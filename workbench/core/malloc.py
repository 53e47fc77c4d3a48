"""The C allocator's policy for freed memory, set once per process by the entry points that train, sample or evaluate
(``train.train``, ``evaluate.evaluate_runs``, the command line), never by importing ``workbench``.

By default glibc's ``malloc`` serves every block above 128 KiB (a threshold it raises up to 32 MiB) by a fresh
``mmap`` and hands it back to the kernel on ``free``; a tensor of that size allocated again is faulted back in page
by page, each page zeroed by the kernel. Training and sampling allocate and free the same large activations,
logits and caches at every step, so on a CPU a large share of the time went to page faults: a DPO step of 4
pairs of <= 192 tokens on the embedded model spent 41 s of system time against 73 s of user time over six steps,
with 10 million minor page faults (2 cores of an AMD EPYC with AVX512-BF16). Keeping freed memory in the
process (no ``mmap`` below 2 GiB, no trimming) removed 84 % of those faults and made the steps 1.7-1.8x faster
(benchmarks/bench_malloc.py measures it side by side). The cost: a process keeps its peak memory until it exits.

Only glibc is tuned (Linux); elsewhere, or with ``WORKBENCH_MALLOC=system``, nothing changes. Each run's
``env.json`` records what was set."""

from __future__ import annotations

import ctypes
import ctypes.util

from . import settings

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# the largest value mallopt's int argument takes: blocks up to 2 GiB come from the heap and are reused
KEEP_BELOW = 2**31 - 1

_state: dict = {"policy": "not set"}


def keep_freed_memory() -> dict:
    """Tell glibc to serve blocks below 2 GiB from the heap and never return freed heap memory to the kernel
    (``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD)``). Idempotent. Returns what is in effect, as
    recorded in env.json: {"policy": "keep freed memory" | "system" | "system (reason)", ...}."""
    if _state["policy"] != "not set":
        return dict(_state)
    if (settings.get("WORKBENCH_MALLOC") or "").lower() == "system":
        _state.update(policy="system (WORKBENCH_MALLOC=system)")
        return dict(_state)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): its allocator is left as it is
        _state.update(policy="system (not glibc)")
        return dict(_state)
    version.restype = ctypes.c_char_p
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BELOW) == 1
    _state.update(policy="keep freed memory" if ok else "system (mallopt refused)",
                  glibc=version().decode(), mmap_threshold=KEEP_BELOW if ok else None,
                  trim_threshold=KEEP_BELOW if ok else None)
    return dict(_state)


def policy() -> dict:
    """What ``keep_freed_memory`` set in this process (for env.json)."""
    return dict(_state)
