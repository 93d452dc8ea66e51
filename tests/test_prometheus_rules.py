"""The Prometheus alert rules (promtool check + unit tests) and the Grafana fleet dashboard."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import yaml

from tasks.gpu_model import DEFAULT_CRITICAL_XIDS, Kind
from tests.conftest import CONTRACTS, REPO, need_binary

PROM_DIR = REPO / "configs" / "prometheus"
DASHBOARD = REPO / "configs" / "grafana" / "gpu-fleet.json"


def _contract_metrics() -> set[str]:
    names = set()
    with open(CONTRACTS / "dcgm-exporter-default-counters.csv") as f:
        for row in csv.reader(f):
            if row and not row[0].strip().startswith("#") and row[1].strip() != "label":
                names.add(row[0].strip())
    return names


def test_promtool_check_rules():
    promtool = need_binary("promtool", "prometheus")
    files = sorted(str(p) for p in PROM_DIR.glob("*.rules.yml"))
    assert any(f.endswith("gpu.rules.yml") for f in files)
    out = subprocess.run([promtool, "check", "rules", *files], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass():
    promtool = need_binary("promtool", "prometheus")
    tests = sorted(str(p) for p in (PROM_DIR / "tests").glob("*.yml"))
    assert tests
    out = subprocess.run([promtool, "test", "rules", *tests], capture_output=True, text=True, timeout=120,
                         cwd=PROM_DIR / "tests")
    assert out.returncode == 0, out.stdout + out.stderr


def _xid_alternatives(selector: str = "") -> str:
    """`X == 48 or X == 63 or ...` over the one list of critical XIDs (the platform config's default)."""
    return " or ".join(f"DCGM_FI_DEV_XID_ERRORS{selector} == {x}" for x in sorted(DEFAULT_CRITICAL_XIDS))


def _squash(expr: str) -> str:
    return " ".join(expr.split())


def _rules(text: str) -> list[dict]:
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


def test_checked_in_rules_are_the_render_of_the_example_config():
    """`configs/prometheus/gpu.rules.yml` is generated: `python -m tasks.gpu_rules render` of the example."""
    rendered = subprocess.run([sys.executable, "-m", "tasks.gpu_rules", "render",
                               str(REPO / "configs" / "platform.example.yaml")],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == (PROM_DIR / "gpu.rules.yml").read_text(), (
        "configs/prometheus/gpu.rules.yml is stale: python -m tasks.gpu_rules render "
        "configs/platform.example.yaml > configs/prometheus/gpu.rules.yml")
    bad = subprocess.run([sys.executable, "-m", "tasks.gpu_rules", "render", "/nonexistent.yaml"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 1 and "cannot render the GPU rules" in bad.stderr


def test_checked_in_sweep_rules_are_the_render_of_the_example_config_and_the_sweeps_own_queries():
    """`configs/prometheus/gpu-sweep.rules.yml` is `render-sweep` of the example config, and records exactly
    the queries a sweep built from that config runs, with the hashes the sweep looks for."""
    from blocks.config import load_platform_config
    from tasks.gpu_model import SweepSettings
    from tasks.prometheus import query_args, sweep_queries, sweep_recording_rules

    example = REPO / "configs" / "platform.example.yaml"
    rendered = subprocess.run([sys.executable, "-m", "tasks.gpu_rules", "render-sweep", str(example)],
                              capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == (PROM_DIR / "gpu-sweep.rules.yml").read_text(), (
        "configs/prometheus/gpu-sweep.rules.yml is stale: python -m tasks.gpu_rules render-sweep "
        "configs/platform.example.yaml > configs/prometheus/gpu-sweep.rules.yml")
    cfg = load_platform_config(str(example))
    settings = SweepSettings.from_config(cfg, cfg.cluster(None))
    want = sweep_recording_rules(sweep_queries(settings.thresholds.window, **query_args(settings)))
    got = _rules(rendered.stdout)
    assert [(r["record"], _squash(r["expr"]), r["labels"]["sweep_query"]) for r in got] == [
        (name, _squash(expr), h) for name, expr, h in want]
    assert got[-1]["record"] == "gpu_sweep:evaluated"  # last: present only once the others are committed
    from tasks.gpu_rules import render_sweep_config

    assert yaml.safe_load(render_sweep_config(str(example), "30s"))["groups"][0]["interval"] == "30s"


def test_rules_raise_the_sweeps_findings_with_the_same_critical_xids():
    rules = _rules((PROM_DIR / "gpu.rules.yml").read_text())
    alerts = [r for r in rules if "alert" in r]
    findings = {r["labels"]["finding"] for r in alerts}
    assert findings == {k.value for k in (Kind.CRITICAL_XID, Kind.ROW_REMAP, Kind.ROW_REMAP_PENDING, Kind.GPU_MISSING,
                                          Kind.GPU_HOT, Kind.MEMORY_HOT, Kind.IDLE_HELD, Kind.EXPORTER_DOWN,
                                          Kind.EXPORTER_STALE, Kind.NO_EXPORTER, Kind.NODE_NOT_READY,
                                          Kind.CORDONED_HELD)}
    xid_rule = next(r for r in alerts if r["alert"] == "GPUCriticalXID")
    assert _xid_alternatives('{job=~"nvidia-dcgm-exporter|dcgm-exporter"}') in _squash(xid_rule["expr"])
    assert 'xid=~"' + "|".join(str(x) for x in sorted(DEFAULT_CRITICAL_XIDS)) + '"' in xid_rule["expr"]
    for r in alerts:
        assert r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["action"]
        # every alert names the node: it carries `node` (kube-state-metrics' or the exporter's)
        assert "$labels.node" in r["annotations"]["summary"], r["alert"]
    assert all(".*dcgm.*" not in r["expr"] for r in rules)


def test_rules_render_from_another_platform_config(tmp_path):
    """Jobs, selector, thresholds, window, XIDs and holder resources all come from `thresholds.gpu`."""
    from blocks.config import GPUThresholds
    from tasks.gpu_rules import RuleSettings, render

    gpu = GPUThresholds(exporter_jobs=["gpu-metrics"], metric_selector='cluster="gpu-prod"', window="30m",
                        xid_resolution="30s", stale_after="5m", temp_c=80, memory_temp_c=90, idle_util_pct=2,
                        critical_xids=[79, 48], whole_gpu_resources=["example.com/gpu"],
                        shared_gpu_resources=[], gpu_resource_prefixes=["example.com/slice-"])
    text = render(RuleSettings.from_config(gpu))
    rules = {r.get("alert") or r.get("record"): r for r in _rules(text)}
    assert "nvidia-dcgm-exporter" not in text and 'job=~"gpu-metrics"' in text
    assert 'DCGM_FI_DEV_XID_ERRORS{cluster="gpu-prod",job=~"gpu-metrics"} == 48 or' in _squash(
        rules["GPUCriticalXID"]["expr"])
    assert 'xid=~"48|79"' in rules["GPUCriticalXID"]["expr"] and "[30m:30s]" in rules["GPUCriticalXID"]["expr"]
    assert rules["GPUTemperatureHigh"]["expr"].rstrip().endswith("> 80")
    assert rules["GPUMemoryTemperatureHigh"]["expr"].rstrip().endswith("> 90")
    assert rules["GPUIdleButHeld"]["expr"].rstrip().endswith("< 2") and rules["GPUIdleButHeld"]["for"] == "30m"
    assert ") > 300)" in rules["DCGMExporterStale"]["expr"] and rules["DCGMExporterDown"]["for"] == "5m"
    assert 'resource=~"example_com_gpu"' in rules["GPUMissing"]["expr"]
    assert 'resource=~"example_com_gpu|example_com_slice_.+"' in rules["GPUNodeNotReadyWithGPUsHeld"]["expr"]
    path = tmp_path / "other.rules.yml"
    path.write_text(text)
    promtool = need_binary("promtool", "prometheus")
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# PromQL words that are not metric names.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "vector", "inf", "nan"}


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = m.group(0)
        following = expr[m.end():].lstrip()
        if following.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function or an operator
        names.add(word)
    return names


def test_dashboard_parses_and_uses_only_contract_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    contract = _contract_metrics()
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= _metric_names(target["expr"])
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            used |= {m for m in re.findall(r"label_values\((\w+)", var["definition"])}
    assert used and used <= contract, sorted(used - contract)
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_GPU_TEMP"} <= used
    xid_panel = next(p for p in dash["panels"] if p["title"] == "GPUs with a critical XID")
    per_host = '{Hostname=~"$hostname"}'
    assert [t["expr"] for t in xid_panel["targets"]] == [f"count({_xid_alternatives(per_host)}) or vector(0)"]
    assert _metric_names('max by (Hostname) (up{job="x"}) == 0 or rate(foo_total[5m])') == {"up", "foo_total"}
