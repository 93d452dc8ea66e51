"""Provisioning: real ansible-playbook through ansible-runner against the sandbox's sshd hosts and the
stand-in kubespray checkout (sandbox/kubespray_checkout): a playbook run with batched progress, a failed
task, an unreachable host retried alone, a missing confirmation, the target's identity, and a reset approved
without the cluster's name. The flows' dry run, approval, lock, re-plan, failure with its way back and cancel
are the operation contract's (tests/test_operations.py, tests/operation_scenarios/provisioning.py)."""

from __future__ import annotations

import tempfile
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


def test_cluster_yml_runs_streams_in_batches_and_reaches_every_group(ks_platform):
    from prefect import flow

    from tasks.kubespray import run_kubespray
    from tasks.redact import Redactor

    platform, ks, state_dir = ks_platform

    @flow(name="cluster-yml-once")
    def cluster_yml() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            run = run_kubespray(ks, "cluster.yml", _inventory(ks, Path(tmp)), Redactor(), progress_key="cluster-yml",
                                flush_every_s=0.5)
        return {"recap": run.recap, "events": run.tally.events, "progress_updates": run.progress_updates}

    state = run_flow_sync(cluster_yml)
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["recap"]) == {h.name for h in ks.hosts}
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in result["recap"].values())
    assert 1 <= result["progress_updates"] < result["events"] / 5  # batched, never one call per event
    kubelet = state_dir / "gpu-node-0001" / "kubernetes-node-Install-kubelet"
    assert "kube_version=v1.29.5" in kubelet.read_text()  # the overrides reached the playbook
    assert (state_dir / "cp-1" / "etcd-Configure-etcd").exists()
    assert not (state_dir / "gpu-node-0001" / "etcd-Configure-etcd").exists()  # groups respected


def test_target_is_the_kube_system_uid_or_the_host_keys_read_over_ssh(ks_platform):
    from kubernetes import client as k8s

    from blocks.platform import Platform
    from tasks.kubespray import read_cluster_identity, read_host_keys

    platform, ks, _ = ks_platform
    api = Platform(platform).kubernetes()
    uid, nodes = read_cluster_identity.fn(api, 15)
    assert uid == k8s.CoreV1Api(api).read_namespace("kube-system").metadata.uid and len(uid) == 36
    assert {"cp-1", "gpu-node-0001"} <= set(nodes) and nodes["cp-1"]["uid"] and nodes["cp-1"]["ready"] == "True"
    keys = read_host_keys.fn(ks)
    assert set(keys) == {h.name for h in ks.hosts} and all(k.startswith("SHA256:") for k in keys.values())
    # what the host's sshd presents: the fingerprint of a key listed in known_hosts for it
    import asyncssh

    known = {asyncssh.import_public_key(" ".join(line.split()[1:3])).get_fingerprint("sha256")
             for line in Path(ks.known_hosts).read_text().splitlines() if line.strip()}
    assert set(keys.values()) <= known


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


def test_reset_approved_without_the_cluster_name_is_refused(ks_platform):
    from flows.provisioning import reset_cluster
    from tests.approvals import APPROVE, run_and_answer

    platform, ks, state_dir = ks_platform
    before = sorted(str(p) for p in state_dir.rglob("*"))
    state = run_and_answer(reset_cluster, {"platform": platform, "dry_run": False, "poll_interval_s": 0.5},
                           {**APPROVE, "confirm": "not-the-cluster"})
    assert state.is_failed() and "refused, nothing was changed" in state.message, state.message
    assert "'not-the-cluster', not 'sandbox'" in state.message
    assert sorted(str(p) for p in state_dir.rglob("*")) == before
