"""prefect.yaml carries every lifecycle: each @flow in flows/ that an operator or a schedule starts is a
deployment whose entrypoint imports that flow, whose parameters validate against the flow's signature
(the schema the server enforces), with the schedule the lifecycle needs and none where it is manual,
and a concurrency limit where runs must not overlap. No Prefect server, no network: seconds."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import yaml
from prefect import Flow
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import validate

import flows
from tests.conftest import REPO

SPEC = yaml.safe_load((REPO / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}

# Flows that are not entry points: started by another flow, never by an operator or a schedule.
SUBFLOWS = {"argo-training-run": "the training subflow of train-on-push and the build flows"}

# The schedules the lifecycles need (issue 15; the guide's crontab for the two GitLab backups).
SCHEDULED = {
    "platform-health-check": {"interval": 600},
    "gpu-monitoring-sweep": {"interval": 300},
    "certificate-check": {"cron": "30 5 * * *"},          # daily
    "image-cleanup-audit": {"cron": "30 3 * * *"},        # daily
    "gitlab-backup": {"cron": "0 2 * * *"},               # daily at 02:00
    "gitlab-config-backup": {"cron": "15 4 * * 2-6"},     # 04:15, Tuesday to Saturday
    "gitlab-restore-drill": {"cron": "0 6 * * 0"},        # weekly, Sunday 06:00
    "cluster-inventory": {"cron": "0 * * * *"},           # hourly
    "etcd-backup": {"cron": "0 */6 * * *"},               # every 6 hours
    "etcd-restore-drill": {"cron": "0 5 * * 0"},          # weekly, Sunday 05:00
}

# Parameters that name the target of a run: no default on purpose, so no run starts against a guessed
# host, version or commit (the UI's run form asks for them; GitLab CI passes the commit).
REQUIRED_AT_RUN = {("scale-cluster", "hosts"), ("remove-node", "hosts"), ("upgrade-cluster", "version"),
                   ("train-on-push", "project"), ("train-on-push", "commit_sha"),
                   ("build-training-image", "context_url"), ("build-training-image", "revision")}

# Runs of these deployments must not overlap (deployment concurrency limit 1). The GitLab host, the
# provisioning of a cluster and a certificate renewal are also held apart across deployments by the
# global limits of tasks/concurrency.py, taken inside the flows.
ONE_AT_A_TIME = {"platform-health-check", "gpu-monitoring-sweep", "gpu-node-uncordon", "certificate-check",
                 "cluster-inventory", "image-cleanup-audit", "image-prune", "gitlab-restore", "gitlab-restore-drill",
                 "etcd-backup", "etcd-restore-drill", "etcd-defrag"}

# Actions that change the platform: a dry run unless the operator passes dry_run=false.
DRY_RUN_FIRST = {"image-prune", "gitlab-restore", "gpu-monitoring-sweep", "gpu-node-uncordon",
                 "renew-control-plane-certificates", "remove-node", "upgrade-cluster", "reset-cluster", "init-nodes",
                 "etcd-defrag"}


def _all_flows() -> dict[str, tuple[str, Flow]]:
    """flow name -> (module:function, flow) for every @flow defined in flows/."""
    found = {}
    for mod in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{mod.name}")
        for attr, obj in vars(module).items():
            if isinstance(obj, Flow) and obj.fn.__module__ == module.__name__:
                found[obj.name] = (f"flows/{mod.name}.py:{attr}", obj)
    return found


FLOWS = _all_flows()


def _flow_of(entrypoint: str) -> Flow:
    path, attr = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attr)
    assert isinstance(flow, Flow), f"{entrypoint} is not a flow"
    return flow


def _rendered(params: dict) -> dict:
    """The parameters as `prefect deploy` renders them ({{ $VAR }} from the environment)."""
    return {k: ("sandbox" if v == "{{ $AI_PLATFORM_OPS_PLATFORM }}" else v) for k, v in params.items()}


def test_every_lifecycle_flow_is_a_deployment():
    entry_points = set(FLOWS) - set(SUBFLOWS)
    assert len(entry_points) >= 20
    assert sorted(entry_points - set(DEPLOYMENTS)) == []
    assert set(SUBFLOWS) <= set(FLOWS), "a listed subflow no longer exists"
    assert sorted(set(SUBFLOWS) & set(DEPLOYMENTS)) == []


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_entrypoint_parameters_and_texts(name):
    d = DEPLOYMENTS[name]
    flow = _flow_of(d["entrypoint"])
    assert flow.name == name, f"deployment {name} runs flow {flow.name}"
    assert FLOWS[name][0] == d["entrypoint"]
    assert len(d["description"]) >= 40 and d["tags"], "an operator reads the description and filters by tags"
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    params = _rendered(d.get("parameters") or {})
    assert params.get("platform") == "sandbox", "every deployment names the platform"
    assert set(params) <= set(schema["properties"]), f"unknown parameters {set(params) - set(schema['properties'])}"
    assert validate(params, schema, ignore_required=True) == []
    no_default = {p.name for p in inspect.signature(flow.fn).parameters.values()
                  if p.default is inspect.Parameter.empty and p.name not in params}
    assert {(name, p) for p in no_default} <= REQUIRED_AT_RUN, f"parameters without a default: {no_default}"
    if name in DRY_RUN_FIRST:
        assert params.get("dry_run", inspect.signature(flow.fn).parameters["dry_run"].default) is True
    assert d["work_pool"]["name"] == "{{ $AI_PLATFORM_OPS_POOL }}"


def test_required_at_run_parameters_exist():
    """The exceptions above are real parameters without a default (the list cannot go stale)."""
    for name, param in REQUIRED_AT_RUN:
        p = inspect.signature(_flow_of(DEPLOYMENTS[name]["entrypoint"]).fn).parameters[param]
        assert p.default is inspect.Parameter.empty
        assert param in DEPLOYMENTS[name]["description"] or param.rstrip("s").upper() in DEPLOYMENTS[name]["description"]


def test_schedules_and_manual_deployments():
    for name, d in DEPLOYMENTS.items():
        schedules = d.get("schedules") or []
        if name not in SCHEDULED:
            assert schedules == [], f"{name} is manual: no schedule"
            continue
        assert len(schedules) == 1 and schedules[0].get("active", True), name
        want = SCHEDULED[name]
        got = {k: schedules[0][k] for k in ("interval", "cron") if k in schedules[0]}
        assert got == want, name
        if "cron" in want:
            assert schedules[0]["timezone"] == "UTC"
    manual = [n for n, d in DEPLOYMENTS.items() if n not in SCHEDULED and n != "check-node-drift"
              and n != "train-on-push" and n != "build-training-image"]
    for name in manual:
        assert DEPLOYMENTS[name]["description"].startswith("Manual."), name


def test_concurrency_limits():
    limited = {n for n, d in DEPLOYMENTS.items() if d.get("concurrency_limit")}
    assert limited == ONE_AT_A_TIME
    assert all(DEPLOYMENTS[n]["concurrency_limit"] == 1 for n in limited)


def test_pull_step_resolves_the_project_home_on_the_worker():
    assert SPEC["pull"] == [{"prefect.deployments.steps.set_working_directory": {
        "directory": "{{ $AI_PLATFORM_OPS_HOME }}"}}]
