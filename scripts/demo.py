"""The demo: a local Prefect server, the sandbox platform, every deployment, and real flow runs.

    python -m scripts.demo          # keeps the UI up until Ctrl-C
    python -m scripts.demo --once   # exits after the runs: 0 if every run completed, else 1

Everything lives under .demo/ (Prefect's SQLite database, the sandbox state) and listens on
127.0.0.1 only. `make demo` / `make demo-once` install everything first.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"
POOL = "ai-platform-ops-demo"

# (deployment "flow-name/deployment-name", parameters). Every run must end Completed.
# The platform parameter comes from prefect.yaml ({{ $AI_PLATFORM_OPS_PLATFORM }} = sandbox).
DEMO_RUNS: list[tuple[str, dict]] = [
    ("cluster-inventory/cluster-inventory", {}),
    ("gpu-monitoring-sweep/gpu-monitoring-sweep", {"window": "1m"}),  # dry run: findings + plan, no change
    ("gitlab-backup/gitlab-backup", {}),
    ("gitlab-config-backup/gitlab-config-backup", {}),
    ("gitlab-restore-drill/gitlab-restore-drill", {}),  # restores the backup above on the scratch host
]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class Demo:
    def __init__(self, port: int, nodes: int):
        self.port = port
        self.nodes = nodes
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.ui_url = f"http://127.0.0.1:{port}"
        self.procs: list[subprocess.Popen] = []
        self.sandbox = None
        self.env = dict(os.environ)
        self.env.update({
            "PREFECT_HOME": str(DEMO / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": self.api_url,
            "AI_PLATFORM_OPS_HOME": str(REPO),
            "AI_PLATFORM_OPS_POOL": POOL,
            "AI_PLATFORM_OPS_PLATFORM": "sandbox",
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        })

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        logf = open(DEMO / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env=self.env, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _run(self, argv: list[str], timeout: int = 300) -> str:
        out = subprocess.run(argv, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise SystemExit(f"[demo] command failed ({out.returncode}): {' '.join(argv)}\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def start_server(self) -> None:
        log(f"starting Prefect server on {self.ui_url} (SQLite under {DEMO / 'prefect'})")
        proc = self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start",
                                              "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"[demo] Prefect server exited; see {DEMO / 'prefect-server.log'}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("[demo] Prefect server did not become healthy within 180 s")

    def start_sandbox(self) -> None:
        from sandbox.platform import Sandbox
        from sandbox.prometheus import wait_for_first_scrape

        log(f"starting the sandbox platform ({self.nodes} nodes) on 127.0.0.1")
        state = DEMO / "sandbox"
        try:
            Sandbox.load(state).down()
        except Exception:  # noqa: BLE001 - no earlier sandbox to stop
            pass
        self.sandbox = Sandbox(state_dir=state, nodes=self.nodes).up()
        wait_for_first_scrape(self.sandbox)
        # secrets the sandbox components created (tokens, keys) for block loading and the worker
        self.env.update({k: v for k, v in os.environ.items() if k.startswith("SANDBOX_")})
        env_file = state / "env"
        if env_file.exists():
            for line in env_file.read_text().splitlines():
                if "=" in line:
                    key, value = line.split("=", 1)
                    self.env[key] = value
        log(f"sandbox up: kubeconfig {self.sandbox.kubeconfig}")

    def load_and_deploy(self) -> None:
        log("loading blocks from the sandbox platform.yaml")
        print(self._run([sys.executable, "-m", "blocks.load", str(self.sandbox.platform_yaml)]), end="")
        self._run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite"])
        log("prefect deploy --all")
        self._run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], timeout=600)
        log(f"starting a process worker on pool {POOL}")
        self._spawn("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                               "--limit", "4"])

    def run_flows(self) -> bool:
        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("PREFECT_", "SANDBOX_"))})
        from prefect.deployments import run_deployment

        ok = True
        results = []
        for name, params in DEMO_RUNS:
            log(f"running {name} {params or ''}")
            run = run_deployment(name, parameters=params, timeout=600)
            state = run.state
            results.append((name, run, state))
            ok &= bool(state and state.is_completed())
        print()
        log(f"Prefect UI: {self.ui_url}")
        for name, run, state in results:
            print(f"  {name:55} {state.name if state else 'NO STATE':10} {self.ui_url}/runs/flow-run/{run.id}")
        print()
        return ok

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if self.sandbox is not None:
            self.sandbox.down()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after the runs (non-zero if any did not complete)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PREFECT_PORT", "4200")))
    parser.add_argument("--nodes", type=int, default=50)
    args = parser.parse_args()
    DEMO.mkdir(exist_ok=True)
    demo = Demo(args.port, args.nodes)
    try:
        demo.start_server()
        demo.start_sandbox()
        demo.load_and_deploy()
        ok = demo.run_flows()
        if args.once:
            log("all runs completed" if ok else "some runs did NOT complete")
            return 0 if ok else 1
        log(f"UI up at {demo.ui_url}; press Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        log("stopping worker, server and sandbox")
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
