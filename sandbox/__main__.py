"""python -m sandbox up [--nodes N] | down | status | fault KIND [--node N --gpu G --value V] | heal | reset

Starts a stand-in GPU platform on 127.0.0.1 and writes `kubeconfig` and `platform.yaml`
into the state directory (default sandbox/.state/; `--state-dir` or SANDBOX_STATE_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sandbox.platform import DEFAULT_STATE_DIR, Sandbox, SandboxError

FAULTS = ["node-not-ready", "xid", "gpu-missing", "hot-gpu", "idle-gpu", "remapped-rows", "row-remap-pending",
          "row-remap-failure", "exporter-down", "exporter-restart", "api-down", "prometheus-down"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("SANDBOX_STATE_DIR", DEFAULT_STATE_DIR)))
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the sandbox platform")
    up.add_argument("--nodes", type=int, default=50, help="total nodes (control plane + monitor + GPU nodes)")
    up.add_argument("--gpu-nodes", type=int, default=None, help="GPU nodes (overrides --nodes)")
    up.add_argument("--profile", choices=["full", "sweep"], default=None,
                    help="dcgm counters served: all defaults, or the sweep's (default: full up to 500 GPU nodes)")
    up.add_argument("--no-wait", action="store_true", help="do not wait for Prometheus' first scrape")
    sub.add_parser("down", help="stop every process the sandbox started")
    sub.add_parser("status", help="print URLs, files and processes")
    fault = sub.add_parser("fault", help="inject a fault")
    fault.add_argument("kind", choices=FAULTS)
    fault.add_argument("--node")
    fault.add_argument("--gpu", type=int)
    fault.add_argument("--value", type=float)
    sub.add_parser("heal", help="undo every injected fault")
    sub.add_parser("reset", help="heal and restore all Kubernetes objects to the seeded state")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            if args.nodes < 2 and args.gpu_nodes is None:
                parser.error("--nodes: expected an integer >= 2")
            start = time.monotonic()
            sb = Sandbox(state_dir=args.state_dir, nodes=args.nodes, gpu_nodes=args.gpu_nodes)
            gpu_count = args.gpu_nodes
            if args.profile:
                sb.profile = args.profile
            elif (gpu_count or args.nodes) > 500:
                sb.profile = "sweep"
            sb.up()
            if not args.no_wait:
                from sandbox.prometheus import wait_for_first_scrape

                wait_for_first_scrape(sb)
            print(f"sandbox up in {time.monotonic() - start:.1f}s: {sb.gpu_nodes} GPU nodes")
            _print_status(sb)
        elif args.command == "down":
            try:
                sb = Sandbox.load(args.state_dir)
            except SandboxError:
                print("no sandbox running")
                return 0
            stopped = sb.down()
            print(f"sandbox down: stopped {len(stopped)} process(es) {stopped}")
        elif args.command == "status":
            _print_status(Sandbox.load(args.state_dir))
        elif args.command == "fault":
            print(json.dumps(Sandbox.load(args.state_dir).fault(args.kind, args.node, args.gpu, args.value)))
        elif args.command == "heal":
            Sandbox.load(args.state_dir).heal()
            print("healed")
        elif args.command == "reset":
            Sandbox.load(args.state_dir).reset()
            print("reset")
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_status(sb: Sandbox) -> None:
    print(f"  kubeconfig:    {sb.kubeconfig}")
    print(f"  platform.yaml: {sb.platform_yaml}")
    if sb.secrets:
        print(f"  secrets:       {sb.state_dir / 'secrets'}/ ({', '.join(sorted(sb.secrets))})")
    for name, url in sb.urls.items():
        print(f"  {name + ':':14} {url}")
    for name, info in sb.processes.items():
        print(f"  process {name}: pid {info['pid']}")


if __name__ == "__main__":
    sys.exit(main())
