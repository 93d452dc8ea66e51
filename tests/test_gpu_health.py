"""The GPU sweep's pure parts: PromQL answers, the join, classification, cordon plans, the heatmap.

Hand-built data only: no Prefect, no network (httpx.MockTransport answers in-process).
"""

from __future__ import annotations

import math

import httpx
import pytest

from tasks.gpu_classify import classify, needs_detail
from tasks.gpu_model import (
    DEFAULT_CRITICAL_XIDS,
    FINDING_ANNOTATION,
    REPAIR_ANNOTATION,
    ExporterPod,
    FleetSnapshot,
    GPUNode,
    GPUPod,
    GPUStatus,
    Kind,
    Severity,
    SweepSettings,
    SweepThresholds,
)
from tasks.gpu_pictures import heatmap
from tasks.gpu_plans import UNHEALTHY_TAINT_KEY, plan_cordon, plan_uncordon
from tasks.prometheus import (
    DCGMSnapshot,
    PrometheusQueryError,
    PrometheusUnavailable,
    detail_query,
    fetch_dcgm,
    merge_answers,
    query_vector,
    rules_verdict,
    sweep_queries,
    sweep_recording_rules,
)

TH = SweepThresholds(window="20s")
OLD = "2020-01-01T00:00:00Z"
NOW = 1_800_000_000.0


def fleet(n=2, gpus=8, holders=None, exporters=True, **node_kw):
    nodes = [GPUNode(f"g{i}", node_kw.get("ready", True), node_kw.get("unschedulable", False), gpus, gpus)
             for i in range(n)]
    exp = [ExporterPod("gpu-operator", f"dcgm-{i}", f"g{i}", f"10.0.0.{i}") for i in range(n)] if exporters else []
    pods = holders if holders is not None else [
        GPUPod("ml", f"train-{i}", f"g{i}", f"Workflow/wf-{i}", gpus, {}, OLD) for i in range(n)]
    return FleetSnapshot(nodes, pods, exp)


def series(m, value, **labels):
    return {"metric": {"m": m, **labels}, "value": [NOW, str(value)]}


def answers(n=2, gpus=8, util=70.0, temp=60.0, pods=True, skip=(), extra=()):
    """Phase-one answers of a healthy fleet of n nodes (exporter pods dcgm-i)."""
    util_s, temp_s, now_s = [], [], []
    for i in range(n):
        host = f"dcgm-{i}"
        now_s.append(series("gpus_now", gpus, Hostname=host))
        for g in range(gpus):
            if (i, g, "util") not in skip:
                holder = {"pod": f"train-{i}", "namespace": "ml"} if pods else {}
                util_s.append(series("util_avg", util, Hostname=host, gpu=str(g), **holder))
            if (i, g, "temp") not in skip:
                temp_s.append(series("temp_max", temp, Hostname=host, gpu=str(g)))
    return {"util": util_s, "temp": temp_s, "faults": list(extra), "exporters": now_s}


def _as_prometheus_answers(ans, th=None):
    """What Prometheus answers to `sweep_queries` for a fleet whose per-GPU window values are `ans`:
    per-exporter aggregates, and per GPU only what fails a filter (low or NaN utilisation, hot or NaN
    temperature); `xid_max` becomes the gauge's distinct value with when it was last seen."""
    th = th or TH
    out = {"util": [], "temp": [], "faults": [], "exporters": list(ans["exporters"])}
    agg = {}
    seen = set()
    for s in ans["util"]:
        m, v = s["metric"], float(s["value"][1])
        host = m["Hostname"]
        a = agg.setdefault(host, {"util_sum": 0.0, "util_n": 0, "temp_n": 0})
        if v == v:
            a["util_sum"] += v
            a["util_n"] += 1
        if not v == v or v < th.idle_util_pct:
            out["util"].append(s)
    for s in ans["temp"]:
        m, v = s["metric"], float(s["value"][1])
        if (m["Hostname"], m["gpu"]) not in seen:  # one per GPU, as `max by (Hostname, instance, gpu)` gives
            seen.add((m["Hostname"], m["gpu"]))
            agg.setdefault(m["Hostname"], {"util_sum": 0.0, "util_n": 0, "temp_n": 0})["temp_n"] += 1
        if not v == v or v > th.temp_c:
            out["temp"].append(s)
    for host, a in agg.items():
        out["util"] += [series("util_sum", a["util_sum"], Hostname=host), series("util_n", a["util_n"], Hostname=host)]
        out["temp"].append(series("temp_n", a["temp_n"], Hostname=host))
    for s in ans["faults"]:
        m = dict(s["metric"])
        if m.pop("m") == "xid_max":
            out["faults"].append(series("xid_seen", NOW, xid=s["value"][1], **m))
        else:
            out["faults"].append(s)
    return out


def snapshot(ans, detail=None, detail_hosts=()):
    snap = merge_answers(DCGMSnapshot(window="20s", at=NOW), _as_prometheus_answers(ans))
    if detail:
        merge_answers(snap, {"detail": detail})
        snap.detail_hosts.update(detail_hosts)
    return snap


def kinds(result):
    return sorted((f.kind.value, f.node, f.gpu) for f in result.findings)


# --- queries ---------------------------------------------------------------------------------


def test_sweep_queries_are_a_fixed_small_set_with_the_window():
    q = sweep_queries("20s", memory_temp_c=95, stale_after_s=120, exporter_jobs=["dcgm-exporter", "gpu.metrics"])
    assert set(q) == {"util", "temp", "faults", "exporters"}
    assert "avg_over_time(DCGM_FI_DEV_GPU_UTIL[20s])" in q["util"]
    # per exporter for the fleet; per GPU only what fails a filter (low or NaN utilisation, hot or NaN)
    assert "sum by (Hostname, instance) (avg by (Hostname, instance, gpu) (avg_over_time(DCGM_FI_DEV_GPU_UTIL[20s])) >= 0)" in q["util"]
    # under 5% or NaN, one evaluation of the window: clamp_max keeps values under 5 and NaN, drops the rest
    assert "(clamp_max(avg_over_time(DCGM_FI_DEV_GPU_UTIL[20s]), 5) != 5)" in q["util"]
    assert "exported_pod, exported_namespace" in q["util"]
    # filtered per series, then merged: the aggregation touches only what fails
    assert ("max by (Hostname, instance, gpu) (clamp_min(max_over_time(DCGM_FI_DEV_GPU_TEMP[20s]), 85) != 85)"
            in q["temp"])
    assert "max by (Hostname, instance, gpu) (max_over_time(DCGM_FI_DEV_ROW_REMAP_FAILURE[20s]) != 0)" in q["faults"]
    # `empty` is told in Python from the answering targets and gpus_now's (instance, job): no second pass
    assert "count by (Hostname, instance, job) (DCGM_FI_DEV_GPU_UTIL)" in q["exporters"]
    assert "unless" not in q["exporters"] and '"up_ok"' in q["exporters"]
    for metric in ("DCGM_FI_DEV_XID_ERRORS", "DCGM_EXP_XID_ERRORS_COUNT", "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
                   "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_DEV_ROW_REMAP_PENDING", "DCGM_FI_DEV_MEMORY_TEMP"):
        assert metric in q["faults"]
    assert 'count_values by (Hostname, instance, gpu) ("xid", DCGM_FI_DEV_XID_ERRORS != 0))[20s:1m]' in q["faults"]
    assert 'up{job=~"dcgm-exporter|gpu\\\\.metrics"}' in q["exporters"] and "> 120" in q["exporters"]
    scoped = sweep_queries("15m", metric_selector='cluster="a"')
    assert 'DCGM_FI_DEV_GPU_UTIL{cluster="a"}[15m]' in scoped["util"]
    with pytest.raises(ValueError, match="window"):
        sweep_queries("15 minutes")
    with pytest.raises(ValueError, match="exporter_job"):
        sweep_queries("15m", exporter_jobs=['x"} or vector(1) or {a="'])
    d = detail_query("20s", ["nvidia-dcgm-exporter-ab.c"])
    assert 'Hostname=~"nvidia-dcgm-exporter-ab\\\\.c"' in d and "count_over_time" in d and "UUID" in d


def _client(handler):
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_query_vector_errors_are_typed_transient_or_not():
    ok = {"status": "success", "data": {"resultType": "vector", "result": [series("x", 1)]}, "warnings": ["w"]}
    result, warnings = query_vector(_client(lambda _: httpx.Response(200, json=ok)), "http://p", "x")
    assert result[0]["value"][1] == "1" and warnings == ["w"]
    with pytest.raises(PrometheusUnavailable, match="503"):
        query_vector(_client(lambda _: httpx.Response(503, text="overloaded")), "http://p", "x")
    with pytest.raises(PrometheusQueryError, match="bad_data"):
        query_vector(_client(lambda _: httpx.Response(400, json={"status": "error", "errorType": "bad_data",
                                                                 "error": "parse error"})), "http://p", "x")
    with pytest.raises(PrometheusUnavailable, match="ran out of time"):
        query_vector(_client(lambda _: httpx.Response(422, json={
            "status": "error", "errorType": "execution", "error": "expanding series: context deadline exceeded"})),
            "http://p", "x")
    with pytest.raises(PrometheusQueryError, match="not JSON"):
        query_vector(_client(lambda _: httpx.Response(200, text="<html>login</html>")), "http://p", "x")

    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(PrometheusUnavailable, match="cannot reach"):
        query_vector(_client(refuse), "http://p", "x")
    from tasks._retry import is_transient

    assert is_transient(PrometheusUnavailable("x")) and not is_transient(PrometheusQueryError("x"))


def _rules_api(rules, *, health="ok", last="now", interval=60, drop=(), hashes=None):
    from datetime import UTC, datetime

    stamp = datetime.now(tz=UTC).isoformat().replace("+00:00", "123Z") if last == "now" else last
    out = [{"name": name, "type": "recording", "health": health, "lastError": "boom" if health == "err" else "",
            "lastEvaluation": stamp, "labels": {"sweep_query": (hashes or {}).get(name, h)}}
           for name, _, h in rules if name not in drop]
    return {"status": "success", "data": {"groups": [{"name": "gpu-sweep", "interval": interval,
                                                       "evaluationTime": 0.5, "rules": out}]}}


def test_recorded_series_are_used_only_when_every_rule_is_loaded_healthy_fresh_and_of_these_queries():
    rules = sweep_recording_rules(sweep_queries("15m"))
    assert [r[0] for r in rules] == ["gpu_sweep:util", "gpu_sweep:temp", "gpu_sweep:faults", "gpu_sweep:exporters",
                                     "gpu_sweep:evaluated"]
    assert sweep_recording_rules(sweep_queries("15m", temp_c=80))[1][2] != rules[1][2]  # thresholds change the hash
    now = __import__("time").time()
    assert rules_verdict(_rules_api(rules), rules, now) is None
    assert "not loaded" in rules_verdict({"status": "success", "data": {"groups": []}}, rules, now)
    other = sweep_recording_rules(sweep_queries("20s"))
    assert "other settings" in rules_verdict(_rules_api(other), rules, now)
    assert "gpu_sweep:temp" in rules_verdict(_rules_api(rules, drop=("gpu_sweep:temp",)), rules, now)
    assert "'err': boom" in rules_verdict(_rules_api(rules, health="err"), rules, now)
    assert "'unknown'" in rules_verdict(_rules_api(rules, health="unknown"), rules, now)  # not evaluated yet
    assert "last evaluated" in rules_verdict(_rules_api(rules, last=OLD), rules, now)
    # Go's zero time is how Prometheus shows a rule never evaluated
    assert "last evaluated 0001-01-01" in rules_verdict(_rules_api(rules, last="0001-01-01T00:00:00Z"), rules, now)
    # an unrelated gpu_sweep: rule (no sweep_query label) is neither one of the sweep's nor a reason to use them
    stray = {"name": "gpu_sweep:mine", "type": "recording", "health": "ok", "lastEvaluation": OLD}
    only_stray = {"status": "success", "data": {"groups": [{"name": "own", "interval": 60, "rules": [stray]}]}}
    assert "other settings" in rules_verdict(only_stray, rules, now)
    with_stray = _rules_api(rules)
    with_stray["data"]["groups"][0]["rules"].append(stray)
    assert rules_verdict(with_stray, rules, now) is None

    # the sweep: rules API + the marker's timestamp + one read at that instant; else the raw queries, saying why
    asked = []
    answers = {"timestamp": [{"metric": {}, "value": [now, "1700000000"]}],
               "recorded": [series("gpus_now", 8, Hostname="h1", job="dcgm-exporter", instance="10.0.0.1:9400")]}
    answers["recorded"][0]["metric"]["__name__"] = "gpu_sweep:exporters"

    def prometheus(body):
        def handle(request):
            if request.url.path.endswith("/rules"):
                asked.append("rules")
                return httpx.Response(200, json=body) if body else httpx.Response(404, text="not found")
            form = dict(httpx.QueryParams(request.content.decode()))
            kind = "timestamp" if form["query"].startswith("timestamp(") else (
                "recorded" if "(gpu_sweep:" in form["query"] else "raw")
            asked.append((kind, form.get("time")))
            if kind == "recorded" and "(gpu_sweep:exporters{" not in form["query"]:
                return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": []}})
            return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector",
                                                                          "result": answers.get(kind, [])}})
        return _client(handle)

    snap = fetch_dcgm("http://p", "15m", client=prometheus(_rules_api(rules)))
    assert snap.source == "recording rules" and snap.at == 1700000000 and snap.round_trips == 6
    assert asked[:2] == ["rules", ("timestamp", None)] and asked[2:] == [("recorded", "1700000000.000")] * 4
    assert snap.gpus_now == {"h1": 8}
    for body, why in ((None, "HTTP 404"), (_rules_api(rules, health="err"), "boom")):
        asked.clear()
        snap = fetch_dcgm("http://p", "15m", client=prometheus(body))
        assert snap.source == "raw queries" and why in snap.source_note and snap.round_trips == 5
        assert asked[0] == "rules" and sorted(a[0] for a in asked[1:]) == ["raw"] * 4
    asked.clear()
    snap = fetch_dcgm("http://p", "15m", client=prometheus(_rules_api(rules)), source="raw", at=1700000000)
    assert snap.source == "raw queries" and snap.round_trips == 4 and "rules" not in asked
    assert {a[1] for a in asked} == {"1700000000.000"}
    with pytest.raises(ValueError, match="metrics_source"):
        fetch_dcgm("http://p", "15m", source="rules")
    # the settings refuse it first, so the flow fails at its start instead of sweeping with every GPU unknown
    with pytest.raises(ValueError, match=r"metrics_source: expected one of 'auto', 'raw', got 'rules'"):
        SweepSettings(metrics_source="rules")
    with pytest.raises(ValueError, match=r"xid_baseline: expected one of 'repair', 'cordon', got 'restart'"):
        SweepSettings(xid_baseline="restart")


def test_duplicated_series_keep_the_worst_value_and_nan_loses_to_a_number():
    ans = answers(n=1)
    ans["temp"].append(series("temp_max", 91, Hostname="dcgm-0", gpu="3"))  # a second scrape job
    snap = snapshot(ans)
    merge_answers(snap, {"x": [series("temp_max", "NaN", Hostname="dcgm-0", gpu="3"),
                               series("temp_max", 60, Hostname="dcgm-0", gpu="4"),
                               series("temp_max", "NaN", Hostname="dcgm-0", gpu="4")]})
    assert snap.values[("dcgm-0", "3")]["temp_max"] == 91
    assert snap.values[("dcgm-0", "4")]["temp_max"] == 60
    result = classify(fleet(1), snap, TH)
    assert kinds(result) == [("gpu-hot", "g0", "3")]


# --- classification --------------------------------------------------------------------------


def test_clean_fleet_has_no_findings_and_every_gpu_healthy():
    result = classify(fleet(), snapshot(answers()), TH)
    assert result.findings == [] and result.status == "ok"
    assert result.gpu_status_counts == {"healthy": 16}
    assert result.gpus_reporting == 16 and result.gpus_held == 16 and result.fleet_util_pct == 70.0
    assert needs_detail(fleet(), snapshot(answers()), TH) == set()


def test_prometheus_unavailable_is_unknown_never_all_clear():
    result = classify(fleet(), DCGMSnapshot.unavailable("20s", "connection refused"), TH)
    assert result.status == "unknown"
    assert [f.kind for f in result.findings] == [Kind.PROMETHEUS_UNAVAILABLE]
    assert result.findings[0].severity is Severity.CRITICAL
    assert {g.status for g in result.gpus} == {GPUStatus.UNKNOWN} and len(result.gpus) == 16


def test_critical_xid_set_and_application_xids():
    extra = [series("xid_max", 79, Hostname="dcgm-0", gpu="2"), series("xid_max", 13, Hostname="dcgm-1", gpu="5")]
    snap = snapshot(answers(extra=extra))
    assert needs_detail(fleet(), snap, TH) == {"dcgm-0", "dcgm-1"}
    detail = [series("util", 70, Hostname="dcgm-0", gpu="2", UUID="GPU-abc", pod="train-0", namespace="ml")]
    merge_answers(snap, {"detail": detail})
    result = classify(fleet(), snap, TH)
    crit = [f for f in result.findings if f.kind is Kind.CRITICAL_XID][0]
    assert (crit.node, crit.gpu, crit.uuid, crit.pod, crit.namespace, crit.owner) == (
        "g0", "2", "GPU-abc", "train-0", "ml", "Workflow/wf-0")
    assert crit.cordon_reason == "xid-79" and "fell off the bus" in crit.summary
    assert crit.evidence["window"] == "20s" and crit.evidence["DCGM_FI_DEV_XID_ERRORS"] == [79]
    info = [f for f in result.findings if f.kind is Kind.XID][0]
    assert info.severity is Severity.INFO and info.cordon_reason is None
    assert (info.node, info.gpu) == ("g1", "5") and "13 (graphics engine exception)" in info.summary
    assert result.status == "critical"


def test_configured_critical_xids_decide_what_is_critical():
    """The configured set is what counts: a listed XID is critical, an unlisted one only `info`."""
    from blocks.config import GPUThresholds

    extra = [series("xid_max", 79, Hostname="dcgm-0", gpu="2"), series("xid_max", 13, Hostname="dcgm-1", gpu="5")]
    th = SweepThresholds.from_config(GPUThresholds(critical_xids=[13]), window="20s")
    assert 79 in DEFAULT_CRITICAL_XIDS and 13 not in DEFAULT_CRITICAL_XIDS  # the config's default, not this test's
    by_kind = {f.kind: f for f in classify(fleet(), snapshot(answers(extra=extra)), th).findings}
    assert set(by_kind) == {Kind.CRITICAL_XID, Kind.XID}
    assert (by_kind[Kind.CRITICAL_XID].node, by_kind[Kind.CRITICAL_XID].gpu) == ("g1", "5")
    assert by_kind[Kind.CRITICAL_XID].cordon_reason == "xid-13"
    assert (by_kind[Kind.XID].node, by_kind[Kind.XID].gpu, by_kind[Kind.XID].severity) == ("g0", "2", Severity.INFO)
    # an XID no catalogue names still classifies by the configured set, shown by its number
    odd = SweepThresholds(window="20s", critical_xids=frozenset({140}))
    res = classify(fleet(), snapshot(answers(extra=[series("xid_max", 140, Hostname="dcgm-0", gpu="1")])), odd)
    assert [(f.kind, f.summary) for f in res.findings] == [(Kind.CRITICAL_XID, "XID 140")]


def test_row_remap_and_memory_temperature_and_nan_from_filters():
    extra = [series("rows_max", 2, Hostname="dcgm-0", gpu="1"), series("row_fail_max", 1, Hostname="dcgm-0", gpu="1"),
             series("memory_temp_max", 101, Hostname="dcgm-1", gpu="0"),
             series("memory_temp_max", "NaN", Hostname="dcgm-1", gpu="7")]
    result = classify(fleet(), snapshot(answers(extra=extra)), TH)
    assert kinds(result) == [("memory-hot", "g1", "0"), ("metric-nan", "g1", "7"), ("row-remap", "g0", "1")]
    row = [f for f in result.findings if f.kind is Kind.ROW_REMAP][0]
    assert row.cordon_reason == "row-remap-failure" and row.severity is Severity.CRITICAL
    nan = [g for g in result.gpus if (g.node, g.gpu) == ("g1", "7")][0]
    assert nan.status is GPUStatus.UNKNOWN


def test_metric_absent_on_some_gpus_and_all_nan_utilisation():
    ans = answers(skip={(0, 3, "temp")})
    ans["util"].append(series("util_avg", "NaN", Hostname="dcgm-1", gpu="6", pod="train-1", namespace="ml"))
    ans["util"] = [s for s in ans["util"] if not (s["metric"]["Hostname"] == "dcgm-1" and s["metric"]["gpu"] == "6"
                                                   and s["value"][1] != "NaN")]
    result = classify(fleet(), snapshot(ans), TH)
    # counted per exporter: the node says how many GPUs lack the metric
    assert kinds(result) == [("metric-missing", "g0", None), ("metric-nan", "g1", "6")]
    assert "DCGM_FI_DEV_GPU_TEMP" in result.findings[0].summary and "for 1 GPU" in result.findings[0].summary
    assert result.status == "warning"


def test_gpu_missing_counts_against_capacity_and_names_the_gpu_from_details():
    ans = answers()
    ans["exporters"][0] = series("gpus_now", 7, Hostname="dcgm-0")
    snap = snapshot(ans)
    assert needs_detail(fleet(), snap, TH) == {"dcgm-0"}
    detail = [series("util", 70, Hostname="dcgm-0", gpu=str(g), UUID=f"GPU-{g}") for g in range(8) if g != 4]
    merge_answers(snap, {"detail": detail})
    snap.detail_hosts.add("dcgm-0")
    result = classify(fleet(), snap, TH)
    missing = [f for f in result.findings if f.kind is Kind.GPU_MISSING]
    assert len(missing) == 1 and missing[0].gpu == "4" and missing[0].cordon_reason == "gpu-missing"
    assert missing[0].evidence["gpus_reporting"] == 7 and missing[0].evidence["capacity"] == 8
    assert [g.status for g in result.gpus if g.node == "g0"].count(GPUStatus.MISSING) == 1


def test_exporter_down_stale_and_absent_are_unknown_not_healthy():
    ans = answers(n=3)
    ans["exporters"] = [s for s in ans["exporters"] if s["metric"]["Hostname"] == "dcgm-2"]  # 0, 1: nothing now
    ans["exporters"].append(series("up", 0, instance="dcgm-0:9400", job="dcgm-exporter"))
    f = fleet(3)
    f.exporters = [e for e in f.exporters if e.node != "g1"]  # g1 has no exporter pod at all, no metrics
    for part in ("util", "temp"):
        ans[part] = [s for s in ans[part] if s["metric"]["Hostname"] != "dcgm-1"]
    result = classify(f, snapshot(ans), TH)
    assert kinds(result) == [("exporter-down", "g0", None), ("no-exporter", "g1", None)]
    assert {g.status for g in result.gpus if g.node in ("g0", "g1")} == {GPUStatus.UNKNOWN}
    assert result.gpus_reporting == 8
    stale = answers(n=1)
    stale["exporters"].append(series("up_age", 600, instance="10.0.0.0:9400", job="dcgm-exporter"))
    result = classify(fleet(1), snapshot(stale), TH)  # mapped through the exporter pod's IP
    assert kinds(result) == [("exporter-stale", "g0", None)]


def test_node_not_ready_or_cordoned_while_gpus_are_held():
    result = classify(fleet(1, ready=False, unschedulable=True), snapshot(answers(n=1)), TH)
    assert kinds(result) == [("cordoned-with-gpus-held", "g0", None), ("node-not-ready", "g0", None)]
    assert [f.severity for f in result.findings if f.kind is Kind.NODE_NOT_READY] == [Severity.CRITICAL]
    empty = classify(fleet(1, ready=None, holders=[]), snapshot(answers(n=1, pods=False)), TH)
    assert [(f.kind, f.severity) for f in empty.findings] == [(Kind.NODE_NOT_READY, Severity.WARNING)]


def _idle_detail(host, gpu, util_max, samples=10, gr=None, pod="train-0"):
    out = [series("util", util_max, Hostname=host, gpu=gpu, UUID=f"GPU-{gpu}", pod=pod, namespace="ml"),
           series("util_max", util_max, Hostname=host, gpu=gpu), series("util_samples", samples, Hostname=host, gpu=gpu),
           series("fb_used", 40000, Hostname=host, gpu=gpu), series("power_avg", 80, Hostname=host, gpu=gpu)]
    if gr is not None:
        out.append(series("gr_max", gr, Hostname=host, gpu=gpu))
    return out


def test_idle_but_held_needs_the_whole_window_and_names_pod_and_owner():
    ans = answers(n=1)
    for s in ans["util"]:
        if s["metric"]["gpu"] in ("0", "1", "2", "3"):
            s["value"][1] = "1.0"
    snap = snapshot(ans)
    assert needs_detail(fleet(1), snap, TH) == {"dcgm-0"}
    detail = (_idle_detail("dcgm-0", "0", 0.0) + _idle_detail("dcgm-0", "1", 30.0)  # busy once: not idle
              + _idle_detail("dcgm-0", "2", 0.0, samples=1)  # too few samples to judge
              + _idle_detail("dcgm-0", "3", 0.0, gr=0.4))  # graphics engine busy
    merge_answers(snap, {"detail": detail})
    snap.detail_hosts.add("dcgm-0")
    result = classify(fleet(1), snap, TH)
    assert kinds(result) == [("idle-but-held", "g0", "0")]
    f = result.findings[0]
    assert (f.pod, f.namespace, f.owner, f.uuid) == ("train-0", "ml", "Workflow/wf-0", "GPU-0")
    assert f.evidence["DCGM_FI_DEV_GPU_UTIL_max"] == 0 and f.evidence["window"] == "20s"
    assert f.evidence["fb_used_mib"] == 40000
    young = fleet(1, holders=[GPUPod("ml", "train-0", "g0", "Job/j", 8, {}, "2099-01-01T00:00:00Z")])
    assert classify(young, snap, TH).findings == []  # younger than the window: not judged


def test_idle_without_dcgm_attribution_falls_back_to_the_nodes_gpu_pods():
    holders = [GPUPod("ml", "solo", "g0", "Job/solo", 2, {}, OLD)]
    ans = answers(n=1, util=0.0, pods=False)
    f = fleet(1, holders=holders)
    snap = snapshot(ans)
    assert needs_detail(f, snap, TH) == {"dcgm-0"}  # 8 idle GPUs, only 6 free
    detail = []
    for g in range(8):
        detail += _idle_detail("dcgm-0", str(g), 0.0, pod="")
    merge_answers(snap, {"detail": detail})
    snap.detail_hosts.add("dcgm-0")
    result = classify(f, snap, TH)
    assert [(x.kind, x.pod, x.owner) for x in result.findings] == [(Kind.IDLE_HELD, "solo", "Job/solo")]
    assert result.findings[0].evidence["free_gpus"] == 6
    # 2 busy GPUs (the pod's) and 6 idle free ones: nothing to report
    busy = answers(n=1, util=0.0, pods=False)
    for s in busy["util"][:2]:
        s["value"][1] = "90"
    assert needs_detail(f, snapshot(busy), TH) == set()
    assert classify(f, snapshot(busy), TH).findings == []


def test_hostname_as_node_name_and_unmapped_hostnames():
    ans = answers(n=1)
    for part in ans.values():
        for s in part:
            s["metric"]["Hostname"] = "g0"  # hostNetwork exporter: Hostname is the node
    ans["temp"].append(series("temp_max", 50, Hostname="stranger", gpu="0"))
    result = classify(fleet(1, exporters=False), snapshot(ans), TH)
    assert kinds(result) == [("unmapped-exporter", None, None)]
    assert result.gpus_reporting == 8


def test_conflicting_holders_are_reported_in_the_owner_column():
    ans = answers(n=1, extra=[series("xid_max", 79, Hostname="dcgm-0", gpu="0")])
    snap = snapshot(ans, detail=[series("util", 70, Hostname="dcgm-0", gpu="0", pod="train-0", namespace="ml"),
                                 series("util", 70, Hostname="dcgm-0", gpu="0", pod="other", namespace="ml")],
                    detail_hosts={"dcgm-0"})
    assert snap.labels[("dcgm-0", "0")]["other_pod"] in ("other", "train-0")
    f = [x for x in classify(fleet(1), snap, TH).findings if x.kind is Kind.CRITICAL_XID][0]
    assert "conflicting holders" in f.owner


def test_thresholds_from_config_with_overrides():
    from blocks.config import GPUThresholds

    th = SweepThresholds.from_config(GPUThresholds(), window="20s", temp_c=None, stale_after="30s")
    assert (th.window, th.window_s, th.temp_c, th.stale_after_s) == ("20s", 20, 85.0, 30.0)
    with pytest.raises(ValueError, match="'soon'"):
        SweepThresholds.from_config(GPUThresholds(), window="soon")
    with pytest.raises(ValueError, match="'2 minutes'"):
        SweepThresholds.from_config(GPUThresholds(), stale_after="2 minutes")


# --- cordon plans ----------------------------------------------------------------------------


def _critical_fleet(n, bad):
    extra = [series("xid_max", 79, Hostname=f"dcgm-{i}", gpu="0") for i in bad]
    f = fleet(n)
    return f, classify(f, snapshot(answers(n=n, extra=extra)), TH)


def test_cordon_plan_is_capped_and_idempotent():
    f, result = _critical_fleet(20, bad=[1, 2, 3, 4])
    plan = plan_cordon(result, f.nodes, 0.10)
    assert plan.cap == 2 and len(plan.actions) == 2 and len(plan.over_cap) == 2
    assert plan.actions[0].reason == "xid-79"
    assert {a.node for a in plan.actions + plan.over_cap} == {"g1", "g2", "g3", "g4"}
    f.nodes[1].unschedulable = True
    f.nodes[1].taints = [{"key": UNHEALTHY_TAINT_KEY, "value": "xid-79", "effect": "NoSchedule"}]
    again = plan_cordon(result, f.nodes, 0.10)
    assert again.already == ["g1"] and len(again.actions) == 2 and "g1" not in again.nodes
    small, res_small = _critical_fleet(3, bad=[0])
    assert plan_cordon(res_small, small.nodes, 0.10).nodes == ["g0"]  # the cap is at least one node
    md = plan.markdown(dry_run=True)
    assert "Dry run" in md and "over the cap" in md.lower() and UNHEALTHY_TAINT_KEY in md
    with pytest.raises(ValueError, match="max_share"):
        plan_cordon(result, f.nodes, 0)


def test_warnings_never_cordon():
    f = fleet(2)
    result = classify(f, snapshot(answers(temp=99)), TH)
    assert result.status == "warning" and plan_cordon(result, f.nodes, 1.0).actions == []


def test_uncordon_only_our_nodes_and_only_when_healthy():
    f, result = _critical_fleet(4, bad=[0])
    for node in f.nodes[:2]:
        node.unschedulable = True
        node.taints = [{"key": UNHEALTHY_TAINT_KEY, "value": "xid-79", "effect": "NoSchedule"}]
        node.annotations = {FINDING_ANNOTATION: "{}"}
    f.nodes[3].unschedulable = True  # g3: cordoned by someone else (no taint of ours)
    plan = plan_uncordon(["g0", "g1", "g2", "g3", "nope"], f.nodes, result)
    assert plan.actions == ["g1"] and plan.in_service == ["g2"]  # g2 is schedulable already: nothing to do
    assert set(plan.refused) == {"g0", "g3", "nope"} and "critical-xid" in plan.refused["g0"]
    assert "not by this project" in plan.refused["g3"]
    assert plan.facts() == {"uncordon": [{"node": "g1", "uid": ""}], "in_service": ["g2"]}
    assert plan_uncordon(["g0"], f.nodes, result, force=True).actions == ["g0"]
    unknown = classify(f, DCGMSnapshot.unavailable("20s", "down"), TH)
    assert plan_uncordon(["g1"], f.nodes, unknown).actions == []


# --- the heatmap -----------------------------------------------------------------------------


def test_heatmap_marks_faults_and_bins_big_fleets():
    f, result = _critical_fleet(4, bad=[2])
    hm = heatmap(result)
    assert hm.columns == 8 and hm.row_labels == ["g0", "g1", "g2", "g3"] and hm.nodes_per_row == 1
    assert hm.bad[2][0] == 1 and sum(map(sum, hm.bad)) == 1 and hm.util[0][0] == 70.0
    _, res_big = _critical_fleet(300, bad=[5])
    hm = heatmap(res_big, max_rows=64)
    assert len(hm.row_labels) <= 64 and hm.nodes_per_row == 5 and sum(map(sum, hm.bad)) == 1
    unknown = heatmap(classify(fleet(1), DCGMSnapshot.unavailable("20s", "x"), TH))
    assert all(math.isnan(v) for v in unknown.util[0]) and sum(unknown.unknown[0]) == 8


def test_heatmap_png_stays_small_for_a_big_fleet():
    from tasks.gpu_pictures import render_heatmap_png
    from tasks.reports import png_data_uri

    _, res_big = _critical_fleet(2000, bad=[5, 600])
    fig = render_heatmap_png(heatmap(res_big), "2000 nodes")
    uri = png_data_uri(fig)
    assert uri.startswith("data:image/png;base64,") and len(uri) < 200_000


# --- issue 10: exporter setups, XIDs as a last-value gauge, holders, degraded details -------------


def test_holders_include_mig_time_sliced_hami_and_init_containers():
    from tasks.gpu_model import GPUResources
    from tasks.kubernetes import _sweep_pod, gpu_requests

    def pod(limits, init=None, name="p"):
        spec = {"nodeName": "g0", "containers": [{"name": "c", "resources": {"limits": limits}}]}
        if init:
            spec["initContainers"] = [{"name": "i", "resources": {"limits": init}}]
        return {"metadata": {"name": name, "namespace": "ml", "labels": {"workflows.argoproj.io/workflow": "wf"}},
                "spec": spec, "status": {}}

    assert gpu_requests(pod({"nvidia.com/mig-1g.10gb": "2"})) == {"nvidia.com/mig-1g.10gb": 2}
    assert gpu_requests(pod({"nvidia.com/gpu": "1"}, init={"nvidia.com/gpu": "4"})) == {"nvidia.com/gpu": 4}
    for limits, init in (({"nvidia.com/mig-3g.40gb": "1"}, None), ({"nvidia.com/gpu.shared": "1"}, None),
                         ({"nvidia.com/gpumem": "2000"}, None), ({"cpu": "1"}, {"nvidia.com/gpu": "1"})):
        held = _sweep_pod(pod(limits, init), [[("app", "nvidia-dcgm-exporter")]])
        assert held is not None and held.gpus_held == 1 and held.workflow == "wf", (limits, init)
    # resource names are configurable: a platform that names its slices otherwise
    custom = GPUResources(whole=("example.com/gpu",), shared=(), prefixes=())
    assert _sweep_pod(pod({"nvidia.com/gpu.shared": "1"}), [], custom) is None
    assert _sweep_pod(pod({"example.com/gpu": "2"}), [], custom).whole_gpus == 2


def test_hostnames_map_as_pod_node_short_fqdn_or_through_the_target_ip():
    from tasks.gpu_classify import HostMap

    f = FleetSnapshot([GPUNode("gpu-1.dc.example", True, False, 8, 8), GPUNode("gpu-2", True, False, 8, 8)], [],
                      [ExporterPod("gpu-operator", "dcgm-abc", "gpu-1.dc.example", "10.1.0.7")])
    m = HostMap(f)
    assert m.host("dcgm-abc") == m.host("gpu-1") == m.host("gpu-1.dc.example") == "gpu-1.dc.example"
    assert m.host("gpu-2.other.example") == "gpu-2" and m.host("@10.1.0.7:9400") == "gpu-1.dc.example"
    assert m.host("@10.9.9.9:9400") is None and m.host("elsewhere") is None


def test_exported_labels_name_the_holder_and_the_exporter_pod_never_does():
    from tasks.gpu_classify import holder_of

    exporters = {"dcgm-0"}
    assert holder_of({"pod": "dcgm-0", "namespace": "gpu-operator", "exported_pod": "train-0",
                      "exported_namespace": "ml"}, exporters) == ("ml", "train-0")
    assert holder_of({"pod": "dcgm-0", "namespace": "gpu-operator"}, exporters) is None
    assert holder_of({"pod": "train-0", "namespace": "ml"}, exporters) == ("ml", "train-0")


def _xid_snap(code_seen: dict[int, float], counter: dict[int, float] | None = None):
    ans = answers(n=1)
    snap = snapshot(ans)
    snap.xids[("dcgm-0", "2")] = dict(code_seen)
    if counter is not None:
        snap.per_host["dcgm-0"]["xid_counter"] = 8
        snap.xid_counts[("dcgm-0", "2")] = dict(counter)
    return snap


def test_every_distinct_xid_counts_and_a_repair_discounts_what_the_gauge_kept():
    import json as _json
    from datetime import datetime, timezone

    snap = _xid_snap({48: NOW - 10, 119: NOW - 2})  # 48 overwritten by 119 within the window
    result = classify(fleet(1), snap, TH)
    assert [(f.kind, f.gpu) for f in result.findings if f.severity is Severity.CRITICAL] == [(Kind.CRITICAL_XID, "2")]
    assert result.xid_source == "DCGM_FI_DEV_XID_ERRORS" and result.xid_last == {"g0": {"2": 119}}
    repaired = fleet(1)
    at = datetime.fromtimestamp(NOW - 60, tz=timezone.utc).isoformat()
    repaired.nodes[0].annotations[REPAIR_ANNOTATION] = _json.dumps({"at": at, "xids": {"2": 79}})
    kept = classify(repaired, _xid_snap({79: NOW - 1}), TH)  # the gauge still shows the repaired XID
    assert not [f for f in kept.findings if f.kind is Kind.CRITICAL_XID]
    assert "before the last repair" in [f for f in kept.findings if f.kind is Kind.XID][0].summary
    new = classify(repaired, _xid_snap({79: NOW - 100, 48: NOW - 1}), TH)  # a new XID after the repair
    assert [f.summary for f in new.findings if f.kind is Kind.CRITICAL_XID] == ["XID 48 (double-bit ECC error)"]
    repaired.exporters[0].started = datetime.fromtimestamp(NOW - 30, tz=timezone.utc).isoformat()
    again = classify(repaired, _xid_snap({79: NOW - 1}), TH)  # same XID, but after the exporter restarted
    assert [f.gpu for f in again.findings if f.kind is Kind.CRITICAL_XID] == ["2"]
    # the counter is preferred where the exporter exports it, and the report says so
    counted = classify(fleet(1), _xid_snap({79: NOW - 1}, counter={}), TH)
    assert counted.xid_source == "none" and not [f for f in counted.findings if f.kind is Kind.CRITICAL_XID]
    counted = classify(fleet(1), _xid_snap({}, counter={74: NOW - 1}), TH)
    assert counted.xid_source == "DCGM_EXP_XID_ERRORS_COUNT"
    assert [f.summary for f in counted.findings if f.kind is Kind.CRITICAL_XID] == ["XID 74 (NVLink error)"]


def test_row_remap_failure_is_critical_pending_a_warning_rows_alone_info():
    extra = [series("rows_max", 4, Hostname="dcgm-0", gpu="1"),
             series("rows_max", 2, Hostname="dcgm-0", gpu="2"), series("row_pending_max", 1, Hostname="dcgm-0", gpu="2"),
             series("rows_max", 3, Hostname="dcgm-0", gpu="3"), series("row_fail_max", 1, Hostname="dcgm-0", gpu="3")]
    result = classify(fleet(1), snapshot(answers(n=1, extra=extra)), TH)
    got = sorted((f.gpu, f.kind.value, f.severity.value, f.cordon_reason) for f in result.findings)
    assert got == [("1", "remapped-rows", "info", None), ("2", "row-remap-pending", "warning", None),
                   ("3", "row-remap", "critical", "row-remap-failure")]
    assert [f.evidence["DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"] for f in result.findings if f.gpu == "1"] == [4]


def test_most_gpus_unknown_is_unknown_and_unmapped_series_are_counted():
    ans = answers(n=3)
    snap = snapshot(ans)
    f = fleet(3)
    f.exporters = []  # the exporter pods are not found (another chart's labels): Hostnames map to nothing
    result = classify(f, snap, TH)
    unmapped = [x for x in result.findings if x.kind is Kind.UNMAPPED_EXPORTER]
    assert len(unmapped) == 1 and unmapped[0].evidence["exporters"] == 3 and unmapped[0].evidence["gpus"] == 24
    assert result.status == "unknown" and result.gpus_unknown == 24


def test_a_failed_detail_query_keeps_the_findings_and_says_what_is_missing():
    from tasks.prometheus import with_detail_error

    ans = answers(extra=[series("xid_max", 79, Hostname="dcgm-0", gpu="2")])
    ans["exporters"][1] = series("gpus_now", 7, Hostname="dcgm-1")
    snap = with_detail_error(snapshot(ans), "PrometheusUnavailable: timed out")
    result = classify(fleet(), snap, TH)
    assert {f.kind for f in result.findings} == {Kind.CRITICAL_XID, Kind.GPU_MISSING, Kind.DETAILS_MISSING}
    assert result.status == "critical" and result.metrics_error is None
    missing = [f for f in result.findings if f.kind is Kind.GPU_MISSING][0]
    assert "follow-up query failed" in missing.evidence["missing_gpus"]


def test_critical_findings_name_the_workflow_and_train_on_push_commits_are_found():
    from tasks.gpu_training_notes import training_commits

    holders = [GPUPod("argo-job", "wf-a-pod", "g0", "Workflow/wf-a", 8, {}, OLD, workflow="wf-a"),
               GPUPod("ml", "train-1", "g1", "Job/x", 8, {}, OLD)]
    result = classify(fleet(holders=holders), snapshot(answers(extra=[series("xid_max", 79, Hostname="dcgm-0",
                                                                               gpu="2")])), TH)
    crit = [f for f in result.findings if f.kind is Kind.CRITICAL_XID][0]
    assert crit.workflow == "argo-job/wf-a"
    sha = "a" * 40
    wfs = {"argo-job/wf-a": {"metadata": {"annotations": {"ai-platform-ops/repository": "ml/rl",
                                                          "ai-platform-ops/commit": sha}}}}
    assert training_commits(result, wfs) == [{"project": "ml/rl", "commit": sha, "workflow": "argo-job/wf-a",
                                              "findings": [f"critical-xid on g0 gpu 2: {crit.summary}"]}]
    assert training_commits(result, {"argo-job/wf-a": {"metadata": {"annotations": {}}}}) == []


def test_a_target_that_answers_without_gpu_series_is_empty():
    """`empty` is told from the answering targets (`up_ok`) and the (instance, job) of `gpus_now`."""
    snap = merge_answers(DCGMSnapshot(window="15m", at=NOW), {"exporters": [
        series("gpus_now", 8, Hostname="dcgm-0", instance="dcgm-0:9400", job="dcgm-exporter"),
        series("gpus_now", 8, Hostname="dcgm-0", instance="10.0.0.0:9400", job="scrape-by-ip"),
        series("up_ok", 1, instance="dcgm-0:9400", job="dcgm-exporter", pod="dcgm-0"),
        series("up_ok", 1, instance="10.0.0.0:9400", job="scrape-by-ip", pod="dcgm-0"),
        series("up_ok", 1, instance="dcgm-1:9400", job="dcgm-exporter", pod="dcgm-1"),  # serves no GPU
        series("up_ok", 1, instance="dcgm-0:9400", job="other-job"),  # this job sees no GPU of dcgm-0
    ]})
    assert sorted((t.instance, t.job, t.empty) for t in snap.targets) == [
        ("dcgm-0:9400", "other-job", True), ("dcgm-1:9400", "dcgm-exporter", True)]
    assert snap.per_host["dcgm-0"]["gpus_now"] == 8
