"""GitLab restore (manual, with approval) and the weekly restore drill onto a scratch GitLab.

`gitlab_restore(backup_id)` is a dry run by default: it validates the id, finds the backup's
manifest, checks version, edition and free space, and reports the plan. With `dry_run=False`
it fetches what is missing from off-site (checksums verified), pauses for approval showing the
plan, takes a safety backup, stops puma and sidekiq, runs `gitlab-backup restore`, restores the
config archive and gitlab-secrets.json, reconfigures, restarts, runs `gitlab-rake gitlab:check`
and checks health. Every step is reported; a failure says what state GitLab is in and how to
continue or roll back to the safety backup.

`gitlab_restore_drill()` restores the newest verified off-site backup onto the scratch host
(blocks `<platform>-scratch`), compares it with production through the API and reports RTO and RPO.

Each run opens the platform once (`blocks.platform.Platform`); its tasks get the host and API
blocks of the target (production or scratch), the off-site `Store` and one `Redactor`.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.concurrency.asyncio import concurrency

from blocks.platform import Platform
from flows.gitlab_backup import notify_failure
from tasks.approval import aask_approval
from tasks.gitlab import (
    BackupFile,
    Manifest,
    ProjectState,
    api_health,
    compare_restore,
    copy_offsite,
    create_config_backup,
    create_data_backup,
    ensure_host_limit,
    fetch_to_host,
    gitlab_command,
    gitlab_preflight,
    host_file_sha256,
    human_bytes,
    human_duration,
    list_host_backups,
    parse_backup_id,
    project_states,
    restore_config_files,
    space_problem,
    version_problem,
    write_host_manifest,
)
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, apublish_table, md_table
from tasks.storage import Store, list_offsite_manifests, read_offsite_manifest

FREE_SPACE_FACTOR = 3
# What each flow needs from the platform (loaded concurrently, once per run).
PARTS = ("gitlab_host", "gitlab_api", "backup_store", "notifier")
DRILL_PARTS = (*PARTS, "gitlab_host_scratch", "gitlab_api_scratch")


class RestoreFailed(RuntimeError):
    pass


class RestoreRefused(RuntimeError):
    """A precondition failed (id, manifest, version, space, checksum): nothing was changed."""


class _Steps:
    """The step log every report shows: what ran, how it ended, how long it took."""

    def __init__(self, redactor: Redactor):
        self.redactor = redactor
        self.rows: list[dict] = []

    async def run(self, name: str, coro, detail: Callable[[Any], str] | None = None):
        start = time.monotonic()
        try:
            result = await coro
        except BaseException as exc:
            self.rows.append({"step": name, "status": "FAILED", "seconds": round(time.monotonic() - start, 1),
                              "detail": self.redactor.error(exc)[:300]})
            raise
        self.rows.append({"step": name, "status": "ok", "seconds": round(time.monotonic() - start, 1),
                          "detail": detail(result) if detail else ""})
        return result

    def skip(self, name: str, why: str) -> None:
        self.rows.append({"step": name, "status": "skipped", "seconds": 0, "detail": why})

    def names(self) -> set[str]:
        return {r["step"] for r in self.rows if r["status"] == "ok"}


def _state_after_failure(done: set[str], backup_id: str, safety_id: str | None, target: str) -> str:
    """What state GitLab is in after a failed restore, and how to continue or roll back."""
    rollback = (f"roll back with `gitlab_restore(backup_id='{safety_id}', dry_run=False)` (the safety backup), or on "
                f"the host: `gitlab-backup restore BACKUP={safety_id} force=yes`, restore its gitlab-secrets copy, "
                "`gitlab-ctl reconfigure && gitlab-ctl restart`" if safety_id else
                "no safety backup was taken (scratch host or failure before it)")
    if "stop puma" not in done:
        return f"GitLab on {target} is untouched and running. Fix the cause and run the restore again."
    if "gitlab-backup restore" not in done:
        return (f"puma and/or sidekiq are STOPPED on {target}; data is untouched. Continue by running the restore "
                f"again, or resume service with `gitlab-ctl start`. To undo: {rollback}.")
    if "gitlab-ctl restart" not in done:
        return (f"data of {backup_id} is restored on {target} but configuration/services are not back "
                "(puma/sidekiq may be stopped). Continue: restore gitlab-secrets.json, `gitlab-ctl reconfigure`, "
                f"`gitlab-ctl restart`. To roll back: {rollback}.")
    return (f"GitLab on {target} runs with {backup_id} restored but a check failed: read the gitlab:check output "
            f"above. To roll back: {rollback}.")


def _plan_markdown(platform: str, manifest: Manifest, target: str, preflight: dict, local: dict,
                   safety: bool, problems: list[str]) -> str:
    lines = [
        f"# GitLab restore plan: {platform}", "",
        f"- **Backup:** `{manifest.id}` taken {manifest.finished_at:%Y-%m-%d %H:%M} UTC on {manifest.host}",
        f"- **Backup GitLab:** {manifest.gitlab_version} {manifest.edition.upper()}; **target** {target} runs "
        f"{preflight.get('gitlab_version', '?')} {str(preflight.get('edition', '?')).upper()}",
        f"- **Components:** {', '.join(manifest.components)}",
        f"- **Size:** {human_bytes(manifest.total_size)}; free on target: "
        f"{human_bytes(preflight.get('free_bytes', 0))}",
        "", "## Steps", "",
        "1. fetch from off-site what the host lacks, checksum-verified: "
        + (", ".join(f"{k} ({v})" for k, v in local.items()) or "nothing"),
        "2. " + ("take a safety backup (data, config, secrets), verified" if safety else "no safety backup (scratch)"),
        "3. `gitlab-ctl stop puma`, `gitlab-ctl stop sidekiq`",
        f"4. `gitlab-backup restore BACKUP={manifest.id} force=yes`",
        "5. restore the config archive and gitlab-secrets.json (0600)",
        "6. `gitlab-ctl reconfigure`, `gitlab-ctl restart`",
        "7. `gitlab-rake gitlab:check SANITIZE=true`, then readiness, version and projects through the API",
    ]
    if problems:
        lines += ["", "## Refused", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines)


async def _load_manifest(store: Store, source_host: Any, backup_id: str) -> Manifest:
    """The backup's manifest off-site, else the one beside it on the (production) host it was taken on."""
    data = await read_offsite_manifest(store, "data", backup_id)
    if data is None:  # not off-site: the host's own manifest, if any
        on_host = await list_host_backups(source_host)
        data = next((b["manifest"] for b in on_host["data"] if b["id"] == backup_id and b["manifest"]), None)
    if data is None:
        raise RestoreRefused(f"backup {backup_id} has no manifest off-site or on the host: it was never verified; "
                             "pick a backup id from the latest gitlab-backup report")
    return Manifest.model_validate(data)


async def _restore(plat: Platform, redactor: Redactor, backup_id: str, *, scratch: bool, dry_run: bool,
                   approval_timeout_s: int = 3600, poll_interval_s: int = 10) -> dict:
    """Restore onto production (`scratch=False`: approval and a safety backup first) or onto the scratch
    host (the drill: neither)."""
    logger = get_run_logger()
    platform = plat.name
    bid = parse_backup_id(backup_id)  # ValueError before anything else: ids reach a remote shell
    host, api = plat.gitlab_host(scratch), plat.gitlab_api(scratch)
    store, notifier = plat.backup_store(), plat.notifier()
    steps = _Steps(redactor)
    target = "scratch" if scratch else "production"
    started = time.monotonic()
    manifest = await steps.run("find manifest", _load_manifest(store, plat.gitlab_host(), bid.value),
                               lambda m: f"{len(m.files)} files, verified={m.verified}")
    preflight = await steps.run("preflight", gitlab_preflight(host, api, redactor),
                                lambda p: f"GitLab {p['gitlab_version']}, ready={p['ready']}")
    problems = [p for p in preflight["problems"] if "not ready" in p]
    if preflight["gitlab_version"] is None:
        problems.append("the installed GitLab version is unknown (the API is not ready): start GitLab "
                        "(`gitlab-ctl start`) so its version can be checked against the backup")
    elif p := version_problem(preflight["gitlab_version"], preflight["edition"], bid):
        problems.append(p)
    destinations = {
        "data": posixpath.join(host.backup_path, bid.archive),
        "config": posixpath.join(host.config_backup_path, manifest.file("config").name) if manifest.file("config")
        else None,
        "secrets": posixpath.join(host.config_backup_path, manifest.file("secrets").name)
        if manifest.file("secrets") else None,
    }
    if destinations["secrets"] is None:
        problems.append("the backup has no gitlab-secrets.json copy: restoring it would leave encrypted data "
                        "unreadable")
    missing: dict[str, str] = {}
    for role, path in destinations.items():
        if path is None:
            continue
        f: BackupFile = manifest.file(role)
        present = await host_file_sha256(host, path)
        if present is None:
            missing[role] = "fetch from off-site" if f.offsite else "MISSING, no off-site copy"
            if not f.offsite:
                problems.append(f"{f.name} is neither on the host nor off-site")
        elif present["sha256"] != f.sha256:
            problems.append(f"{path} on the host does not match the manifest's SHA-256: it is corrupt or another "
                            "file; move it away and run again (it will be fetched from off-site)")
    needed = FREE_SPACE_FACTOR * manifest.file("data").size
    if p := space_problem(preflight["free_bytes"], needed, f"the restore ({FREE_SPACE_FACTOR}x the archive)"):
        problems.append(p)
    safety_backup = not scratch
    plan = _plan_markdown(platform, manifest, target, preflight, missing, safety_backup, problems)
    key = f"gitlab-restore-plan-{platform}-{target}"
    await apublish_markdown(key, plan, description=f"Restore plan for {bid.value}")
    if problems:
        await apublish_table(f"gitlab-restore-steps-{platform}-{target}", steps.rows, description="Restore steps")
        raise RestoreRefused("restore refused, nothing was changed: " + "; ".join(problems))
    if dry_run:
        logger.info("dry run: the plan is in artifact %s; run with dry_run=False to restore", key)
        return {"dry_run": True, "backup_id": bid.value, "plan": plan, "steps": steps.rows}

    for role, path in destinations.items():
        if role in missing:
            f = manifest.file(role)
            rel = f.offsite.split(f"/data/{bid.value}/", 1)[-1]
            await steps.run(f"fetch {role}", fetch_to_host(host, store, f"data/{bid.value}/{rel}", path, f.sha256,
                                                           archive=role != "secrets"),
                            lambda r: f"{human_bytes(r['size'])}, sha256 verified")

    approver = "(scratch drill: no approval needed)"
    if not scratch:
        answer = await aask_approval(plan, approval_timeout_s, poll_interval_s)
        if not answer.approve:
            steps.skip("approval", f"declined by {answer.who()}")
            await apublish_table(f"gitlab-restore-steps-{platform}-{target}", steps.rows, description="Restore steps")
            logger.warning("restore of %s declined by %s: nothing was changed", bid.value, answer.who())
            return {"dry_run": False, "approved": False, "approver": answer.who(), "steps": steps.rows}
        approver = answer.who()
        steps.rows.append({"step": "approval", "status": "ok", "seconds": 0, "detail": f"approved by {approver}"})
        logger.info("restore of %s approved by %s", bid.value, approver)

    safety_id = None
    limit = await ensure_host_limit(f"{platform}-scratch" if scratch else platform)
    restore_started = time.monotonic()
    try:
        async with concurrency(limit, occupy=1, timeout_seconds=3600):
            if safety_backup:
                safety_id = await steps.run("safety backup", create_data_backup(host, redactor), lambda r: r)
                safety = parse_backup_id(safety_id)
                safety_path = posixpath.join(host.backup_path, safety.archive)
                checked = await steps.run("verify safety backup", copy_offsite(
                    host, safety_path, archive=True, expected_version=preflight["gitlab_version"]),
                    lambda r: f"{human_bytes(r['size'])}, sha256 {r['sha256'][:12]}...")
                cfg = await steps.run("safety config backup", create_config_backup(host, redactor),
                                      lambda r: r["config_archive"])
                now = datetime.now(timezone.utc)
                await write_host_manifest(host, posixpath.join(
                    host.backup_path, f"{safety_id}_gitlab_backup.manifest.json"), Manifest(
                    id=safety_id, kind="data", platform=platform, host=preflight["host"],
                    gitlab_version=preflight["gitlab_version"], edition=preflight["edition"],
                    components=checked["components"], skipped=checked["skipped"], safety=True, verified=True,
                    etc_dir=posixpath.dirname(host.secrets_file), started_at=now, finished_at=now,
                    files=[BackupFile(role="data", name=safety.archive, host_path=safety_path, size=checked["size"],
                                      sha256=checked["sha256"])]).model_dump(mode="json"))
                logger.info("safety backup %s (config %s) taken before the restore", safety_id, cfg["config_archive"])
            else:
                steps.skip("safety backup", "scratch host")
            for svc in ("puma", "sidekiq"):
                await steps.run(f"stop {svc}", gitlab_command(host, ["gitlab-ctl", "stop", svc], 300, redactor))
            await steps.run("gitlab-backup restore", gitlab_command(
                host, ["gitlab-backup", "restore", f"BACKUP={bid.value}", "force=yes"], 6 * 3600, redactor),
                lambda r: f"{r['seconds']}s")
            await steps.run("restore config and secrets", restore_config_files(
                host, destinations["config"], destinations["secrets"], manifest.etc_dir),
                lambda r: f"into {r['etc_dir']}")
            await steps.run("gitlab-ctl reconfigure", gitlab_command(host, ["gitlab-ctl", "reconfigure"], 1800,
                                                                      redactor))
            await steps.run("gitlab-ctl restart", gitlab_command(host, ["gitlab-ctl", "restart"], 600, redactor))
            await steps.run("gitlab:check", gitlab_command(
                host, ["gitlab-rake", "gitlab:check", "SANITIZE=true"], 1800, redactor),
                lambda r: (r["tail"] or [""])[-1])
            health = await steps.run("health", api_health(api, redactor),
                                     lambda h: f"ready={h['ready']}, {h.get('version')}, {h.get('projects')} projects")
            if not health["ready"] or health.get("version") != bid.gitlab_version:
                raise RestoreFailed(f"GitLab is not healthy after the restore: {health}")
    except BaseException as exc:
        state = _state_after_failure(steps.names(), bid.value, safety_id, target)
        error = redactor.error(exc)
        await apublish_markdown(f"gitlab-restore-{platform}-{target}", "\n".join([
            f"# GitLab restore FAILED: {platform} ({target})", "", f"**Error:** {error}", "",
            f"**State:** {state}", "", "## Steps", "", md_table(steps.rows, limit=40)]),
            description="Restore failed: state and how to continue")
        await apublish_table(f"gitlab-restore-steps-{platform}-{target}", steps.rows, description="Restore steps")
        await notify_failure(notifier, f"GitLab restore FAILED on {platform} ({target})", f"{error}\n{state}")
        raise RestoreFailed(f"{error}\n{state}") from exc
    seconds = time.monotonic() - restore_started
    await apublish_markdown(f"gitlab-restore-{platform}-{target}", "\n".join([
        f"# GitLab restore: {platform} ({target})", "",
        f"- **Restored:** `{bid.value}` ({manifest.gitlab_version}), approved by {approver}",
        f"- **Safety backup:** {safety_id or 'none'}", f"- **Duration:** {human_duration(seconds)}",
        f"- **Health:** ready, {health.get('projects')} projects", "", "## Steps", "", md_table(steps.rows, limit=40)]),
        description="Restore report")
    await apublish_table(f"gitlab-restore-steps-{platform}-{target}", steps.rows, description="Restore steps")
    return {"dry_run": False, "approved": True, "approver": approver, "backup_id": bid.value,
            "safety_backup": safety_id, "seconds": round(seconds, 1), "total_seconds":
            round(time.monotonic() - started, 1), "health": health, "steps": steps.rows, "manifest": manifest}


@flow(name="gitlab-restore", log_prints=False)
async def gitlab_restore(platform: str = "main", backup_id: str = "", dry_run: bool = True,
                         approval_timeout_s: int = 3600, poll_interval_s: int = 10) -> dict:
    """Restore GitLab from `backup_id` (e.g. 1717000000_2024_05_29_17.0.1-ee). Dry run by default;
    a real run pauses for approval, takes a safety backup first and reports every step."""
    parse_backup_id(backup_id)  # ValueError before anything else: ids reach a remote shell
    plat = await Platform.aopen(platform, *PARTS)
    redactor = Redactor.of(await plat.asecrets())
    result = await _restore(plat, redactor, backup_id, scratch=False, dry_run=dry_run,
                            approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s)
    result.pop("manifest", None)
    return redactor.value(result)


@flow(name="gitlab-restore-drill", log_prints=False)
async def gitlab_restore_drill(platform: str = "main", sample: int = 20) -> dict:
    """Restore the newest verified off-site backup onto the scratch GitLab; compare with production; RTO/RPO."""
    logger = get_run_logger()
    plat = await Platform.aopen(platform, *DRILL_PARTS)
    redactor = Redactor.of(await plat.asecrets())
    manifests = [Manifest.model_validate(m) for m in await list_offsite_manifests(plat.backup_store(), "data")]
    verified = sorted((m for m in manifests if m.verified and m.offsite and not m.safety),
                      key=lambda m: m.finished_at)
    if not verified:
        await notify_failure(plat.notifier(), f"GitLab restore drill FAILED on {platform}",
                             "no verified off-site backup")
        raise RestoreFailed("no verified off-site backup to drill with: RPO is unbounded; check gitlab-backup runs")
    newest = verified[-1]
    result = await _restore(plat, redactor, newest.id, scratch=True, dry_run=False)
    rto = result["seconds"]
    prod = await project_states(plat.gitlab_api(), redactor, sample=sample)
    restored = await project_states(plat.gitlab_api(scratch=True), redactor, ids=[p["id"] for p in prod["sampled"]])
    comparison = compare_restore(prod["count"], restored["count"],
                                 [ProjectState.model_validate(p) for p in prod["sampled"]],
                                 [ProjectState.model_validate(p) for p in restored["sampled"]], newest.finished_at)
    rpo = (datetime.now(timezone.utc) - newest.finished_at).total_seconds()
    lines = [f"# GitLab restore drill: {platform}", "",
             f"- **Result:** {'PASSED' if comparison.ok else 'FAILED'}",
             f"- **Backup:** `{newest.id}` ({human_bytes(newest.total_size)})",
             f"- **RTO (restore duration):** {human_duration(rto)}",
             f"- **RPO (age of the newest verified backup):** {human_duration(rpo)}",
             f"- **Projects:** production {comparison.production_projects}, restored {comparison.restored_projects}",
             f"- **Sampled last commits:** {comparison.matching}/{comparison.sampled} match",
             f"- **Changed in production since the backup:** {', '.join(comparison.changed_since_backup) or 'none'}",
             f"- **Mismatched:** {', '.join(comparison.mismatched) or 'none'}; **missing:** "
             f"{', '.join(comparison.missing) or 'none'}", "", "## Steps", "", md_table(result["steps"], limit=40)]
    await apublish_markdown(f"gitlab-restore-drill-{platform}", "\n".join(lines), description="Restore drill: RTO/RPO")
    out = {"backup_id": newest.id, "rto_seconds": round(rto, 1), "rpo_seconds": round(rpo, 1),
           "comparison": comparison.model_dump(), "ok": comparison.ok}
    if not comparison.ok:
        await notify_failure(plat.notifier(), f"GitLab restore drill FAILED on {platform}",
                             f"restored data differs from production: {comparison.model_dump()}")
        raise RestoreFailed(f"drill: restored data differs from production: {comparison.model_dump()}")
    logger.info("drill passed: RTO %s, RPO %s", human_duration(rto), human_duration(rpo))
    return out
