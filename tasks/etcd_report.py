"""The etcd lifecycles' reports: the backup's summary (snapshots, attempts, retention) and the restore
drill's (revision, keys, RTO, RPO per cluster), as markdown for `tasks.reports.apublish_markdown`."""

from __future__ import annotations

from tasks.gitlab_rules import human_bytes, human_duration
from tasks.reports import md_table


def backup_summary(platform: str, done: dict[str, dict], errors: list[str], rows: list[dict], seconds: float) -> str:
    lines = [f"# etcd backup: {platform}", ""]
    if errors:
        lines += ["**FAILED.** " + " / ".join(errors), "",
                  "Nothing was deleted for a failed cluster; earlier snapshots are untouched.", ""]
    lines += [f"- **Duration:** {human_duration(seconds)}", ""]
    if done:
        lines += ["## Snapshots", "", md_table([
            {"cluster": c, "snapshot": r["manifest"]["id"], "member": r["manifest"]["member"],
             "revision": r["manifest"]["revision"], "keys": r["manifest"]["key_count"],
             "size": human_bytes(r["manifest"]["size"]), "sha256": r["manifest"]["sha256"][:16] + "...",
             "off-site": r["location"]} for c, r in done.items()]), ""]
    attempts = [{"cluster": c, **a} for c, r in done.items() for a in r["attempts"]]
    if attempts:
        lines += ["## Attempts", "", md_table(attempts), ""]
    if rows:
        lines += ["## Retention", "", md_table(rows, limit=60)]
    return "\n".join(lines)


def drill_summary(platform: str, rows: list[dict], errors: list[str]) -> str:
    lines = [f"# etcd restore drill: {platform}", ""]
    passed = "**Passed:** every snapshot restored as its manifest says."
    lines += ["**FAILED.** " + " / ".join(errors), ""] if errors else [passed, ""]
    lines += ["Restored on the scratch host only; no production member was touched.", ""]
    if rows:
        lines += [md_table([{"cluster": r["cluster"], "snapshot": r["snapshot"], "revision": r["revision"],
                             "keys": r["key_count"], "sampled keys": r["sample_checked"], "size": human_bytes(r["size"]),
                             "RTO": human_duration(r["rto_seconds"]), "RPO": human_duration(r["rpo_seconds"]),
                             "result": "; ".join(r["problems"]) or "ok"} for r in rows])]
    return "\n".join(lines)

