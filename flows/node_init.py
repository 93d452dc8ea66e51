"""Node initialisation (manual): the node_init role (configs/ansible/roles/node_init) on a cluster's hosts.

`check-node-drift(hosts)` runs the role in check mode with diff (`--check --diff` on ansible-playbook's
command line: no task changes a host; only read-only queries run) and publishes, per host, the tasks that
would change and their diffs as a table artifact. `init-nodes(hosts)` first computes that same plan; it
is a dry run by default (the plan is its result). With `dry_run=False` it pauses for approval of the plan
and then applies the role for real, under the cluster's provisioning slot (never beside a kubespray run),
and checks the hosts again afterwards: a host still drifting fails the run.

Both flows take the hosts from `clusters[].kubespray` (the same inventory kubespray uses; `hosts` limits
the run to some of them) and run through the project's one runner, `tasks/ansible.py` `run_playbook`
(events in the log, batched progress, redaction).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency

from blocks.config import KubesprayConfig, parse_duration
from flows.provisioning import _check_hosts, _open, provisioning_limit
from tasks.ansible import PlaybookRun, run_playbook
from tasks.approval import ask_approval
from tasks.kubespray import PlaybookFailed, _log, ssh_access
from tasks.kubespray_inventory import write_inventory
from tasks.node_drift import drift_rows, drift_summary
from tasks.redact import Redactor
from tasks.reports import artifact_key, md_table, publish_markdown, publish_table

ANSIBLE_DIR = Path(__file__).resolve().parent.parent / "configs" / "ansible"
PLAYBOOK = "node-init.yml"


@task(name="node-init-playbook")
def node_init_playbook(cfg: KubesprayConfig, inventory: Path, hosts: list[str] | None, check: bool,
                       redactor: Redactor, progress_key: str | None = None) -> PlaybookRun:
    """The node_init role through `run_playbook`; `check=True` adds --check --diff (nothing changes)."""
    return run_playbook(ANSIBLE_DIR, PLAYBOOK, inventory, ssh=ssh_access(cfg), limit=hosts, check=check,
                        diff=check, timeout_s=parse_duration(cfg.playbook_timeout), redactor=redactor,
                        log=_log(redactor), progress_key=progress_key, flush_every_s=2.0)


def _targets(cfg: KubesprayConfig, hosts: list[str] | None) -> list[str]:
    """The role's play targets k8s_cluster: control plane and nodes (not etcd-only or bastion hosts)."""
    nodes = [h.name for h in cfg.hosts if {"kube_control_plane", "kube_node", "calico_rr"} & set(h.groups)]
    return [h for h in (hosts or nodes) if h in nodes]


def _drift(cfg: KubesprayConfig, inventory: Path, hosts: list[str] | None, redactor: Redactor,
           key: str) -> dict[str, Any]:
    run = node_init_playbook(cfg, inventory, hosts, True, redactor, progress_key=key + "-progress")
    if run.stopped_at_prompt is not None:
        raise PlaybookFailed(f"node-init stopped at a prompt {run.stopped_at_prompt!r}")
    targets = _targets(cfg, hosts)
    rows = [{**r, "diff": redactor.text(r["diff"])} for r in drift_rows(run.tally, targets)]
    summary = drift_summary(rows)
    publish_table(key, rows, f"node_init drift (check mode): {len(summary['drifted'])} drifting, "
                             f"{len(summary['in_sync'])} in sync, {len(summary['unknown'])} unknown")
    return {"rows": rows, **summary, "recap": run.recap, "events": run.tally.events}


@flow(name="check-node-drift")
def check_node_drift(hosts: list[str] | None = None, platform: str = "main", cluster: str | None = None,
                     fail_on_drift: bool = False) -> dict[str, Any]:
    """The node_init role in check mode with diff on `hosts` (default: every node of the cluster): per host,
    what differs. Fails when a host could not be checked (or drifts, with `fail_on_drift`)."""
    _, ccfg, redactor = _open(platform, cluster)
    ks = ccfg.kubespray
    hosts = _check_hosts(hosts, [h.name for h in ks.hosts])
    with tempfile.TemporaryDirectory(prefix="node-init-") as tmp:
        inventory = write_inventory(ks, Path(tmp) / "hosts.yaml")
        result = _drift(ks, inventory, hosts, redactor, artifact_key("node-drift", ccfg.name))
    get_run_logger().info("node drift on %s: drifting %s, in sync %s, unknown %s", ccfg.name,
                          result["drifted"], result["in_sync"], result["unknown"])
    if result["unknown"]:
        raise RuntimeError("drift unknown on " + "; ".join(
            f"{r['host']}: {r['state']} at {r['task']!r}: {r['diff']}" for r in result["rows"]
            if r["state"] in ("error", "unreachable", "not run")))
    if fail_on_drift and result["drifted"]:
        raise RuntimeError(f"nodes drift from the node_init role: {result['drifted']}")
    return result


@flow(name="init-nodes")
def init_nodes(hosts: list[str] | None = None, platform: str = "main", cluster: str | None = None,
               dry_run: bool = True, poll_interval_s: float = 2.0) -> dict[str, Any]:
    """Initialise `hosts` (default: every node) with the node_init role. Dry run by default: the plan (what
    check mode says would change) is the result. `dry_run=False`: the plan, approval, the real run under
    the cluster's provisioning slot, then a check that nothing drifts any more."""
    logger = get_run_logger()
    _, ccfg, redactor = _open(platform, cluster)
    ks = ccfg.kubespray
    hosts = _check_hosts(hosts, [h.name for h in ks.hosts])
    key = artifact_key("node-init", ccfg.name)
    with tempfile.TemporaryDirectory(prefix="node-init-") as tmp:
        inventory = write_inventory(ks, Path(tmp) / "hosts.yaml")
        with concurrency(provisioning_limit(platform, ccfg.name), occupy=1,
                         timeout_seconds=parse_duration(ks.lock_timeout)):
            plan = _drift(ks, inventory, hosts, redactor, key + "-plan")
            text = (f"## init-nodes on cluster `{ccfg.name}`\n\n{len(plan['drifted'])} host(s) would change: "
                    f"{', '.join(plan['drifted']) or 'none'}; in sync: {', '.join(plan['in_sync']) or 'none'}\n\n"
                    + md_table(plan["rows"], ["host", "state", "task", "diff"], limit=200))
            if plan["unknown"]:
                raise RuntimeError(f"cannot plan node init: hosts {plan['unknown']} could not be checked")
            if dry_run or not plan["drifted"]:
                publish_markdown(key, text + ("\n_Dry run: nothing was changed._" if dry_run else
                                              "\n_Every host is in sync: nothing to do._"))
                return {"dry_run": dry_run, "applied": False, "plan": plan}
            answer = ask_approval(text, parse_duration(ks.approval_timeout), poll_interval_s)
            if not answer.approve:
                raise RuntimeError(f"init-nodes was not approved by {answer.who()}; nothing was run")
            logger.info("init-nodes approved by %s", answer.who())
            run = node_init_playbook(ks, inventory, plan["drifted"], False, redactor, progress_key=key + "-progress")
            problems = [f.describe() for f in run.tally.failures]
            if problems or not run.ok:
                raise PlaybookFailed(redactor.text(f"node-init failed ({run.status}): " + "; ".join(problems)))
            after = _drift(ks, inventory, plan["drifted"], redactor, key + "-after")
    publish_markdown(key, text + f"\n**approved by:** {answer.who()}\n\nafter: drifting {after['drifted']}\n")
    if after["drifted"] or after["unknown"]:
        raise RuntimeError(f"node init ran but hosts still drift: {after['drifted'] + after['unknown']}")
    return {"dry_run": False, "applied": True, "approved_by": answer.who(), "plan": plan, "recap": run.recap}
