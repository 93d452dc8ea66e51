"""The operator's path on a production-shaped Prefect server (issue 15, items 3-5), end to end.

One module-wide set-up, as an operator would do it: Debian's PostgreSQL on loopback (a throwaway
cluster), a real `prefect server start` on it, the sandbox's blocks (`python -m blocks.load`), the
`platform-local` process pool, the automations (`python -m scripts.automations apply`),
`prefect deploy --all`, and a worker emitting flow-run heartbeats. On that server:
- the server stores its runs in PostgreSQL, and deployed flows run to Completed on it;
- every deployment of prefect.yaml exists with its schedule and parameters;
- the health check, run by name, completes and its report artifact reads back through the API;
- a manual deployment that asks for approval waits Paused, the webhook hears that it waits, and it
  completes after `resume_flow_run` with the approval input;
- a failed run, a late run, a critical finding reach the webhook with the run's link;
- a worker killed mid-sweep leaves a zombie run that the zombie automation marks Crashed, which frees
  the GPU sweep's only concurrency slot: the next sweep completes;
- headless Chromium renders the deployments page.

Timing (Prefect 3.9.1): heartbeats are at least 30 s apart (`MINIMUM_HEARTBEAT_INTERVAL`,
prefect/flow_engine.py, and `ge=30` in prefect/settings/models/flows.py); proactive triggers are
evaluated every 5 s (`periodic_granularity`, prefect/server/events/triggers.py), so a zombie is marked
at most `zombie_within_s` + 5 s after its last heartbeat, plus the action's latency. The zombie is
made first and checked last, so that the other tests run while its silence times out.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from sandbox._common import free_port, spawn, stop_process
from sandbox.webhook import received
from scripts.prefect_server import run_artifacts, wait_for_state, wait_until_healthy
from scripts.work_pools import LOCAL_POOL
from tests.conftest import REPO, need_binary

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(600)]

HEARTBEAT_S = 30  # Prefect's minimum
ZOMBIE_WITHIN_S = 40
PAUSED_WITHIN_S = 10
SWEEP = "gpu-monitoring-sweep/gpu-monitoring-sweep"


# --- PostgreSQL, the Prefect server, the worker ---------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else need_binary(name, "postgresql")


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class OpsServer:
    """What the module's set-up started, and the environment an operator's shell would have."""

    def __init__(self, root: Path):
        self.root = root
        self.pg_port = free_port()
        self.port = free_port()
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.ui_url}/api"
        self.db_url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.pg_port}/prefect"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}
        self.late_run_id = None

    def run(self, name: str, argv: list[str], timeout: float = 300, env: dict | None = None) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or self.env,
                              cwd=REPO, check=False)
        (self.root / f"{name}.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        proc = spawn(argv, self.root / f"{name}.log", env=self.env, cwd=REPO)
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str) -> subprocess.Popen:
        return self.spawn(name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", LOCAL_POOL,
                                 "--work-queue", "default", "--limit", "4"])


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process, its process group and every descendant (the flow runs a worker started run
    in sessions of their own) at once, with no SIGTERM first: what an OOM kill or a node reboot does to a
    worker."""
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def _start_postgres(ops: OpsServer) -> None:
    data = ops.root / "pg"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(ops.root, "postgres")
        shutil.chown(data, "postgres")

    def run(argv: list[str]) -> None:
        subprocess.run(_as_postgres(argv), capture_output=True, text=True, timeout=120, check=True, cwd="/")

    run([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
    # loopback only; the socket in our directory; fsync off: a throwaway cluster
    run([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(ops.root / "postgres.log"), "-w", "-t", "60", "-o",
         f"-c listen_addresses=127.0.0.1 -p {ops.pg_port} -k {ops.root} -c fsync=off", "start"])
    run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(ops.pg_port), "-U", "postgres", "prefect"])


def _stop_postgres(ops: OpsServer) -> None:
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(ops.root / "pg"), "-m", "immediate", "-w", "stop"]),
                   capture_output=True, timeout=60, check=False, cwd="/")


def psql(ops: OpsServer, sql: str) -> str:
    proc = subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(ops.pg_port), "-U", "postgres", "-d",
                           "prefect", "-At", "-c", sql], capture_output=True, text=True, timeout=30, check=True)
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def ops(sandbox):
    """PostgreSQL, `prefect server start` on it, blocks, pool, automations, deployments, a worker."""
    from sandbox._common import read_secrets

    need_binary("runuser", "util-linux")
    root = Path(tempfile.mkdtemp(prefix="ops-server-"))
    os.chmod(root, 0o755)
    ops = OpsServer(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(read_secrets(sandbox.state_dir))  # the stand-in secrets platform.yaml names as {env: ...}
    env.update({
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": ops.api_url,
        "PREFECT_UI_URL": ops.ui_url,  # the links automations put in their notices
        "PREFECT_UI_API_URL": ops.api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": ops.db_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
        "PREFECT_DEPLOYMENT_CONCURRENCY_SLOT_WAIT_SECONDS": "5",  # a waiting sweep retries its slot soon
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "AI_PLATFORM_OPS_HOME": str(REPO),
        "AI_PLATFORM_OPS_POOL": LOCAL_POOL,
        "AI_PLATFORM_OPS_PLATFORM": "sandbox",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    })
    ops.env = env
    timings: dict[str, float] = {}
    try:
        t = time.monotonic()
        _start_postgres(ops)
        timings["postgres"] = time.monotonic() - t
        t = time.monotonic()
        server = ops.spawn("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(ops.port)])
        wait_until_healthy(ops.api_url, server, 180, log=root / "server.log")
        timings["server"] = time.monotonic() - t
        t = time.monotonic()
        py = sys.executable
        ops.run("blocks-load", [py, "-m", "blocks.load", str(sandbox.platform_yaml)])
        ops.run("work-pool", [py, "-m", "scripts.work_pools", "create", "--only", LOCAL_POOL])
        ops.run("automations", [py, "-m", "scripts.automations", "apply", "--platform", "sandbox",
                                "--set", f"heartbeat_s={HEARTBEAT_S}", "--set", f"zombie_within_s={ZOMBIE_WITHIN_S}",
                                "--set", f"paused_within_s={PAUSED_WITHIN_S}"])
        ops.run("deploy", [py, "-m", "prefect", "--no-prompt", "deploy", "--all"], timeout=400)
        timings["deploy"] = time.monotonic() - t
        ops.start_worker("worker-1")
        ops.timings = timings
        with _api(ops):
            ops.late_run_id = _schedule_late_probe(ops)
        yield ops
    finally:
        for proc in reversed(list(ops.procs.values())):
            stop_process(proc.pid)
        _stop_postgres(ops)
        shutil.rmtree(root, ignore_errors=True)


def _api(ops: OpsServer):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: ops.api_url})


@pytest.fixture
def api(ops):
    """This module's tests talk to the PostgreSQL-backed server, not the session's test server."""
    with _api(ops):
        yield ops


def _schedule_late_probe(ops: OpsServer):
    """A run of a scheduled deployment that nobody picks up (its queue has no worker): Prefect's
    late-runs service marks it Late 15 s after its start time, and the webhook must hear of it."""
    from prefect.client.orchestration import get_client

    ops.run("late-queue", [sys.executable, "-m", "prefect", "work-queue", "create", "late-probe", "--pool", LOCAL_POOL])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("cluster-inventory/cluster-inventory")
        run = client.create_flow_run_from_deployment(dep.id, work_queue_name="late-probe")
    return run.id


# --- helpers ----------------------------------------------------------------------------------------


def webhook_notices(sandbox) -> list[dict]:
    """Every notice the sandbox's webhook receiver got, its body decoded: {"subject", "body", "platform"}."""
    out = []
    for post in received(sandbox):
        try:
            out.append(json.loads(post["body"]))
        except json.JSONDecodeError:
            continue  # the receiver records raw bodies; the flows' own notices use the same block
    return out


def wait_for_notice(sandbox, needle: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for notice in webhook_notices(sandbox):
            if needle in notice.get("body", ""):
                return notice
        time.sleep(0.5)
    raise AssertionError(f"no webhook notice with {needle!r} within {timeout_s} s; got: "
                         f"{[n.get('subject') for n in webhook_notices(sandbox)]}")


def run_url(ops: OpsServer, run_id) -> str:
    return f"{ops.ui_url}/runs/flow-run/{run_id}"


def read_run(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def heartbeats_of(ops: OpsServer, run_id) -> int:
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "any_resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 10}
    r = httpx.post(f"{ops.api_url}/events/filter", json=body, timeout=10)
    r.raise_for_status()
    return len(r.json()["events"])


# --- a worker dies mid-sweep (made first, checked last) ---------------------------------------------


@pytest.fixture(scope="module")
def killed_sweep(ops, sandbox):
    """A GPU sweep whose worker (and the run's process) is SIGKILLed while the run is Running and has sent
    its first heartbeat; a new worker; the next sweep queued behind the dead run's concurrency slot.

    To kill it mid-run deterministically, the sandbox's Prometheus is frozen (SIGSTOP) while the sweep
    starts: the sweep waits on its query, as on a Prometheus that hangs, and is killed there. A GPU fault
    (row-remap failure: critical) is injected before the next sweep, so that sweep reports a critical
    finding. The module's end heals the sandbox."""
    from prefect.deployments import run_deployment

    prometheus = psutil.Process(sandbox.processes["prometheus"]["pid"])
    with _api(ops):
        prometheus.suspend()
        try:
            first = run_deployment(SWEEP, parameters={"window": "20s"}, timeout=0)
            wait_for_state(first.id, {"Running"}, 120)
            deadline = time.monotonic() + 20
            while heartbeats_of(ops, first.id) == 0:
                assert time.monotonic() < deadline, "the running sweep sent no heartbeat event"
                time.sleep(0.5)
            killed_at = time.monotonic()
            kill_tree(ops.procs["worker-1"])
        finally:
            prometheus.resume()
        assert read_run(first.id).state.name == "Running"  # nobody is left to say otherwise
        sandbox.fault("row-remap-failure", node="gpu-node-0002", gpu=1)
        ops.start_worker("worker-2")
        second = run_deployment(SWEEP, parameters={"window": "20s"}, timeout=0)
    try:
        yield {"zombie": first.id, "next": second.id, "killed_at": killed_at}
    finally:
        sandbox.reset()


def test_a_worker_killed_mid_sweep_leaves_its_run_running(api, killed_sweep):
    # the dead run still holds the sweep's only slot: the next sweep cannot start yet
    assert read_run(killed_sweep["zombie"]).state.name == "Running"
    assert read_run(killed_sweep["next"]).state.name in {"Scheduled", "AwaitingConcurrencySlot", "Pending"}


# --- item 4: the server runs on PostgreSQL ---------------------------------------------------------


def test_server_runs_on_postgresql(api):
    # Prefect created its schema in the PostgreSQL database we pointed it at
    tables = set(psql(api, "select tablename from pg_tables where schemaname = 'public'").split())
    assert {"flow_run", "deployment", "automation", "events", "alembic_version"} <= tables
    deployments = {d for d in psql(api, "select name from deployment").split()}
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == deployments
    # the API answers from it: an object made through the API is a row there (the admin settings
    # endpoint masks the connection URL, so the database itself is the witness)
    assert psql(api, f"select count(*) from work_pool where name = '{LOCAL_POOL}'") == "1"
    print(f"set-up times (s): { {k: round(v, 1) for k, v in api.timings.items()} }")


def test_automations_apply_again_changes_nothing(api):
    out = api.run("automations-again", [sys.executable, "-m", "scripts.automations", "apply", "--platform", "sandbox",
                                        "--set", f"heartbeat_s={HEARTBEAT_S}", "--set",
                                        f"zombie_within_s={ZOMBIE_WITHIN_S}", "--set", f"paused_within_s={PAUSED_WITHIN_S}"])
    outcomes = [line.split()[0] for line in out.splitlines()]
    assert outcomes == ["unchanged"] * 5, out
    assert psql(api, "select count(*) from automation") == "5"


# --- item 5: the operator's path ---------------------------------------------------------------------


def test_every_deployment_exists_with_schedule_and_parameters(api):
    from prefect.client.orchestration import get_client

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    listed = api.run("deployment-ls", [sys.executable, "-m", "prefect", "deployment", "ls"], timeout=120,
                     env={**api.env, "COLUMNS": "400"})  # rich truncates names to the terminal's width
    with get_client(sync_client=True) as client:
        for d in spec["deployments"]:
            flow_name = d["entrypoint"].rsplit(":", 1)[1].replace("_", "-")
            dep = client.read_deployment_by_name(f"{flow_name}/{d['name']}")
            assert d["name"] in listed
            want = {k: ("sandbox" if v == "{{ $AI_PLATFORM_OPS_PLATFORM }}" else v) for k, v in d["parameters"].items()}
            assert dep.parameters == want, d["name"]
            assert dep.work_pool_name == LOCAL_POOL and set(dep.tags) == set(d["tags"])
            assert dep.description and dep.description.split()[0] in d["description"]
            schedules = d.get("schedules", [])
            assert len(dep.schedules) == len(schedules), d["name"]
            for got, wanted in zip(dep.schedules, schedules):
                assert got.active
                if "cron" in wanted:
                    assert got.schedule.cron == wanted["cron"]
                else:
                    assert got.schedule.interval.total_seconds() == wanted["interval"]
            if "concurrency_limit" in d:
                assert dep.global_concurrency_limit.limit == d["concurrency_limit"], d["name"]


def test_health_check_by_name_completes_and_its_report_reads_back(api):
    from prefect.deployments import run_deployment

    run = run_deployment("platform-health-check/platform-health-check", timeout=300, poll_interval=1)
    assert run.state.is_completed(), run.state.message
    assert run.state.message.startswith("grade ")
    report = [a for a in run_artifacts(run.id) if a.key == "platform-health-sandbox"]
    assert report and report[0].type == "markdown"
    assert "Score" in report[0].data and "kube-api" in report[0].data
    # it ran on PostgreSQL: the run is a row there
    assert psql(api, f"select state_name from flow_run where id = '{run.id}'") == "Completed"


def test_approval_waits_paused_is_announced_and_completes_after_resume(api, sandbox):
    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run

    run = run_deployment("image-prune/image-prune", parameters={"dry_run": False}, timeout=0)
    paused = wait_for_state(run.id, {"Paused"}, 180)
    assert paused.state.state_details.run_input_keyset  # it waits for the Approval form
    # the automation tells the webhook that a run waits (the threshold is 1 h in production)
    notice = wait_for_notice(sandbox, f"{run_url(api, run.id)}", PAUSED_WITHIN_S + 30)
    assert "waits for approval" in notice["subject"]
    assert read_run(run.id).state.name == "Paused"
    resume_flow_run(run.id, run_input={"approve": False, "approver": "ops-on-call"})
    done = wait_for_state(run.id, {"Completed", "Failed", "Crashed"}, 120)
    assert done.state.name == "Completed", done.state.message
    # the operation's one report says who declined and that nothing was changed (tasks/operation.py)
    report = [a for a in run_artifacts(run.id) if a.key and a.key.startswith("image-prune-report-")]
    assert report and "declined by ops-on-call" in report[-1].data and "untouched" in report[-1].data


def test_failed_run_reaches_the_webhook_with_its_link(api, sandbox):
    from prefect.deployments import run_deployment

    run = run_deployment("cluster-inventory/cluster-inventory", parameters={"platform": "no-such-platform"},
                         timeout=180, poll_interval=1)
    assert run.state.is_failed()
    notice = wait_for_notice(sandbox, run_url(api, run.id), 30)
    assert "is Failed" in notice["subject"] and "cluster-inventory" in notice["body"]


def test_late_run_reaches_the_webhook(api, sandbox):
    assert read_run(api.late_run_id).state.name == "Late"
    notice = wait_for_notice(sandbox, run_url(api, api.late_run_id), 30)
    assert "is late" in notice["subject"]


def test_chromium_renders_the_deployments_page(api, tmp_path):
    from scripts.screenshots import PNG_MAGIC, screenshot

    need_binary("chromium", "chromium")
    png = screenshot(f"{api.ui_url}/deployments", tmp_path / "deployments.png")
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 30_000  # a rendered page, not a blank one


def test_zombie_run_is_crashed_and_the_next_sweep_completes(api, sandbox, killed_sweep):
    bound = ZOMBIE_WITHIN_S + HEARTBEAT_S + 30  # last heartbeat <= kill; + 5 s evaluation; + action
    left = bound - (time.monotonic() - killed_sweep["killed_at"])
    zombie = wait_for_state(killed_sweep["zombie"], {"Crashed"}, max(left, 1))
    assert "No heartbeat" in zombie.state.message
    crashed_after = time.monotonic() - killed_sweep["killed_at"]
    nxt = wait_for_state(killed_sweep["next"], {"Completed", "Failed", "Crashed"}, 120)
    assert nxt.state.name == "Completed", nxt.state.message
    # the automation freed the slot, not lease expiry: the dead run's deployment-concurrency lease was
    # renewed for 300 s (maintain_concurrency_lease(lease_id, 300), prefect/flow_engine.py) at its start
    assert time.monotonic() - killed_sweep["killed_at"] < 250
    print(f"zombie marked Crashed {crashed_after:.0f} s after the kill; next sweep done "
          f"{time.monotonic() - killed_sweep['killed_at']:.0f} s after it")
    # the webhook heard of the crash, and of the next sweep's critical finding, each with its run's link
    notice = wait_for_notice(sandbox, run_url(api, killed_sweep["zombie"]), 30)
    assert "Crashed" in notice["subject"]
    notice = wait_for_notice(sandbox, run_url(api, killed_sweep["next"]), 30)
    assert "critical" in notice["subject"] and "gpu-node-0002/gpu-1: row-remap" in notice["body"]
