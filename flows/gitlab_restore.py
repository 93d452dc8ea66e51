"""GitLab restore (manual, with approval) and the weekly restore drill onto a scratch GitLab.

Both run through the one operation module (`tasks.operation`), with ONE step list (`_steps`), written here
once in GitLab's documented order (docs *Restore GitLab*):

1. fetch from off-site what the host lacks (checksum-verified, the archive handed to the backup user, 0600);
2. production only: a safety backup of the host as it is (data, `gitlab.rb`, `gitlab-secrets.json`, with a
   complete manifest: restoring its id is the way back);
3. hand the archive to the git user (`gitlab-backup restore` runs as git and reads it as git);
4. the configuration that belongs with the data: production gets the backup's `gitlab.rb` and
   `gitlab-secrets.json`; scratch keeps its own identity, only the secrets (needed to decrypt) and the drill
   overlay on scratch's *own* `gitlab.rb` (its URL; mail, Sidekiq and production's object storage off);
   then `gitlab-ctl reconfigure` ("have run gitlab-ctl reconfigure after copying over the secrets file");
5. `gitlab-ctl stop puma` and `sidekiq`, checked down with `gitlab-ctl status`;
6. `gitlab-backup restore BACKUP=<id> force=yes`;
7. `gitlab-ctl reconfigure`, `gitlab-ctl restart`;
8. `gitlab-rake gitlab:check SANITIZE=true` and `gitlab-rake gitlab:doctor:secrets`, whose printed failures
   count even though they exit 0; then readiness, version and projects through the API.

`gitlab_restore(backup_id)` is a dry run by default: the planner validates the id, finds the backup's
manifest, reads the host and the API (readiness, version, edition, free space, the backup's files on the
host and their SHA-256; with the API down, the version from `gitlab-rake gitlab:env:info` and which services
`gitlab-ctl status` shows down: a host where only puma and sidekiq are stopped, as a failed restore leaves
it, can be restored, which is what makes the way back runnable) and publishes the plan, refusals included (`tasks.gitlab_rules.restore_refusals`).
The target is the production GitLab host named by its SSH host key fingerprint, read live through the SSH
connection; the approval covers the backup, its files, the GitLab version on both sides and what is
fetched. A real run pauses for approval (no lock held), then takes the host's limit (`gitlab-host-<platform>`,
the one that keeps backups and restores apart), plans again and refuses if anything changed (another host
key, another GitLab version, a backup file changed or gone). A failure's message carries the state computed
from the steps and the way back: `gitlab-restore` of the safety backup. A cancelled run ends Cancelled.

`gitlab_restore_drill()` restores the newest verified off-site backup onto the scratch host (blocks
`<platform>-scratch`) through the same planner and steps, unattended (`Operation(unattended=...)`): it is
scheduled weekly and changes only scratch (refused when scratch's SSH host or host key is production's).
It then compares scratch with production through the API and reports RTO (the whole run: plan, fetch,
restore, checks) and RPO (the backup's age). Failures are raised; the failed-run automation notifies.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger

from blocks.platform import Platform
from flows.gitlab_backup import host_layout, step_timeout
from tasks.gitlab_api import api_health, api_preflight, project_states
from tasks.gitlab_host import (
    HostLayout,
    drill_config,
    fetch_to_host,
    find_manifest,
    gitlab_command,
    hand_archive_to,
    host_file_sha256,
    host_gitlab_state,
    host_key,
    host_limit_name,
    host_preflight,
    restore_config_files,
    restore_progress,
    services_status,
    take_safety_backup,
)
from tasks.gitlab_rules import (
    BackupId,
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
    store_key_of,
)
from tasks.operation import (
    Operation,
    Plan,
    Step,
    Target,
    WayBack,
    approval_timeout,
    lock_timeout,
    run_operation,
)
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, md_table
from tasks.storage import list_offsite_manifests

FREE_SPACE_FACTOR = 3
# What each flow needs from the platform (loaded concurrently, once per run).
PARTS = ("gitlab_host", "gitlab_api", "backup_store")
DRILL_PARTS = (*PARTS, "gitlab_host_scratch", "gitlab_api_scratch")
DRILL_UNATTENDED = "the weekly restore drill onto the scratch GitLab host: it changes only scratch"


class DrillFailed(RuntimeError):
    """The drill could not run (no verified backup) or scratch's data differs from production's."""


class CheckFailed(RuntimeError):
    """A step ran but its output reports a failure (a check that printed failures and exited 0)."""


@dataclass
class _Restore:
    """One restore as its planner and steps see it: the platform, the backup, production or scratch, and what
    the steps learn on the way (`results`: the safety backup's id)."""

    plat: Platform
    redactor: Redactor
    bid: BackupId
    scratch: bool
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return "scratch" if self.scratch else "production"

    @property
    def host(self) -> Any:
        return self.plat.gitlab_host(self.scratch)

    @property
    def api(self) -> Any:
        return self.plat.gitlab_api(self.scratch)

    @property
    def layout(self) -> HostLayout:
        return host_layout(self.plat.config, self.scratch)

    def timeout(self, step: str) -> int:
        return step_timeout(self.plat.config, step)

    def progress_key(self, what: str) -> str:
        return f"gitlab-restore-{what}-progress-{self.plat.name}-{self.where}"


def _destinations(r: _Restore, manifest: Manifest) -> dict[str, str]:
    """Where each file of the backup is (or goes) on the target host: the archive in the backup path, the
    config archive and the secrets copy in the config backup path."""
    out = {"data": posixpath.join(r.host.backup_path, r.bid.archive)}
    for role in ("config", "secrets"):
        f = manifest.file(role)
        if f is not None:
            out[role] = posixpath.join(r.host.config_backup_path, f.name)
    return out


def _steps(r: _Restore, manifest: Manifest, dest: dict[str, str], missing: list[str]) -> list[Step]:
    """THE restore, in order: the one place its steps are written (production and the drill alike)."""
    host, layout, redactor, where = r.host, r.layout, r.redactor, r.where
    grace = r.timeout("stop_grace")
    steps: list[Step] = []

    async def cmd(argv: list[str], limit: str, **kw: Any) -> dict:
        limit_s = r.timeout(limit)
        return await gitlab_command.with_options(timeout_seconds=limit_s + grace + 300)(
            host, layout, argv, limit_s, redactor, **kw)

    for role in missing:
        f = manifest.file(role)

        async def fetch(role: str = role, f: Any = f) -> str:
            got = await fetch_to_host.with_options(timeout_seconds=r.timeout("transfer"))(
                host, r.plat.backup_store(), store_key_of(f, "data", r.bid.value), dest[role], f.sha256,
                archive=role != "secrets", owner=layout.backup_user if role == "data" else None,
                progress_key=r.progress_key(f"fetch-{role}"))
            return f"{human_bytes(got['size'])}, sha256 verified" + (f", owned by {got['owner']}"
                                                                     if got["owner"] else "")

        steps.append(Step(f"fetch {role} from off-site", f"{where}'s disk: {dest[role]} written (0600)",
                          "its SHA-256 equals the manifest's before it gets its name",
                          f"nothing to undo on GitLab: delete {dest[role]} if it is not wanted", fetch))

    if not r.scratch:
        async def safety() -> str:
            pre = r.results["preflight"]
            m = await take_safety_backup(host, layout, redactor, platform=r.plat.name, pre=pre,
                                         create_timeout_s=r.timeout("backup_create"), grace_s=grace,
                                         transfer_s=r.timeout("transfer"),
                                         progress_key=r.progress_key("safety"))
            r.results["safety"] = m.id
            get_run_logger().info("safety backup %s taken before the restore", m.id)
            return f"{m.id}: " + ", ".join(f"{f.role} {f.name}" for f in m.files)

        steps.append(Step("safety backup", "production's backup directories: a new data archive, config archive "
                          "and secrets copy, with their manifest",
                          "the archive holds what GitLab's log says it dumped; every file's SHA-256 in the manifest",
                          "none needed: it is kept on the host (delete it once it is no longer wanted)", safety))

    async def hand() -> str:
        return (await hand_archive_to(host, dest["data"], layout.backup_user))["owner_mode"]

    steps.append(Step(f"hand the archive to {layout.backup_user}", f"owner and mode of {dest['data']}",
                      f"owned by {layout.backup_user}, 0600", "none needed: only GitLab's restore reads it", hand))

    if r.scratch:
        scratch_cfg = r.plat.config.gitlab.scratch
        overlay = DrillOverlay(str(scratch_cfg.external_url or scratch_cfg.api_url).rstrip("/"),
                               scratch_cfg.object_store_bucket)

        async def configure() -> str:
            out = await drill_config(host, layout, dest["secrets"], overlay)
            return f"scratch's own gitlab.rb, external_url {out['external_url']}"

        steps.append(Step("put back gitlab-secrets.json, drill overlay on scratch's gitlab.rb",
                          f"scratch's {host.secrets_file} (production's) and {layout.gitlab_rb} (drill overlay; the "
                          "previous one kept as gitlab.rb.pre-drill)", "files written, 0600",
                          "the next drill writes them again", configure))
    else:
        async def configure() -> str:
            out = await restore_config_files(host, dest.get("config"), dest["secrets"], manifest.etc_dir)
            return f"into {out['etc_dir']}"

        steps.append(Step("put back gitlab.rb and gitlab-secrets.json",
                          f"production's {posixpath.dirname(host.secrets_file)}: the backup's gitlab.rb (and the "
                          "other files of its config archive) and gitlab-secrets.json", "files written, 0600",
                          "the safety backup holds the previous ones", configure))

    async def reconfigure() -> str:
        return f"{(await cmd(['gitlab-ctl', 'reconfigure'], 'reconfigure'))['seconds']}s"

    steps.append(Step("gitlab-ctl reconfigure (before the data)", f"GitLab's services on {where}: the configuration "
                      "applied, services restarted", "exit status 0", "reconfigure again with the previous files",
                      reconfigure))

    async def stop() -> str:
        for svc in ("puma", "sidekiq"):
            await cmd(["gitlab-ctl", "stop", svc], "restart")
        status = await services_status(host, redactor)
        up = services_still_up(status["services"])
        if up:
            raise CheckFailed(f"gitlab-ctl status still shows {', '.join(up)} running after the stop")
        return ", ".join(f"{k}: {v}" for k, v in status["services"].items() if k in ("puma", "sidekiq")) or \
            "puma, sidekiq not running"

    steps.append(Step("stop puma and sidekiq", f"puma and sidekiq on {where}: stopped, GitLab serves nothing",
                      "`gitlab-ctl status` shows both down", "`gitlab-ctl start`", stop))

    async def restore() -> str:
        out = await cmd(["gitlab-backup", "restore", f"BACKUP={r.bid.value}", "force=yes"], "backup_restore",
                        progress_key=r.progress_key("restore"), progress=restore_progress)
        return f"{out['seconds']}s"

    steps.append(Step(f"gitlab-backup restore BACKUP={r.bid.value} force=yes",
                      f"{where}'s database and files: replaced by the backup's (an interrupted restore leaves them "
                      "partly overwritten)", "exit status 0",
                      "restore the safety backup" if not r.scratch else "the next drill restores scratch again",
                      restore))

    async def reconfigure_after() -> str:
        return f"{(await cmd(['gitlab-ctl', 'reconfigure'], 'reconfigure'))['seconds']}s"

    async def restart() -> str:
        return f"{(await cmd(['gitlab-ctl', 'restart'], 'restart'))['seconds']}s"

    steps.append(Step("gitlab-ctl reconfigure", f"GitLab's services on {where}: the configuration applied",
                      "exit status 0", "", reconfigure_after))
    steps.append(Step("gitlab-ctl restart", f"every GitLab service on {where}: restarted", "exit status 0", "",
                      restart))

    allowed = ("Sidekiq",) if r.scratch else ()  # the drill keeps Sidekiq off (the overlay): its "no" is expected

    async def check() -> str:
        out = await cmd(["gitlab-rake", "gitlab:check", "SANITIZE=true"], "check")
        _require(check_failures("\n".join(out["output"]), allowed), "gitlab:check")
        return "no failures"

    async def doctor() -> str:
        out = await cmd(["gitlab-rake", "gitlab:doctor:secrets"], "check")
        _require(doctor_secrets_failures("\n".join(out["output"])), "gitlab:doctor:secrets")
        return "every value decrypts"

    async def health() -> str:
        h = await api_health(r.api, redactor)
        r.results["health"] = h
        if not h["ready"] or not same_gitlab(h.get("version"), manifest.gitlab_version):
            raise CheckFailed(f"GitLab is not healthy after the restore: {h}")
        return f"ready, {h.get('version')}, {h.get('projects')} projects"

    steps.append(Step("gitlab:check", "nothing (a check)", "no failure printed (it exits 0 either way)"
                      + ("; Sidekiq off is expected on scratch" if r.scratch else ""), "", check))
    steps.append(Step("gitlab:doctor:secrets", "nothing (a check)", "every encrypted value decrypts", "", doctor))
    steps.append(Step("health through the API", "nothing (a check)",
                      f"ready, GitLab {manifest.gitlab_version}, projects listed", "", health))
    return steps


def _require(failures: list[str], what: str) -> None:
    if failures:
        raise CheckFailed(f"{what} reported: " + "; ".join(failures[:8]))


def _way_back(r: _Restore, n_steps: int):
    """The way back once `applied` steps are done (the failed one counted)."""
    def after(applied: int) -> WayBack | None:
        if r.scratch:
            return WayBack("The drill changes only the scratch host, production is untouched: fix the cause, then "
                           "run the drill again (it restores scratch again).", "gitlab-restore-drill", {})
        safety = r.results.get("safety")
        if safety:
            return WayBack(f"Restore the safety backup {safety}, taken before anything was changed (its data, "
                           f"gitlab.rb and gitlab-secrets.json): gitlab-restore with backup_id={safety}, "
                           "dry_run=false.", "gitlab-restore", {"backup_id": safety, "dry_run": False})
        if applied >= n_steps:  # the plan, shown before anything ran
            return WayBack("Restore the safety backup this run takes before it changes anything: gitlab-restore "
                           "with backup_id=<its id, named in the report and in a failure's message>, dry_run=false.")
        return WayBack(f"GitLab was not changed yet (the run stopped before its safety backup; at most a file was "
                       f"fetched): fix the cause, then restore {r.bid.value} again.", "gitlab-restore",
                       {"backup_id": r.bid.value, "dry_run": False})
    return after


def _planner(r: _Restore):
    async def planner(_session: Any) -> Plan:
        host, api, plat, bid = r.host, r.api, r.plat, r.bid
        fingerprint = await host_key(host)
        target = Target("GitLab host", f"{r.where} GitLab of {plat.name} ({api.url}, SSH {host.host}:{host.port})",
                        f"SSH host key {fingerprint}")
        title = f"GitLab restore of {bid.value} onto {r.where}"
        if r.scratch:
            prod = plat.gitlab_host()
            if same_host((host.host, host.port), (prod.host, prod.port)) or \
                    await host_key(prod) == fingerprint:
                return Plan(target, [], title=title, refusals=[
                    "the scratch host is the production host (same SSH host and port, or the same host key): a "
                    "drill never restores onto production; fix gitlab.scratch in the platform config"])
        manifest = await find_manifest(plat.backup_store(), plat.gitlab_host(), bid.value)
        if manifest is None:
            return Plan(target, [], title=title, refusals=[
                f"backup {bid.value} has no manifest off-site or on the host: it was never verified; pick a backup "
                "id from the latest gitlab-backup report"])
        pre = {**await api_preflight(api, r.redactor), **await host_preflight(host, r.layout, r.redactor)}
        down = None
        if not pre["ready"]:  # e.g. a failed restore left puma and sidekiq stopped: ask the host itself
            on_host = await host_gitlab_state(host, r.redactor)
            down = on_host["down"]
            if pre["version"] is None:
                pre.update({k: on_host[k] for k in ("version", "edition", "gitlab_version")})
        r.results["preflight"] = pre
        dest = _destinations(r, manifest)
        files, missing, rows = [], [], []
        for role, path in dest.items():
            f = manifest.file(role)
            present = await host_file_sha256(host, path)
            matches = None if present is None else present["sha256"] == f.sha256
            files.append(HostFile(role, f.name, present is not None, matches, bool(f.offsite)))
            if present is None and f.offsite:
                missing.append(role)
            rows.append({"role": role, "file": path, "sha256": f.sha256, "on the host": present is not None,
                         "matches": matches, "off-site": bool(f.offsite)})
        refusals = restore_refusals(ready=pre["ready"], installed_version=pre["version"],
                                    installed_edition=pre["edition"], backup_version=manifest.gitlab_version,
                                    files=files, has_secrets="secrets" in dest, free_bytes=pre["free_bytes"],
                                    needed_bytes=FREE_SPACE_FACTOR * manifest.file("data").size, down=down)
        if bid.gitlab_version and not same_gitlab(bid.gitlab_version, manifest.gitlab_version):
            refusals.append(f"the id {bid.value} names GitLab {bid.gitlab_version} but its manifest says "
                            f"{manifest.gitlab_version}: the manifest belongs to another backup")
        steps = _steps(r, manifest, dest, missing) if not refusals else []
        details = "\n".join([
            f"- **Backup:** `{manifest.id}` taken {manifest.finished_at:%Y-%m-%d %H:%M} UTC on {manifest.host}"
            + (" (a safety backup)" if manifest.safety else ""),
            f"- **GitLab:** the backup's {manifest.gitlab_version}; {r.where} runs {pre.get('gitlab_version') or '?'}"
            + (f" (not ready, read on the host; down: {', '.join(down) or 'nothing'})" if down is not None else ""),
            f"- **Components:** {', '.join(manifest.components)}"
            + (f" (disabled: {', '.join(manifest.disabled)})" if manifest.disabled else ""),
            f"- **Size:** {human_bytes(manifest.total_size)}; free on {r.where}: {human_bytes(pre['free_bytes'])}",
            "", md_table([{k: (v[:16] + "..." if k == "sha256" else v) for k, v in row.items()} for row in rows])])
        facts = {"backup": bid.value, "backup_gitlab": manifest.gitlab_version, "components": manifest.components,
                 "files": [{k: row[k] for k in ("role", "file", "sha256", "on the host", "matches")} for row in rows],
                 "gitlab": {"api": api.url, "version": pre["gitlab_version"], "ready": pre["ready"], "down": down},
                 "fetch": missing, "safety_backup": not r.scratch}
        return Plan(target, steps, title=title, details=details, facts=facts, refusals=refusals,
                    way_back=_way_back(r, len(steps)))
    return planner


def _operation(r: _Restore, name: str, *, approval_timeout_s: int | None = None, poll_interval_s: float = 10,
               unattended: str | None = None) -> Operation:
    cfg, platform = r.plat.config, r.plat.name
    return Operation(name, platform, _planner(r),
                     lock=host_limit_name(f"{platform}-scratch" if r.scratch else platform),
                     approval_timeout_s=approval_timeout(cfg, approval_timeout_s), lock_timeout_s=lock_timeout(cfg),
                     poll_interval_s=poll_interval_s, redactor=r.redactor, key=r.where, unattended=unattended)


@flow(name="gitlab-restore", log_prints=False)
async def gitlab_restore(platform: str = "main", backup_id: str = "", dry_run: bool = True,
                         approval_timeout_s: int | None = None, poll_interval_s: float = 10) -> Any:
    """Restore GitLab from `backup_id` (e.g. 1717000000_2024_05_29_17.0.1-ee, a custom BACKUP= name, or a
    safety backup's id). Dry run by default; a real run pauses for approval showing the plan, then takes a
    safety backup first and restores in GitLab's documented order."""
    bid = parse_backup_id(backup_id)  # ValueError before anything else: ids reach a remote shell
    plat = await Platform.aopen(platform, *PARTS)
    r = _Restore(plat, Redactor.of(await plat.asecrets()), bid, scratch=False)
    out = await run_operation(_operation(r, "gitlab-restore", approval_timeout_s=approval_timeout_s,
                                         poll_interval_s=poll_interval_s), dry_run=dry_run)
    if isinstance(out, dict):
        out.update(backup_id=bid.value, safety_backup=r.results.get("safety"), health=r.results.get("health"))
    return out


@flow(name="gitlab-restore-drill", log_prints=False)
async def gitlab_restore_drill(platform: str = "main", sample: int = 20) -> Any:
    """Restore the newest verified off-site backup onto the scratch GitLab (unattended: it changes only
    scratch); compare with production; report RTO and RPO."""
    logger = get_run_logger()
    plat = await Platform.aopen(platform, *DRILL_PARTS)
    redactor = Redactor.of(await plat.asecrets())
    manifests = [Manifest.model_validate(m) for m in await list_offsite_manifests(plat.backup_store(), "data")]
    verified = sorted((m for m in manifests if m.verified and m.offsite and not m.safety),
                      key=lambda m: m.finished_at)
    if not verified:
        raise DrillFailed("no verified off-site backup to drill with: RPO is unbounded; check gitlab-backup runs")
    newest = verified[-1]
    r = _Restore(plat, redactor, parse_backup_id(newest.id), scratch=True)
    started = time.monotonic()
    record = await run_operation(_operation(r, "gitlab-restore-drill", unattended=DRILL_UNATTENDED), dry_run=False)
    if not isinstance(record, dict):  # Cancelled: returned as is
        return record
    rto = time.monotonic() - started
    prod = await project_states(plat.gitlab_api(), redactor, sample=sample)
    restored = await project_states(plat.gitlab_api(scratch=True), redactor, ids=[p["id"] for p in prod["sampled"]])
    comparison = compare_restore(prod["count"], restored["count"],
                                 [ProjectState.model_validate(p) for p in prod["sampled"]],
                                 [ProjectState.model_validate(p) for p in restored["sampled"]], newest.finished_at)
    rpo = (datetime.now(timezone.utc) - newest.finished_at).total_seconds()
    lines = [f"# GitLab restore drill: {platform}", "",
             f"- **Result:** {'PASSED' if comparison.ok else 'FAILED'}",
             f"- **Backup:** `{newest.id}` ({human_bytes(newest.total_size)})",
             f"- **Run:** {record['approver']}",
             f"- **RTO (the whole restore: plan, fetch, restore, checks):** {human_duration(rto)}",
             f"- **RPO (age of the newest verified backup):** {human_duration(rpo)}",
             f"- **Projects:** production {comparison.production_projects}, restored {comparison.restored_projects}",
             f"- **Sampled last commits:** {comparison.matching}/{comparison.sampled} match",
             f"- **Changed in production since the backup:** {', '.join(comparison.changed_since_backup) or 'none'}",
             f"- **Mismatched:** {', '.join(comparison.mismatched) or 'none'}; **missing:** "
             f"{', '.join(comparison.missing) or 'none'}", "", "## Steps", "", md_table(record["steps"], limit=40)]
    await apublish_markdown(f"gitlab-restore-drill-{platform}", "\n".join(lines), description="Restore drill: RTO/RPO")
    if not comparison.ok:
        raise DrillFailed(f"drill: restored data differs from production: {comparison.model_dump()}")
    logger.info("drill passed: RTO %s, RPO %s", human_duration(rto), human_duration(rpo))
    return {"backup_id": newest.id, "rto_seconds": round(rto, 1), "rpo_seconds": round(rpo, 1),
            "comparison": comparison.model_dump(), "ok": comparison.ok, "approver": record["approver"],
            "steps": record["steps"]}

