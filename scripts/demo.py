"""The demo: a local Prefect server, the sandbox platform, every deployment, and real flow runs.

After the runs that must complete, it shows the interesting paths: an image-prune with dry_run=false
left Paused for approval in the UI; then three sandbox faults (a critical XID, a hot GPU, a node
NotReady), a GPU sweep that reports them with heatmap marks and a cordon plan (dry run), and a health
check below full marks that names the failing check. `--once` checks each of these.

    python -m scripts.demo          # keeps the UI up until Ctrl-C (or SIGTERM, SIGHUP)
    python -m scripts.demo --once   # exits after the runs: 0 if every run ended as expected, else 1
    python -m scripts.demo --stop   # stops what an earlier demo left running (make clean runs it)

Everything lives under .demo/ (Prefect's SQLite database, the sandbox state, logs) and listens on
127.0.0.1 only. `make demo` / `make demo-once` install everything first.

Stopping: every process the demo starts runs in a session of its own and is recorded in a pid
file under .demo/pids/ (pid, start time, argv) the moment it starts; the sandbox records its own
in .demo/sandbox/state.json. On Ctrl-C, SIGTERM or SIGHUP the demo stops them all (each whole
process group, and what the worker started), waits for them, and removes the records. A demo
killed with SIGKILL cannot: the next demo (or `make clean`) stops what the records name first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from sandbox._common import (
    STOP_SIGNALS,
    SandboxError,
    StopRequested,
    holding_stop_signals,
    on_stop_signal,
    port_in_use,
    process_record,
    read_secrets,
    spawn,
    stop_process,
    wait_for,
)
from scripts.automations import load_file
from scripts.prefect_server import (
    RunStateTimeout,
    run_artifacts,
    wait_for_state,
    wait_until_healthy,
)
from scripts.work_pools import LOCAL_POOL

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"
POOL = LOCAL_POOL  # the process pool `make work-pools` creates

# (deployment "flow-name/deployment-name", parameters). Every run must end Completed.
# The platform parameter comes from prefect.yaml ({{ $AI_PLATFORM_OPS_PLATFORM }} = sandbox).
DEMO_RUNS: list[tuple[str, dict]] = [
    ("cluster-inventory/cluster-inventory", {}),
    ("gitlab-backup/gitlab-backup", {}),
    ("gitlab-config-backup/gitlab-config-backup", {}),
    ("gitlab-restore-drill/gitlab-restore-drill", {}),  # restores the backup above on the scratch host
    # the sandbox's PKI holds an expired, a not-yet-valid, a wrong-SAN and a weak certificate on purpose:
    # the report shows them; `fail_on=never` keeps the demo's run Completed
    ("certificate-check/certificate-check", {"fail_on": "never"}),
    # dry run: the renewal plan per control-plane node, nothing changed
    ("renew-control-plane-certificates/renew-control-plane-certificates", {}),
    ("image-cleanup-audit/image-cleanup-audit", {}),  # unused images per node, disk vs GC/eviction, registry
    ("image-prune/image-prune", {}),  # dry run: the exact prune plan, nothing removed
    ("etcd-backup/etcd-backup", {}),  # the sandbox's real etcd: a verified snapshot per cluster, off-site
    ("etcd-restore-drill/etcd-restore-drill", {}),  # restores the snapshots above on the etcd scratch host
]


# The interesting paths, after the runs above: sandbox faults (`python -m sandbox fault KIND`), then a GPU
# sweep that finds them (findings, heatmap marks, a cordon plan: dry run), a health check below full marks
# naming the failing check, and one run left Paused for approval in the UI.
# (GPU node number, GPU, value): the GPU nodes of sandbox/cluster.py node_names, counted from 1
XID_NODE, XID_GPU, XID = 3, 2, 79  # a critical XID (79: fallen off the bus): a cordon
HOT_NODE, HOT_GPU, HOT_C = 6, 1, 93.0  # a hot GPU: a warning and a heatmap mark
NOT_READY_NODE = 9  # its kubelet stops posting status: the health check's `nodes` turns critical
SWEEP = ("gpu-monitoring-sweep/gpu-monitoring-sweep", {"window": "1m"})  # dry run: findings + plan, no change
HEALTH = ("platform-health-check/platform-health-check", {})
# dry_run=false: the audit, the exact prune plan, then a pause for approval (nothing is removed unless
# someone approves in the UI; `make demo` leaves it waiting)
APPROVAL = ("image-prune/image-prune", {"dry_run": False})


def log(msg: str) -> None:
    try:
        print(f"[demo] {msg}", flush=True)
    except OSError:  # the terminal went away (SIGHUP): stopping must go on
        pass


def _pid_files(home: Path) -> list[Path]:
    """The demo's pid files, the latest started first (the order to stop them in)."""
    files = list((home / "pids").glob("*.pid")) if (home / "pids").is_dir() else []
    return sorted(files, key=lambda f: json.loads(f.read_text()).get("seq", 0), reverse=True)


def stop_recorded(home: Path) -> list[str]:
    """Stop every process the pid files under `home` name (and their groups), then the sandbox the
    demo started there; returns what was running. A pid now used by another process is left alone."""
    from sandbox.platform import Sandbox

    stopped = []
    for pid_file in _pid_files(home):
        record = json.loads(pid_file.read_text())
        if stop_process(record["pid"], record.get("start"), timeout_s=10):
            stopped.append(f"{pid_file.stem} (pid {record['pid']})")
        pid_file.unlink()
    try:
        sandbox = Sandbox.load(home / "sandbox")
    except SandboxError:
        return stopped
    names = {info["pid"]: name for name, info in sandbox.processes.items()}
    stopped += [f"sandbox/{names[pid]} (pid {pid})" for pid in sandbox.down()]
    return stopped


class Demo:
    def __init__(self, home: Path, port: int, nodes: int):
        self.home = home
        self.port = port
        self.nodes = nodes
        self.api_url = f"http://127.0.0.1:{port}/api"
        self.ui_url = f"http://127.0.0.1:{port}"
        self.sandbox = None
        self._seq = 0
        self.env = dict(os.environ)
        self.env.update({
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": self.api_url,
            "AI_PLATFORM_OPS_HOME": str(REPO),
            "AI_PLATFORM_OPS_POOL": POOL,
            "AI_PLATFORM_OPS_PLATFORM": "sandbox",
            # the heartbeat the zombie automation expects (configs/prefect/automations.yaml settings)
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(load_file()[0]["heartbeat_s"]),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        })

    def prepare(self) -> None:
        """Stop this directory's leftovers, refuse a port someone else holds, start from a clean database."""
        self.home.mkdir(parents=True, exist_ok=True)
        leftovers = stop_recorded(self.home)
        if leftovers:
            log(f"stopped what an earlier demo left running: {', '.join(leftovers)}")
        if port_in_use(self.port):
            raise SystemExit(
                f"[demo] port {self.port} is taken by a program this demo did not start (its own leftovers "
                f"are stopped already). Stop that program, or run the demo on another port: "
                f"DEMO_PREFECT_PORT={self.port + 1} make demo")
        # A clean database for every demo, rather than marking the last demo's unfinished runs Crashed:
        # a demo stopped uncleanly can leave a run Running that holds a deployment's concurrency slot
        # (and slot leases, work-queue state, blocks of an older sandbox with other ports and tokens).
        # Everything in it is re-created by this demo anyway, so deleting it is both simpler and
        # complete, where cleaning up would have to know every kind of state a run can leave behind.
        shutil.rmtree(self.home / "prefect", ignore_errors=True)

    def _spawn(self, name: str, argv: list[str], log_mode: str = "ab") -> subprocess.Popen:
        """Start `argv` in its own session, logging to NAME.log, recorded in pids/NAME.pid before anything else."""
        logf = self.home / f"{name}.log"
        if log_mode == "wb":
            logf.write_bytes(b"")
        (self.home / "pids").mkdir(exist_ok=True)
        with holding_stop_signals():
            proc = spawn(argv, logf, env=self.env, cwd=REPO)
            self._seq += 1
            record = {**process_record(proc, argv, logf), "seq": self._seq}
            (self.home / "pids" / f"{name}.pid").write_text(json.dumps(record))
        return proc

    def _run(self, name: str, argv: list[str], timeout: int = 300) -> str:
        """Run a command to its end like `_spawn`'d ones (stoppable, recorded); its output, or SystemExit."""
        proc = self._spawn(name, argv, log_mode="wb")
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if proc.poll() is None:  # timed out, or a stop signal arrived while waiting
                stop_process(proc.pid, timeout_s=5)
            (self.home / "pids" / f"{name}.pid").unlink(missing_ok=True)
        output = (self.home / f"{name}.log").read_text(errors="replace")
        if code != 0:
            raise SystemExit(f"[demo] command failed ({'timed out' if code is None else code}): "
                             f"{' '.join(argv)}\n{output}")
        return output

    def start_server(self) -> None:
        log(f"starting Prefect server on {self.ui_url} (a fresh SQLite database under {self.home / 'prefect'})")
        proc = self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start",
                                              "--host", "127.0.0.1", "--port", str(self.port)])
        try:
            wait_until_healthy(self.api_url, proc, 180, log=self.home / "prefect-server.log")
        except SandboxError as e:
            raise SystemExit(f"[demo] {e}") from None

    def start_sandbox(self) -> None:
        from sandbox.platform import Sandbox
        from sandbox.prometheus import wait_for_first_scrape

        log(f"starting the sandbox platform ({self.nodes} nodes) on 127.0.0.1")
        state = self.home / "sandbox"
        self.sandbox = Sandbox(state_dir=state, nodes=self.nodes)
        self.sandbox.up()
        wait_for_first_scrape(self.sandbox)
        # the stand-in secrets the platform.yaml references as {env: NAME}, for blocks.load and the worker
        self.env.update(read_secrets(state))
        log(f"sandbox up: kubeconfig {self.sandbox.kubeconfig}")

    def load_and_deploy(self) -> None:
        log("loading blocks from the sandbox platform.yaml")
        print(self._run("blocks-load", [sys.executable, "-m", "blocks.load", str(self.sandbox.platform_yaml)]), end="")
        # both pools, as `make work-pools` creates them: the UI shows platform-k8s too (no worker polls it here)
        self._run("work-pool", [sys.executable, "-m", "scripts.work_pools", "create"])
        log("prefect deploy --all")
        self._run("deploy", [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], timeout=600)
        print(self._run("automations", [sys.executable, "-m", "scripts.automations", "apply", "--platform", "sandbox"]),
              end="")
        log(f"starting a process worker on pool {POOL}")
        self._spawn("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                               "--limit", "4"])

    def run_flows(self) -> bool:
        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("PREFECT_", "SANDBOX_"))})
        from prefect.deployments import run_deployment

        results = []  # (name, run, what was expected, problem or None, what it shows)
        for name, params in DEMO_RUNS + self.training_runs():
            log(f"running {name} {params or ''}")
            run = run_deployment(name, parameters=params, timeout=600)
            done = bool(run.state and run.state.is_completed())
            results.append((name, run, "Completed", None if done else "did not complete", run.state.message or ""))
        self.show_commit_statuses()
        results += self.interesting_paths()
        print()
        log(f"Prefect UI: {self.ui_url}")
        for name, run, expected, problem, shows in results:
            state = run.state.name if run.state else "NO STATE"
            print(f"  {name:55} {state:10} {'ok' if problem is None else 'NOT OK: ' + problem:12} "
                  f"{self.ui_url}/runs/flow-run/{run.id}")
            if expected != "Completed":
                print(f"  {'':55} expected: {expected}\n  {'':55} shows:    {shows}")
        print()
        return all(problem is None for _, _, _, problem, _ in results)

    def interesting_paths(self) -> list[tuple[str, Any, str, str | None, str]]:
        """A run left Paused for approval, then faults, a sweep that finds them and a health check that
        names them; each checked against what it must show."""
        from prefect.deployments import run_deployment

        out = []
        name, params = APPROVAL
        log(f"running {name} {params}: it pauses for approval, and is left waiting in the UI")
        run = run_deployment(name, parameters=params, timeout=0)
        try:
            run = wait_for_state(run.id, {"Paused", "Completed", "Failed", "Crashed", "Cancelled"}, 300)
        except RunStateTimeout as e:
            run = e.run  # shown below as not paused
        paused = run.state is not None and run.state.is_paused()
        out.append((name, run, "Paused, waiting for approval in the UI (Resume and answer the form)",
                    None if paused else "not paused", "the prune plan, and the approval form under Resume"))

        self.inject_faults()
        name, params = SWEEP
        log(f"running {name} {params}")
        run = run_deployment(name, parameters=params, timeout=600)
        expected = f"findings (critical XID {XID} on {self.gpu_node(XID_NODE)}), heatmap marks, a cordon plan"
        out.append((name, run, expected, *self.check_sweep(run)))
        name, params = HEALTH
        log(f"running {name}")
        run = run_deployment(name, parameters=params, timeout=600)
        out.append((name, run, "a grade below A, naming the critical check `nodes`", *self.check_health(run)))
        return out

    def gpu_node(self, number: int) -> str:
        """The sandbox's GPU node `number` (the last one on a smaller sandbox), named as the sandbox names it."""
        from sandbox.cluster import node_names

        gpus = node_names(self.sandbox.gpu_nodes, self.sandbox.extra.get("node_domain", ""))[2]
        return gpus[min(number, len(gpus)) - 1]

    def inject_faults(self) -> None:
        """Three sandbox faults, then wait until Prometheus has scraped the XID (the sweep reads it there)."""
        from tasks.prometheus import query_vector

        query = f"count(DCGM_FI_DEV_XID_ERRORS == {XID}) or vector(0)"  # the label layout does not matter
        with httpx.Client() as client:

            def xids() -> float:
                result, _ = query_vector(client, self.sandbox.urls["prometheus"], query, timeout_s=10)
                return float(result[0]["value"][1]) if result else 0.0

            before = xids()
            faults = [("xid", XID_NODE, XID_GPU, XID), ("hot-gpu", HOT_NODE, HOT_GPU, HOT_C),
                      ("node-not-ready", NOT_READY_NODE, None, None)]
            for kind, number, gpu, value in faults:
                node = self.gpu_node(number)
                applied = self.sandbox.fault(kind, node, gpu, value)
                log(f"fault injected: {kind} on {node}" + (f" GPU {gpu}" if gpu is not None else "")
                    + f" ({json.dumps(applied)})")
            try:
                wait_for(lambda: xids() > before, "the XID in Prometheus", 90)
            except SandboxError:
                log("Prometheus has not scraped the XID within 90 s: the sweep may not show it")

    def check_sweep(self, run: Any) -> tuple[str | None, str]:
        """(what is wrong or None, what the run shows)."""
        if not (run.state and run.state.is_completed()):
            return "did not complete", ""
        arts = {a.key: a.data for a in run_artifacts(run.id) if a.key}
        table = next((v for k, v in arts.items() if k.startswith("gpu-findings-")), None)
        summary = next((v for k, v in arts.items() if k.startswith("gpu-sweep-")), "")
        rows = json.loads(table) if isinstance(table, str) else table or []
        node = self.gpu_node(XID_NODE)
        kinds = sorted({f"{r.get('severity')} {r.get('finding')}" for r in rows})
        plan = summary.split("## Cordon", 1)[1].split("\n## ", 1)[0] if "## Cordon" in summary else ""
        cordon = sorted(set(re.findall(r"\*\*(\S+)\*\*: `", plan)))
        shows = f"{len(rows)} findings ({', '.join(kinds)}); cordon plan: {', '.join(cordon) or 'none'}"
        if not any(r.get("finding") == "critical-xid" and r.get("node") == node for r in rows):
            return f"no critical-xid finding on {node}", shows
        if node not in cordon:
            return f"no cordon plan naming {node}", shows
        if "![GPU fleet heatmap](data:image/png" not in summary:
            return "no heatmap", shows
        return None, shows + "; heatmap"

    def check_health(self, run: Any) -> tuple[str | None, str]:
        """(what is wrong or None, what the run shows)."""
        if not (run.state and run.state.is_completed()):
            return "did not complete", ""
        message = run.state.message or ""  # "grade C (72/100); critical: nodes, certificates"
        if not message.startswith("grade ") or message.startswith("grade A"):
            return "not below full marks", message
        if "nodes" not in message.partition("critical: ")[2].split(", "):
            return "does not name the `nodes` check", message
        return None, message

    def training_runs(self) -> list[tuple[str, dict]]:
        """The training lifecycle on the sandbox: build the training image (BuildKit on the Argo stand-in
        pushes it to the registry), then a push of the sandbox's training project (`sandbox.gitlab_api`)."""
        push = self.sandbox.extra["training_project"]
        clone_url = f"{self.sandbox.config['gitlab']['api_url']}/{push['project']}.git"
        return [
            ("build-training-image/build-training-image",
             {"context_url": clone_url, "revision": push["commit_sha"], "repository": "ai-base", "tag": "demo"}),
            ("train-on-push/train-on-push",
             {"project": push["project"], "commit_sha": push["commit_sha"], "ref": push["ref"]}),
        ]

    def show_commit_statuses(self) -> None:
        """The commit statuses train-on-push posted, as the GitLab API stand-in recorded them."""
        push = self.sandbox.extra["training_project"]
        state = httpx.get(f"{self.sandbox.config['gitlab']['api_url']}/control/state", timeout=10).json()
        statuses = state["statuses"].get(f"{push['project']}@{push['commit_sha']}", [])
        trail = " -> ".join(f"{s['status']} ({s['description']})" for s in statuses) or "none"
        log(f"commit statuses of {push['project']}@{push['commit_sha'][:12]} on the GitLab stand-in: {trail}")

    def stop(self) -> None:
        """Stop everything this demo started (worker, server, sandbox), waiting for each to be gone."""
        stopped = stop_recorded(self.home)
        log(f"stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after the runs (non-zero if any did not complete)")
    parser.add_argument("--stop", action="store_true", help="stop what an earlier demo left running, and exit")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PREFECT_PORT", "4200")))
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--home", type=Path, default=DEMO, help="the demo's directory (default .demo/)")
    args = parser.parse_args(argv)
    home = args.home.resolve()
    if args.stop:
        stopped = stop_recorded(home) if home.exists() else []
        log(f"stopped {len(stopped)} leftover process(es)" + (f": {', '.join(stopped)}" if stopped else ""))
        return 0
    for sig in STOP_SIGNALS:  # Ctrl-C, SIGTERM, SIGHUP all unwind through the `finally` below
        signal.signal(sig, on_stop_signal)
    demo = Demo(home, args.port, args.nodes)
    serving = False
    try:
        demo.prepare()
        demo.start_server()
        demo.start_sandbox()
        demo.load_and_deploy()
        ok = demo.run_flows()
        if args.once:
            log("all runs completed" if ok else "some runs did NOT complete")
            return 0 if ok else 1
        log(f"UI up at {demo.ui_url}; press Ctrl-C to stop")
        serving = True
        while True:
            time.sleep(3600)
    except StopRequested as exc:
        log(f"{signal.Signals(exc.signum).name} received")
        return 0 if serving else 128 + exc.signum
    except KeyboardInterrupt:
        return 0 if serving else 128 + signal.SIGINT
    finally:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the stopping short
            signal.signal(sig, signal.SIG_IGN)
        log("stopping worker, server and sandbox")
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
