"""Renew control-plane certificates (manual): `kubeadm certs renew all`, one control-plane host at a time,
through the one operation module (`tasks.operation`); with `restore_backup`, its way back: the backups a
renewal took put back on the hosts.

The operation (its target, facts, steps and way back) is declared in `tasks.tls_plans`
(`renewal_operation`): the target is the cluster's control-plane hosts (all, or `nodes`), named by the SSH
host key each one presents; a host whose step fails after its backup gets that backup put back at once; the
hosts renewed before it are put back by this flow again with `restore_backup=<the run's stamp>` and `nodes`.
Dry run by default; the lock `cert-renewal-<platform>-<cluster>` is taken after the approval.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

from prefect import flow

from blocks.platform import Platform
from tasks.operation import run_operation
from tasks.redact import Redactor
from tasks.tls_plans import DEPLOYMENT, control_plane_hosts, renewal_operation
from tasks.tls_renewal import STAMP_FORMAT, STAMP_RE

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,252}$")


@flow(name=DEPLOYMENT, log_prints=False)
async def renew_control_plane_certificates(platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                                           nodes: list[str] | None = None, restore_backup: str | None = None,
                                           approval_timeout_s: int | None = None,
                                           poll_interval_s: float = 2.0) -> Any:
    """Renew kubeadm's certificates on the cluster's control-plane hosts (all, or `nodes`, in config order),
    one host at a time. `restore_backup=<stamp>` instead puts back the backups a renewal of that stamp took
    (its failure message names the stamp and the hosts). Dry run by default; a real run pauses for approval."""
    for n in nodes or []:
        if not isinstance(n, str) or not _NODE_RE.match(n):
            raise ValueError(f"bad node name {n!r}: expected a host label as in the config")
    if restore_backup is not None and not re.match(STAMP_RE, restore_backup):
        raise ValueError(f"restore_backup={restore_backup!r}: expected a renewal's stamp such as 20250131T120000Z")
    stamp = datetime.now(UTC).strftime(STAMP_FORMAT)  # this run's backups; fixed for its plan and re-plan
    if restore_backup == stamp:
        raise ValueError(f"restore_backup={restore_backup!r} is this very second's stamp: start again in a second")
    plat = await Platform.aopen(platform)
    cfg = plat.config
    cl = cfg.cluster(cluster)
    redactor = Redactor.of(await plat.asecrets())
    blocks = control_plane_hosts(await asyncio.to_thread(plat.cluster_hosts, cl.name), nodes, cl.name)
    op = renewal_operation(platform, cfg, cl.name, blocks, stamp, redactor, restore_backup=restore_backup,
                           approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s)
    return await run_operation(op, dry_run=dry_run)
