"""The provisioning lifecycle as the operation contract drives it: kubespray's create, scale, remove-node,
upgrade and reset against the sandbox's sshd hosts and stand-in checkout (sandbox/kubespray_checkout), node
init with the stand-in node_init playbook, add-ons with the stand-in helm.

What each scenario reads back is the sandbox itself: the stand-in's per-host state folders (what the
playbooks did on the hosts), the emulated Kubernetes API through the official client (the nodes the
stand-in's kubelet registers, remove-node deletes, an upgrade's kubelet version), the helm stand-in's
release store. Never the flow's own output.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

from tests.operation_scenarios import Scenario

CLUSTER = "sandbox"
KUBELET = "kubernetes-node-Install-kubelet"  # the stand-in's marker of "kubernetes/node : Install kubelet"
ADDED = "gpu-node-0002"
NEW_VERSION = "v1.29.6"
_SAVED: dict[str, Any] = {}


# --- reading and setting the sandbox ----------------------------------------------------------------


def _hosts(sb) -> list[str]:
    return [h["name"] for h in sb.config["clusters"][0]["kubespray"]["hosts"]]


def _state(sb) -> Path:
    return Path(sb.extra["provisioning"]["state_dir"])


def _installed(sb, host: str) -> bool:
    return (_state(sb) / host / KUBELET).is_file()


def _core(sb):
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    return k8s.CoreV1Api(k8s_config.new_client_from_config(str(sb.kubeconfig)))


def _node(sb, name: str) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    import json

    try:  # as the API server answers it (not through the client's models: any node object reads back)
        return json.loads(_core(sb).read_node(name, _preload_content=False).data)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _bare(node: dict) -> dict:
    node = copy.deepcopy(node)
    for k in ("uid", "resourceVersion", "creationTimestamp"):
        node["metadata"].pop(k, None)
    return node


def _recreate(sb, name: str, body: dict | None = None) -> None:
    """The node object deleted and created again (same name and content: another object, a new uid)."""
    core = _core(sb)
    body = _bare(body or _node(sb, name))
    if _node(sb, name) is not None:
        core.delete_node(name)
    core.create_node(body)


def _restore_nodes(sb) -> None:
    """The inventory hosts' node objects as the sandbox seeded them (saved the first time)."""
    for host in _hosts(sb):
        now = _node(sb, host)
        if host not in _SAVED:
            assert now is not None, f"the sandbox has no node {host}"
            _SAVED[host] = _bare(now)
        if now is None or _bare(now) != _SAVED[host]:
            _recreate(sb, host, _SAVED[host])


def _wipe(sb, hosts: list[str] | None = None) -> None:
    import shutil

    for host in hosts or _hosts(sb):
        shutil.rmtree(_state(sb) / host, ignore_errors=True)


def _install(sb, hosts: list[str] | None = None) -> None:
    """The hosts as cluster.yml leaves them (the stand-in's marker of an installed kubelet)."""
    for host in hosts or _hosts(sb):
        (_state(sb) / host).mkdir(parents=True, exist_ok=True)
        (_state(sb) / host / KUBELET).write_text("kubernetes/node : Install kubelet kube_version=v1.29.5\n")


def _busy_kubelet_port(sb) -> None:
    """Something listening on the kubelet's port (10250) of the hosts (they share this machine's loopback)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 10250))
    sock.listen(1)
    _SAVED["listener"] = sock


def _reset(sb, *, install: bool = False, wipe: list[str] | None = None) -> None:
    listener = _SAVED.pop("listener", None)
    if listener is not None:
        listener.close()
    _restore_nodes(sb)
    _wipe(sb, wipe)
    if install:
        _install(sb)


def _run(flow_fn, answer: dict | None = None, **params):
    from tests.approvals import APPROVE, run_and_answer

    return run_and_answer(flow_fn, {"platform": "sandbox", "dry_run": False, "poll_interval_s": 0.5, **params},
                          {**APPROVE, **(answer or {})})


def _kubelet_versions(sb) -> set[str]:
    return {(_node(sb, h) or {}).get("status", {}).get("nodeInfo", {}).get("kubeletVersion") for h in _hosts(sb)}


# --- the way back of each, run as the failed run's message names it -------------------------------


def _back_reset(sb, failed):
    from flows.provisioning import reset_cluster

    assert "reset-cluster" in failed.message, failed.message
    return _run(reset_cluster, {"confirm": CLUSTER})


def _back_create(sb, failed):
    from flows.provisioning import create_cluster

    assert "create-cluster" in failed.message, failed.message
    return _run(create_cluster)


def _back_remove(sb, failed):
    from flows.provisioning import remove_node

    assert "remove-node" in failed.message and ADDED in failed.message, failed.message
    return _run(remove_node, hosts=[ADDED])


def _back_scale(sb, failed):
    from flows.provisioning import scale_cluster

    assert "scale-cluster" in failed.message and ADDED in failed.message, failed.message
    return _run(scale_cluster, hosts=[ADDED])


def _back_upgrade(sb, failed):
    from flows.provisioning import upgrade_cluster

    assert "upgrade-cluster" in failed.message and NEW_VERSION in failed.message, failed.message
    return _run(upgrade_cluster, version=NEW_VERSION)


def _ready(sb, host: str) -> bool:
    node = _node(sb, host)
    return node is not None and any(c["type"] == "Ready" and c["status"] == "True"
                                    for c in node["status"].get("conditions") or [])


SCENARIOS = [
    # create: identity is the hosts' SSH host keys; a busy kubelet port fails the re-plan's preflight
    Scenario("create-cluster", lambda sb: {}, lambda sb: all(_installed(sb, h) for h in _hosts(sb)),
             _busy_kubelet_port, _back_reset, restored=lambda sb: not any(_installed(sb, h) for h in _hosts(sb)),
             reset=lambda sb: _reset(sb), fixtures=("cert_sandbox",)),
    # scale: the added host's node object replaced meanwhile is another node; the way back removes it
    Scenario("scale-cluster", lambda sb: {"hosts": [ADDED]}, lambda sb: _installed(sb, ADDED),
             lambda sb: _recreate(sb, ADDED), _back_remove,
             restored=lambda sb: not _installed(sb, ADDED) and _node(sb, ADDED) is None,
             reset=lambda sb: _reset(sb, wipe=[ADDED]), fixtures=("cert_sandbox",)),
    Scenario("remove-node", lambda sb: {"hosts": [ADDED]}, lambda sb: _node(sb, ADDED) is None,
             lambda sb: _recreate(sb, ADDED), _back_scale,
             restored=lambda sb: _ready(sb, ADDED) and _installed(sb, ADDED),
             reset=lambda sb: _reset(sb, install=True), fixtures=("cert_sandbox",)),
    # upgrade: control plane, verify, nodes, verify; failed before the nodes' run, the way back finishes it
    Scenario("upgrade-cluster", lambda sb: {"version": NEW_VERSION}, lambda sb: _kubelet_versions(sb) == {NEW_VERSION},
             lambda sb: _recreate(sb, "gpu-node-0001"), _back_upgrade,
             restored=lambda sb: _kubelet_versions(sb) == {NEW_VERSION}, reset=lambda sb: _reset(sb, install=True),
             fail_at=3, fixtures=("cert_sandbox",)),
    Scenario("reset-cluster", lambda sb: {}, lambda sb: not any(_installed(sb, h) for h in _hosts(sb)),
             lambda sb: _recreate(sb, "gpu-node-0001"), _back_create,
             restored=lambda sb: all(_installed(sb, h) for h in _hosts(sb)), reset=lambda sb: _reset(sb, install=True),
             fixtures=("cert_sandbox",), extra={"answer": {"confirm": CLUSTER}}),
]


# --- init-nodes: the sandbox's stand-in node_init playbook (its hosts are this machine) ----------------

REPO = Path(__file__).resolve().parents[2]
NODE_INIT = REPO / "sandbox" / "node_init_standin" / "node-init.yml"


def _node_init_files(sb) -> dict[Path, str]:
    """The files the stand-in playbook writes on ADDED, with their contents (read from the playbook)."""
    import yaml

    tasks = yaml.safe_load(NODE_INIT.read_text())[0]["tasks"]
    return {Path(t["ansible.builtin.copy"]["dest"].replace("{{ standin_state_dir }}", str(_state(sb)))
                 .replace("{{ inventory_hostname }}", ADDED)): t["ansible.builtin.copy"]["content"] for t in tasks}


def _node_init_done(sb) -> bool:
    return all(p.is_file() and p.read_text() == c for p, c in _node_init_files(sb).items())


def _node_init_reset(sb) -> None:
    _reset(sb, wipe=[])
    for p in _node_init_files(sb):
        p.unlink(missing_ok=True)


def _node_init_change(sb) -> None:
    """One of the files written meanwhile (by hand, as the role would): that task no longer drifts."""
    path, content = next(iter(_node_init_files(sb).items()))
    path.write_text(content)


def _back_node_init(sb, failed):
    """init-nodes again: it converges; with nothing left to change it completes without asking."""
    from flows.node_init import init_nodes
    from tests.conftest import run_flow_sync

    assert "init-nodes" in failed.message, failed.message
    params = {"platform": "sandbox", "hosts": [ADDED], "playbook": str(NODE_INIT)}
    if not run_flow_sync(init_nodes, **params).result()["plan"]:
        return run_flow_sync(init_nodes, **params, dry_run=False)
    return _run(init_nodes, **params)


# --- install-addons: the helm stand-in (sandbox/helm_standin.py) and its release store -------------------

ADDONS = ["nvidia-device-plugin", "ingress-nginx"]
BEFORE = {"scenario": "before"}


def _helm(sb) -> tuple[Path, Path]:
    """The stand-in `helm` (a wrapper script) and its state folder."""
    import sys

    base = _state(sb).parent / "helm-standin"
    exe, state = base / "bin" / "helm", base / "state"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text(f"#!/bin/sh\nHELM_STANDIN_STATE={state} exec {sys.executable} "
                       f"{REPO / 'sandbox' / 'helm_standin.py'} \"$@\"\n")
        exe.chmod(0o755)
    return exe, state


def _releases(sb) -> dict:
    import json

    path = _helm(sb)[1] / "releases.json"
    return json.loads(path.read_text())["releases"] if path.exists() else {}


def _addon(sb, name: str) -> dict | None:
    from tasks.helm_releases import load_releases

    rel = next(r for r in load_releases() if r.name == name)
    return _releases(sb).get(f"{rel.namespace}/{name}")


def _seed_releases(sb, values: dict[str, dict], revision: int = 1) -> None:
    """The release store with each release deployed at the pinned chart with `values` (helm's storage: one
    record per revision, `history`)."""
    import json

    from tasks.helm_releases import load_releases

    state = _helm(sb)[1]
    state.mkdir(parents=True, exist_ok=True)
    path = state / "releases.json"
    doc = json.loads(path.read_text()) if revision > 1 and path.exists() else \
        {"releases": {}, "history": {}, "namespaces": ["default", "kube-system"]}
    for rel in load_releases():
        if rel.name not in values:
            continue
        key = f"{rel.namespace}/{rel.name}"
        entry = {"name": rel.name, "namespace": rel.namespace, "chart": rel.chart, "version": rel.version,
                 "repo": rel.repo, "values": values[rel.name], "revision": revision, "status": "deployed",
                 "updated": "2026-01-01 00:00:00 +0000 UTC"}
        doc["releases"][key] = entry
        doc["history"].setdefault(key, []).append(dict(entry))
        if rel.namespace not in doc["namespaces"]:
            doc["namespaces"].append(rel.namespace)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))


def _addons_applied(sb) -> bool:
    from tasks.helm_releases import load_releases, load_values

    files = {r.name: load_values(r.values) for r in load_releases()}
    return all((_addon(sb, n) or {}).get("values") == files[n] for n in ADDONS)


def _addons_restored(sb) -> bool:
    return all((_addon(sb, n) or {}).get("values") == BEFORE and _addon(sb, n)["status"] == "deployed" for n in ADDONS)


def _back_addons(sb, failed):
    from flows.addons import install_addons

    assert "install-addons" in failed.message and "rollback_to" in failed.message, failed.message
    return _run(install_addons, helm_bin=str(_helm(sb)[0]), rollback_to={n: 1 for n in ADDONS})


SCENARIOS += [
    Scenario("init-nodes", lambda sb: {"hosts": [ADDED], "playbook": str(NODE_INIT)}, _node_init_done,
             _node_init_change, _back_node_init, restored=_node_init_done, reset=_node_init_reset,
             fixtures=("cert_sandbox",)),
    Scenario("install-addons", lambda sb: {"releases": ADDONS, "helm_bin": str(_helm(sb)[0])}, _addons_applied,
             lambda sb: _seed_releases(sb, {"ingress-nginx": {"scenario": "changed"}}, revision=2), _back_addons,
             restored=_addons_restored, reset=lambda sb: _seed_releases(sb, {n: BEFORE for n in ADDONS}),
             fixtures=("cert_sandbox",)),
]
