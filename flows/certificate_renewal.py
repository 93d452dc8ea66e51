"""Renew control-plane certificates (manual): `kubeadm certs renew all`, one control-plane node at a time.

A dry run by default: it reads every control-plane host's PKI and publishes the plan (what is renewed on
which node, what is not and why). With `dry_run=false` it pauses for approval showing that plan, then,
holding the cluster's concurrency limit (`cert-renewal-<platform>-<cluster>`, so two renewals never
overlap), renews node after node (`tasks/tls_renewal.py`: back up, renew, restart the static pods, wait
for /readyz, verify the new expiry dates, refresh the kubeconfigs the config names). The first failure
stops the run: that node's backup is put back and checked, the nodes after it are left untouched.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.concurrency.asyncio import concurrency
from prefect.states import Completed, Failed

from blocks.config import parse_duration
from blocks.platform import Platform
from tasks.approval import aask_approval
from tasks.redact import Redactor
from tasks.reports import AsyncProgress, apublish_markdown, apublish_table, md_table
from tasks.tls import HostScan, scan_host
from tasks.tls_renewal import NodeResult, plan_markdown, plan_renewal, renew_node

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,252}$")


async def ensure_renewal_limit(platform: str, cluster: str) -> str:
    """The global concurrency limit (1 slot) that keeps two renewals of one cluster apart."""
    from tasks.concurrency import exclusive_limit

    return await exclusive_limit(f"cert-renewal-{platform}-{cluster}")


async def _scan(blocks: list[Any], layout: Any, timeout_s: float, redactor: Redactor) -> list[HostScan]:
    scans = await asyncio.gather(*(scan_host(b, layout, timeout_s=timeout_s, redactor=redactor, with_timer=False)
                                   for b in blocks), return_exceptions=True)
    bad = [f"{b.label}: {redactor.error(s)}" for b, s in zip(blocks, scans) if isinstance(s, BaseException)]
    if bad:  # unknown is not healthy: no plan from a partial view of the control plane
        raise RuntimeError("cannot read every control-plane host, nothing was changed: " + "; ".join(bad))
    problems = [f"{p.where}: {p.message}" for s in scans for p in s.problems]
    if problems:
        get_run_logger().warning("files that could not be read (not renewed by kubeadm either): %s", problems)
    return list(scans)


@flow(name="renew-control-plane-certificates", log_prints=False)
async def renew_control_plane_certificates(platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                                           nodes: list[str] | None = None, approval_timeout_s: int | None = None,
                                           poll_interval_s: float = 2.0, lock_timeout_s: float = 600) -> dict[str, Any]:
    """Renew kubeadm's certificates on the cluster's control-plane nodes (all, or `nodes`, in config order).

    lock_timeout_s: how long to wait for another renewal of the cluster to finish before giving up."""
    logger = get_run_logger()
    for n in nodes or []:
        if not isinstance(n, str) or not _NODE_RE.match(n):
            raise ValueError(f"bad node name {n!r}: expected a host label as in the config")
    plat = await Platform.aopen(platform)
    cfg = plat.config
    cl = cfg.cluster(cluster)
    c = cfg.certificates
    t = c.timeouts
    redactor = Redactor.of(await plat.asecrets())
    blocks = [b for b in await asyncio.to_thread(plat.cluster_hosts, cl.name) if b.role == "control-plane"]
    if nodes:
        unknown = sorted(set(nodes) - {b.label for b in blocks})
        if unknown:
            raise ValueError(f"not control-plane hosts of {cl.name}: {unknown}; have {[b.label for b in blocks]}")
        blocks = [b for b in blocks if b.label in nodes]
    if not blocks:
        raise ValueError(f"cluster {cl.name} has no control-plane hosts in the config (clusters[].control_plane)")
    now = datetime.now(UTC)
    scans = await _scan(blocks, c.layout, t.ssh_s, redactor)
    plans = plan_renewal(scans, c.layout, now)
    plan = redactor.text(plan_markdown(platform, cl.name, plans, c.kubeconfigs, c.layout, t, now))
    key = f"certificate-renewal-{platform}-{cl.name}"
    await apublish_markdown(f"{key}-plan", plan, description="renewal plan")
    planned = {p.label: sorted(p.renew) for p in plans}
    if dry_run:
        return {"dry_run": True, "plan": planned}

    answer = await aask_approval(plan, approval_timeout_s or parse_duration(t.approval), poll_interval_s)
    if not answer.approve:
        logger.warning("renewal declined by %s: nothing was changed", answer.who())
        return {"dry_run": False, "approved": False, "approver": answer.who(), "plan": planned}
    approver = answer.who()
    limit = await ensure_renewal_limit(platform, cl.name)
    results: list[NodeResult] = []
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    progress = await AsyncProgress.start(f"{key}-progress", len(blocks), "control-plane nodes renewed")
    try:
        async with concurrency(limit, occupy=1, timeout_seconds=lock_timeout_s):
            for block, scan in zip(blocks, scans):
                logger.info("renewing %s", block.label)
                result = await renew_node(block, c.layout, t, c.kubeconfigs, scan, stamp, redactor, logger)
                results.append(result)
                await progress.advance()
                if not result.ok:
                    break
    except TimeoutError:
        if results:  # renew_node reports its own failures: this came from elsewhere
            raise
        raise RuntimeError(f"another renewal of {cl.name} holds the concurrency limit {limit!r} for more than "
                           f"{lock_timeout_s:g}s: nothing was changed") from None
    failed = next((r for r in results if not r.ok), None)
    untouched = [b.label for b in blocks[len(results):]]
    rows = [s for r in results for s in r.steps]
    await apublish_table(f"{key}-steps", redactor.value(rows), description="every step on every node")
    summary = _summary(platform, cl.name, approver, results, untouched)
    await apublish_markdown(key, redactor.text(summary + "\n" + md_table(rows, limit=80)), description="renewal")
    out = redactor.value({
        "dry_run": False, "approved": True, "approver": approver, "plan": planned,
        "nodes": [{"node": r.label, "ok": r.ok, "restored": r.restored, "backup": r.backup, "renewed": r.renewed,
                   "error": r.error} for r in results], "untouched": untouched, "steps": rows})
    if failed:
        return Failed(message=f"renewal failed on {failed.label}: {failed.error}; "
                              f"{'its backup was put back' if failed.restored else 'its backup could NOT be put back'};"
                              f" untouched: {untouched or 'none'}", data=out)
    return Completed(message=f"renewed on {len(results)} nodes, approved by {approver}", data=out)


def _summary(platform: str, cluster: str, approver: str, results: list[NodeResult], untouched: list[str]) -> str:
    lines = [f"# Control-plane certificate renewal: {platform} / {cluster}", "", f"Approved by **{approver}**.", ""]
    for r in results:
        if r.ok:
            lines.append(f"- **{r.label}**: renewed {len(r.renewed)} certificates; backup `{r.backup}`")
        else:
            state = ("its backup was put back and verified" if r.restored else
                     "its backup could NOT be put back: restore it by hand with "
                     f"`tar -C / -xpf {r.backup}` and move the manifests back") if r.backup else "nothing was changed"
            lines.append(f"- **{r.label}: FAILED** ({r.error}); {state}")
    if untouched:
        lines.append(f"- untouched: {', '.join(untouched)}")
    return "\n".join(lines) + "\n"
