"""The automations file (configs/prefect/automations.yaml) as `scripts.automations` turns it into Prefect
automations: no server needed. The live behaviour is tested in tests/test_operator_path.py."""

from __future__ import annotations

import pytest

from scripts.automations import AutomationsError, build, load_file

BLOCK = "11111111-2222-3333-4444-555555555555"


def _by_name(overrides=None):
    _, specs = load_file(overrides=overrides)
    return {a.name.removeprefix("ai-platform-ops/"): a for a in build(specs, BLOCK)}


def test_every_trouble_reaches_the_webhook_with_the_runs_link():
    autos = _by_name()
    assert set(autos) == {"run-failed-or-crashed", "run-late", "approval-waiting", "critical-finding",
                          "crash-zombie-runs"}
    for name in ("run-failed-or-crashed", "run-late", "approval-waiting", "critical-finding"):
        (action,) = autos[name].actions
        assert action.type == "send-notification" and str(action.block_document_id) == BLOCK
        assert "{{ flow_run|ui_url }}" in action.body, name
    failed = autos["run-failed-or-crashed"].trigger
    assert failed.posture == "Reactive" and failed.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert failed.match_related.model_dump() == {"prefect.resource.role": "deployment"}  # deployments' runs
    assert autos["run-late"].trigger.expect == {"prefect.flow-run.Late"}
    critical = autos["critical-finding"].trigger
    assert critical.expect == {"ai-platform-ops.finding.critical"}


def test_a_run_paused_for_an_hour_is_announced():
    paused = _by_name()["approval-waiting"].trigger
    assert paused.posture == "Proactive" and paused.after == {"prefect.flow-run.Paused"}
    assert paused.within.total_seconds() == 3600 and paused.for_each == {"prefect.resource.id"}
    # leaving Paused in any direction resolves it; staying Paused does not
    assert {"prefect.flow-run.Running", "prefect.flow-run.Completed", "prefect.flow-run.Cancelled"} <= paused.expect
    assert "prefect.flow-run.Paused" not in paused.expect
    assert "3600 s" in _by_name()["approval-waiting"].actions[0].body


def test_zombie_automation_is_prefects_documented_one_with_a_configurable_silence():
    zombie = _by_name()["crash-zombie-runs"]
    t = zombie.trigger
    # docs.prefect.io/v3/advanced/detect-zombie-flows
    assert t.posture == "Proactive" and t.after == {"prefect.flow-run.heartbeat"}
    assert t.expect == {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}
    assert t.match.model_dump() == {"prefect.resource.id": "prefect.flow-run.*"} and t.for_each == {"prefect.resource.id"}
    assert t.within.total_seconds() == 90
    (action,) = zombie.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
    assert _by_name({"zombie_within_s": "120"})["crash-zombie-runs"].trigger.within.total_seconds() == 120


def test_settings_are_checked():
    with pytest.raises(AutomationsError, match="must exceed heartbeat_s"):
        load_file(overrides={"zombie_within_s": "30"})  # would crash healthy runs between two heartbeats
    with pytest.raises(AutomationsError, match="unknown setting"):
        load_file(overrides={"zombie_after": "30"})
    _, specs = load_file()
    with pytest.raises(AutomationsError, match="no webhook block"):
        build(specs, None)
