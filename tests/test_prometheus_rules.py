"""The Prometheus alert rules (promtool check + unit tests) and the Grafana fleet dashboard."""

from __future__ import annotations

import csv
import json
import re
import subprocess

import yaml

from tasks.gpu_health import DEFAULT_CRITICAL_XIDS, Kind
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


def test_rules_raise_the_sweeps_findings_with_the_same_critical_xids():
    rules = [r for g in yaml.safe_load((PROM_DIR / "gpu.rules.yml").read_text())["groups"] for r in g["rules"]]
    findings = {r["labels"]["finding"] for r in rules}
    assert findings == {k.value for k in (Kind.CRITICAL_XID, Kind.ROW_REMAP, Kind.GPU_MISSING, Kind.GPU_HOT,
                                          Kind.MEMORY_HOT, Kind.IDLE_HELD, Kind.EXPORTER_DOWN, Kind.EXPORTER_STALE,
                                          Kind.NODE_NOT_READY, Kind.CORDONED_HELD)}
    xid_rule = next(r for r in rules if r["alert"] == "GPUCriticalXID")
    assert _squash(xid_rule["expr"]) == f"max by (Hostname, gpu, UUID, pod, namespace) ( {_xid_alternatives()} )"
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["action"]


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
