"""tasks/operation.py, the one way to change the platform: the plan's digest and diff, the state computed from
the steps, and the runner on the session's Prefect server against a small target kept in a JSON file (its
identity a UID, its content a set of labels): dry run, approval, the re-check after approval, the lock not
held while the approval waits, a failure at a middle step with its way back run, a cancel during apply, and
a sync flow. The lifecycles' own operations are tested against the sandbox in tests/test_operations.py."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from prefect import flow

from tasks import operation
from tasks.operation import (
    Operation,
    Plan,
    Refused,
    Step,
    StepFailed,
    Target,
    TargetChanged,
    WayBack,
    plan_diff,
    run_operation,
    state_after,
)
from tests.approvals import APPROVE, run_and_answer
from tests.conftest import run_flow_sync

TARGET_FILE: Path | None = None


def _read() -> dict:
    return json.loads(TARGET_FILE.read_text())


def _write(data: dict) -> None:
    TARGET_FILE.write_text(json.dumps(data))


def _planner(labels: dict[str, str]):
    """Set `labels` on the target, one step each; the way back removes what was set."""
    def plan(_session) -> Plan:
        live = _read()
        changes = {k: v for k, v in labels.items() if live["labels"].get(k) != v}
        steps = []
        for k, v in changes.items():
            def run(k=k, v=v):
                data = _read()
                data["labels"][k] = v
                data["by"] = operation.approver()  # what a step records on the target (a node annotation)
                _write(data)
                return f"{k}={v}"

            steps.append(Step(f"label {k}", f"label {k} of {live['name']}: {live['labels'].get(k)!r} -> {v!r}",
                              "read back", f"set {k} back to {live['labels'].get(k)!r}", run,
                              lambda _r, k=k, v=v: _check(k, v)))
        before = {k: live["labels"].get(k) for k in changes}
        return Plan(Target("toy target", live["name"], live["uid"]), steps, title="toy labels",
                    facts={"labels": live["labels"], "changes": changes},
                    refusals=["the target is frozen"] if live.get("frozen") else [],
                    way_back=WayBack("put the labels back", "toy-labels", {"labels": before, "dry_run": False}))
    return plan


def _check(k: str, v: str) -> None:
    if _read()["labels"].get(k) != v:
        raise RuntimeError(f"label {k} reads {_read()['labels'].get(k)!r} after the change")


@flow(name="toy-labels")
async def toy_labels(labels: dict[str, str], dry_run: bool = True, lock: str | None = None):
    op = Operation("toy-labels", "test", _planner(labels), lock=lock, approval_timeout_s=120, lock_timeout_s=5,
                   poll_interval_s=0.3, key="toy")
    return await run_operation(op, dry_run=dry_run)


FLOW_THREAD: dict[str, int] = {}


@flow(name="toy-labels-sync")
def toy_labels_sync(labels: dict[str, str], dry_run: bool = True):
    import threading

    FLOW_THREAD["id"] = threading.get_ident()  # where a SIGTERM lands in a sync flow: the waiting thread
    op = Operation("toy-labels-sync", "test", _planner(labels), approval_timeout_s=120, poll_interval_s=0.3)
    return operation.run_operation_sync(op, dry_run=dry_run)


@pytest.fixture
def target(tmp_path):
    global TARGET_FILE
    TARGET_FILE = tmp_path / "target.json"
    _write({"name": "node-a", "uid": str(uuid.uuid4()), "labels": {"zone": "a"}})
    yield TARGET_FILE
    TARGET_FILE = None


# --- pure ------------------------------------------------------------------------------------------


def _plan(**facts) -> Plan:
    return Plan(Target("toy", "n", "uid-1"), [Step("one", "a"), Step("two", "b"), Step("three", "c")],
                facts=facts or {"x": 1})


def test_digest_covers_target_steps_and_facts_but_not_the_display_name():
    a = _plan()
    assert a.digest == _plan().digest and len(a.digest) == 64
    assert _plan(x=2).digest != a.digest
    renamed = Plan(Target("toy", "renamed", "uid-1"), a.steps, facts=a.facts)
    assert renamed.digest == a.digest, "a name is not an identity"
    other = Plan(Target("toy", "n", "uid-2"), a.steps, facts=a.facts)
    assert other.digest != a.digest
    assert "x" in plan_diff(a, _plan(x=2)) and '-  "x": 1' in plan_diff(a, _plan(x=2))


def test_state_after_is_computed_from_the_steps():
    p = _plan()
    assert state_after(p, 0, None, None).startswith("untouched")
    assert state_after(p, 1, 2, "failed: boom") == ("step 1 applied (one); step 2 (two) failed: boom; it may have "
                                                   "partly changed b; step 3 not run")
    assert state_after(p, 0, 1, "failed: x").startswith("no step completed; step 1 (one) failed: x")
    assert state_after(p, 3, None, None) == "steps 1-3 applied (one, two, three)"


def test_errors_say_what_changed_and_what_to_do():
    r = Refused("image-prune", ["a tag moved"], what_next="plan again")
    assert r.nothing_changed and "nothing was changed: a tag moved. Next: plan again" in str(r)
    f = StepFailed("x", 2, "two", "boom", "step 1 applied", WayBack("undo it", "x-undo", {"a": 1}))
    assert not f.nothing_changed and "failed at step 2 (two): boom" in str(f) and "Way back: undo it" in str(f)
    assert isinstance(TargetChanged("x", ["y"]), Refused)


# --- the runner, on the session's Prefect server ---------------------------------------------------


def test_dry_run_changes_nothing_and_publishes_the_plan(prefect_server, target):
    state = run_flow_sync(toy_labels, labels={"zone": "b", "gpu": "h100"})
    assert state.is_completed(), state.message
    out = state.result()
    assert out["dry_run"] and out["approved"] is None and out["steps"] == []
    assert [s["step"] for s in out["plan"]] == ["label zone", "label gpu"]
    assert _read()["labels"] == {"zone": "a"}
    md = _artifact("toy-labels-plan-test-toy")
    assert out["digest"][:16] in md and "Dry run: nothing was changed" in md and "toy-labels" in md


def test_approved_run_applies_and_logs_each_step(prefect_server, target):
    state = run_and_answer(toy_labels, {"labels": {"zone": "b"}, "dry_run": False}, APPROVE)
    assert state.is_completed(), state.message
    out = state.result()
    assert out["approver"] == "alice" and [r["status"] for r in out["steps"]] == ["ok"]
    assert _read()["labels"] == {"zone": "b"} and _read()["by"] == "alice"
    assert operation.approver() is None  # only while the steps run
    assert "applied" in _artifact("toy-labels-report-test-toy")


def test_declined_run_changes_nothing(prefect_server, target):
    state = run_and_answer(toy_labels, {"labels": {"zone": "b"}, "dry_run": False},
                           {"approve": False, "approver": "bob"})
    assert state.is_completed() and state.result()["state"].startswith("untouched: declined by bob")
    assert _read()["labels"] == {"zone": "a"}


def test_a_change_between_approval_and_apply_is_refused_with_the_difference(prefect_server, target):
    def meanwhile():
        data = _read()
        data["labels"]["zone"] = "c"
        _write(data)

    state = run_and_answer(toy_labels, {"labels": {"zone": "b"}, "dry_run": False}, APPROVE, meanwhile=meanwhile)
    assert state.is_failed()
    assert "refused, nothing was changed" in state.message and "the plan changed after the approval" in state.message
    assert '"zone": "a"' in state.message and '"zone": "c"' in state.message  # the difference is shown
    assert _read()["labels"] == {"zone": "c"}


def test_another_target_behind_the_same_name_is_refused(prefect_server, target):
    def replaced():
        _write({**_read(), "uid": str(uuid.uuid4())})  # same name, another object

    state = run_and_answer(toy_labels, {"labels": {"zone": "b"}, "dry_run": False}, APPROVE, meanwhile=replaced)
    assert state.is_failed() and "is not the one approved: identity" in state.message
    assert _read()["labels"] == {"zone": "a"}


def test_no_lock_is_held_while_the_approval_waits(prefect_server, target):
    from prefect.concurrency.asyncio import concurrency

    from tasks.concurrency import exclusive_limit

    lock = f"toy-{uuid.uuid4().hex[:8]}"
    asyncio.run(exclusive_limit(lock))
    took = []

    async def take():
        async with concurrency(lock, occupy=1, timeout_seconds=5):
            took.append(lock)

    state = run_and_answer(toy_labels, {"labels": {"zone": "b"}, "dry_run": False, "lock": lock}, APPROVE,
                           meanwhile=lambda: asyncio.run(take()))
    assert took == [lock], "another run could not take the lock while this one waited for approval"
    assert state.is_completed(), state.message
    assert _read()["labels"] == {"zone": "b"}


def test_a_held_lock_refuses_after_approval_without_changes(prefect_server, target):
    from prefect.concurrency.asyncio import concurrency

    from tasks.concurrency import exclusive_limit

    lock = f"toy-{uuid.uuid4().hex[:8]}"
    asyncio.run(exclusive_limit(lock))

    async def hold():
        async with concurrency(lock, occupy=1, timeout_seconds=5):
            await asyncio.to_thread(lambda: state_box.append(run_and_answer(
                toy_labels, {"labels": {"zone": "b"}, "dry_run": False, "lock": lock}, APPROVE)))

    state_box: list = []
    asyncio.run(hold())
    state = state_box[0]
    assert state.is_failed() and "held the lock" in state.message and "nothing was changed" in state.message
    assert _read()["labels"] == {"zone": "a"}


def test_failure_at_a_middle_step_reports_the_state_and_the_way_back_runs(prefect_server, target, monkeypatch):
    def fault(op_name, index, step):
        if index == 2:
            raise ConnectionError("peer went away")

    monkeypatch.setattr(operation, "_before_step", fault)
    state = run_and_answer(toy_labels, {"labels": {"zone": "b", "gpu": "h100", "rack": "r1"}, "dry_run": False},
                           APPROVE)
    assert state.is_failed()
    assert "failed at step 2 (label gpu): ConnectionError: peer went away" in state.message
    assert "step 1 applied (label zone)" in state.message and "step 3 not run" in state.message
    assert "Way back: put the labels back" in state.message
    assert _read()["labels"] == {"zone": "b"}
    monkeypatch.setattr(operation, "_before_step", lambda *a: None)
    # the way back: the deployment and parameters the report names, run as given
    report = _artifact("toy-labels-report-test-toy")
    assert 'Run deployment `toy-labels` with labels={"zone": "a", "gpu": null, "rack": null}' in report
    back = run_and_answer(toy_labels, {"labels": {"zone": "a"}, "dry_run": False}, APPROVE)
    assert back.is_completed() and _read()["labels"]["zone"] == "a"


def test_cancel_during_apply_ends_cancelled_with_the_state(prefect_server, target, monkeypatch):
    from prefect.exceptions import TerminationSignal

    def cancel(op_name, index, step):
        if index == 2:
            raise TerminationSignal(15)

    monkeypatch.setattr(operation, "_before_step", cancel)
    state = run_and_answer(toy_labels, {"labels": {"zone": "b", "gpu": "h100"}, "dry_run": False}, APPROVE)
    assert state.is_cancelled(), state
    assert "cancelled at step 2 (label gpu)" in state.message and "step 1 applied (label zone)" in state.message
    assert _read()["labels"] == {"zone": "b"}


def test_a_cancel_reaching_a_sync_flow_stops_the_apply_and_ends_cancelled(prefect_server, target, monkeypatch):
    """A sync flow's SIGTERM is raised in the thread that waits in run_operation_sync (Prefect's handler runs
    in the main thread), not in the loop applying the steps: delivered the same way here (an asynchronous
    exception in that thread), the apply stops after the running step, nothing more is changed, and the
    run ends Cancelled with the state computed from the steps."""
    import ctypes
    import time

    from prefect.exceptions import TerminationSignal

    class SigTerm(TerminationSignal):
        def __init__(self):
            super().__init__(15)

    def deliver(op_name, index, step):
        if index == 2:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(FLOW_THREAD["id"]), ctypes.py_object(SigTerm))
            time.sleep(1)  # step 2 is running when the signal arrives

    monkeypatch.setattr(operation, "_before_step", deliver)
    state = run_and_answer(toy_labels_sync, {"labels": {"zone": "b", "gpu": "h100", "rack": "r1"},
                                             "dry_run": False}, APPROVE)
    assert state.is_cancelled(), state
    assert "cancelled after step 2" in state.message
    assert "steps 1-2 applied (label zone, label gpu)" in state.message and "step 3 not run" in state.message
    time.sleep(1)
    assert _read()["labels"] == {"zone": "b", "gpu": "h100"}, "the apply went on after the cancel"


def test_refusals_in_the_plan_stop_before_approval(prefect_server, target):
    _write({**_read(), "frozen": True})
    state = run_flow_sync(toy_labels, labels={"zone": "b"}, dry_run=False)
    assert state.is_failed() and "refused, nothing was changed: the target is frozen" in state.message


def test_sync_flows_run_the_same_operation(prefect_server, target):
    state = run_and_answer(toy_labels_sync, {"labels": {"zone": "d"}, "dry_run": False}, APPROVE)
    assert state.is_completed(), state.message
    assert _read()["labels"] == {"zone": "d"}


@flow(name="toy-labels-drill")
async def toy_labels_drill(labels: dict[str, str]):
    op = Operation("toy-labels-drill", "test", _planner(labels), lock_timeout_s=5, key="toy",
                   unattended="scheduled drill on a scratch target")
    return await run_operation(op, dry_run=False)


def test_an_unattended_operation_applies_without_approval_and_says_so(prefect_server, target):
    state = run_flow_sync(toy_labels_drill, labels={"zone": "s"})  # no approval is answered: none is asked
    assert state.is_completed(), state.message
    out = state.result()
    assert out["approved"] is True and out["approver"] == "nobody (unattended: scheduled drill on a scratch target)"
    assert _read()["labels"] == {"zone": "s"}
    assert "Approval:** none, unattended: scheduled drill" in _artifact("toy-labels-drill-plan-test-toy")
    assert "nobody (unattended" in _artifact("toy-labels-drill-report-test-toy")


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            a = await client.read_latest_artifacts()
            return {x.key: x.data for x in a}

    found = asyncio.run(read())
    assert key in found, f"no artifact {key}: {sorted(found)}"
    return found[key]
