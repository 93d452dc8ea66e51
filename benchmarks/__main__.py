"""python -m benchmarks NAME [--size N] [--repeat R]

Each benchmark measures the project and a baseline side by side in the same run and prints one
JSON line per measurement: {"bench", "size", "seconds", "baseline_seconds", "ratio", "peak_rss_mb",
"round_trips"} (fields that do not apply are omitted). `ratio` is baseline/project: > 1 is faster.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under benchmarks/ exposing run(size: int, repeat: int) -> None
BENCHMARKS = {
    "inventory": "benchmarks.inventory",
    "gpu-sweep": "benchmarks.gpu_sweep",
    "backup-stream": "benchmarks.backup_stream",
    "cert-scan": "benchmarks.cert_scan",
    "image-audit": "benchmarks.image_audit",
    "etcd-snapshot": "benchmarks.etcd_snapshot",
    "operation-steps": "benchmarks.operation_steps",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--size", type=int, default=None, help="benchmark size (its own default when omitted)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions per measurement (median)")
    args, extra = parser.parse_known_args(argv)
    module = importlib.import_module(BENCHMARKS[args.name])
    if extra:  # a benchmark's own options (cert-scan: --endpoints N, ...)
        module.run(size=args.size, repeat=args.repeat, extra=extra)
    else:
        module.run(size=args.size, repeat=args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
