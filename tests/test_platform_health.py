"""platform-health-check: the pure scoring and analysis, the emulator's /version and can-i, and the flow
against the sandbox (clean: healthy; node NotReady, Prometheus down, registry down: a lower grade that
names the right critical check; an unreachable source: unknown, never ok)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from sandbox.webhook import received
from tasks import health
from tasks.health import Check, build_report, grade_of, score, transitions

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def _all_ok() -> list[Check]:
    return [Check(name, "ok", "fine") for name in health.WEIGHTS]


# --- pure ------------------------------------------------------------------------------------------


def test_score_and_grade_popeye_style():
    assert score(_all_ok()) == 100 and grade_of(100) == "A"
    checks = _all_ok()
    checks[0].status = "warning"  # kube-api, weight 3 of 26: loses 1.5
    assert score(checks) == 94
    checks[0].status = "unknown"  # unknown earns nothing, like critical, but does not cap
    assert score(checks) == 88 and grade_of(88) == "B"
    checks[0].status = "critical"
    assert score(checks) == health.CRITICAL_CAP and grade_of(health.CRITICAL_CAP) == "D"
    assert [grade_of(s) for s in (90, 89, 79, 69, 59, 49, 0)] == ["A", "B", "C", "D", "E", "F", "F"]
    assert score([]) == 0


def test_report_healthy_and_ordering():
    checks = _all_ok()
    checks[3].status = "warning"
    rep = build_report(checks)
    assert rep.healthy and rep.grade == "A" and rep.checks[0].status == "warning"
    checks[5].status = "critical"
    rep = build_report(checks)
    assert not rep.healthy and rep.critical == [checks[5].name] and rep.checks[0].name == checks[5].name


def test_transitions_drop_critical_and_recovery():
    ok = build_report(_all_ok())
    assert transitions(None, ok) == []
    bad_checks = _all_ok()
    bad_checks[-1].status = "critical"
    bad = build_report(bad_checks)
    news = transitions(ok.state(), bad)
    assert news[0].startswith("grade dropped: A -> D") and any("gpu-sweep is CRITICAL" in n for n in news)
    assert transitions(bad.state(), bad) == []  # no news twice
    back = transitions(bad.state(), ok)
    assert back[0].startswith("grade recovered: D -> A") and any("gpu-sweep recovered" in n for n in back)
    assert transitions(None, bad) == ["gpu-sweep is CRITICAL: fine"]


READYZ_OK = "[+]ping ok\n[+]log ok\n[+]etcd ok\nreadyz check passed\n"
READYZ_ETCD = "[+]ping ok\n[-]etcd failed: reason withheld\nreadyz check failed\n"


def test_apiserver_and_etcd():
    api, etcd = health.analyse_apiserver((200, READYZ_OK), (200, "ok"))
    assert (api.status, etcd.status) == ("ok", "ok")
    api, etcd = health.analyse_apiserver((500, READYZ_ETCD), (200, "ok"))
    assert (api.status, etcd.status) == ("critical", "critical") and "etcd" in api.summary
    api, etcd = health.analyse_apiserver((200, "ok"), (200, "ok"))  # not verbose: etcd not reported
    assert etcd.status == "unknown"


def _node(name, ready="True", **pressure):
    conds = [{"type": "Ready", "status": ready, "reason": "KubeletNotReady" if ready != "True" else "KubeletReady"}]
    conds += [{"type": t, "status": pressure.get(t, "False")} for t in health.PRESSURES]
    return {"metadata": {"name": name}, "status": {"conditions": conds}}


def test_nodes():
    assert health.analyse_nodes([_node("a"), _node("b")]).status == "ok"
    c = health.analyse_nodes([_node("a"), _node("b", ready="Unknown")])
    assert c.status == "critical" and "b: Ready=Unknown" in c.evidence[0]
    c = health.analyse_nodes([_node("a", DiskPressure="True")])
    assert c.status == "warning" and c.evidence == ["a: DiskPressure"]
    assert health.analyse_nodes([]).status == "unknown"


def _pod(name, ns="kube-system", phase="Running", created=NOW - timedelta(days=1), ready=True, restarts=0,
         waiting=None, last_finished=None):
    cs = {"name": "c", "ready": ready, "restartCount": restarts, "state": {"waiting": {"reason": waiting}}
          if waiting else {"running": {}}}
    if last_finished:
        cs["lastState"] = {"terminated": {"finishedAt": last_finished.strftime("%Y-%m-%dT%H:%M:%SZ")}}
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")},
            "status": {"phase": phase, "containerStatuses": [cs] if phase != "Pending" else []}}


def test_system_pods():
    pods = {"kube-system": [_pod("ok")], "argo": []}
    assert health.analyse_workloads(pods, NOW).status == "ok"
    pods["kube-system"] += [_pod("crash", ready=False, restarts=3, waiting="CrashLoopBackOff")]
    c = health.analyse_workloads(pods, NOW)
    assert c.status == "critical" and "kube-system/crash: c CrashLoopBackOff" in c.evidence
    restarts = _pod("flappy", restarts=6, last_finished=NOW - timedelta(minutes=5))
    old_restarts = _pod("old", restarts=40, last_finished=NOW - timedelta(hours=5))
    pending = _pod("stuck", phase="Pending", created=NOW - timedelta(minutes=11))
    young = _pod("young", phase="Pending", created=NOW - timedelta(minutes=2))
    notready = _pod("nr", ready=False)
    c = health.analyse_workloads({"monitoring": [restarts, old_restarts, pending, young, notready]}, NOW)
    joined = " | ".join(c.evidence)
    assert c.status == "critical" and "stuck: Pending for 11 min" in joined and "flappy" in joined
    assert "old" not in joined and "young" not in joined and "nr: Running, not ready" in joined


def test_pvcs_targets_runners_gitlab():
    pvc = lambda n, phase, age: {"metadata": {"name": n, "namespace": "ml", "creationTimestamp":
                                               (NOW - age).strftime("%Y-%m-%dT%H:%M:%SZ")}, "status": {"phase": phase}}
    assert health.analyse_pvcs([pvc("a", "Bound", timedelta(days=1)), pvc("b", "Pending", timedelta(minutes=1))],
                               NOW).status == "ok"
    assert health.analyse_pvcs([pvc("b", "Pending", timedelta(hours=1))], NOW).status == "warning"
    up = {"health": "up", "labels": {"job": "dcgm"}}
    down = {"health": "down", "labels": {"job": "dcgm"}, "scrapeUrl": "http://x/metrics", "lastError": "refused"}
    assert health.analyse_targets([up, up]).status == "ok"
    assert health.analyse_targets([up, up, down]).status == "warning"
    assert health.analyse_targets([up, down]).status == "critical"
    assert health.analyse_targets([]).status == "unknown"
    fresh = {"health": "unknown", "labels": {"job": "dcgm"}}
    assert health.analyse_targets([fresh, fresh]).status == "unknown"
    assert health.analyse_targets([up, fresh]).status == "ok"
    online = {"id": 1, "description": "r1", "status": "online", "paused": False}
    assert health.analyse_runners([online]).status == "ok"
    assert health.analyse_runners([online, {"id": 2, "status": "offline"}]).status == "warning"
    assert health.analyse_runners([{**online, "paused": True}]).status == "critical"
    ok = (200, {"status": "ok", "master_check": [{"status": "ok"}], "db_check": [{"status": "ok"}]})
    assert health.analyse_gitlab(ok, (200, {"status": "ok"})).status == "ok"
    failed = (503, {"status": "failed", "db_check": [{"status": "failed", "message": "no db"}]})
    c = health.analyse_gitlab(failed, (200, {"status": "ok"}))
    assert c.status == "critical" and "db_check: failed no db" in c.evidence


def test_lifecycle_results():
    assert health.analyse_backup_age(None, None, NOW).status == "unknown"
    assert health.analyse_backup_age(NOW - timedelta(hours=3), "r", NOW).status == "ok"
    assert health.analyse_backup_age(NOW - timedelta(hours=30), "r", NOW).status == "warning"
    assert health.analyse_backup_age(NOW - timedelta(hours=50), "r", NOW).status == "critical"
    rows = [{"days_left": 200.0, "subject": "a"}, {"days_left": 12.5, "subject": "etcd-peer"}]
    c = health.analyse_certificates(rows, "r")
    assert c.status == "warning" and "12.5 (etcd-peer)" in c.summary
    assert health.analyse_certificates(rows + [{"days_left": 3, "subject": "x"}], "r").status == "critical"
    assert health.analyse_certificates(None, None).status == "unknown"
    finding = {"severity": "critical", "node": "gpu-1", "gpu": 3, "finding": "xid"}
    assert health.analyse_gpu_sweep([finding], "r", "COMPLETED").status == "critical"
    assert health.analyse_gpu_sweep([{**finding, "severity": "warning"}], "r", "COMPLETED").status == "ok"
    assert health.analyse_gpu_sweep([], "r", "FAILED").status == "unknown"


def test_deployment_every_ten_minutes():
    deps = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    dep = deps["platform-health-check"]
    assert dep["entrypoint"] == "flows/platform_health.py:platform_health_check"
    assert dep["schedules"][0]["interval"] == 600 and dep["concurrency_limit"] == 1


# --- the sandbox ------------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_emulator_version_matches_kubelets_and_can_i(sandbox):
    from sandbox.cluster import KUBELET_VERSION

    version = httpx.get(f"{sandbox.urls['kube']}/version", timeout=5).json()
    assert version["gitVersion"] == KUBELET_VERSION and "k3s" not in version["gitVersion"]
    assert version["minor"] == KUBELET_VERSION.split(".")[1]
    nodes = httpx.get(f"{sandbox.urls['kube']}/api/v1/nodes", params={"limit": 1}, timeout=5).json()["items"]
    assert nodes[0]["status"]["nodeInfo"]["kubeletVersion"] == version["gitVersion"]
    out = subprocess.run(["kubectl", "--kubeconfig", str(sandbox.kubeconfig), "auth", "can-i", "patch", "nodes"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "yes", out.stderr
    # the emulator is still serving after the review
    assert httpx.get(f"{sandbox.urls['kube']}/readyz", timeout=5).status_code == 200


@pytest.mark.sandbox
def test_gitlab_standin_runners_and_health(gitlab_sandbox):
    import os

    cfg = gitlab_sandbox.config["gitlab"]
    base, token = cfg["api_url"], os.environ[cfg["token"]["env"]]
    r = httpx.get(f"{base}/api/v4/runners/all", headers={"PRIVATE-TOKEN": token}, timeout=5)
    assert r.status_code == 200 and r.json()[0]["status"] == "online" and r.headers["X-Total"] == "1"
    assert httpx.get(f"{base}/api/v4/runners/all", timeout=5).status_code == 401
    ready = httpx.get(f"{base}/-/readiness", params={"all": "1"}, timeout=5).json()
    assert ready["status"] == "ok" and ready["db_check"] == [{"status": "ok"}]
    assert httpx.get(f"{base}/-/liveness", timeout=5).json() == {"status": "ok"}


def _run(platform):
    import time

    from flows.platform_health import platform_health_check
    from tests.conftest import run_flow_sync

    start = time.monotonic()
    state = run_flow_sync(platform_health_check, platform=platform, check_timeout_s=10)
    seconds = time.monotonic() - start
    assert state.is_completed(), state.message
    result = state.result()
    print(f"health check: {seconds:.2f} s, grade {result['grade']} ({result['score']}), "
          + ", ".join(f"{c['name']}={c['status']}({c['seconds']:.2f}s)" for c in result["details"]))
    assert seconds < 30  # every check concurrent, each under its 10 s timeout
    return result


def _fake_lifecycle_runs(platform: str, backup_hours_ago: float = 0) -> None:
    """Latest runs of the three lifecycles the health check reads, with the artifacts they publish."""
    from prefect import flow

    from tasks.reports import publish_table

    @flow(name="gitlab-backup")
    def gitlab_backup(platform: str):
        return {"backup_id": "x"}

    @flow(name="certificate-check")
    def certificate_check(platform: str):
        publish_table(f"certificate-table-{platform}-sandbox", [{"days_left": 300.0, "subject": "kube-apiserver"},
                                                                {"days_left": 90.0, "subject": "etcd-peer"}])

    @flow(name="gpu-monitoring-sweep")
    def gpu_monitoring_sweep(platform: str):
        publish_table(f"gpu-findings-{platform}-sandbox", [{"severity": "info", "node": "n", "finding": "idle"}])

    for fn in (gitlab_backup, certificate_check, gpu_monitoring_sweep):
        assert fn(platform=platform, return_state=True).is_completed()


@pytest.fixture(scope="module")
def health_platform(sandbox, sandbox_platform, gitlab_sandbox, training_platform):
    _fake_lifecycle_runs(sandbox_platform)
    return sandbox_platform


@pytest.mark.sandbox
@pytest.mark.prefect
def test_health_check_against_the_sandbox(health_platform, clean_sandbox):
    sb = clean_sandbox
    by = lambda result: {c["name"]: c for c in result["details"]}
    clean = _run(health_platform)
    checks = by(clean)
    assert clean["healthy"] and clean["grade"] == "A" and not clean["critical"], clean["details"]
    assert {n for n, c in checks.items() if c["status"] == "ok"} >= {
        "kube-api", "etcd", "nodes", "system-workloads", "pvcs", "gitlab", "gitlab-runners", "prometheus",
        "prometheus-targets", "registry", "gitlab-backup-age", "certificates", "gpu-sweep"}
    assert "fewest days left: 90" in checks["certificates"]["summary"]
    assert _latest_report(health_platform).startswith(f"# Platform health: {health_platform}")
    before = len(received(sb))

    # a node NotReady
    sb.fault("node-not-ready", node=_first_node(sb))
    res = _run(health_platform)
    assert res["critical"] == ["nodes"] and res["grade"] > clean["grade"]  # a later letter: a lower grade
    assert res["score"] <= health.CRITICAL_CAP and not res["healthy"]
    heard = received(sb)[before:]
    assert heard and "nodes is CRITICAL" in json.dumps(heard)
    sb.heal()
    res = _run(health_platform)
    assert res["grade"] == "A" and "nodes recovered" in json.dumps(received(sb)[before:])

    # Prometheus down: Prometheus critical, its targets unknown (never ok)
    sb.fault("prometheus-down")
    res = _run(health_platform)
    checks = by(res)
    assert "prometheus" in res["critical"] and checks["prometheus-targets"]["status"] == "unknown"
    assert not res["healthy"]
    sb.heal()

    # the registry down
    record = sb.processes["registry"]
    sb.stop_process("registry")
    try:
        res = _run(health_platform)
        assert res["critical"] == ["registry"] and res["score"] <= health.CRITICAL_CAP
    finally:
        sb.spawn("registry", record["argv"])
        from sandbox._common import http_ok, wait_for

        wait_for(http_ok(f"{sb.urls['registry']}/v2/"), "docker-registry", 30)


@pytest.mark.sandbox
@pytest.mark.prefect
def test_unreachable_api_is_unknown_not_ok(health_platform, clean_sandbox):
    """The API server failing every resource request: nodes, pods and PVCs are unknown, never ok."""
    httpx.post(f"{clean_sandbox.urls['control']}/control/fault", json={"kind": "api-down"}, timeout=10)
    res = _run(health_platform)
    checks = {c["name"]: c for c in res["details"]}
    for name in ("nodes", "system-workloads", "pvcs"):
        assert checks[name]["status"] == "unknown", checks[name]
    assert not res["healthy"]


def _first_node(sb) -> str:
    return httpx.get(f"{sb.urls['kube']}/api/v1/nodes", params={"limit": 1}, timeout=5).json()["items"][0][
        "metadata"]["name"]


def test_a_probe_that_hangs_or_breaks_is_never_ok():
    import asyncio

    from tasks.health_probes import run_check
    from tasks.redact import Redactor

    async def hang():
        await asyncio.sleep(5)

    def boom():
        raise RuntimeError("token s3cr3t refused")

    red = Redactor.of(["s3cr3t"])
    hung = asyncio.run(run_check.fn("registry,gpu-sweep", hang, 0.1, red))
    assert [(c.name, c.status) for c in hung] == [("registry", "critical"), ("gpu-sweep", "unknown")]
    broke = asyncio.run(run_check.fn("nodes", boom, 1, red))
    assert broke[0].status == "unknown" and "s3cr3t" not in broke[0].summary + "".join(broke[0].evidence)


@pytest.mark.sandbox
@pytest.mark.prefect
def test_runners_offline_and_gitlab_dependency_down(health_platform, clean_sandbox):
    """Every runner offline: gitlab-runners critical; Redis stopped: GitLab not ready, named in the evidence."""
    state = Path(clean_sandbox.extra["gitlab_root_production"]) / "var" / "opt" / "gitlab" / "state"
    runners, services = state / "runners.json", state / "services.json"
    saved = services.read_text()
    runners.write_text(json.dumps([{"id": 7, "description": "k8s-gpu-runner", "paused": False, "online": False,
                                    "status": "offline", "runner_type": "instance_type", "is_shared": True}]))
    services.write_text(json.dumps({**json.loads(saved), "redis": "down"}))
    try:
        res = _run(health_platform)
    finally:
        runners.unlink()
        services.write_text(saved)
    checks = {c["name"]: c for c in res["details"]}
    assert {"gitlab", "gitlab-runners"} <= set(res["critical"]), res["details"]
    assert "redis_check: failed redis is not running" in checks["gitlab"]["evidence"]
    assert checks["gitlab-runners"]["evidence"] == ["k8s-gpu-runner: offline"]


def _latest_report(platform: str) -> str:
    """The health check's report artifact, read back through the Prefect API."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            art = await client.read_latest_artifacts()
            return [a for a in art if a.key == f"platform-health-{platform}"]

    found = asyncio.run(read())
    assert found, "no platform-health artifact"
    return found[0].data
