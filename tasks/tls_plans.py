"""Renewing control-plane certificates as one operation (`tasks.operation`): `kubeadm certs renew all`, one
control-plane host at a time, and its way back (the backups a renewal took, put back on the hosts).

`renewal_operation(...)` returns the `Operation` of `renew-control-plane-certificates`; the flow in
`flows/certificate_renewal.py` opens the platform, picks the hosts (`control_plane_hosts`) and runs it.

- The target is the cluster's control-plane hosts (all, or `nodes`), named by the SSH host key each one
  presents on the session's connection, not by their names.
- The facts are, per host, its host key and the certificates `kubeadm certs renew all` would replace, each
  with its serial, fingerprint and expiry: a certificate renewed or replaced after the approval changes
  them, and the run is refused with the difference.
- The steps are written once: `_renewal_steps` for each host (the hosts one at a time, in the config's
  order), and the kubeconfig refresh in `_renewal_planner`.
- A host whose step fails after its backup gets that backup put back at once (the state says whether that
  worked); the hosts renewed before it are put back by the way back: the same deployment with
  `restore_backup=<the run's stamp>` and `nodes`, itself an approved operation (`_restore_steps`).
- The lock `cert-renewal-<platform>-<cluster>` is taken after the approval.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger

from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, lock_timeout
from tasks.redact import Redactor
from tasks.reports import md_table
from tasks.ssh import host_key_fingerprint
from tasks.tls import HostScan, scan_over
from tasks.tls_model import CertInfo
from tasks.tls_renewal import (
    archive_digest,
    archive_members,
    backup_archive,
    backup_pki,
    ca_of,
    cert_facts,
    check_renewed,
    compare_backup,
    kubeadm_renew,
    managed_certs,
    not_renewed,
    open_hosts,
    pem,
    put_back,
    refresh_from_host,
    restart_static_pods,
    wait_ready,
)
from tasks.tls_report import cert_rows

DEPLOYMENT = "renew-control-plane-certificates"


def control_plane_hosts(blocks: list[Any], nodes: list[str] | None, cluster: str) -> list[Any]:
    """The cluster's control-plane host blocks (all, or those named in `nodes`), in the config's order."""
    blocks = [b for b in blocks if b.role == "control-plane"]
    if nodes:
        unknown = sorted(set(nodes) - {b.label for b in blocks})
        if unknown:
            raise ValueError(f"not control-plane hosts of {cluster}: {unknown}; have {[b.label for b in blocks]}")
        blocks = [b for b in blocks if b.label in nodes]
    if not blocks:
        raise ValueError(f"cluster {cluster} has no control-plane hosts in the config (clusters[].control_plane)")
    return blocks


class _Hosts:
    """What the steps of one run share: the config's layout and timeouts, the redactor, the run's stamp."""

    def __init__(self, cluster: str, certs: Any, stamp: str, redactor: Redactor, logger: Any):
        self.cluster, self.layout, self.t, self.kubeconfigs = cluster, certs.layout, certs.timeouts, certs.kubeconfigs
        self.stamp, self.redactor, self.logger = stamp, redactor, logger

    async def read(self, b: Any, conn: Any) -> tuple[str, HostScan] | str:
        """The host key and the PKI of one host, or why they could not be read."""
        if isinstance(conn, BaseException):
            return f"cannot reach it over SSH: {self.redactor.error(conn)}"
        try:
            scan = await scan_over(conn, b.label, b.root, self.layout, timeout_s=self.t.ssh_s,
                                   redactor=self.redactor, with_timer=False)
            return host_key_fingerprint(conn), scan
        except Exception as exc:  # noqa: BLE001 - refused: no plan from a partial view of the control plane
            return f"cannot read its PKI: {self.redactor.error(exc)}"

    async def managed(self, b: Any, conn: Any) -> dict[str, CertInfo]:
        scan = await scan_over(conn, b.label, b.root, self.layout, timeout_s=self.t.ssh_s, redactor=self.redactor,
                               with_timer=False)
        return managed_certs(scan, self.layout)

    async def ready(self, b: Any, conn: Any, ca: CertInfo | None, on_disk: dict[str, CertInfo] | None = None) -> str:
        """/readyz answers `ok` and the API server serves the apiserver.crt now on the host's disk."""
        if not b.apiserver_port:
            return "no API server port configured: /readyz not checked"
        served = (on_disk if on_disk is not None else await self.managed(b, conn)).get("apiserver.crt")
        return await wait_ready(b.host, b.apiserver_port, pem(ca), served.fingerprint if served else None,
                                self.t.readyz_s)

    async def read_all(self, blocks: list[Any], conns: dict[str, Any]) -> list[tuple[str, HostScan] | str]:
        return list(await asyncio.gather(*(self.read(b, conns[b.label]) for b in blocks)))

    async def identified(self, blocks: list[Any], conns: dict[str, Any], ids: list[str],
                         refusals: list[str]) -> list[tuple[Any, str, HostScan]]:
        """(host block, host key fingerprint, scan) of each host that could be read; each host's identity goes
        to `ids` (`label=fingerprint`, or `label=unknown` with the reason in `refusals`)."""
        out = []
        for b, got in zip(blocks, await self.read_all(blocks, conns)):
            if isinstance(got, str):
                refusals.append(f"{b.label}: {got}")
                ids.append(f"{b.label}=unknown")
                continue
            ids.append(f"{b.label}={got[0]}")
            out.append((b, *got))
        return out

    def restart(self, b: Any, conn: Any) -> Callable[[], Any]:
        return lambda: restart_static_pods(conn, b.root, self.layout, self.t.static_pod_wait_s, self.t.ssh_s,
                                           self.redactor)

    def restore_parameters(self, hosts: list[str], stamp: str) -> dict[str, Any]:
        return {"cluster": self.cluster, "nodes": hosts, "restore_backup": stamp, "dry_run": False}

    def restore_way_back(self, hosts: list[str], stamp: str, what: str) -> WayBack:
        params = self.restore_parameters(hosts, stamp)
        return WayBack(f"Put back {what} on {', '.join(hosts)}: run {DEPLOYMENT} with restore_backup=\"{stamp}\" "
                       f"nodes={json.dumps(hosts)} dry_run=false (it plans, asks for approval and takes a safety "
                       "backup first).", DEPLOYMENT, params)


# --- the renewal ---------------------------------------------------------------------------------


def _renewal_steps(h: _Hosts, b: Any, conn: Any, before: dict[str, CertInfo], ca: CertInfo | None) -> list[Step]:
    """One host's steps. A failure of the renewal, the restart or the check puts this host's backup back
    before the error is raised, and the error says whether that worked."""
    label, layout, t, redactor = b.label, h.layout, h.t, h.redactor
    archive = backup_archive(b.root, layout, label, h.stamp)

    async def rollback() -> str:
        try:
            await put_back(conn, b.root, layout, archive, t.ssh_s, redactor)
            await restart_static_pods(conn, b.root, layout, t.static_pod_wait_s, t.ssh_s, redactor)
            await compare_backup(conn, b.root, archive, t.ssh_s, redactor)
            try:
                ready = await h.ready(b, conn, ca)
            except TimeoutError as exc:
                ready = f"but {exc}"
            return f"automatic rollback: {label}'s backup {archive} was put back and compared equal; {ready}"
        except Exception as exc:  # noqa: BLE001 - said in the state, with the way back
            return (f"automatic rollback of {label} FAILED ({redactor.error(exc)}): put {archive} back with "
                    f"restore_backup=\"{h.stamp}\" nodes=[\"{label}\"]")

    def rolled_back(fn: Callable[[], Any]) -> Callable[[], Any]:
        async def run() -> Any:
            try:
                return await fn()
            except Exception as exc:
                note = await rollback()
                h.logger.warning("%s", note)
                raise RuntimeError(f"{redactor.error(exc)}\n{note}") from exc
        return run

    async def check() -> str:
        after = await h.managed(b, conn)
        ready = await h.ready(b, conn, ca, after)
        renewed = check_renewed(before, after, datetime.now(UTC))
        return f"{ready}; {len(renewed)} certificates renewed, now expiring {min(r['new'] for r in renewed.values())}"

    names = ", ".join(before)
    return [
        Step(f"back up {label}", f"{label}: no certificate yet; writes {archive} (0600) with {layout.cert_dir}, "
             f"the kubeconfigs and {layout.manifests_dir}", f"the archive lists {layout.cert_dir}",
             f"nothing to undo: this archive is what undoes the next steps on {label}",
             lambda: backup_pki(conn, b.root, layout, archive, t.ssh_s, redactor)),
        Step(f"renew on {label}", f"{label}: the {len(before)} certificates in the facts ({names})",
             "`kubeadm certs renew all` exits 0",
             f"put back {archive} (done at once if {label} fails; after that: restore_backup=\"{h.stamp}\")",
             rolled_back(lambda: kubeadm_renew(conn, b.root, layout, t.kubeadm_s, redactor, h.logger))),
        Step(f"restart static pods on {label}", f"{label}: {', '.join(layout.static_pods)} restart (manifests out "
             f"for {t.static_pod_wait_s:g}s, then back)", "every manifest moved out is back",
             "the same restart, after the backup is put back", rolled_back(h.restart(b, conn))),
        Step(f"check {label}", f"{label}: nothing (reads)", f"/readyz ok within {t.readyz_s:g}s serving the renewed "
             "apiserver certificate; every certificate in the facts has a new fingerprint and a later expiry",
             "nothing to undo", rolled_back(check)),
    ]


def _renewal_planner(h: _Hosts, blocks: list[Any]) -> Callable[[dict[str, Any]], Any]:
    async def planner(conns: dict[str, Any]) -> Plan:
        now = datetime.now(UTC)
        ids, facts, refusals, steps, rows, others = [], {}, [], [], [], []
        renewed_at: list[tuple[int, str]] = []  # (index of a host's renewal step, host)
        last: tuple[Any, Any] | None = None
        for b, fingerprint, scan in await h.identified(blocks, conns, ids, refusals):
            if scan.problems:
                h.logger.warning("%s: files that could not be read (not renewed by kubeadm either): %s", b.label,
                                 [f"{p.where}: {p.message}" for p in scan.problems])
            before, ca = managed_certs(scan, h.layout), ca_of(scan, b.label, h.layout)
            if not before:
                refusals.append(f"{b.label}: no kubeadm-managed certificate under {h.layout.cert_dir}")
            if b.apiserver_port and ca is None:
                refusals.append(f"{b.label}: no ca.crt in {h.layout.cert_dir}: its /readyz cannot be verified")
            facts[b.label] = {"host_key": fingerprint, "certificates": cert_facts(before)}
            rows += cert_rows(b.label, before, now)
            others += [f"{b.label}: {x}" for x in not_renewed(scan, before, now)]
            renewed_at.append((len(steps) + 2, b.label))
            steps += _renewal_steps(h, b, conns[b.label], before, ca)
            last = (b, conns[b.label])
        refresh = [k for k in h.kubeconfigs if k.refresh_from]
        if refresh and last is not None:
            b, conn = last

            async def refresh_all() -> str:
                return "; ".join([await refresh_from_host(conn, b.root, b.label, h.layout, k, h.t.ssh_s)
                                  for k in refresh])

            steps.append(Step("refresh kubeconfigs", "on the worker: the client certificate of " + ", ".join(
                f"{k.path} (from {b.label}'s {k.refresh_from})" for k in refresh),
                "each kubeconfig holds the renewed client certificate", "nothing to undo: the client "
                "certificate it held before stays valid until it expires", refresh_all))

        def way_back(applied: int) -> WayBack:
            hosts = [label for index, label in renewed_at if index <= applied]
            if not hosts:
                return WayBack(f"Nothing was renewed: nothing to put back (backups taken stay in "
                               f"{h.layout.backup_dir}).")
            return h.restore_way_back(hosts, h.stamp, f"the backups taken before the renewal ({h.stamp})")

        details = md_table(rows, limit=200)
        if others:
            details += (f"\n\nNot renewed ({len(others)}): CAs (another procedure), the kubelet's rotating client "
                        "certificate, kubespray's etcd certificates (its etcd role) and any other file: "
                        + "; ".join(others[:24]) + (" ..." if len(others) > 24 else ""))
        return Plan(Target("control-plane hosts", f"{h.cluster}: {', '.join(b.label for b in blocks)}",
                           "; ".join(ids)), steps, title=f"Renew control-plane certificates ({h.cluster})",
                    details=details, facts=facts, refusals=refusals, way_back=way_back)
    return planner


# --- the way back: a backup put back ---------------------------------------------------------------


def _restore_steps(h: _Hosts, b: Any, conn: Any, archive: str, ca: CertInfo | None) -> list[Step]:
    label, layout, t, redactor = b.label, h.layout, h.t, h.redactor
    safety = backup_archive(b.root, layout, label, h.stamp)
    return [
        Step(f"safety backup {label}", f"{label}: no certificate yet; writes {safety} (0600) with what is there "
             "now", f"the archive lists {layout.cert_dir}", "nothing to undo: this archive undoes the next steps",
             lambda: backup_pki(conn, b.root, layout, safety, t.ssh_s, redactor)),
        Step(f"put back {label}", f"{label}: {layout.cert_dir}, the kubeconfigs and {layout.manifests_dir} "
             f"overwritten with {archive}", "`tar --compare` finds no difference from the backup",
             f"put back the safety backup: restore_backup=\"{h.stamp}\"",
             lambda: put_back(conn, b.root, layout, archive, t.ssh_s, redactor),
             lambda _: compare_backup(conn, b.root, archive, t.ssh_s, redactor)),
        Step(f"restart static pods on {label}", f"{label}: {', '.join(layout.static_pods)} restart",
             "every manifest moved out is back", "the same restart after the safety backup is put back",
             h.restart(b, conn)),
        Step(f"check {label}", f"{label}: nothing (reads)",
             f"/readyz ok within {t.readyz_s:g}s serving the apiserver certificate now on disk", "nothing to undo",
             lambda: h.ready(b, conn, ca)),
    ]


def _restore_planner(h: _Hosts, blocks: list[Any], stamp: str) -> Callable[[dict[str, Any]], Any]:
    async def planner(conns: dict[str, Any]) -> Plan:
        now = datetime.now(UTC)
        ids, facts, refusals, steps, rows = [], {}, [], [], []
        put_at: list[tuple[int, str]] = []
        for b, fingerprint, scan in await h.identified(blocks, conns, ids, refusals):
            conn = conns[b.label]
            archive = backup_archive(b.root, h.layout, b.label, stamp)
            digest = await archive_digest(conn, archive, h.t.ssh_s, h.redactor)
            if digest is None:
                refusals.append(f"{b.label}: no backup {archive}")
            elif not any(m.startswith(h.layout.cert_dir.strip("/") + "/")
                         for m in await archive_members(conn, archive, h.t.ssh_s, h.redactor)):
                refusals.append(f"{b.label}: {archive} does not hold {h.layout.cert_dir}")
            now_certs = managed_certs(scan, h.layout)
            facts[b.label] = {"host_key": fingerprint, "backup": archive, "sha256": digest,
                              "certificates now": cert_facts(now_certs)}
            rows += cert_rows(b.label, now_certs, now)
            put_at.append((len(steps) + 2, b.label))
            steps += _restore_steps(h, b, conn, archive, ca_of(scan, b.label, h.layout))

        def way_back(applied: int) -> WayBack:
            hosts = [label for index, label in put_at if index <= applied]
            if not hosts:
                return WayBack("Nothing was put back: the hosts are as they were.")
            return h.restore_way_back(hosts, h.stamp, f"the safety backups taken before this restore ({h.stamp})")

        return Plan(Target("control-plane hosts", f"{h.cluster}: {', '.join(b.label for b in blocks)}",
                           "; ".join(ids)), steps, title=f"Put back certificate backup {stamp} ({h.cluster})",
                    details="The certificates there now, replaced by the backup's:\n\n" + md_table(rows, limit=200),
                    facts=facts, refusals=refusals, way_back=way_back)
    return planner


def renewal_operation(platform: str, cfg: Any, cluster: str, blocks: list[Any], stamp: str, redactor: Redactor, *,
                      restore_backup: str | None = None, approval_timeout_s: int | None = None,
                      poll_interval_s: float = 2.0) -> Operation:
    """The renewal on `blocks` (this run's backups named by `stamp`), or with `restore_backup` the backups of
    that stamp put back, as one operation on a session holding an SSH connection to each host."""
    h = _Hosts(cluster, cfg.certificates, stamp, redactor, get_run_logger())
    planner = _restore_planner(h, blocks, restore_backup) if restore_backup else _renewal_planner(h, blocks)
    return Operation(DEPLOYMENT, platform, planner, lambda: open_hosts(blocks),
                     lock=f"cert-renewal-{platform}-{cluster}",
                     approval_timeout_s=approval_timeout(cfg, approval_timeout_s), lock_timeout_s=lock_timeout(cfg),
                     poll_interval_s=poll_interval_s, redactor=redactor,
                     key=cluster + ("-restore" if restore_backup else ""))
