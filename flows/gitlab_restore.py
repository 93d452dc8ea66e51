"""GitLab restore (manual, with approval) and the weekly restore drill onto a scratch GitLab.

`gitlab_restore(backup_id)` is a dry run by default: it validates the id, finds the backup's
manifest, checks readiness, version, edition, files and free space (`tasks.gitlab_rules.
restore_refusals`), and reports the plan. With `dry_run=False` it fetches what is missing from
off-site (checksums verified, then owned by the backup user, 0600), pauses for approval showing
the plan, takes a safety backup, and then follows GitLab's documented sequence (docs *Restore
GitLab*): put back `gitlab.rb` and `gitlab-secrets.json` and `gitlab-ctl reconfigure`; stop puma
and sidekiq and verify with `gitlab-ctl status` that they are down; `gitlab-backup restore` (as
the git user, from an archive it owns); reconfigure, restart; `gitlab-rake gitlab:check
SANITIZE=true` and `gitlab-rake gitlab:doctor:secrets`, whose printed failures count even when
they exit 0; then health through the API. A failure report says exactly what state the host is
in and the way back (`tasks.gitlab_rules.state_after_failure`).

`gitlab_restore_drill()` restores the newest verified off-site backup onto the scratch host
(blocks `<platform>-scratch`), which keeps its own identity: only `gitlab-secrets.json` is put
back (needed to decrypt), and a drill overlay on scratch's *own* `gitlab.rb` sets scratch's URL
and turns off mail, Sidekiq (mirrors, scheduled jobs) and production's object storage. It then
compares scratch with production through the API and reports RTO and RPO.

Each run opens the platform once (`blocks.platform.Platform`); its tasks get the host and API
blocks of the target (production or scratch), its layout, the off-site `Store` and one `Redactor`.
Long remote commands are supervised (`tasks.ssh.run_supervised`) and limited by `gitlab.timeouts`.
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
from flows.gitlab_backup import host_layout, step_timeout
from tasks.approval import aask_approval
from tasks.gitlab_api import api_health, api_preflight, project_states
from tasks.gitlab_host import (
    copy_offsite,
    create_config_backup,
    create_data_backup,
    drill_config,
    ensure_host_limit,
    fetch_to_host,
    gitlab_command,
    hand_archive_to,
    host_file_sha256,
    host_preflight,
    list_host_backups,
    restore_config_files,
    restore_progress,
    services_status,
    write_host_manifest,
)
from tasks.gitlab_rules import (
    STEP_CHECK,
    STEP_CONFIG,
    STEP_DOCTOR,
    STEP_DRILL_CONFIG,
    STEP_HEALTH,
    STEP_RECONFIGURE,
    STEP_RECONFIGURE_BEFORE,
    STEP_RESTART,
    STEP_RESTORE,
    STEP_STATUS,
    STEP_STOP,
    BackupFile,
    DrillOverlay,
    HostFile,
    Manifest,
    ProjectState,
    check_failures,
    compare_restore,
    doctor_secrets_failures,
    human_bytes,
    human_duration,
    parse_backup_id,
    restore_refusals,
    same_gitlab,
    same_host,
    services_still_up,
    state_after_failure,
    store_key_of,
)
from tasks.notify import notify
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


class CheckFailed(RuntimeError):
    """A step ran but its output reports a failure (a check that printed failures and exited 0)."""


class _Steps:
    """The step log every report shows: what ran, how it ended, how long it took; and which steps started."""

    def __init__(self, redactor: Redactor):
        self.redactor = redactor
        self.rows: list[dict] = []
        self.started: set[str] = set()

    async def run(self, name: str, coro, detail: Callable[[Any], str] | None = None):
        start = time.monotonic()
        self.started.add(name)
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


def _plan_markdown(platform: str, manifest: Manifest, target: str, pre: dict, local: dict, safety: bool,
                   problems: list[str], backup_user: str) -> str:
    config_step = ("put back the backup's `gitlab.rb` and `gitlab-secrets.json` (0600), then `gitlab-ctl reconfigure`"
                   if target == "production" else
                   "put back only `gitlab-secrets.json`; scratch keeps its own `gitlab.rb` with the drill overlay "
                   "(its URL, mail off, Sidekiq off, object storage off/scratch); then `gitlab-ctl reconfigure`")
    lines = [
        f"# GitLab restore plan: {platform}", "",
        f"- **Backup:** `{manifest.id}` taken {manifest.finished_at:%Y-%m-%d %H:%M} UTC on {manifest.host}",
        f"- **Backup GitLab:** {manifest.gitlab_version}; **target** {target} runs "
        f"{pre.get('gitlab_version') or '?'}",
        f"- **Components:** {', '.join(manifest.components)}"
        + (f" (disabled: {', '.join(manifest.disabled)})" if manifest.disabled else ""),
        f"- **Size:** {human_bytes(manifest.total_size)}; free on target: {human_bytes(pre.get('free_bytes', 0))}",
        "", "## Steps", "",
        "1. fetch from off-site what the host lacks, checksum-verified: "
        + (", ".join(f"{k} ({v})" for k, v in local.items()) or "nothing"),
        "2. " + ("take a safety backup (data, config, secrets), verified" if safety else "no safety backup (scratch)"),
        f"3. hand the archive to `{backup_user}`, mode 0600 (GitLab restores as git)",
        f"4. {config_step}",
        "5. `gitlab-ctl stop puma`, `gitlab-ctl stop sidekiq`, and `gitlab-ctl status` shows both down",
        f"6. `gitlab-backup restore BACKUP={manifest.id} force=yes`",
        "7. `gitlab-ctl reconfigure`, `gitlab-ctl restart`",
        "8. `gitlab-rake gitlab:check SANITIZE=true` and `gitlab-rake gitlab:doctor:secrets` (their printed "
        "failures count), then readiness, version and projects through the API",
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


def _require(failures: list[str], what: str) -> None:
    if failures:
        raise CheckFailed(f"{what} reported: " + "; ".join(failures[:8]))


async def _restore(plat: Platform, redactor: Redactor, backup_id: str, *, scratch: bool, dry_run: bool,
                   approval_timeout_s: int = 3600, poll_interval_s: int = 10) -> dict:
    """Restore onto production (`scratch=False`: approval and a safety backup first) or onto the scratch
    host (the drill: neither, and scratch keeps its own identity)."""
    logger = get_run_logger()
    platform, cfg = plat.name, plat.config
    bid = parse_backup_id(backup_id)  # ValueError before anything else: ids reach a remote shell
    host, api = plat.gitlab_host(scratch), plat.gitlab_api(scratch)
    layout = host_layout(cfg, scratch)
    store, notifier = plat.backup_store(), plat.notifier()
    steps = _Steps(redactor)
    target = "scratch" if scratch else "production"
    started = time.monotonic()
    if scratch and same_host((host.host, host.port), (plat.gitlab_host().host, plat.gitlab_host().port)):
        raise RestoreRefused("the scratch host is the production host (same SSH host and port): a drill never "
                             "restores onto production; fix gitlab.scratch in the platform config")
    manifest = await steps.run("find manifest", _load_manifest(store, plat.gitlab_host(), bid.value),
                               lambda m: f"{len(m.files)} files, verified={m.verified}")
    pre = await steps.run("preflight", _preflight(host, api, layout, redactor),
                          lambda p: f"GitLab {p['gitlab_version']}, ready={p['ready']}")
    destinations = {
        "data": posixpath.join(host.backup_path, bid.archive),
        "config": posixpath.join(host.config_backup_path, manifest.file("config").name) if manifest.file("config")
        else None,
        "secrets": posixpath.join(host.config_backup_path, manifest.file("secrets").name)
        if manifest.file("secrets") else None,
    }
    facts, missing = [], {}
    for role, path in destinations.items():
        if path is None:
            continue
        f: BackupFile = manifest.file(role)
        present = await host_file_sha256(host, path)
        facts.append(HostFile(role, f.name, present is not None,
                              None if present is None else present["sha256"] == f.sha256, bool(f.offsite)))
        if present is None:
            missing[role] = "fetch from off-site" if f.offsite else "MISSING, no off-site copy"
    problems = restore_refusals(ready=pre["ready"], installed_version=pre["version"],
                                installed_edition=pre["edition"], backup_version=manifest.gitlab_version,
                                files=facts, has_secrets=destinations["secrets"] is not None,
                                free_bytes=pre["free_bytes"], needed_bytes=FREE_SPACE_FACTOR * manifest.file("data").size)
    if bid.gitlab_version and not same_gitlab(bid.gitlab_version, manifest.gitlab_version):
        problems.append(f"the id {bid.value} names GitLab {bid.gitlab_version} but its manifest says "
                        f"{manifest.gitlab_version}: the manifest belongs to another backup")
    safety_backup = not scratch
    plan = _plan_markdown(platform, manifest, target, pre, missing, safety_backup, problems, layout.backup_user)
    key = f"gitlab-restore-plan-{platform}-{target}"
    await apublish_markdown(key, plan, description=f"Restore plan for {bid.value}")
    if problems:
        await apublish_table(f"gitlab-restore-steps-{platform}-{target}", steps.rows, description="Restore steps")
        raise RestoreRefused("restore refused, nothing was changed: " + "; ".join(problems))
    if dry_run:
        logger.info("dry run: the plan is in artifact %s; run with dry_run=False to restore", key)
        return {"dry_run": True, "backup_id": bid.value, "plan": plan, "steps": steps.rows}

    transfer_s = step_timeout(cfg, "transfer")
    for role, path in destinations.items():
        if role in missing:
            f = manifest.file(role)
            await steps.run(f"fetch {role}", fetch_to_host.with_options(timeout_seconds=transfer_s)(
                host, store, store_key_of(f, "data", bid.value), path, f.sha256, archive=role != "secrets",
                owner=layout.backup_user if role == "data" else None,
                progress_key=f"gitlab-restore-fetch-{role}-progress-{platform}-{target}"),
                lambda r: f"{human_bytes(r['size'])}, sha256 verified" + (f", owned by {r['owner']}"
                                                                          if r["owner"] else ""))

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

    safety_id = safety_config = None
    limit = await ensure_host_limit(f"{platform}-scratch" if scratch else platform)
    restore_started = time.monotonic()
    t = {name: step_timeout(cfg, name) for name in ("backup_create", "backup_restore", "reconfigure", "restart",
                                                     "check", "stop_grace")}

    def cmd(argv: list[str], limit_s: int, **kw):
        return gitlab_command.with_options(timeout_seconds=limit_s + t["stop_grace"] + 300)(
            host, layout, argv, limit_s, redactor, **kw)

    try:
        async with concurrency(limit, occupy=1, timeout_seconds=3600):
            if safety_backup:
                created = await steps.run("safety backup", create_data_backup.with_options(
                    timeout_seconds=t["backup_create"] + t["stop_grace"] + 300)(
                    host, layout, redactor, timeout_s=t["backup_create"],
                    progress_key=f"gitlab-restore-safety-progress-{platform}"), lambda r: r["backup_id"])
                safety_id = created["backup_id"]
                safety = parse_backup_id(safety_id)
                safety_path = posixpath.join(host.backup_path, safety.archive)
                checked = await steps.run("verify safety backup", copy_offsite.with_options(timeout_seconds=transfer_s)(
                    host, safety_path, archive=True, expected_version=pre["gitlab_version"], log=created["log"]),
                    lambda r: f"{human_bytes(r['size'])}, sha256 {r['sha256'][:12]}...")
                cfg_backup = await steps.run("safety config backup", create_config_backup(host, redactor),
                                             lambda r: r["config_archive"])
                safety_config = cfg_backup["config_archive"]
                now = datetime.now(timezone.utc)
                await write_host_manifest(host, posixpath.join(
                    host.backup_path, f"{safety_id}_gitlab_backup.manifest.json"), Manifest(
                    id=safety_id, kind="data", platform=platform, host=pre["host"],
                    gitlab_version=pre["gitlab_version"], edition=pre["edition"],
                    components=checked["components"], skipped=checked["skipped"], disabled=checked["disabled"],
                    safety=True, verified=True, etc_dir=posixpath.dirname(host.secrets_file), started_at=now,
                    finished_at=now, files=[BackupFile(role="data", name=safety.archive, host_path=safety_path,
                                                       size=checked["size"], sha256=checked["sha256"])]
                ).model_dump(mode="json"))
                logger.info("safety backup %s (config %s) taken before the restore", safety_id, safety_config)
            else:
                steps.skip("safety backup", "scratch host")
            await steps.run(f"archive owned by {layout.backup_user}", hand_archive_to(
                host, destinations["data"], layout.backup_user), lambda r: r["owner_mode"])
            # Before the data: the configuration that belongs with it (docs *Restore GitLab*: "have run
            # gitlab-ctl reconfigure after copying over the GitLab secrets file").
            if scratch:
                external_url = str(cfg.gitlab.scratch.external_url or cfg.gitlab.scratch.api_url).rstrip("/")
                await steps.run(STEP_DRILL_CONFIG, drill_config(
                    host, layout, destinations["secrets"],
                    DrillOverlay(external_url, cfg.gitlab.scratch.object_store_bucket)),
                    lambda r: f"scratch's own gitlab.rb, external_url {r['external_url']}")
            else:
                await steps.run(STEP_CONFIG, restore_config_files(
                    host, destinations["config"], destinations["secrets"], manifest.etc_dir),
                    lambda r: f"into {r['etc_dir']}")
            await steps.run(STEP_RECONFIGURE_BEFORE, cmd(["gitlab-ctl", "reconfigure"], t["reconfigure"]))

            async def stop_both() -> None:
                for svc in ("puma", "sidekiq"):
                    await cmd(["gitlab-ctl", "stop", svc], t["restart"])

            await steps.run(STEP_STOP, stop_both())

            async def both_down() -> dict:
                status = await services_status(host, redactor)
                up = services_still_up(status["services"])
                if up:
                    raise CheckFailed(f"gitlab-ctl status still shows {', '.join(up)} running after the stop")
                return status

            await steps.run(STEP_STATUS, both_down(),
                            lambda s: ", ".join(f"{k}: {v}" for k, v in s["services"].items()
                                                if k in ("puma", "sidekiq")) or "puma, sidekiq not running")
            await steps.run(STEP_RESTORE, cmd(
                ["gitlab-backup", "restore", f"BACKUP={bid.value}", "force=yes"], t["backup_restore"],
                progress_key=f"gitlab-restore-progress-{platform}-{target}", progress=restore_progress),
                lambda r: f"{r['seconds']}s")
            await steps.run(STEP_RECONFIGURE, cmd(["gitlab-ctl", "reconfigure"], t["reconfigure"]))
            await steps.run(STEP_RESTART, cmd(["gitlab-ctl", "restart"], t["restart"]))

            async def checked(argv: list[str], parse: Callable[[str], list[str]], what: str) -> dict:
                r = await cmd(argv, t["check"])
                _require(parse("\n".join(r["output"])), what)
                return r

            # the drill keeps Sidekiq off (the overlay): its "Running? ... no" is expected there
            allowed = ("Sidekiq",) if scratch else ()
            await steps.run(STEP_CHECK, checked(["gitlab-rake", "gitlab:check", "SANITIZE=true"],
                                                lambda text: check_failures(text, allowed), "gitlab:check"),
                            lambda r: "no failures")
            await steps.run(STEP_DOCTOR, checked(["gitlab-rake", "gitlab:doctor:secrets"], doctor_secrets_failures,
                                                 "gitlab:doctor:secrets"), lambda r: "every value decrypts")
            health = await steps.run(STEP_HEALTH, api_health(api, redactor),
                                     lambda h: f"ready={h['ready']}, {h.get('version')}, {h.get('projects')} projects")
            if not health["ready"] or not same_gitlab(health.get("version"), manifest.gitlab_version):
                raise RestoreFailed(f"GitLab is not healthy after the restore: {health}")
    except BaseException as exc:
        state = state_after_failure(steps.started, steps.names(), bid.value, target, safety_id, safety_config,
                                    host.backup_path, host.config_backup_path, layout.backup_user)
        error = redactor.error(exc)
        await apublish_markdown(f"gitlab-restore-{platform}-{target}", "\n".join([
            f"# GitLab restore FAILED: {platform} ({target})", "", f"**Error:** {error}", "",
            f"**State:** {state}", "", "## Steps", "", md_table(steps.rows, limit=40)]),
            description="Restore failed: state and how to continue")
        await apublish_table(f"gitlab-restore-steps-{platform}-{target}", steps.rows, description="Restore steps")
        await notify(notifier, f"GitLab restore FAILED on {platform} ({target})", f"{error}\n{state}")
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


async def _preflight(host: Any, api: Any, layout: Any, redactor: Redactor) -> dict:
    return {**await api_preflight(api, redactor), **await host_preflight(host, layout, redactor)}


@flow(name="gitlab-restore", log_prints=False)
async def gitlab_restore(platform: str = "main", backup_id: str = "", dry_run: bool = True,
                         approval_timeout_s: int = 3600, poll_interval_s: int = 10) -> dict:
    """Restore GitLab from `backup_id` (e.g. 1717000000_2024_05_29_17.0.1-ee, or a custom BACKUP= name). Dry
    run by default; a real run pauses for approval, takes a safety backup first and reports every step."""
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
        await notify(plat.notifier(), f"GitLab restore drill FAILED on {platform}",
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
        await notify(plat.notifier(), f"GitLab restore drill FAILED on {platform}",
                     f"restored data differs from production: {comparison.model_dump()}")
        raise RestoreFailed(f"drill: restored data differs from production: {comparison.model_dump()}")
    logger.info("drill passed: RTO %s, RPO %s", human_duration(rto), human_duration(rpo))
    return out
