"""One GitLab backup run (data or config): preflight, create, verify, copy off-site, manifest, retention.

The flows in `flows/gitlab_backup.py` open the platform and hand this module the GitLab host and API
blocks, the off-site `Store`, the platform config and one `Redactor`; `run_backup` runs the steps under
the host's global concurrency limit (`gitlab-host-<platform>`, one backup or restore per host at a time)
and returns a `BackupOutcome` (the error included: nothing is raised before the report is published,
`tasks.gitlab_report.publish_backup`). `BackupOutcome.result()` is what the flow returns, or the
`BackupFailed` it raises.

What GitLab reports decides what the archive must hold (`tasks.gitlab_host.copy_offsite`), retention runs
only after a fully verified run and never deletes the newest verified backup (`tasks.gitlab_rules.
plan_retention`); the secrets copy is kept apart from the data off-site (`secrets/<kind>/<id>/`,
server-side encrypted where the store offers it).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.concurrency.asyncio import concurrency

from blocks.config import BackupThresholds, parse_duration
from tasks.gitlab_api import api_preflight
from tasks.gitlab_host import (
    HostLayout,
    copy_offsite,
    create_config_backup,
    create_data_backup,
    delete_host_files,
    ensure_host_limit,
    host_preflight,
    list_host_backups,
    write_host_manifest,
)
from tasks.gitlab_report import decision_row
from tasks.gitlab_rules import (
    BackupFile,
    BackupRecord,
    Manifest,
    human_bytes,
    human_duration,
    keep_time_warning,
    offsite_key,
    parse_backup_id,
    plan_retention,
    space_problem,
)
from tasks.redact import Redactor
from tasks.reports import AsyncProgress
from tasks.storage import (
    Store,
    delete_offsite_backups,
    list_offsite_manifests,
    write_offsite_manifest,
)


class BackupFailed(RuntimeError):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


def host_layout(config: Any, scratch: bool = False) -> HostLayout:
    """The `HostLayout` of the production (or scratch) GitLab host from the platform config's `gitlab`."""
    g = config.gitlab
    s = g.scratch if scratch else None
    return HostLayout(backup_user=g.backup_user, gitlab_rb=(s and s.gitlab_rb) or g.gitlab_rb,
                      backup_log=(s and s.backup_log) or g.backup_log, control_dir=(s and s.control_dir) or g.control_dir)


def step_timeout(config: Any, step: str) -> int:
    """A per-step timeout from `gitlab.timeouts` (what the operator configured), in seconds."""
    return parse_duration(getattr(config.gitlab.timeouts, step))


async def preflight_checks(host: Any, api: Any, layout: HostLayout, redactor: Redactor, keep_days: int) -> dict:
    """API and host preflight in one dict; `problems` stop the run, `warnings` go into the report."""
    out = {**await api_preflight(api, redactor), **await host_preflight(host, layout, redactor)}
    out["problems"], out["warnings"] = [], []
    if not out["ready"]:
        out["problems"].append(f"GitLab is not ready: /-/readiness answered {out['readiness_status']}")
    if not out["secrets_present"]:
        out["problems"].append(f"{host.secrets_file} is missing: a backup without it cannot be restored "
                               "(restore it from the last config backup first)")
    if out.get("backup_keep_time") is None:
        out["warnings"].append("gitlab.rb's backup_keep_time is not a number: GitLab's own pruning is unknown")
    elif w := keep_time_warning(out["backup_keep_time"], keep_days):
        out["warnings"].append(w)
    if not out.get("gitlab_rb_read"):
        out["warnings"].append(f"{layout.gitlab_rb} could not be read: GitLab's own backup_keep_time is unknown")
    return out


def rpo_seconds(manifests: list[dict], now: datetime) -> float | None:
    verified = [Manifest.model_validate(m) for m in manifests if m.get("verified") and m.get("offsite")]
    if not verified:
        return None
    return (now - max(m.finished_at for m in verified)).total_seconds()


async def _config_and_secrets(host: Any, store: Store, redactor: Redactor, kind: str, backup_id: str | None,
                              progress: AsyncProgress) -> tuple[list[BackupFile], str]:
    """backup-etc + secrets copy on the host, both verified and copied off-site: the config archive under
    `<kind>/<id>/`, the secrets apart under `secrets/<kind>/<id>/`, server-side encrypted where the store
    offers it (`id` defaults to the config archive's stamp)."""
    cfg = await create_config_backup(host, redactor)
    await progress.advance()
    backup_id = backup_id or cfg["stamp"]
    files = []
    for role, name, archive in (("config", cfg["config_archive"], True), ("secrets", cfg["secrets_copy"], False)):
        path = posixpath.join(cfg["directory"], name)
        key = offsite_key(kind, backup_id, role, name)
        copied = await copy_offsite(host, path, archive=archive, store=store, store_key=key,
                                    encrypt=role == "secrets")
        files.append(BackupFile(role=role, name=name, host_path=path, size=copied["size"], sha256=copied["sha256"],
                                offsite=copied["location"], store_key=key))
        await progress.advance()
    return files, cfg["stamp"]


async def apply_retention(host: Any, store: Store, thresholds: BackupThresholds, kind: str,
                          now: datetime) -> list[dict]:
    """Plan and apply retention for one kind after a verified run, on the host and off-site; returns the
    decisions as rows. `plan_retention` never deletes the newest verified backup."""
    t = thresholds
    keep_days, keep_count = (t.keep_days, t.keep_count) if kind == "data" else (t.config_keep_days,
                                                                                 t.config_keep_count)
    rows = []
    on_host = await list_host_backups(host)
    records = [BackupRecord(b["id"], datetime.fromtimestamp(b["created"], timezone.utc), b["verified"], b["size"])
               for b in on_host[kind]]
    plan = plan_retention(records, now=now, keep_days=keep_days, keep_count=keep_count, run_succeeded=True)
    doomed = {d.id for d in plan if d.action == "delete"}
    paths = [p for b in on_host[kind] if b["id"] in doomed for p in b["files"]]
    # archives first, manifests last: an interrupted deletion never leaves a manifest without its doubt
    paths.sort(key=lambda p: p.endswith(".manifest.json"))
    if paths:
        await delete_host_files(host, paths)
    rows += [decision_row("host", kind, d) for d in plan]

    manifests = await list_offsite_manifests(store, kind)
    records = [BackupRecord(m["id"], Manifest.model_validate(m).finished_at,
                            bool(m.get("verified") and m.get("offsite"))) for m in manifests]
    plan = plan_retention(records, now=now, keep_days=keep_days, keep_count=keep_count, run_succeeded=True)
    doomed_offsite = [d.id for d in plan if d.action == "delete"]
    if doomed_offsite:
        await delete_offsite_backups(store, kind, doomed_offsite, apart=("secrets",))
    rows += [decision_row("off-site", kind, d) for d in plan]
    return rows


@dataclass
class BackupOutcome:
    """What one run did, failed or not: the report (`tasks.gitlab_report.publish_backup`) and the flow's
    result (`result()`) are made from it."""

    platform: str
    kind: str
    location: str
    started: datetime
    finished: datetime
    preflight: dict = field(default_factory=dict)
    manifest: Manifest | None = None
    rows: list[dict] = field(default_factory=list)
    rpo: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return (self.finished - self.started).total_seconds()

    @property
    def title(self) -> str:
        return "GitLab backup" if self.kind == "data" else "GitLab config backup"

    def result(self) -> dict:
        """The run's result, or `BackupFailed` saying what failed, that nothing was deleted, the RPO now."""
        if self.error is not None:
            # the one failure notice is the failed-run automation's (configs/prefect/automations.yaml), whose body
            # is this message: what failed, that nothing was deleted, the RPO now
            raise BackupFailed(f"{self.error}\nNothing was deleted. RPO is now "
                               f"{human_duration(self.rpo) if self.rpo is not None else 'unknown (no verified copy)'}.")
        manifest, seconds, rpo = self.manifest, self.seconds, self.rpo
        get_run_logger().info("backup %s verified and off-site (%s, %s); RPO %s", manifest.id,
                              human_bytes(manifest.total_size), human_duration(seconds), human_duration(rpo or 0))
        return {"backup_id": manifest.id, "size": manifest.total_size, "seconds": round(seconds, 1),
                "rpo_seconds": round(rpo or 0, 1), "files": [f.model_dump() for f in manifest.files],
                "retention": self.rows, "location": self.location}


async def run_backup(platform: str, kind: str, host: Any, api: Any, store: Store, config: Any, redactor: Redactor,
                     options: dict[str, str] | None, started: datetime) -> BackupOutcome:
    """One backup of `kind` ("data": `gitlab-backup create` + config + secrets; "config": `gitlab-ctl
    backup-etc` + secrets), under the host's limit; a failure is logged and returned in the outcome."""
    logger = get_run_logger()
    thresholds = config.thresholds.backup
    layout = host_layout(config)
    create_s, transfer_s = step_timeout(config, "backup_create"), step_timeout(config, "transfer")
    grace_s = step_timeout(config, "stop_grace")
    limit = await ensure_host_limit(platform)
    out = BackupOutcome(platform, kind, store.describe(kind) + "/", started, started)
    progress = await AsyncProgress.start(f"gitlab-{kind}-backup-progress-{platform}",
                                         total=7 if kind == "data" else 4, description=f"GitLab {kind} backup")
    try:
        async with concurrency(limit, occupy=1, timeout_seconds=3600):
            out.preflight = preflight = await preflight_checks(host, api, layout, redactor, thresholds.keep_days)
            for w in preflight["warnings"]:
                logger.warning("preflight: %s", w)
            await progress.advance()
            if preflight["problems"]:
                raise BackupFailed("preflight: " + "; ".join(preflight["problems"]))
            if kind == "data":
                needed = int(preflight["last_backup_size"] * thresholds.free_space_factor)
                problem = space_problem(preflight["free_bytes"], needed, "a new backup (last backup size x factor)")
                if problem:
                    raise BackupFailed("preflight: " + problem)
                created = await create_data_backup.with_options(timeout_seconds=create_s + grace_s + 300)(
                    host, layout, redactor, options, timeout_s=create_s,
                    progress_key=f"gitlab-backup-create-progress-{platform}")
                backup_id = created["backup_id"]
                await progress.advance()
                bid = parse_backup_id(backup_id)
                archive_path = posixpath.join(host.backup_path, bid.archive)
                key = offsite_key("data", backup_id, "data", bid.archive)
                copied = await copy_offsite.with_options(timeout_seconds=transfer_s)(
                    host, archive_path, archive=True, store=store, store_key=key,
                    expected_version=preflight["gitlab_version"], log=created["log"],
                    progress_key=f"gitlab-backup-offsite-progress-{platform}")
                await progress.advance()
                files = [BackupFile(role="data", name=bid.archive, host_path=archive_path, size=copied["size"],
                                    sha256=copied["sha256"], offsite=copied["location"], store_key=key)]
                extra, _ = await _config_and_secrets(host, store, redactor, "data", backup_id, progress)
                files += extra
                manifest_path = posixpath.join(host.backup_path, f"{backup_id}_gitlab_backup.manifest.json")
                components, skipped, disabled = copied["components"], copied["skipped"], copied["disabled"]
            else:
                files, backup_id = await _config_and_secrets(host, store, redactor, "config", None, progress)
                manifest_path = posixpath.join(host.config_backup_path, f"gitlab_config_{backup_id}.manifest.json")
                components, skipped, disabled = [], [], []
            out.manifest = manifest = Manifest(
                id=backup_id, kind=kind, platform=platform, host=preflight["host"],
                gitlab_version=preflight["gitlab_version"], edition=preflight["edition"], components=components,
                skipped=skipped, disabled=disabled, files=files, etc_dir=posixpath.dirname(host.secrets_file), started_at=started,
                finished_at=_now(), verified=True, offsite=True)
            await write_host_manifest(host, manifest_path, manifest.model_dump(mode="json"))
            await write_offsite_manifest(store, kind, backup_id, manifest.model_dump(mode="json"))
            await progress.advance()
            out.rows = await apply_retention(host, store, thresholds, kind, now=_now())
            await progress.set(progress.total)
    except Exception as exc:  # noqa: BLE001 - reported, notified, then re-raised (BackupOutcome.result)
        out.error = redactor.error(exc)
        logger.error("GitLab %s backup failed: %s", kind, out.error)
    out.finished = _now()
    try:
        manifests = await list_offsite_manifests(store, kind)
    except Exception:  # noqa: BLE001 - the store may be what failed; RPO then reads "none"
        manifests = []
    out.rpo = rpo_seconds(manifests, out.finished)
    return out
