"""The GitLab reports people read: a backup's summary and retention table, a restore plan's details, the
restore drill's summary.

Rendering only (markdown text and table rows); `publish_backup` publishes a backup run's report with
`tasks.reports`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks.gitlab_rules import DrillComparison, Manifest, RetentionDecision, human_bytes, human_duration
from tasks.reports import apublish_markdown, apublish_table, md_table

if TYPE_CHECKING:
    from tasks.gitlab_backup import BackupOutcome


def decision_row(where: str, kind: str, d: RetentionDecision) -> dict:
    return {"where": where, "kind": kind, "backup": d.id, "created": d.created_at.strftime("%Y-%m-%d %H:%M"),
            "action": d.action, "reason": d.reason}


def backup_summary(platform: str, title: str, manifest: Manifest | None, preflight: dict, rows: list[dict],
                   rpo: float | None, seconds: float, error: str | None, location: str) -> str:
    lines = [f"# {title}: {platform}", ""]
    if error:
        lines += ["**FAILED.** " + error, "",
                  "Nothing was deleted (retention skips failed runs); earlier backups are untouched.", ""]
    if manifest:
        lines += [f"- **Backup:** `{manifest.id}` ({manifest.kind})",
                  f"- **GitLab:** {manifest.gitlab_version} {manifest.edition.upper()}",
                  f"- **Components:** {', '.join(manifest.components) or '-'}"
                  + (f" (skipped: {', '.join(manifest.skipped)})" if manifest.skipped else "")
                  + (f" (disabled on this GitLab: {', '.join(manifest.disabled)})" if manifest.disabled else ""),
                  f"- **Size:** {human_bytes(manifest.total_size)}",
                  f"- **Verified:** {'yes' if manifest.verified else 'NO'}"]
    lines += [f"- **Duration:** {human_duration(seconds)}", f"- **Off-site location:** {location}",
              "- **RPO (age of newest verified off-site copy):** "
              f"{human_duration(rpo) if rpo is not None else 'none!'}",
              f"- **Host free space:** {human_bytes(preflight.get('free_bytes', 0))}" if preflight else "", ""]
    if preflight and preflight.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in preflight["warnings"]] + [""]
    if manifest:
        lines += ["## Files", "", md_table([{"role": f.role, "name": f.name, "size": human_bytes(f.size),
                                              "sha256": f.sha256[:16] + "...", "off-site": f.offsite or ""}
                                             for f in manifest.files])]
    if rows:
        lines += ["## Retention", "", md_table(rows, limit=40)]
    return "\n".join(lines)


async def publish_backup(o: BackupOutcome) -> None:
    """The backup run's report (size, duration, location, RPO; a failure said first) and its retention table."""
    await apublish_markdown(f"gitlab-{o.kind}-backup-{o.platform}",
                            backup_summary(o.platform, o.title, o.manifest, o.preflight, o.rows, o.rpo, o.seconds,
                                           o.error, o.location),
                            description=f"{o.title}: size, duration, location, RPO")
    if o.rows:
        await apublish_table(f"gitlab-{o.kind}-backup-retention-{o.platform}", o.rows,
                             description="Retention decisions")


def restore_plan_details(manifest: Manifest, where: str, pre: dict, down: list[str] | None,
                         rows: list[dict[str, Any]]) -> str:
    """The restore plan's details: the backup, the GitLab on both sides, the backup's files on the host."""
    return "\n".join([
        f"- **Backup:** `{manifest.id}` taken {manifest.finished_at:%Y-%m-%d %H:%M} UTC on {manifest.host}"
        + (" (a safety backup)" if manifest.safety else ""),
        f"- **GitLab:** the backup's {manifest.gitlab_version}; {where} runs {pre.get('gitlab_version') or '?'}"
        + (f" (not ready, read on the host; down: {', '.join(down) or 'nothing'})" if down is not None else ""),
        f"- **Components:** {', '.join(manifest.components)}"
        + (f" (disabled: {', '.join(manifest.disabled)})" if manifest.disabled else ""),
        f"- **Size:** {human_bytes(manifest.total_size)}; free on {where}: {human_bytes(pre['free_bytes'])}",
        "", md_table([{k: (v[:16] + "..." if k == "sha256" else v) for k, v in row.items()} for row in rows])])


def drill_summary(platform: str, comparison: DrillComparison, newest: Manifest, record: dict, rto: float,
                  rpo: float) -> str:
    """The restore drill's report: the result, the backup, RTO and RPO, production against scratch, the steps."""
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
    return "\n".join(lines)
