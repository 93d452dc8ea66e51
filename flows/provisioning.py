"""Provisioning (manual): kubespray's create, scale, remove-node, upgrade and reset as flows.

Each flow opens the platform once, writes the cluster's inventory from `clusters[].kubespray` (a temp
file), takes the cluster's provisioning slot (`provisioning-<platform>-<cluster>`, one at a time), checks
the hosts (preflight), runs kubespray's playbook of the configured checkout through ansible-runner
(`tasks/kubespray.py`: events in the log, a batched progress artifact, unreachable hosts alone retried),
then post-verifies through the Kubernetes API. `remove-node`, `upgrade-cluster` and `reset-cluster` are
dry runs by default; a real run pauses for approval (reset: the operator types the cluster's name) and
only then passes kubespray's confirmation variables (`skip_confirmation`, `reset_confirmation`, `node`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.utilities.asyncutils import run_coro_as_sync

from blocks.config import parse_duration
from blocks.platform import Platform
from tasks.approval import Approval, ask_approval
from tasks.kubespray import preflight_hosts, run_kubespray, verify_cluster
from tasks.kubespray_inventory import write_inventory
from tasks.provisioning_checks import expected_nodes
from tasks.redact import Redactor
from tasks.reports import artifact_key, md_table, publish_markdown, publish_table

_HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}$")
_VERSION_RE = re.compile(r"^v\d+\.\d+\.\d+$")


class ResetApproval(Approval):
    """Reset wipes the cluster: the approver also types the cluster's name."""

    cluster_name: str = ""


def provisioning_limit(platform: str, cluster: str) -> str:
    from tasks.concurrency import exclusive_limit

    return run_coro_as_sync(exclusive_limit(f"provisioning-{platform}-{cluster}"))


def _open(platform: str, cluster: str | None):
    plat = Platform(platform)
    ccfg = plat.config.cluster(cluster)
    if ccfg.kubespray is None:
        raise ValueError(f"cluster {ccfg.name!r} has no kubespray section in the platform config")
    return plat, ccfg, Redactor.of(plat.secrets())


def _check_hosts(names: list[str] | None, known: list[str]) -> list[str] | None:
    if names is None:
        return None
    bad = [n for n in names if not _HOST_RE.match(n)]
    unknown = [n for n in names if n not in known]
    if bad or unknown or not names:
        raise ValueError(f"hosts must be inventory hosts of the cluster: bad {bad}, unknown {unknown}, known {known}")
    return names


def _run(action: str, playbook: str, *, platform: str, cluster: str | None, hosts: list[str] | None = None,
         extravars: dict[str, Any] | None = None, dry_run: bool = False, approval: str | None = None,
         check_ports: bool = False, verify: bool = True, absent: list[str] | None = None,
         kube_version: str | None = None, poll_interval_s: float = 2.0, flush_every_s: float = 2.0) -> dict[str, Any]:
    logger = get_run_logger()
    plat, ccfg, redactor = _open(platform, cluster)
    ks = ccfg.kubespray
    if extravars and "serial" in extravars and extravars["serial"] is None:  # upgrades: batches from the config
        extravars = {**extravars, "serial": ks.upgrade_serial}
    hosts = _check_hosts(hosts, [h.name for h in ks.hosts])
    key = artifact_key("provisioning", action, ccfg.name)
    plan = (f"## {action} on cluster `{ccfg.name}`\n\nkubespray {ks.version} `{playbook}` from `{ks.checkout}`"
            f"\n\nhosts: {', '.join(hosts) if hosts else 'all inventory hosts'}\n\nvariables: "
            f"`{sorted((extravars or {}).keys())}`; overrides: {[str(p) for p in ks.overrides]}\n")
    if dry_run:
        publish_markdown(key + "-plan", plan + "\n_Dry run: nothing was changed._")
        return {"action": action, "dry_run": True, "plan": plan}
    limit = provisioning_limit(platform, ccfg.name)
    with tempfile.TemporaryDirectory(prefix="kubespray-") as tmp:
        inventory = write_inventory(ks, Path(tmp) / "hosts.yaml")
        with concurrency(limit, occupy=1, timeout_seconds=parse_duration(ks.lock_timeout)):
            checks = preflight_hosts(ks, inventory, hosts, check_ports, redactor)
            bad = [c for c in checks if not c.ok]
            publish_table(key + "-preflight", [{"host": c.host, "ok": c.ok, "problems": "; ".join(c.problems),
                                                **c.facts} for c in checks])
            if bad:
                raise RuntimeError("preflight failed, nothing was run: "
                                   + "; ".join(f"{c.host}: {', '.join(c.problems)}" for c in bad))
            approver = None
            if approval is not None:
                answer = ask_approval(plan, parse_duration(ks.approval_timeout), poll_interval_s) \
                    if approval == "plain" else _ask_reset(plan, ccfg.name, ks, poll_interval_s)
                if not answer.approve:
                    raise RuntimeError(f"{action} was not approved by {answer.who()}; nothing was run")
                if approval == "cluster-name" and answer.cluster_name.strip() != ccfg.name:
                    raise RuntimeError(f"{action} not confirmed: the approver typed {answer.cluster_name!r}, "
                                       f"not the cluster's name {ccfg.name!r}; nothing was run")
                approver = answer.who()
                logger.info("%s approved by %s", action, approver)
            run = run_kubespray(ks, playbook, inventory, redactor, extravars=extravars, limit=hosts,
                                progress_key=key, flush_every_s=flush_every_s)
    verdict = None
    if verify:
        verdict = verify_cluster(plat.kubernetes(ccfg.name), expected_nodes(ks, set(absent or [])),
                                 kube_version or ks.kube_version or _override_version(ks), absent,
                                 ccfg.request_timeout_s, redactor)
    rows = [{"host": h, **c} for h, c in sorted(run.recap.items())]
    publish_table(key + "-recap", rows, f"PLAY RECAP of {playbook}")
    report = (plan + f"\n**approved by:** {approver or '-'}\n\n### PLAY RECAP\n" + md_table(rows)
              + f"\nattempts: {len(run.attempts) - 1}, progress updates: {run.progress_updates}, "
                f"events: {run.tally.events}\n")
    if verdict is not None:
        report += "\n### Post-verify\n" + md_table(verdict.nodes) + "\n" + (
            "all checks passed\n" if verdict.ok else "\n".join(f"- {p}" for p in verdict.problems))
    publish_markdown(key, report)
    result = {"action": action, "dry_run": False, "approved_by": approver, "recap": run.recap,
              "attempts": run.attempts, "progress_updates": run.progress_updates, "events": run.tally.events,
              "verified": None if verdict is None else verdict.ok,
              "verify_problems": [] if verdict is None else verdict.problems}
    if verdict is not None and not verdict.ok:
        raise RuntimeError(f"{action} ran but the cluster does not verify: " + "; ".join(verdict.problems))
    return result


def _ask_reset(plan: str, cluster: str, ks, poll_interval_s: float) -> ResetApproval:
    from prefect.flow_runs import pause_flow_run

    form = ResetApproval.with_initial_data(
        description=plan + f"\n\nType the cluster's name (**{cluster}**) in **cluster_name**, set **approve** and "
                           "write your name in **approver**, then resume the run.", approve=False)
    return pause_flow_run(wait_for_input=form, timeout=parse_duration(ks.approval_timeout),
                          poll_interval=poll_interval_s)


def _override_version(ks) -> str | None:
    import yaml

    version = None
    for path in ks.overrides:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        version = doc.get("kube_version", version)
    return version


@flow(name="create-cluster")
def create_cluster(platform: str = "main", cluster: str | None = None, flush_every_s: float = 2.0) -> dict[str, Any]:
    """kubespray `cluster.yml` on every inventory host, after a preflight (ports must be free)."""
    return _run("create", "cluster.yml", platform=platform, cluster=cluster, check_ports=True,
                flush_every_s=flush_every_s)


@flow(name="scale-cluster")
def scale_cluster(hosts: list[str], platform: str = "main", cluster: str | None = None) -> dict[str, Any]:
    """kubespray `scale.yml` limited to the new `hosts` (docs/operations/nodes.md: --limit=NODE_NAME)."""
    return _run("scale", "scale.yml", platform=platform, cluster=cluster, hosts=hosts, check_ports=True)


@flow(name="remove-node")
def remove_node(host: str, platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                poll_interval_s: float = 2.0) -> dict[str, Any]:
    """kubespray `remove-node.yml -e node=HOST -e skip_confirmation=yes`, after approval."""
    return _run("remove-node", "remove-node.yml", platform=platform, cluster=cluster, hosts=[host],
                extravars={"node": host, "skip_confirmation": True}, dry_run=dry_run, approval="plain",
                absent=[host], poll_interval_s=poll_interval_s)


@flow(name="upgrade-cluster")
def upgrade_cluster(version: str, platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                    poll_interval_s: float = 2.0) -> dict[str, Any]:
    """kubespray `upgrade-cluster.yml -e kube_version=VERSION`: control plane one node at a time, then the
    nodes in batches of `kubespray.upgrade_serial`; a failed batch stops it."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"version must look like v1.29.5, got {version!r}")
    return _run("upgrade", "upgrade-cluster.yml", platform=platform, cluster=cluster,
                extravars={"kube_version": version, "serial": None}, dry_run=dry_run, approval="plain",
                kube_version=version, poll_interval_s=poll_interval_s)


@flow(name="reset-cluster")
def reset_cluster(platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                  poll_interval_s: float = 2.0) -> dict[str, Any]:
    """kubespray `reset.yml -e reset_confirmation=yes`, after the operator typed the cluster's name."""
    return _run("reset", "reset.yml", platform=platform, cluster=cluster, extravars={"reset_confirmation": "yes"},
                dry_run=dry_run, approval="cluster-name", verify=False, poll_interval_s=poll_interval_s)
