"""Shared benchmark plumbing: timing, medians, peak RSS, one JSON line per measurement."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable


def timed(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of `fn` over `repeat` runs (after `warmup` runs), and its last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB: Linux's `VmHWM` (/proc/self/status), since
    `getrusage`'s ru_maxrss keeps the parent's peak across fork and exec, so a child started from a big
    process (pytest) would report its parent's; ru_maxrss (KiB on Linux) where there is no /proc."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def emit(bench: str, size: int, **fields: Any) -> dict[str, Any]:
    """Print one JSON line: bench, size, seconds, baseline_seconds, ratio (baseline/project), ..."""
    record: dict[str, Any] = {"bench": bench, "size": size}
    for key, value in fields.items():
        if value is None:
            continue
        record[key] = round(value, 4) if isinstance(value, float) else value
    if "seconds" in record and "baseline_seconds" in record and "ratio" not in record and record["seconds"]:
        record["ratio"] = round(record["baseline_seconds"] / record["seconds"], 2)
    print(json.dumps(record), flush=True)
    sys.stdout.flush()
    return record
