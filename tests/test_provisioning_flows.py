"""Provisioning flows: real ansible-playbook through ansible-runner against the sandbox's sshd hosts and the
stand-in kubespray checkout (sandbox/kubespray_checkout): success with progress and post-verify, a failed
task, an unreachable host retried alone, a missing confirmation, approval of reset, and no overlap."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

from tests.conftest import need_binary, run_flow_sync

pytestmark = [pytest.mark.sandbox, pytest.mark.prefect]


@pytest.fixture(scope="module")
def ks_platform(cert_sandbox, sandbox_platform):
    from blocks.config import load_platform_config

    need_binary("ss", "iproute2")
    cfg = load_platform_config(cert_sandbox.platform_yaml)
    assert cfg.clusters[0].kubespray is not None, "the sandbox has no provisioning component"
    return sandbox_platform, cfg.clusters[0].kubespray, Path(cert_sandbox.extra["provisioning"]["state_dir"])


def _inventory(ks, tmp: Path) -> Path:
    from tasks.kubespray_inventory import write_inventory

    return write_inventory(ks, tmp / "hosts.yaml")


def test_create_cluster_runs_streams_and_verifies(ks_platform):
    from flows.provisioning import create_cluster

    platform, ks, state_dir = ks_platform
    state = run_flow_sync(create_cluster, platform=platform, flush_every_s=0.5)
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["recap"]) == {h.name for h in ks.hosts}
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in result["recap"].values())
    assert result["verified"] is True and result["verify_problems"] == []
    assert 1 <= result["progress_updates"] < result["events"] / 5  # batched, never one call per event
    kubelet = state_dir / "gpu-node-0001" / "kubernetes-node-Install-kubelet"
    assert "kube_version=v1.29.5" in kubelet.read_text()  # the overrides reached the playbook
    assert (state_dir / "cp-1" / "etcd-Configure-etcd").exists()
    assert not (state_dir / "gpu-node-0001" / "etcd-Configure-etcd").exists()  # groups respected


def test_failed_task_names_host_task_and_message(ks_platform):
    from tasks.kubespray import PlaybookFailed, run_kubespray
    from tasks.redact import Redactor

    _, ks, _ = ks_platform
    hosts = [h.model_copy(update={"vars": {**h.vars, "standin_fail_task": "etcd : Configure etcd"}})
             if h.name == "cp-2" else h for h in ks.hosts]
    bad = ks.model_copy(update={"hosts": hosts})
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(PlaybookFailed) as err:
        run_kubespray.fn(bad, "cluster.yml", _inventory(bad, Path(tmp)), Redactor())
    text = str(err.value)
    assert "cp-2: task 'etcd : Configure etcd failed' failed" in text
    assert "stand-in failure of 'etcd : Configure etcd' on cp-2" in text
    assert "cp-1" not in text  # only the host that failed is named


def test_unreachable_host_alone_is_retried(ks_platform):
    from sandbox._common import free_port
    from tasks.kubespray import PlaybookFailed, run_kubespray
    from tasks.redact import Redactor

    _, ks, _ = ks_platform
    down = {"name": "gpu-node-0003", "ansible_host": "127.0.0.1", "groups": ["kube_node"],
            "vars": {"ansible_port": free_port()}}  # nothing listens there
    bad = ks.model_validate({**ks.model_dump(), "hosts": [*ks.model_dump()["hosts"], down], "unreachable_retries": 1})
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(PlaybookFailed) as err:
        run_kubespray.fn(bad, "scale.yml", _inventory(bad, Path(tmp)), Redactor())
    assert "gpu-node-0003: unreachable after 1 retry(ies)" in str(err.value)
    assert "gpu-node-0001" not in str(err.value)


def test_retry_is_limited_to_unreachable_hosts():
    from tasks.ansible import PlaybookRun, run_with_unreachable_retries
    from tasks.ansible_events import RunTally, TaskFailure

    limits = []

    def attempt(limit):
        limits.append(limit)
        tally = RunTally(failures=[TaskFailure("n3", "Gathering Facts", "refused", unreachable=True)]
                         if len(limits) == 1 else [])
        return PlaybookRun("scale.yml", "failed" if len(limits) == 1 else "successful", 0,
                           {"n1": {"unreachable": 0}, "n3": {"unreachable": 1 if len(limits) == 1 else 0}}, tally)

    result = run_with_unreachable_retries(attempt, 2)
    assert limits == [None, ["n3"]] and result.ok and len(result.attempts) == 2


def test_missing_confirmation_stops_instead_of_hanging(ks_platform):
    import time

    from tasks.kubespray import PlaybookFailed, run_kubespray
    from tasks.redact import Redactor

    import psutil

    _, ks, _ = ks_platform
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(PlaybookFailed, match="'Reset Confirmation'"):
        inventory = _inventory(ks, Path(tmp))
        run_kubespray.fn(ks, "reset.yml", inventory, Redactor())
    # nothing of that run is left waiting on the prompt (a forked worker can outlive ansible-runner's cancel)
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if str(Path(inventory).resolve()) in (p.info.get("cmdline") or [])]
    assert left == []
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(PlaybookFailed, match="No nodes specified for removal"):
        run_kubespray.fn(ks, "remove-node.yml", _inventory(ks, Path(tmp)), Redactor(),
                         extravars={"skip_confirmation": True})
    assert time.monotonic() - started < 120


def test_reset_is_a_dry_run_then_needs_the_cluster_name(ks_platform, monkeypatch):
    import flows.provisioning as prov

    platform, _, state_dir = ks_platform
    state = run_flow_sync(prov.reset_cluster, platform=platform)
    assert state.is_completed() and state.result()["dry_run"] is True
    monkeypatch.setattr(prov, "_ask_reset", lambda *a, **k: prov.ResetApproval(approve=True, approver="ops",
                                                                             cluster_name="wrong"))
    state = run_flow_sync(prov.reset_cluster, platform=platform, dry_run=False)
    assert state.is_failed() and "not confirmed" in state.message
    assert not list(state_dir.glob("*/reset-*"))


def test_two_runs_on_one_cluster_never_overlap(ks_platform):
    from flows.provisioning import scale_cluster

    platform, _, _ = ks_platform
    states = []
    threads = [threading.Thread(target=lambda: states.append(
        run_flow_sync(scale_cluster, platform=platform, hosts=["gpu-node-0001", "gpu-node-0002"])))
        for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(states) == 2 and all(s.is_completed() for s in states), [s.message for s in states]
    windows = sorted((s.result()["attempts"][-1]["started"], s.result()["attempts"][-1]["finished"]) for s in states)
    assert windows[0][1] <= windows[1][0], windows
