"""GitLab restore (manual, with approval) and the weekly restore drill onto a scratch GitLab.

Both run through the one operation module (`tasks.operation`), with ONE step list (`tasks.gitlab_plans`,
`restore_operation`), written once in GitLab's documented order (docs *Restore GitLab*):

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

import time
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger

from blocks.platform import Platform
from tasks.gitlab_api import project_states
from tasks.gitlab_plans import DrillFailed, Restore, restore_operation
from tasks.gitlab_report import drill_summary
from tasks.gitlab_rules import Manifest, ProjectState, compare_restore, human_duration, parse_backup_id
from tasks.operation import run_operation
from tasks.redact import Redactor
from tasks.reports import apublish_markdown
from tasks.storage import list_offsite_manifests

# What each flow needs from the platform (loaded concurrently, once per run).
PARTS = ("gitlab_host", "gitlab_api", "backup_store")
DRILL_PARTS = (*PARTS, "gitlab_host_scratch", "gitlab_api_scratch")
DRILL_UNATTENDED = "the weekly restore drill onto the scratch GitLab host: it changes only scratch"


@flow(name="gitlab-restore", log_prints=False)
async def gitlab_restore(platform: str = "main", backup_id: str = "", dry_run: bool = True,
                         approval_timeout_s: int | None = None, poll_interval_s: float = 10) -> Any:
    """Restore GitLab from `backup_id` (e.g. 1717000000_2024_05_29_17.0.1-ee, a custom BACKUP= name, or a
    safety backup's id). Dry run by default; a real run pauses for approval showing the plan, then takes a
    safety backup first and restores in GitLab's documented order."""
    bid = parse_backup_id(backup_id)  # ValueError before anything else: ids reach a remote shell
    plat = await Platform.aopen(platform, *PARTS)
    redactor = Redactor.of(await plat.asecrets())
    r = Restore(platform, plat.config, plat.gitlab_host(), plat.gitlab_api(), plat.gitlab_host(), plat.backup_store(),
                redactor, bid, scratch=False)
    out = await run_operation(restore_operation(r, "gitlab-restore", approval_timeout_s=approval_timeout_s,
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
    r = Restore(platform, plat.config, plat.gitlab_host(scratch=True), plat.gitlab_api(scratch=True),
                plat.gitlab_host(), plat.backup_store(), redactor, parse_backup_id(newest.id), scratch=True)
    started = time.monotonic()
    record = await run_operation(restore_operation(r, "gitlab-restore-drill", unattended=DRILL_UNATTENDED),
                                 dry_run=False)
    if not isinstance(record, dict):  # Cancelled: returned as is
        return record
    rto = time.monotonic() - started
    prod = await project_states(plat.gitlab_api(), redactor, sample=sample)
    restored = await project_states(plat.gitlab_api(scratch=True), redactor, ids=[p["id"] for p in prod["sampled"]])
    comparison = compare_restore(prod["count"], restored["count"],
                                 [ProjectState.model_validate(p) for p in prod["sampled"]],
                                 [ProjectState.model_validate(p) for p in restored["sampled"]], newest.finished_at)
    rpo = (datetime.now(timezone.utc) - newest.finished_at).total_seconds()
    await apublish_markdown(f"gitlab-restore-drill-{platform}",
                            drill_summary(platform, comparison, newest, record, rto, rpo),
                            description="Restore drill: RTO/RPO")
    if not comparison.ok:
        raise DrillFailed(f"drill: restored data differs from production: {comparison.model_dump()}")
    logger.info("drill passed: RTO %s, RPO %s", human_duration(rto), human_duration(rpo))
    return {"backup_id": newest.id, "rto_seconds": round(rto, 1), "rpo_seconds": round(rpo, 1),
            "comparison": comparison.model_dump(), "ok": comparison.ok, "approver": record["approver"],
            "steps": record["steps"]}

