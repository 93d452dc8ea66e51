"""The GPU sweep against the exporter setups of real clusters, each scraped by the real Prometheus.

One sandbox for this module (started once, about 10 s): the standalone dcgm-exporter chart's pods
(`app.kubernetes.io/name=dcgm-exporter`), nodes named by FQDN, and one Prometheus with a scrape job
per setup (`sandbox.prometheus.ScrapeJob`): a relabelled scrape (`honor_labels: false`, exporter
pod labels on the target: `exported_pod`), a short `Hostname`, a dropped `Hostname` (mapped
through the target's pod IP), the exporter pod's name as `Hostname`, and an exporter with the
extended counters (`DCGM_EXP_XID_ERRORS_COUNT`, `DCGM_FI_DEV_ROW_REMAP_PENDING`).
"""

from __future__ import annotations

import gc
import json
import time
from datetime import datetime, timezone

import pytest
from kubernetes import client as k8s

from tasks.gpu_model import REPAIR_ANNOTATION, Kind, Severity, SweepSettings, SweepThresholds
from tasks.gpu_sweep import run_sweep, sweep
from tasks.kubernetes import api_client_from_kubeconfig, fetch_gpu_fleet
from tasks.prometheus import PrometheusUnavailable, fetch_dcgm, query_args
from tests.conftest import need_binary

DOMAIN = "gpu.example.internal"
JOBS = [
    {"name": "relabelled", "honor_labels": False, "target_pod_labels": True, "instance": "ip", "hostname": "node"},
    {"name": "short-hostname", "hostname": "short"},
    {"name": "no-hostname", "drop_hostname": True, "instance": "ip"},
    {"name": "pod-hostname", "hostname": "pod"},
    {"name": "extended", "hostname": "node", "counters": "extended"},
]
TH = SweepThresholds(window="20s", xid_resolution="2s")


def node(n: int) -> str:
    return f"gpu-node-{n:04d}.{DOMAIN}"


XID_NODE, IDLE_NODE, PENDING_NODE, TWO_XIDS_NODE, FREE_NODE = node(3), node(1), node(4), node(6), node(10)


def settings(job: str, **kw) -> SweepSettings:
    return SweepSettings(thresholds=TH, cluster="setups", metric_selector=f'job="{job}"', exporter_jobs=(job,), **kw)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    need_binary("prometheus", "prometheus")
    from sandbox.platform import Sandbox, _start_prometheus, start_core
    from sandbox.prometheus import wait_for_first_scrape

    sb = Sandbox(state_dir=tmp_path_factory.mktemp("setups"), nodes=20,
                 extra={"exporter_chart": "standalone", "node_domain": DOMAIN, "prometheus_jobs": JOBS})
    sb.up(components=[start_core, _start_prometheus])
    try:
        wait_for_first_scrape(sb)
        sb.fault("xid", node=TWO_XIDS_NODE, gpu=0, value=48)
        time.sleep(3 * sb.scrape_interval_s)
        sb.fault("xid", node=TWO_XIDS_NODE, gpu=0, value=119)  # overwrites 48 in the gauge
        sb.fault("xid", node=XID_NODE, gpu=2, value=79)
        sb.fault("idle-gpu", node=IDLE_NODE, gpu=3, value=0)
        sb.fault("row-remap-pending", node=PENDING_NODE, gpu=1)
        api = api_client_from_kubeconfig(str(sb.kubeconfig))
        deadline = time.monotonic() + 4 * TH.window_s
        while time.monotonic() < deadline:  # the idle GPU must be idle for a whole window
            r = sweep(api, sb.urls["prometheus"], settings("relabelled"))
            if any(f.kind is Kind.IDLE_HELD for f in r.findings):
                break
            time.sleep(2)
        yield sb, api
    finally:
        sb.down()


_LAST_48: list[float] = []


@pytest.fixture
def fresh_xids(setups):
    """XID 48 then 119 on TWO_XIDS_NODE's GPU 0, recently enough that 48 is still in the 20 s window.

    The module's sandbox lives longer than the window (the idle GPU alone needs a whole window), so a
    48 written once at set-up falls out of it while the tests run on a loaded machine; the pair is
    written again when the last one is older than half the window."""
    sb, _api = setups
    if not _LAST_48 or time.monotonic() - _LAST_48[-1] > TH.window_s / 2:
        sb.fault("xid", node=TWO_XIDS_NODE, gpu=0, value=48)
        _LAST_48.append(time.monotonic())
        time.sleep(1.5 * sb.scrape_interval_s)
        sb.fault("xid", node=TWO_XIDS_NODE, gpu=0, value=119)  # overwrites 48 in the gauge
        time.sleep(1.5 * sb.scrape_interval_s)
    return setups


def _by(result, kind):
    return [f for f in result.findings if f.kind is kind]


def _assert_faults_on_the_right_nodes(result):
    crit = {(f.node, f.gpu): f for f in _by(result, Kind.CRITICAL_XID)}
    assert set(crit) == {(XID_NODE, "2"), (TWO_XIDS_NODE, "0")}, [f.row() for f in result.findings]
    assert crit[(TWO_XIDS_NODE, "0")].summary.startswith("XID 48")  # the overwritten critical XID still counts
    assert result.status == "critical" and result.gpus_reporting == 128 and result.gpus_unknown == 0
    assert not _by(result, Kind.UNMAPPED_EXPORTER)
    return crit


def test_relabelled_scrape_attributes_to_the_workload_never_the_exporter(setups, fresh_xids):
    sb, api = setups
    result = sweep(api, sb.urls["prometheus"], settings("relabelled"))
    crit = _assert_faults_on_the_right_nodes(result)
    xid = crit[(XID_NODE, "2")]
    assert xid.namespace == "argo-job" and not xid.pod.startswith("dcgm-exporter")
    assert xid.owner.startswith("Workflow/") and xid.workflow.startswith("argo-job/rl-prod-")
    idle = _by(result, Kind.IDLE_HELD)
    assert [(f.node, f.gpu) for f in idle] == [(IDLE_NODE, "3")] and idle[0].owner.startswith("Workflow/")
    assert result.xid_source == "DCGM_FI_DEV_XID_ERRORS"


def test_short_hostname_maps_to_nodes_named_by_fqdn(setups, fresh_xids):
    sb, api = setups
    _assert_faults_on_the_right_nodes(sweep(api, sb.urls["prometheus"], settings("short-hostname")))


def test_dropped_hostname_maps_through_the_scrape_targets_pod_ip(setups, fresh_xids):
    sb, api = setups
    result = sweep(api, sb.urls["prometheus"], settings("no-hostname"))
    crit = _assert_faults_on_the_right_nodes(result)
    assert crit[(XID_NODE, "2")].uuid.startswith("GPU-")  # the detail query found its exporter by instance


def test_standalone_chart_exporters_are_found_by_the_default_selectors(setups, fresh_xids):
    sb, api = setups
    _assert_faults_on_the_right_nodes(sweep(api, sb.urls["prometheus"], settings("pod-hostname")))
    # with only the GPU operator's selector, no series maps: unknown with counts, never `warning`
    blind = sweep(api, sb.urls["prometheus"], settings("pod-hostname", exporter_selectors=("app=nvidia-dcgm-exporter",)))
    unmapped = _by(blind, Kind.UNMAPPED_EXPORTER)
    assert len(unmapped) == 1 and unmapped[0].evidence["exporters"] == 16 and unmapped[0].evidence["gpus"] == 128
    assert blind.status == "unknown" and blind.gpus_unknown == 128


def test_xid_counter_is_preferred_and_a_pending_remap_is_a_warning(setups, fresh_xids):
    sb, api = setups
    result = sweep(api, sb.urls["prometheus"], settings("extended"))
    assert result.xid_source == "DCGM_EXP_XID_ERRORS_COUNT"
    crit = _assert_faults_on_the_right_nodes(result)
    assert crit[(XID_NODE, "2")].evidence["source"] == "DCGM_EXP_XID_ERRORS_COUNT"
    pending = _by(result, Kind.ROW_REMAP_PENDING)
    assert [(f.node, f.gpu, f.severity) for f in pending] == [(PENDING_NODE, "1", Severity.WARNING)]
    assert not _by(result, Kind.ROW_REMAP)  # pending is not a failure: no cordon


def test_a_failed_detail_query_leaves_the_findings_standing(setups, fresh_xids):
    sb, api = setups
    s = settings("relabelled")

    collector: list[bool] = []  # the sweep parses and classifies with the cyclic collector paused

    class Failing:
        def result(self):
            collector.append(gc.isenabled())
            raise PrometheusUnavailable("Prometheus ran out of time for the query (timeout)")

    class Done:
        def __init__(self, fn):
            collector.append(gc.isenabled())
            self.value = fn()

        def result(self):
            return self.value

    result, _ = run_sweep(
        s, lambda: Done(lambda: fetch_gpu_fleet(api, exporter_selectors=s.exporter_selectors)),
        lambda: Done(lambda: fetch_dcgm(sb.urls["prometheus"], TH.window, **query_args(s))),
        lambda snap, hosts: Failing())
    assert {(f.node, f.gpu) for f in _by(result, Kind.CRITICAL_XID)} == {(XID_NODE, "2"), (TWO_XIDS_NODE, "0")}
    assert result.status == "critical" and result.metrics_error is None
    note = _by(result, Kind.DETAILS_MISSING)
    assert len(note) == 1 and "ran out of time" in note[0].evidence["error"]
    assert result.gpus_unknown == 0
    assert collector == [False, False, False] and gc.isenabled()


def _annotate(api, name: str, key: str, value: str | None) -> None:
    k8s.CoreV1Api(api).patch_node(name, {"metadata": {"annotations": {key: value}}})


def test_a_repair_discounts_the_kept_xid_until_a_new_one_or_an_exporter_restart(setups):
    sb, api = setups
    at = datetime.now(tz=timezone.utc).isoformat(timespec="seconds")
    time.sleep(1.5)
    _annotate(api, XID_NODE, REPAIR_ANNOTATION, json.dumps({"at": at, "xids": {"2": 79}}))
    try:
        result = sweep(api, sb.urls["prometheus"], settings("relabelled"))
        assert XID_NODE not in {f.node for f in _by(result, Kind.CRITICAL_XID)}
        stale = [f for f in _by(result, Kind.XID) if f.node == XID_NODE]
        assert stale and "before the last repair" in stale[0].summary
        # the exporter restarts (the gauge starts from 0) and the GPU fails again with the same XID
        sb.fault("exporter-restart", node=XID_NODE)
        time.sleep(2 * sb.scrape_interval_s + 1)
        sb.fault("xid", node=XID_NODE, gpu=2, value=79)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            result = sweep(api, sb.urls["prometheus"], settings("relabelled"))
            if XID_NODE in {f.node for f in _by(result, Kind.CRITICAL_XID)}:
                break
            time.sleep(2)
        assert XID_NODE in {f.node for f in _by(result, Kind.CRITICAL_XID)}
    finally:
        _annotate(api, XID_NODE, REPAIR_ANNOTATION, None)


def test_mig_time_sliced_and_init_container_holders_count(setups):
    sb, api = setups
    core = k8s.CoreV1Api(api)

    def pod(name, resources, init=None):
        spec = {"nodeName": FREE_NODE, "containers": [{"name": "main", "image": "x", "resources": {"limits": resources}}]}
        if init:
            spec["initContainers"] = [{"name": "warmup", "image": "x", "resources": {"limits": init}}]
        core.create_namespaced_pod("training", {"apiVersion": "v1", "kind": "Pod", "spec": spec, "status": {
            "phase": "Running"}, "metadata": {"name": name, "namespace": "training"}})

    pod("mig-job", {"nvidia.com/mig-1g.10gb": "1"})
    pod("sliced-job", {"nvidia.com/gpu.shared": "1"})
    pod("init-job", {"cpu": "1"}, init={"nvidia.com/gpu": "1"})
    try:
        sb.fault("node-not-ready", node=FREE_NODE)
        result = sweep(api, sb.urls["prometheus"], settings("relabelled"))
        nr = [f for f in _by(result, Kind.NODE_NOT_READY) if f.node == FREE_NODE]
        assert len(nr) == 1 and nr[0].severity is Severity.CRITICAL
        assert sorted(nr[0].evidence["gpu_pods"]) == ["training/init-job", "training/mig-job", "training/sliced-job"]
    finally:
        for name in ("mig-job", "sliced-job", "init-job"):
            core.delete_namespaced_pod(name, "training")
        sb.heal()
