"""GitLab restore as one operation (`tasks.operation`): its planner, its ONE step list and its way back, for
production (`gitlab-restore`) and the scratch drill (`gitlab-restore-drill`) alike.

`restore_operation(Restore(...), name)` returns the `Operation`; the flows in `flows/gitlab_restore.py` open
the platform, hand it the blocks, the config and the store, and run it. The steps (`_steps`) are written here
once, in GitLab's documented order (docs *Restore GitLab*): fetch what the host lacks, production's safety
backup, the archive handed to the git user, the configuration that belongs with the data and `gitlab-ctl
reconfigure`, puma and sidekiq stopped, `gitlab-backup restore`, reconfigure and restart, then `gitlab:check`,
`gitlab:doctor:secrets` and the API's health. The planner (`_planner`) reads the host and the API, refuses
what `tasks.gitlab_rules.restore_refusals` refuses, and names the target by its SSH host key.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger

from tasks.gitlab_api import api_health, api_preflight
from tasks.gitlab_backup import host_layout, step_timeout
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
from tasks.gitlab_report import restore_plan_details
from tasks.gitlab_rules import (
    BackupId,
    DrillOverlay,
    HostFile,
    Manifest,
    check_failures,
    doctor_secrets_failures,
    human_bytes,
    restore_refusals,
    same_gitlab,
    same_host,
    services_still_up,
    store_key_of,
)
from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, lock_timeout
from tasks.redact import Redactor
from tasks.storage import Store

FREE_SPACE_FACTOR = 3


class DrillFailed(RuntimeError):
    """The drill could not run (no verified backup) or scratch's data differs from production's."""


class CheckFailed(RuntimeError):
    """A step ran but its output reports a failure (a check that printed failures and exited 0)."""


@dataclass
class Restore:
    """One restore as its planner and steps see it: the platform's name and config, the target GitLab host and
    API (production's or scratch's), production's host (where the backups were taken, and which a drill never
    restores onto), the off-site store, the backup, and what the steps learn on the way (`results`: the
    preflight, the safety backup's id, the health after the restore)."""

    platform: str
    config: Any
    host: Any
    api: Any
    production_host: Any
    store: Store
    redactor: Redactor
    bid: BackupId
    scratch: bool
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return "scratch" if self.scratch else "production"

    @property
    def layout(self) -> HostLayout:
        return host_layout(self.config, self.scratch)

    def timeout(self, step: str) -> int:
        return step_timeout(self.config, step)

    def progress_key(self, what: str) -> str:
        return f"gitlab-restore-{what}-progress-{self.platform}-{self.where}"


def _destinations(r: Restore, manifest: Manifest) -> dict[str, str]:
    """Where each file of the backup is (or goes) on the target host: the archive in the backup path, the
    config archive and the secrets copy in the config backup path."""
    out = {"data": posixpath.join(r.host.backup_path, r.bid.archive)}
    for role in ("config", "secrets"):
        f = manifest.file(role)
        if f is not None:
            out[role] = posixpath.join(r.host.config_backup_path, f.name)
    return out


def _steps(r: Restore, manifest: Manifest, dest: dict[str, str], missing: list[str]) -> list[Step]:
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
                host, r.store, store_key_of(f, "data", r.bid.value), dest[role], f.sha256,
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
            m = await take_safety_backup(host, layout, redactor, platform=r.platform, pre=pre,
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
        scratch_cfg = r.config.gitlab.scratch
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


def _way_back(r: Restore, n_steps: int):
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


def _planner(r: Restore):
    async def planner(_session: Any) -> Plan:
        host, api, bid = r.host, r.api, r.bid
        fingerprint = await host_key(host)
        target = Target("GitLab host", f"{r.where} GitLab of {r.platform} ({api.url}, SSH {host.host}:{host.port})",
                        f"SSH host key {fingerprint}")
        title = f"GitLab restore of {bid.value} onto {r.where}"
        if r.scratch:
            prod = r.production_host
            if same_host((host.host, host.port), (prod.host, prod.port)) or \
                    await host_key(prod) == fingerprint:
                return Plan(target, [], title=title, refusals=[
                    "the scratch host is the production host (same SSH host and port, or the same host key): a "
                    "drill never restores onto production; fix gitlab.scratch in the platform config"])
        manifest = await find_manifest(r.store, r.production_host, bid.value)
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
        details = restore_plan_details(manifest, r.where, pre, down, rows)
        facts = {"backup": bid.value, "backup_gitlab": manifest.gitlab_version, "components": manifest.components,
                 "files": [{k: row[k] for k in ("role", "file", "sha256", "on the host", "matches")} for row in rows],
                 "gitlab": {"api": api.url, "version": pre["gitlab_version"], "ready": pre["ready"], "down": down},
                 "fetch": missing, "safety_backup": not r.scratch}
        return Plan(target, steps, title=title, details=details, facts=facts, refusals=refusals,
                    way_back=_way_back(r, len(steps)))
    return planner


def restore_operation(r: Restore, name: str, *, approval_timeout_s: int | None = None,
                      poll_interval_s: float = 10, unattended: str | None = None) -> Operation:
    """The restore of `r.bid` onto `r`'s host as one operation (`gitlab-restore`, or the scratch drill run
    unattended): the lock is the host's limit, the one that keeps its backups and restores apart."""
    cfg, platform = r.config, r.platform
    return Operation(name, platform, _planner(r),
                     lock=host_limit_name(f"{platform}-scratch" if r.scratch else platform),
                     approval_timeout_s=approval_timeout(cfg, approval_timeout_s), lock_timeout_s=lock_timeout(cfg),
                     poll_interval_s=poll_interval_s, redactor=r.redactor, key=r.where, unattended=unattended)
