"""Every platform-changing deployment in prefect.yaml, through the one operation module, against the sandbox.

Each lifecycle declares a `Scenario` in tests/operation_scenarios/<lifecycle>.py: the parameters of a run that
changes something, how to read the change back from the sandbox itself, a change to the target made while
the approval waits, and how to run the way back. The same five checks run for each:

- the deployment's default run (no `dry_run` given) changes nothing and leaves the plan artifact;
- an approved run applies, and another run can take the operation's lock while this one waits for approval;
- a change to the target between the approval and the apply is refused with the difference, nothing applied;
- a failure injected before a middle step reports the applied steps, the state and the way back, and running
  the way back succeeds;
- a cancel during apply ends `Cancelled` with the computed state.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
import re
from typing import Any

import pytest
import yaml

from tasks import operation
from tests.operation_scenarios import Scenario
from tests.approvals import APPROVE, run_and_answer
from tests.conftest import REPO, run_flow_sync


def _scenarios() -> dict[str, Scenario]:
    import tests.operation_scenarios as pkg

    found: dict[str, Scenario] = {}
    for mod in pkgutil.iter_modules(pkg.__path__):
        for sc in importlib.import_module(f"{pkg.__name__}.{mod.name}").SCENARIOS:
            assert sc.deployment not in found, f"two scenarios for {sc.deployment}"
            found[sc.deployment] = sc
    return found


SCENARIOS = _scenarios()
SPEC = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def _flow(name: str):
    path, attr = SPEC[name]["entrypoint"].split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)


def _changes_the_platform(name: str) -> bool:
    """A deployment whose flow runs an operation (tasks.operation.run_operation[_sync]); a read-only flow
    beside it in the same module (check-node-drift beside init-nodes) is not one."""
    return "run_operation" in inspect.getsource(_flow(name).fn)


# The list: each of these changes the platform and must run through tasks/operation.py.
MUST_BE_OPERATIONS = {"gitlab-restore", "renew-control-plane-certificates", "etcd-defrag", "image-prune",
                      "gpu-monitoring-sweep", "gpu-node-uncordon", "create-cluster", "scale-cluster", "remove-node",
                      "upgrade-cluster", "reset-cluster", "init-nodes", "install-addons"}


# Scheduled drills that change only a scratch target, through the same operation run unattended
# (`Operation(unattended=...)`, said in their plan and report): no dry run by default, not in the five cases
# below; their own tests run them.
SCRATCH_DRILLS = {"gitlab-restore-drill"}


def test_every_platform_changing_deployment_is_an_operation_with_a_scenario_and_dry_run_by_default():
    changing = {n for n in SPEC if _changes_the_platform(n)} - SCRATCH_DRILLS
    for name in SCRATCH_DRILLS:
        assert _changes_the_platform(name) and "unattended=" in inspect.getsource(inspect.getmodule(_flow(name).fn))
    assert sorted(MUST_BE_OPERATIONS - changing) == [], "not through tasks/operation.py"
    for name in sorted(changing):
        sig = inspect.signature(_flow(name).fn).parameters
        assert "dry_run" in sig, f"{name} has no dry_run"
        default = (SPEC[name].get("parameters") or {}).get("dry_run", sig["dry_run"].default)
        assert default is True, f"{name}: dry_run defaults to {default!r}"
    assert sorted(changing - set(SCENARIOS)) == [], "platform-changing deployments without a contract scenario"


def _ready(request, name: str) -> tuple[Scenario, Any, str]:
    if name not in SCENARIOS:
        pytest.fail(f"no scenario for {name} in tests/operation_scenarios/")
    sc = SCENARIOS[name]
    for f in sc.fixtures:
        request.getfixturevalue(f)
    platform = request.getfixturevalue("sandbox_platform")
    sb = request.getfixturevalue("sandbox")
    sc.reset(sb)
    request.addfinalizer(lambda: sc.reset(sb))
    return sc, sb, platform


def _answer(sc: Scenario) -> dict:
    """The approval: APPROVE, plus what a plan that wipes something asks to type (`extra["answer"]`)."""
    return {**APPROVE, **sc.extra.get("answer", {})}


def _params(sc: Scenario, sb: Any, platform: str, **more) -> dict:
    return {"platform": platform, **sc.params(sb), **more}


NAMES = sorted(MUST_BE_OPERATIONS)


@pytest.mark.parametrize("name", NAMES)
def test_default_run_changes_nothing_and_leaves_the_plan(request, name):
    sc, sb, platform = _ready(request, name)
    state = run_flow_sync(_flow(name), **_params(sc, sb, platform))
    assert state.is_completed(), state.message
    record = state.result()
    assert record["dry_run"] is True and record["steps"] == [] and record["plan"], record
    assert not sc.applied(sb)
    assert record["digest"][:16] in _latest_artifact(f"{name}-plan", record["digest"][:16])


@pytest.mark.parametrize("name", NAMES)
def test_approved_run_applies_and_the_lock_is_free_while_it_waits(request, name):
    sc, sb, platform = _ready(request, name)
    took: list[str] = []

    def take_the_lock():
        lock = _lock_of_paused_run(name)
        if lock:
            asyncio.run(_take(lock))
            took.append(lock)

    state = run_and_answer(_flow(name), _params(sc, sb, platform, dry_run=False, poll_interval_s=0.5), _answer(sc),
                           meanwhile=take_the_lock)
    assert state.is_completed(), state.message
    assert state.result()["approver"] == "alice"
    assert sc.applied(sb)
    assert took, f"{name}: its plan names no lock, or the lock could not be taken while the approval waited"


@pytest.mark.parametrize("name", NAMES)
def test_a_change_while_the_approval_waits_is_refused_with_the_difference(request, name):
    sc, sb, platform = _ready(request, name)
    state = run_and_answer(_flow(name), _params(sc, sb, platform, dry_run=False, poll_interval_s=0.5), _answer(sc),
                           meanwhile=lambda: sc.change(sb))
    assert state.is_failed(), state.message
    assert "refused, nothing was changed" in state.message and "after the approval" in state.message
    assert not sc.applied(sb)


@pytest.mark.parametrize("name", NAMES)
def test_a_failed_middle_step_reports_the_state_and_the_way_back_runs(request, name, monkeypatch):
    sc, sb, platform = _ready(request, name)

    def fault(op_name, index, step):
        if index == sc.fail_at:
            raise ConnectionError("injected: the peer went away")

    monkeypatch.setattr(operation, "_before_step", fault)
    state = run_and_answer(_flow(name), _params(sc, sb, platform, dry_run=False, poll_interval_s=0.5), _answer(sc))
    monkeypatch.setattr(operation, "_before_step", lambda *a: None)
    assert state.is_failed(), state.message
    assert f"failed at step {sc.fail_at} (" in state.message and "injected: the peer went away" in state.message
    assert re.search(r"steps? 1(-\d+)? applied", state.message) and "Way back:" in state.message
    back = sc.way_back(sb, state)
    assert back.is_completed(), back.message
    assert sc.restored(sb)


@pytest.mark.parametrize("name", NAMES)
def test_a_cancel_during_apply_ends_cancelled_with_the_state(request, name, monkeypatch):
    from prefect.exceptions import TerminationSignal

    sc, sb, platform = _ready(request, name)

    def cancel(op_name, index, step):
        if index == sc.fail_at:
            raise TerminationSignal(15)

    monkeypatch.setattr(operation, "_before_step", cancel)
    state = run_and_answer(_flow(name), _params(sc, sb, platform, dry_run=False, poll_interval_s=0.5), _answer(sc))
    assert state.is_cancelled(), state.message
    assert f"cancelled at step {sc.fail_at}" in state.message and "applied" in state.message


# --- helpers ---------------------------------------------------------------------------------------


async def _take(lock: str) -> None:
    from prefect.concurrency.asyncio import concurrency

    async with concurrency(lock, occupy=1, timeout_seconds=10):
        pass


def _lock_of_paused_run(flow_name: str) -> str | None:
    """The lock named in the paused run's plan artifact (`**Lock:** `name``)."""
    md = _latest_artifact(f"{flow_name}-plan", "Lock:")
    m = re.search(r"\*\*Lock:\*\* `([^`]+)`", md)
    return m.group(1) if m else None


def _latest_artifact(prefix: str, containing: str) -> str:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_latest_artifacts(limit=200)

    arts = asyncio.run(read())
    hits = [a for a in arts if (a.key or "").startswith(prefix) and containing in str(a.data)]
    assert hits, f"no artifact {prefix}* containing {containing!r}: {sorted(a.key for a in arts if a.key)}"
    return max(hits, key=lambda a: a.updated or a.created).data
