"""GitLab backup: `gitlab-backup create`, config and secrets, verification, off-site copy, retention.

Replaces the guide's crontab lines (`gitlab-backup create CRON=1` at 02:00, `gitlab-ctl
backup-etc` at 04:15 Tue-Sat, `find -mtime +5 -delete`). One backup or restore per GitLab host at
a time (global concurrency limit `gitlab-host-<platform>`). Retention runs only after a fully
verified run and never deletes the newest verified backup. A failure notifies the webhook.

Each run opens the platform once (`blocks.platform.Platform`) and hands its tasks the GitLab host
and API blocks, the platform config, the off-site `Store` and one `Redactor` built from the platform's
secrets; the run itself is `tasks.gitlab_backup.run_backup`, its report `tasks.gitlab_report.publish_backup`.

What GitLab reports decides what the archive must hold: the components its backup log says it
dumped (with CRON=1 read from `backup_json.log`), never a fixed list, so a disabled registry or a
GitLab without repositories verifies. `gitlab-backup create` runs supervised (`tasks.ssh`): a
timeout stops it on the host, and a retry can never start a second one. The secrets copy is kept
apart from the data off-site (`secrets/<kind>/<id>/`, server-side encrypted on S3). Preflight warns
when GitLab's own `backup_keep_time` would delete archives that retention keeps.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow

from blocks.platform import Platform
from tasks.gitlab_backup import run_backup
from tasks.gitlab_report import publish_backup
from tasks.redact import Redactor

# What a backup run needs from the platform (loaded concurrently, once per run).
PARTS = ("gitlab_host", "gitlab_api", "backup_store")


@flow(name="gitlab-backup", log_prints=False)
async def gitlab_backup(platform: str = "main", options: dict[str, str] | None = None) -> dict:
    """Back up GitLab (data, config, secrets), verify it, copy it off-site, apply retention.

    `options` overrides the host's `backup_options` (STRATEGY, SKIP, GZIP_RSYNCABLE, CRON, BACKUP=<custom
    name>...). Each step's time limit comes from `gitlab.timeouts` in the platform config.
    """
    return await _backup(platform, "data", options)


@flow(name="gitlab-config-backup", log_prints=False)
async def gitlab_config_backup(platform: str = "main") -> dict:
    """`gitlab-ctl backup-etc` and gitlab-secrets.json, verified and off-site, with config retention."""
    return await _backup(platform, "config", None)


async def _backup(platform: str, kind: str, options: dict[str, str] | None) -> dict:
    """Both backups: open the platform once, run the backup of `kind`, publish its report, end with its result."""
    started = datetime.now(timezone.utc)
    plat = await Platform.aopen(platform, *PARTS)
    redactor = Redactor.of(await plat.asecrets())
    outcome = await run_backup(platform, kind, plat.gitlab_host(), plat.gitlab_api(), plat.backup_store(),
                               plat.config, redactor, options, started)
    await publish_backup(outcome)
    return outcome.result()
