"""Provisioning (manual): kubespray's create, scale, remove-node, upgrade and reset, each an operation.

The five flows share one planner (`_kubespray_operation`): it reads the live target, runs the preflight of
the hosts that get installed (create, scale: a host not ready refuses the plan; reset and remove-node wipe
their hosts, and upgrade-cluster.yml runs kubespray's own preinstall asserts on hosts already in the
cluster), and returns the plan whose steps are the playbook runs, each followed by its verify step. Every flow runs through the one operation module (`tasks.operation`):
a dry run (the default) publishes the plan and stops; a real run pauses for approval (reset: the approver
also types the cluster's name), then takes the cluster's provisioning slot (`provisioning-<platform>-
<cluster>`, the one lock of kubespray runs, node init and add-ons on a cluster), plans again and refuses if
anything changed, and only then passes kubespray's confirmation variables (`skip_confirmation`,
`reset_confirmation`, `node`).

The target: an existing cluster is its `kube-system` namespace UID read through the cluster's API, with the
UIDs of the nodes a run touches among the plan's facts (a node deleted and registered again under the same
name is another node); `create-cluster`, before any API exists, is the inventory hosts' SSH host keys, read
from each host's sshd over SSH (not from a config file).

Each flow's way back is another deployment that runs (kubespray's own way back, docs/operations/nodes.md
and docs/operations/upgrades.md): create <-> reset-cluster / create-cluster, scale-cluster <-> remove-node
with the same hosts, upgrade-cluster: no downgrade, finish it by running it again (the previous version only
by restoring etcd from its backup onto a cluster re-created at that version).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from prefect import flow

from blocks.platform import Platform
from tasks.kubespray import (
    check_hosts,
    expected_kube_version,
    preflight_hosts,
    provisioning_lock,
    read_cluster_identity,
    read_host_keys,
    run_kubespray,
    verify_cluster,
)
from tasks.kubespray_inventory import write_inventory
from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, lock_timeout, run_operation_sync
from tasks.provisioning_checks import expected_nodes
from tasks.redact import Redactor
from tasks.reports import md_table

_VERSION_RE = re.compile(r"^v\d+\.\d+\.\d+$")


def open_cluster(platform: str, cluster: str | None):
    """The platform, the cluster's config (it must have a kubespray section) and the redactor of its secrets."""
    plat = Platform(platform)
    ccfg = plat.config.cluster(cluster)
    if ccfg.kubespray is None:
        raise ValueError(f"cluster {ccfg.name!r} has no kubespray section in the platform config")
    return plat, ccfg, Redactor.of(plat.secrets())


@dataclass
class _Run:
    """One playbook run (one step) and what the verify step after it checks."""

    playbook: str
    changes: str
    undo: str
    limit: list[str] | None = None
    extravars: dict[str, Any] = field(default_factory=dict)
    expected: list[str] | None = None  # nodes Ready afterwards, read through the API (None: no API verify)
    absent: list[str] = field(default_factory=list)
    kube_version: str | None = None
    ports_free: list[str] | None = None  # reset: the hosts whose Kubernetes ports must be free afterwards


class _Session:
    """What the planner and the steps use: the generated inventory (a temp file) and the cluster's API client
    (made when first used: before create-cluster there is no API)."""

    def __init__(self, plat: Platform, cluster: str, inventory: Path):
        self.plat, self.cluster, self.inventory = plat, cluster, inventory

    @cached_property
    def api(self) -> Any:
        return self.plat.kubernetes(self.cluster)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _kubespray_operation(name: str, plat: Platform, ccfg: Any, redactor: Redactor, runs: list[_Run], *,
                         targets: list[str] | None, check_ports: bool, way_back: WayBack, preflight: bool = True,
                         facts_nodes: list[str] | None = None, confirm: str | None = None,
                         approval_timeout_s: int | None, poll_interval_s: float, flush_every_s: float) -> Operation:
    """The plan of a kubespray flow: target, preflight, then each playbook run and its verify, as steps.
    `facts_nodes` None: the target is the hosts' SSH keys (no cluster yet); else the cluster's kube-system UID
    and these nodes' UIDs and kubelet versions."""
    ks = ccfg.kubespray
    key = f"{name}-{ccfg.name}"

    @asynccontextmanager
    async def session():
        with tempfile.TemporaryDirectory(prefix="kubespray-") as tmp:
            s = _Session(plat, ccfg.name, write_inventory(ks, Path(tmp) / "hosts.yaml"))
            try:
                yield s
            finally:
                if "api" in s.__dict__:  # no idle connection is kept while an approval waits
                    s.api.rest_client.pool_manager.clear()

    def planner(s: _Session) -> Plan:
        facts: dict[str, Any] = {"kubespray": ks.version, "checkout": str(ks.checkout),
                                 "overrides": {str(p): _digest(Path(p).read_text()) for p in ks.overrides},
                                 "runs": [{"playbook": r.playbook, "limit": r.limit, "extravars": r.extravars}
                                          for r in runs]}
        if facts_nodes is None:
            keys = read_host_keys(ks, targets)
            facts["host_keys"] = keys
            target = Target("kubespray hosts (SSH host keys; no cluster API yet)", ccfg.name,
                            f"ssh-host-keys:{_digest(keys)}")
        else:
            uid, nodes = read_cluster_identity(s.api, ccfg.request_timeout_s)
            facts["nodes"] = {n: {k: nodes[n][k] for k in ("uid", "kubelet")} if n in nodes else "not registered"
                              for n in facts_nodes}
            target = Target("Kubernetes cluster (kube-system namespace UID)", ccfg.name, uid)
        checks = preflight_hosts(ks, s.inventory, targets, check_ports, redactor) if preflight else []
        refusals = [f"{c.host}: preflight: {'; '.join(c.problems)}" for c in checks if not c.ok]
        facts["preflight"] = {c.host: "ok" if c.ok else "not ready" for c in checks}
        steps: list[Step] = []
        for r in runs:
            where = f" on {', '.join(r.limit)}" if r.limit else " on every inventory host"
            steps.append(Step(f"{r.playbook}{where}", r.changes, "PLAY RECAP: no host failed or unreachable "
                              "(unreachable hosts alone retried)", r.undo, lambda r=r: _play(s, r)))
            if r.expected is not None:
                check = (f"nodes {', '.join(r.expected)} Ready" + (f" at kubelet {r.kube_version}" if r.kube_version
                                                                   else "")
                         + (f"; {', '.join(r.absent)} not registered" if r.absent else "")
                         + "; the API server's /readyz?verbose passes (etcd included)")
                steps.append(Step(f"verify after {r.playbook}", "nothing: reads the cluster through its API", check,
                                  "nothing to undo: a read", lambda r=r: _verify(s, r)))
            elif r.ports_free is not None:
                steps.append(Step(f"verify after {r.playbook}", "nothing: reads each host over SSH",
                                  "the Kubernetes ports are free on every host (preflight with ports)",
                                  "nothing to undo: a read", lambda r=r: _ports_free(s, r)))
        if not preflight:
            facts["preflight"] = "none"
        rows = [{"#": i, "playbook": r.playbook, "limit": ", ".join(r.limit or []) or "all",
                 "variables": ", ".join(sorted(r.extravars)) or "-"} for i, r in enumerate(runs, 1)]
        details = (f"kubespray {ks.version} from `{ks.checkout}`, overrides {[str(p) for p in ks.overrides]}\n\n"
                   + md_table(rows) + "\n" + (md_table([{"host": c.host, "ok": c.ok, **c.facts} for c in checks])
                                               if checks else "No preflight of the hosts (see the flow's doc).\n"))
        return Plan(target, steps, title=f"{name} on {ccfg.name}", details=details, facts=facts, refusals=refusals,
                    way_back=way_back, confirm=confirm)

    def _play(s: _Session, r: _Run) -> str:
        run = run_kubespray(ks, r.playbook, s.inventory, redactor, extravars=r.extravars or None, limit=r.limit,
                            progress_key=f"{key}-playbook", flush_every_s=flush_every_s)
        retries = len(run.attempts) - 2  # the attempts' summaries, then the run's timing
        return f"{len(run.recap)} host(s) ok, {run.tally.events} events, {retries} retry(ies) of unreachable hosts"

    def _verify(s: _Session, r: _Run) -> str:
        verdict = verify_cluster(s.api, r.expected, r.kube_version, r.absent, ccfg.request_timeout_s, redactor)
        if not verdict.ok:
            raise RuntimeError(f"{r.playbook} ran but the cluster does not verify: " + "; ".join(verdict.problems))
        return f"{len(verdict.nodes)} node(s) Ready, /readyz passes"

    def _ports_free(s: _Session, r: _Run) -> str:
        bad = [c for c in preflight_hosts(ks, s.inventory, r.ports_free, True, redactor)
               if any("ports already in use" in p or "unreachable" in p for p in c.problems)]
        if bad:
            raise RuntimeError("after reset, hosts still serve Kubernetes ports: "
                               + "; ".join(f"{c.host}: {', '.join(c.problems)}" for c in bad))
        return "Kubernetes ports free on every host"

    return Operation(name, plat.name, planner, session, lock=provisioning_lock(plat.name, ccfg.name),
                     approval_timeout_s=approval_timeout(plat.config, approval_timeout_s),
                     lock_timeout_s=lock_timeout(plat.config), poll_interval_s=poll_interval_s, redactor=redactor,
                     key=ccfg.name)


def _again(ccfg: Any, **params: Any) -> dict[str, Any]:
    return {"cluster": ccfg.name, **params, "dry_run": False}


@flow(name="create-cluster")
def create_cluster(platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                   approval_timeout_s: int | None = None, poll_interval_s: float = 10,
                   flush_every_s: float = 2.0) -> Any:
    """kubespray `cluster.yml` on every inventory host, after a preflight (ports must be free), post-verified
    through the new cluster's API. Dry run by default; a real run pauses for approval of the plan."""
    plat, ccfg, redactor = open_cluster(platform, cluster)
    ks = ccfg.kubespray
    nodes = expected_nodes(ks)
    run = _Run("cluster.yml", f"every inventory host of {ccfg.name}: etcd, the control plane, kubelet",
               "reset-cluster (reset.yml) wipes what cluster.yml installed", expected=nodes,
               kube_version=expected_kube_version(ks))
    back = WayBack("cluster.yml has no undo: reset the hosts with reset-cluster (type the cluster's name), then "
                   "create again once the cause is fixed.", "reset-cluster", _again(ccfg))
    op = _kubespray_operation("create-cluster", plat, ccfg, redactor, [run], targets=None, check_ports=True,
                              way_back=back, approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s,
                              flush_every_s=flush_every_s)
    return run_operation_sync(op, dry_run=dry_run)


@flow(name="scale-cluster")
def scale_cluster(hosts: list[str], platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                  approval_timeout_s: int | None = None, poll_interval_s: float = 10,
                  flush_every_s: float = 2.0) -> Any:
    """kubespray `scale.yml` limited to the new `hosts` (docs/operations/nodes.md: --limit=NODE_NAME), then a
    check that they are registered and Ready. Dry run by default; a real run pauses for approval."""
    plat, ccfg, redactor = open_cluster(platform, cluster)
    ks = ccfg.kubespray
    hosts = check_hosts(hosts, [h.name for h in ks.hosts])
    run = _Run("scale.yml", f"hosts {', '.join(hosts)}: kubelet installed, nodes joined",
               f"remove-node with hosts {hosts}", limit=hosts, expected=hosts, kube_version=expected_kube_version(ks))
    back = WayBack(f"remove the added hosts again: remove-node with hosts {hosts} (kubespray "
                   "docs/operations/nodes.md).", "remove-node", _again(ccfg, hosts=hosts))
    op = _kubespray_operation("scale-cluster", plat, ccfg, redactor, [run], targets=hosts, check_ports=True,
                              way_back=back, facts_nodes=hosts, approval_timeout_s=approval_timeout_s,
                              poll_interval_s=poll_interval_s, flush_every_s=flush_every_s)
    return run_operation_sync(op, dry_run=dry_run)


@flow(name="remove-node")
def remove_node(hosts: list[str], platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                approval_timeout_s: int | None = None, poll_interval_s: float = 10,
                flush_every_s: float = 2.0) -> Any:
    """kubespray `remove-node.yml -e node=HOST[,HOST] -e skip_confirmation=yes` (the nodes are drained, reset
    and deleted), then a check that they are gone and the rest Ready. Dry run by default; a real run pauses
    for approval."""
    plat, ccfg, redactor = open_cluster(platform, cluster)
    ks = ccfg.kubespray
    hosts = check_hosts(hosts, [h.name for h in ks.hosts])
    run = _Run("remove-node.yml", f"hosts {', '.join(hosts)}: drained, reset, their node objects deleted",
               f"scale-cluster with hosts {hosts}", limit=hosts,
               extravars={"node": ",".join(hosts), "skip_confirmation": True},
               expected=expected_nodes(ks, set(hosts)), absent=hosts)
    back = WayBack(f"add the hosts back: scale-cluster with hosts {hosts} (kubespray docs/operations/nodes.md).",
                   "scale-cluster", _again(ccfg, hosts=hosts))
    op = _kubespray_operation("remove-node", plat, ccfg, redactor, [run], targets=hosts, check_ports=False,
                              way_back=back, preflight=False, facts_nodes=hosts, approval_timeout_s=approval_timeout_s,
                              poll_interval_s=poll_interval_s, flush_every_s=flush_every_s)
    return run_operation_sync(op, dry_run=dry_run)


@flow(name="upgrade-cluster")
def upgrade_cluster(version: str, platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                    approval_timeout_s: int | None = None, poll_interval_s: float = 10,
                    flush_every_s: float = 2.0) -> Any:
    """kubespray `upgrade-cluster.yml -e kube_version=VERSION` in two runs, as kubespray's node-based upgrade
    documents (docs/operations/upgrades.md, `--limit "kube_control_plane:etcd"` first, then the nodes): the
    control plane one node at a time, verified, then the nodes in batches of `kubespray.upgrade_serial`,
    verified. Dry run by default; a real run pauses for approval."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"version must look like v1.29.5, got {version!r}")
    plat, ccfg, redactor = open_cluster(platform, cluster)
    ks = ccfg.kubespray
    control = [h.name for h in ks.hosts if {"kube_control_plane", "etcd"} & set(h.groups)]
    workers = [h for h in expected_nodes(ks) if h not in control]
    undo = (f"no downgrade (kubespray docs/operations/upgrades.md): run upgrade-cluster {version} again to finish; "
            "the previous version only by restoring etcd from its backup onto a cluster re-created at it")
    runs = [_Run("upgrade-cluster.yml", f"control plane and etcd hosts {', '.join(control)}: kubelet and control "
                 f"plane to {version}, one at a time", undo, limit=control, extravars={"kube_version": version},
                 expected=[n for n in expected_nodes(ks) if n in control], kube_version=version)]
    if workers:
        runs.append(_Run("upgrade-cluster.yml", f"nodes {', '.join(workers)}: kubelet to {version}, in batches of "
                         f"{ks.upgrade_serial}", undo, limit=workers,
                         extravars={"kube_version": version, "serial": ks.upgrade_serial},
                         expected=expected_nodes(ks), kube_version=version))
    back = WayBack(f"kubespray does not downgrade: bring every node to one version by running upgrade-cluster "
                   f"{version} again (hosts already upgraded are re-run, the rest upgraded). Back to the previous "
                   "version only by restoring etcd from the snapshot taken before (etcd-backup) onto a cluster "
                   "re-created at that version.", "upgrade-cluster", _again(ccfg, version=version))
    op = _kubespray_operation("upgrade-cluster", plat, ccfg, redactor, runs, targets=None, check_ports=False,
                              way_back=back, preflight=False, facts_nodes=expected_nodes(ks), approval_timeout_s=approval_timeout_s,
                              poll_interval_s=poll_interval_s, flush_every_s=flush_every_s)
    return run_operation_sync(op, dry_run=dry_run)


@flow(name="reset-cluster")
def reset_cluster(platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                  approval_timeout_s: int | None = None, poll_interval_s: float = 10,
                  flush_every_s: float = 2.0) -> Any:
    """kubespray `reset.yml -e reset_confirmation=yes` on every host, then a check that the Kubernetes ports
    are free. Dry run by default; a real run pauses for approval and the approver types the cluster's name."""
    plat, ccfg, redactor = open_cluster(platform, cluster)
    ks = ccfg.kubespray
    everyone = [h.name for h in ks.hosts]
    run = _Run("reset.yml", f"every host of {ccfg.name}: Kubernetes, etcd and their data wiped",
               "create-cluster re-creates it; workloads and etcd data only from an etcd backup",
               extravars={"reset_confirmation": "yes"}, ports_free=everyone)
    back = WayBack("re-create the cluster with create-cluster on the same hosts; its etcd data comes back only from "
                   "an etcd snapshot (etcd-backup).", "create-cluster", _again(ccfg))
    op = _kubespray_operation("reset-cluster", plat, ccfg, redactor, [run], targets=None, check_ports=False,
                              way_back=back, preflight=False, facts_nodes=expected_nodes(ks), confirm=ccfg.name,
                              approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s,
                              flush_every_s=flush_every_s)
    return run_operation_sync(op, dry_run=dry_run)
