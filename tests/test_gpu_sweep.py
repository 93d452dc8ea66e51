"""The GPU sweep against the sandbox: the real Prometheus scraping simulated dcgm-exporters.

One module-scoped fault injection serves the fault, cordon and uncordon tests (waiting out a
window once); the sandbox is reset after it, as `clean_sandbox` does. The clean-fleet test runs
first, the Prometheus-down test last.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import pytest
from kubernetes.client.exceptions import ApiException

from flows.gpu_monitoring_sweep import gpu_monitoring_sweep, gpu_node_uncordon
from sandbox.prometheus import wait_for_sweep_rules
from tasks._retry import TRANSIENT_RETRIES
from tasks.gpu_classify import classify, needs_detail
from tasks.gpu_model import (
    FINDING_ANNOTATION,
    REPAIR_ANNOTATION,
    Kind,
    SweepSettings,
    SweepThresholds,
)
from tasks.gpu_plans import UNHEALTHY_TAINT_KEY
from tasks.gpu_sweep import sweep
from tasks.kubernetes import (
    api_client_from_kubeconfig,
    evict_pods_on,
    fetch_gpu_fleet,
    list_raw,
)
from tasks.prometheus import fetch_dcgm, fetch_dcgm_detail, query_args

WINDOW = "20s"
TH = SweepThresholds(window=WINDOW, xid_resolution="2s")
# (fault, node, gpu) -> the finding it must produce
FAULTS = [
    ("xid", "gpu-node-0003", 2, 79, (Kind.CRITICAL_XID, "gpu-node-0003", "2")),
    ("gpu-missing", "gpu-node-0005", 4, None, (Kind.GPU_MISSING, "gpu-node-0005", "4")),
    ("row-remap-failure", "gpu-node-0008", 0, None, (Kind.ROW_REMAP, "gpu-node-0008", "0")),
    ("hot-gpu", "gpu-node-0006", 1, 93, (Kind.GPU_HOT, "gpu-node-0006", "1")),
    ("idle-gpu", "gpu-node-0001", 3, 0, (Kind.IDLE_HELD, "gpu-node-0001", "3")),
    ("exporter-down", "gpu-node-0007", None, None, (Kind.EXPORTER_DOWN, "gpu-node-0007", None)),
]
CRITICAL_NODES = {"gpu-node-0003", "gpu-node-0005", "gpu-node-0008"}


def _sweep(sb):
    with api_client_from_kubeconfig(str(sb.kubeconfig)) as api:
        return sweep(api, sb.urls["prometheus"], TH, cluster="sandbox")


def _found(result):
    return {(f.kind, f.node, f.gpu) for f in result.findings}


def _nodes(sb):
    with api_client_from_kubeconfig(str(sb.kubeconfig)) as api:
        return {n["metadata"]["name"]: n for n in list_raw(api, "nodes").items}


def _ours(node):
    return [t for t in node["spec"].get("taints") or [] if t.get("key") == UNHEALTHY_TAINT_KEY]


def _api_requests(sb) -> int:
    """How many requests the sandbox's Kubernetes API server has answered so far (its own count)."""
    return httpx.get(f"{sb.urls['control']}/control/state", timeout=10).json()["api_requests_served"]


def _task_runs(flow_run_id, terminal: set[str] = frozenset()) -> dict[str, object]:
    """The flow run's task runs by task name; waits until the tasks named in `terminal` have finished
    (task run states reach the API as events, a moment after the flow returns)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        by_name = {r.name.rsplit("-", 1)[0]: r for r in runs}
        done = all(by_name.get(n) and by_name[n].state and by_name[n].state.is_final() for n in terminal)
        if done or time.monotonic() > deadline:
            return by_name
        time.sleep(0.5)


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


def _run_and_approve(flow_fn, answer: dict, **params):
    """Run a flow that pauses for approval in a thread; answer it from here; return its final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("state", flow_fn(**params, return_state=True)))
    started = time.time()
    thread.start()
    paused = None
    deadline = time.monotonic() + 90
    while paused is None and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.5)
        with get_client(sync_client=True) as client:
            paused_only = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
            for run in client.read_flow_runs(flow_run_filter=paused_only, limit=20):
                if (run.state and run.state.type == StateType.PAUSED and run.flow_id
                        and run.start_time and run.start_time.timestamp() >= started - 5):
                    paused = run
                    break
    assert paused is not None, "the flow never paused for approval"
    resume_flow_run(paused.id, run_input=answer)
    thread.join(timeout=120)
    assert not thread.is_alive()
    return box["state"], paused


# --- a clean fleet -----------------------------------------------------------------------------


def test_clean_fleet_yields_no_findings(sandbox):
    deadline = time.monotonic() + 3 * TH.window_s  # let any earlier fault leave the window
    result = _sweep(sandbox)
    while result.findings and time.monotonic() < deadline:
        time.sleep(2)
        result = _sweep(sandbox)
    assert [f.row() for f in result.findings] == []
    assert result.status == "ok" and result.gpu_nodes == 16 and result.gpus_reporting == 128
    assert result.gpu_status_counts == {"healthy": 128}
    assert 0 < result.fleet_util_pct < 100 and result.gpus_held > 0
    # two listings (one page each), the rules check and four queries: nothing needs details
    assert result.round_trips == 7
    # the sandbox's sweep rules are rendered for its 15m window, not this test's 20s: raw, and why
    assert result.metrics_source == "raw queries" and "other settings" in result.metrics_source_note


# --- every fault of the sandbox ------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulted(sandbox):
    """The sandbox with one of each GPU fault, once Prometheus has seen them for a whole window."""
    try:
        for kind, node, gpu, value, _ in FAULTS:
            sandbox.fault(kind, node=node, gpu=gpu, value=value)
        want = {f[4] for f in FAULTS}
        deadline = time.monotonic() + 4 * TH.window_s
        result = _sweep(sandbox)
        while not want <= _found(result) and time.monotonic() < deadline:
            time.sleep(2)
            result = _sweep(sandbox)
        yield sandbox, result
    finally:
        sandbox.reset()


def test_each_fault_yields_its_finding(faulted):
    _, result = faulted
    assert _found(result) == {f[4] for f in FAULTS}
    by_kind = {f.kind: f for f in result.findings}
    xid = by_kind[Kind.CRITICAL_XID]
    assert xid.uuid.startswith("GPU-") and xid.pod and xid.owner.startswith("Workflow/")
    assert xid.evidence["DCGM_FI_DEV_XID_ERRORS"] == [79] and xid.evidence["window"] == WINDOW
    idle = by_kind[Kind.IDLE_HELD]
    assert idle.namespace == "argo-job" and idle.owner.startswith("Workflow/rl-prod-")
    assert idle.evidence["DCGM_FI_DEV_GPU_UTIL_max"] == 0 and idle.evidence["samples"] >= 2
    assert by_kind[Kind.GPU_HOT].evidence["DCGM_FI_DEV_GPU_TEMP_max"] == 93
    assert by_kind[Kind.GPU_MISSING].evidence["gpus_reporting"] == 7
    assert all(f.advice for f in result.findings)
    unknown = [g for g in result.gpus if g.node == "gpu-node-0007"]
    assert len(unknown) == 8 and {g.status.value for g in unknown} == {"unknown"}
    assert result.status == "critical" and result.round_trips == 8  # 2 listings, rules, 4 queries, 1 for details


def _same_number(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def test_recording_rules_give_the_raw_queries_answers(faulted):
    """The sandbox loads the sweep's recording rules (rendered for its 15m window): the recorded path and
    the raw queries evaluated at the same instant give the same snapshot and the same findings."""
    sb, _ = faulted
    th = SweepThresholds(xid_resolution=f"{sb.scrape_interval_s}s")
    settings = SweepSettings(thresholds=th, cluster="sandbox")
    url = sb.urls["prometheus"]
    wait_for_sweep_rules(sb, settings, timeout_s=30)
    recorded = fetch_dcgm(url, th.window, **query_args(settings))
    assert recorded.source == "recording rules", recorded.source_note
    assert recorded.round_trips == 6 and "evaluated" in recorded.source_note  # rules, timestamp, four reads
    raw = fetch_dcgm(url, th.window, source="raw", at=recorded.at, **query_args(settings))
    assert raw.source == "raw queries" and raw.round_trips == 4
    for name in ("values", "per_host"):
        a, b = getattr(recorded, name), getattr(raw, name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key].keys() == b[key].keys(), (name, key)
            assert all(_same_number(a[key][m], b[key][m]) for m in a[key]), (name, key, a[key], b[key])
    assert recorded.labels == raw.labels and recorded.xids == raw.xids and recorded.xid_counts == raw.xid_counts
    assert sorted(map(repr, recorded.targets)) == sorted(map(repr, raw.targets))
    # every fault of the fixture is in it: the comparison is not between two empty answers
    assert any("row_fail_max" in v for v in raw.values.values()) and any(t.up == 0 for t in raw.targets)
    assert any(raw.xids.values()) and any("temp_max" in v for v in raw.values.values())
    with api_client_from_kubeconfig(str(sb.kubeconfig)) as api:
        fleet = fetch_gpu_fleet(api)
        hosts = needs_detail(fleet, raw, th)
        assert hosts == needs_detail(fleet, recorded, th)
        found = [classify(fleet, fetch_dcgm_detail(url, snap, hosts), th, cluster="sandbox")
                 for snap in (recorded, raw)]
    rows = [sorted(map(repr, (f.row() for f in r.findings))) for r in found]
    assert rows[0] == rows[1] and rows[0]
    assert found[0].gpu_status_counts == found[1].gpu_status_counts
    assert found[0].metrics_source == "recording rules" and found[1].metrics_source == "raw queries"
    # the whole sweep (the flow's path) takes the recorded series
    with api_client_from_kubeconfig(str(sb.kubeconfig)) as api:
        whole = sweep(api, url, settings)
    assert whole.metrics_source == "recording rules" and whole.status == "critical"


def _markdown(flow_run_id, prefix: str) -> str:
    return next(a.data for a in _artifacts(flow_run_id) if a.type == "markdown" and (a.key or "").startswith(prefix))


def test_dry_run_reports_the_capped_plan_and_changes_nothing(faulted, sandbox_platform):
    sb, _ = faulted
    before = _nodes(sb)
    requests = _api_requests(sb)
    state = gpu_monitoring_sweep(platform=sandbox_platform, window=WINDOW, return_state=True)
    assert state.is_completed()
    # a handful of tasks, and a constant number of API calls: one page of nodes and one of pods, and the
    # cluster's identity (the kube-system namespace) for the cordon plan
    assert _api_requests(sb) - requests == 3
    tasks = {"list-gpu-fleet", "query-dcgm-metrics", "query-dcgm-details", "publish-gpu-sweep-report"}
    if "argo" in sb.config and "gitlab" in sb.config:  # critical findings on training pods: a note task
        tasks.add("note-gpu-faults-on-training-commits")
    assert set(_task_runs(state.state_details.flow_run_id, tasks)) == tasks
    out = state.result()
    assert out["dry_run"] and out["steps"] == [] and out["approved"] is None
    sweep_out = out["sweep"]
    assert len(sweep_out["cordon_plan"]) == 1
    assert set(sweep_out["cordon_plan"] + sweep_out["cordon_over_cap"]) == CRITICAL_NODES
    assert [f["node"] for f in out["facts"]["cordon"]] == sweep_out["cordon_plan"]
    assert all(f["uid"] for f in out["facts"]["cordon"])  # each planned node by its uid
    assert _nodes(sb) == before
    md = _markdown(state.state_details.flow_run_id, "gpu-sweep-")
    assert "Dry run: would cordon 1 node" in md and "data:image/png;base64," in md
    assert "critical-xid" in md and "idle-but-held" in md
    table = [a for a in _artifacts(state.state_details.flow_run_id) if a.type == "table"][0].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {r["finding"] for r in rows} >= {"critical-xid", "gpu-missing", "row-remap", "gpu-hot", "idle-but-held",
                                            "exporter-down"}


def test_approved_run_cordons_exactly_the_plan_within_the_cap(faulted, sandbox_platform):
    sb, _ = faulted
    state, _ = _run_and_approve(gpu_monitoring_sweep, {"approve": True, "approver": "alice"},
                                platform=sandbox_platform, window=WINDOW, dry_run=False, max_share=0.15,
                                poll_interval_s=0.5)
    assert state.is_completed(), state
    out = state.result()
    planned = out["sweep"]["cordon_plan"]
    assert out["approver"] == "alice" and len(planned) == 2  # 15% of 16 nodes
    assert [r["step"] for r in out["steps"]] == [f"cordon {n}" for n in planned]
    nodes = _nodes(sb)
    touched = {n for n, obj in nodes.items() if obj["spec"].get("unschedulable") or _ours(obj)}
    assert touched == set(planned) and touched <= CRITICAL_NODES
    for name in touched:
        node = nodes[name]
        assert node["spec"]["unschedulable"] is True
        assert _ours(node)[0]["effect"] == "NoSchedule" and _ours(node)[0]["value"] in (
            "xid-79", "gpu-missing", "row-remap-failure")
        note = json.loads(node["metadata"]["annotations"][FINDING_ANNOTATION])
        assert note["flow_run"] == str(state.state_details.flow_run_id) and note["findings"]
        assert {"key": "disable-node-scheduler", "value": "", "effect": "NoSchedule"} in node["spec"]["taints"]

    # idempotent: the next run plans the third critical node only, never the cordoned ones again
    again = gpu_monitoring_sweep(platform=sandbox_platform, window=WINDOW, max_share=0.15)["sweep"]
    assert set(again["cordon_already"]) == touched and set(again["cordon_plan"]) == CRITICAL_NODES - touched

    # uncordon: the XID the gauge still shows from before the cordon does not block it (the repair is
    # done); the GPU still missing does (the whole run is refused, nothing changed), until forced
    refused = gpu_node_uncordon(platform=sandbox_platform, nodes=sorted(touched), window=WINDOW, return_state=True)
    assert refused.is_failed() and "refused, nothing was changed" in refused.message
    assert "gpu-missing" in refused.message and "gpu-node-0003" not in refused.message.split("refused")[1]
    state, _ = _run_and_approve(gpu_node_uncordon, {"approve": True, "approver": "bob"}, platform=sandbox_platform,
                                nodes=sorted(touched), window=WINDOW, dry_run=False, force=True, poll_interval_s=0.5)
    assert state.is_completed(), state
    assert [r["step"] for r in state.result()["steps"]] == [f"uncordon {n}" for n in sorted(touched)]
    nodes = _nodes(sb)
    for name in touched:
        assert not nodes[name]["spec"].get("unschedulable") and not _ours(nodes[name])
        assert FINDING_ANNOTATION not in nodes[name]["metadata"].get("annotations", {})
        repair = json.loads(nodes[name]["metadata"]["annotations"][REPAIR_ANNOTATION])
        assert str(state.state_details.flow_run_id) in repair["by"] and repair["at"]
    assert json.loads(nodes["gpu-node-0003"]["metadata"]["annotations"][REPAIR_ANNOTATION])["xids"] == {"2": 79}
    # the next sweep no longer counts the XID the gauge keeps: the repaired node is not planned again
    after = gpu_monitoring_sweep(platform=sandbox_platform, window=WINDOW, max_share=0.15)["sweep"]
    assert "gpu-node-0003" not in after["cordon_plan"] + after["cordon_over_cap"]


# --- drain and Prometheus down ---------------------------------------------------------------------


def test_drain_evicts_but_never_forces_a_pod_disruption_budget(clean_sandbox):
    with api_client_from_kubeconfig(str(clean_sandbox.kubeconfig)) as api:
        blocked = evict_pods_on(api, "gpu-node-0009")  # kind 8: inference behind a PDB
        evicted = evict_pods_on(api, "gpu-node-0002")  # kind 1: one 8-GPU training pod
        left = list_raw(api, "pods", field_selector="spec.nodeName=gpu-node-0009").items
    assert [r["result"] for r in blocked] == ["blocked"] and "PodDisruptionBudget" in blocked[0]["detail"]
    assert any(p["metadata"]["name"].startswith("llm-serving-") for p in left)
    assert [r["result"] for r in evicted] == ["evicted"]


def test_prometheus_down_is_unknown_and_fails_the_run(clean_sandbox, sandbox_platform):
    clean_sandbox.fault("prometheus-down")
    with pytest.raises(httpx.ConnectError):  # the fault fired: nothing listens at Prometheus' address
        httpx.get(f"{clean_sandbox.urls['prometheus']}/-/ready", timeout=2)
    result = _sweep(clean_sandbox)
    assert result.status == "unknown" and [f.kind for f in result.findings] == [Kind.PROMETHEUS_UNAVAILABLE]
    assert {g.status.value for g in result.gpus} == {"unknown"}
    state = gpu_monitoring_sweep(platform=sandbox_platform, window=WINDOW, return_state=True)
    assert state.is_failed() and "unknown" in state.message and "cannot reach Prometheus" in state.message
    md = _markdown(state.state_details.flow_run_id, "gpu-sweep-")
    assert "Status: UNKNOWN" in md and "prometheus-unavailable" in md
    # a connection refused is transient: the query task ran once and was retried every time allowed
    query = _task_runs(state.state_details.flow_run_id, {"query-dcgm-metrics"})["query-dcgm-metrics"]
    assert query.state.is_failed() and query.run_count == 1 + TRANSIENT_RETRIES["retries"]


def test_kubernetes_api_down_fails_the_run_after_the_retries(clean_sandbox, sandbox_platform):
    clean_sandbox.fault("api-down")
    requests = _api_requests(clean_sandbox)
    state = gpu_monitoring_sweep(platform=sandbox_platform, window=WINDOW, return_state=True)
    assert state.is_failed()  # without the node list there is nothing to judge
    with pytest.raises(ApiException) as info:
        state.result()
    assert info.value.status == 503
    attempts = 1 + TRANSIENT_RETRIES["retries"]  # a 503 is transient
    # the fault fired on every attempt: two listings each, refused by the API server
    assert _api_requests(clean_sandbox) - requests == 2 * attempts
    fleet = _task_runs(state.state_details.flow_run_id, {"list-gpu-fleet"})["list-gpu-fleet"]
    assert fleet.state.is_failed() and fleet.run_count == attempts
