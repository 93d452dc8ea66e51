"""Node initialisation (manual): the node_init role (configs/ansible/roles/node_init) on a cluster's hosts.

`check-node-drift(hosts)` runs the role in check mode with diff (`--check --diff` on ansible-playbook's
command line: no task changes a host; only read-only queries run) and publishes, per host, the tasks that
would change and their diffs as a table artifact.

`init-nodes(hosts)` is an operation (`tasks.operation`): its plan is that same check-mode run (the hosts
that drift, each task and diff), its target the hosts' SSH host keys read over SSH (node init runs before
kubespray makes a cluster, so there may be no API to ask yet). A dry run (the default) stops at the plan; a
real run pauses for approval, takes the cluster's provisioning slot (never beside a kubespray run or an
add-on install), checks again and refuses if the drift changed, applies the role to the drifting hosts (one
playbook run), then checks in check mode that nothing drifts any more. The role keeps no copy of the files
it replaces: the way back is running it again (it converges to the state it declares).

Both flows take the hosts from `clusters[].kubespray` (the same inventory kubespray uses; `hosts` limits
the run to some of them) and run through the project's one runner, `tasks/ansible.py` `run_playbook`
(events in the log, batched progress, redaction).
"""

from __future__ import annotations

import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from blocks.config import KubesprayConfig, parse_duration
from flows.provisioning import open_cluster
from tasks.ansible import PlaybookRun, run_playbook
from tasks.kubespray import PlaybookFailed, _log, check_hosts, provisioning_lock, read_host_keys, ssh_access
from tasks.kubespray_inventory import write_inventory
from tasks.node_drift import drift_rows, drift_summary
from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, lock_timeout, run_operation_sync
from tasks.redact import Redactor
from tasks.reports import artifact_key, md_table, publish_table

PLAYBOOK = Path(__file__).resolve().parent.parent / "configs" / "ansible" / "node-init.yml"


@task(name="node-init-playbook")
def node_init_playbook(cfg: KubesprayConfig, inventory: Path, hosts: list[str] | None, check: bool,
                       redactor: Redactor, progress_key: str | None = None, playbook: Path = PLAYBOOK) -> PlaybookRun:
    """The node_init role through `run_playbook`; `check=True` adds --check --diff (nothing changes)."""
    return run_playbook(playbook.parent, playbook.name, inventory, ssh=ssh_access(cfg), limit=hosts, check=check,
                        diff=check, timeout_s=parse_duration(cfg.playbook_timeout), redactor=redactor,
                        log=_log(redactor), progress_key=progress_key, flush_every_s=2.0)


def _targets(cfg: KubesprayConfig, hosts: list[str] | None) -> list[str]:
    """The role's play targets k8s_cluster: control plane and nodes (not etcd-only or bastion hosts)."""
    nodes = [h.name for h in cfg.hosts if {"kube_control_plane", "kube_node", "calico_rr"} & set(h.groups)]
    return [h for h in (hosts or nodes) if h in nodes]


def _drift(cfg: KubesprayConfig, inventory: Path, hosts: list[str] | None, redactor: Redactor,
           key: str, playbook: Path = PLAYBOOK) -> dict[str, Any]:
    run = node_init_playbook(cfg, inventory, hosts, True, redactor, progress_key=key + "-progress",
                             playbook=playbook)
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
    _, ccfg, redactor = open_cluster(platform, cluster)
    ks = ccfg.kubespray
    hosts = check_hosts(hosts, [h.name for h in ks.hosts])
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
               dry_run: bool = True, approval_timeout_s: int | None = None, poll_interval_s: float = 10,
               playbook: str | None = None) -> Any:
    """Initialise `hosts` (default: every node) with the node_init role. Dry run by default: the plan is what
    check mode says would change. `dry_run=False`: approval, the role applied to the drifting hosts under the
    cluster's provisioning slot, then a check that nothing drifts any more. `playbook`: another node-init
    playbook (default configs/ansible/node-init.yml; the sandbox passes its stand-in)."""
    plat, ccfg, redactor = open_cluster(platform, cluster)
    ks = ccfg.kubespray
    hosts = check_hosts(hosts, [h.name for h in ks.hosts])
    book = Path(playbook) if playbook else PLAYBOOK
    key = artifact_key("node-init", ccfg.name)
    targets = _targets(ks, hosts)

    @asynccontextmanager
    async def session():
        with tempfile.TemporaryDirectory(prefix="node-init-") as tmp:
            yield write_inventory(ks, Path(tmp) / "hosts.yaml")

    def planner(inventory: Path) -> Plan:
        keys = read_host_keys(ks, targets)
        plan = _drift(ks, inventory, targets, redactor, key + "-plan", book)
        refusals = [f"{h}: could not be checked ({', '.join(sorted({r['state'] for r in plan['rows'] if r['host'] == h}))})"
                    for h in plan["unknown"]]
        drifted = plan["drifted"]
        facts = {"playbook": str(book), "host_keys": keys, "in_sync": plan["in_sync"],
                 "drift": [{k: r[k] for k in ("host", "task", "diff")} for r in plan["rows"] if r["state"] == "drift"]}

        def apply() -> str:
            run = node_init_playbook(ks, inventory, drifted, False, redactor, progress_key=key + "-progress",
                                     playbook=book)
            problems = [f.describe() for f in run.tally.failures]
            if problems or not run.ok:
                raise PlaybookFailed(redactor.text(f"node-init failed ({run.status}): " + "; ".join(problems)))
            return f"{len(run.recap)} host(s), {run.tally.events} events"

        def verify() -> str:
            after = _drift(ks, inventory, drifted, redactor, key + "-after", book)
            if after["drifted"] or after["unknown"]:
                raise RuntimeError(f"node init ran but hosts still drift: {after['drifted'] + after['unknown']}")
            return f"{len(after['in_sync'])} host(s) in sync"

        steps = [] if not drifted else [
            Step(f"node_init on {', '.join(drifted)}", f"hosts {', '.join(drifted)}: the files, packages and "
                 "settings of the drift table", "PLAY RECAP: no failed task, no unreachable host",
                 "the role keeps no copy of what it replaces: run init-nodes again (idempotent)", apply),
            Step(f"verify {', '.join(drifted)}", "nothing: the role in check mode",
                 "check mode reports no drift on those hosts", "nothing to undo: a read", verify)]
        again = {"hosts": drifted, "cluster": ccfg.name, "dry_run": False, **({"playbook": playbook} if playbook else {})}
        return Plan(Target("hosts (SSH host keys)", ", ".join(targets), "ssh-host-keys:" + ",".join(
                        f"{h}={keys[h]}" for h in sorted(keys))), steps, title=f"init-nodes on {ccfg.name}",
                    details=md_table(plan["rows"], ["host", "state", "task", "diff"], limit=200), facts=facts,
                    refusals=refusals,
                    way_back=WayBack("The node_init role keeps no copy of the files it replaces: bring the hosts to "
                                     "the role's state by running init-nodes again on them.", "init-nodes", again))

    op = Operation("init-nodes", platform, planner, session, lock=provisioning_lock(platform, ccfg.name),
                   approval_timeout_s=approval_timeout(plat.config, approval_timeout_s),
                   lock_timeout_s=lock_timeout(plat.config), poll_interval_s=poll_interval_s, redactor=redactor,
                   key=ccfg.name)
    return run_operation_sync(op, dry_run=dry_run)
