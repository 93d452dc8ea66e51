"""What a check-mode run of the node_init role says about each host: the tasks that would change and
their diffs. Pure functions over `RunTally` (tasks/ansible_events.py); no Prefect, no network."""

from __future__ import annotations

from typing import Any

from tasks.ansible_events import RunTally

_DIFF_CHARS = 3000


def _diff_text(diffs: list[dict[str, Any]], path: str | None = None) -> str:
    """Ansible's diff dicts (before/after, before_header/after_header, or a prepared text) as short text."""
    out = []
    for d in diffs:
        if not isinstance(d, dict):
            continue
        if d.get("prepared"):
            out.append(str(d["prepared"]))
            continue
        # the host's path: the module's dest, else the before header (after_header may be a local temp file)
        header = path or d.get("path") or next((h for h in (d.get("before_header"), d.get("after_header"))
                                                if h and "/ansible-local-" not in str(h)), "")
        before, after = d.get("before"), d.get("after")
        if isinstance(before, str) and isinstance(after, str):
            old = set(before.splitlines())
            new = set(after.splitlines())
            lines = [f"-{ln}" for ln in before.splitlines() if ln not in new]
            lines += [f"+{ln}" for ln in after.splitlines() if ln not in old]
            out.append((f"{header}: " if header else "") + " | ".join(lines))
        elif before != after:
            out.append(f"{header}: {before!r} -> {after!r}")
    return "; ".join(out)[:_DIFF_CHARS]


def _as_list(diff: Any) -> list[dict[str, Any]]:
    return diff if isinstance(diff, list) else [diff] if isinstance(diff, dict) else []


def drift_rows(tally: RunTally, hosts: list[str]) -> list[dict[str, Any]]:
    """One row per task that would change a host (with its diff), one `in sync` row per clean host, one
    row per failed task or unreachable host (drift unknown there)."""
    rows: list[dict[str, Any]] = []
    diffs = {(h, d["task"]): d["diff"] for h, ds in tally.diffs.items() for d in ds}
    for host in hosts:
        changed = [(task, res) for task, res in tally.results.get(host, {}).items() if res.get("changed")]
        problems = [f for f in tally.failures if f.host == host]
        for task, res in changed:
            items = [i for i in res.get("results") or [] if isinstance(i, dict) and i.get("changed")]
            text = "; ".join(filter(None, (_diff_text(_as_list(i.get("diff")), i.get("dest") or i.get("path") or str(i.get("item", "")))
                                           for i in items))) if items else \
                _diff_text(diffs.get((host, task), []), res.get("dest") or res.get("path"))
            rows.append({"host": host, "state": "drift", "task": task, "diff": text[:_DIFF_CHARS]})
        for f in problems:
            rows.append({"host": host, "state": "unreachable" if f.unreachable else "error", "task": f.task,
                         "diff": f.message[:_DIFF_CHARS]})
        if not changed and not problems:
            seen = host in tally.hosts
            rows.append({"host": host, "state": "in sync" if seen else "not run", "task": "", "diff": ""})
    return rows


def drift_summary(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Hosts by verdict: drifted, in_sync, unknown (error, unreachable or not run)."""
    by_host: dict[str, set[str]] = {}
    for r in rows:
        by_host.setdefault(r["host"], set()).add(r["state"])
    unknown = sorted(h for h, s in by_host.items() if s & {"error", "unreachable", "not run"})
    drifted = sorted(h for h, s in by_host.items() if "drift" in s and h not in unknown)
    in_sync = sorted(h for h, s in by_host.items() if s == {"in sync"})
    return {"drifted": drifted, "in_sync": in_sync, "unknown": unknown}
