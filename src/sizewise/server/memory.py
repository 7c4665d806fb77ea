"""Giving the host's memory back after a large transient allocation; keeping the collector off
the objects that live as long as the server.

CPython frees a large object (a 50 MB request body, its parsed string, a long token list) to
glibc's malloc, and glibc keeps the pages: allocations above its mmap threshold are unmapped when
freed, but the threshold adapts upwards (to 32 MiB on 64-bit) after the first such free, so later
ones land on the heap and stay resident once their neighbours pin it. `malloc_trim(0)` returns the
free pages of every arena to the kernel. Elsewhere (macOS, musl) there is nothing to call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

# A request whose body was at least this large is followed by a trim (in a worker thread: it
# walks every arena, ~1-10 ms).
TRIM_AFTER_BYTES = 1 << 20


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True when glibc released any."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def freeze_loaded_heap() -> None:
    """After the models are loaded: collect once, then move every object alive (torch, transformers,
    the models' modules and tokenizers: millions of objects) into the collector's permanent generation.
    A full collection otherwise walks them all, holding the GIL for 0.1-0.6 s on a loaded 2-core host,
    and came during request bursts, stalling the event loop (/health) and the engine's steps alike.
    Process-wide (the collector is): for the process that serves, not for a library caller's."""
    gc.collect()
    gc.freeze()
