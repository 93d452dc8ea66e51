"""Pause CPython's cyclic garbage collector while a big answer is parsed and folded.

Why: a fleet listing or a Prometheus answer parses into millions of small dicts, lists and strings
(42,000 pods are 41 MB of JSON, about 2.5 million objects). The cyclic collector is triggered by
allocation counts (every 700 net allocations a young collection, and a full one whenever the
survivors grow by a quarter), and each full collection walks every live object again: measured on
the sandbox's 10,000-node fleet, `orjson.loads` of the pod listing took 0.9-1.3 s with the collector
on and 0.13 s with it off, and the whole sweep's own CPU went from 4.1 s to 1.8 s
(`benchmarks/RESULTS.md`, gpu-sweep sixth pass).

Safe: what is built here is acyclic (parsed JSON, dataclasses holding it), so reference counting
frees all of it as usual and memory does not grow while the collector waits; the Python docs allow
`gc.disable()` "if you are sure your program does not create reference cycles"
(https://docs.python.org/3/library/gc.html). The collector is enabled again when the last
overlapping pause ends, and any cycle made meanwhile (an exception's traceback) is collected then,
at the collector's next threshold.

Pauses nest and overlap across threads (the sweep's listing, its Prometheus reads and the flow's
tasks run in threads of one process): a counter under a lock, the collector is disabled by the first
pause and enabled by the last one, and only when it was enabled before.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic collector off for the block (and for any pause overlapping it)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
