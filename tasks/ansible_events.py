"""What ansible's events mean: per-host tallies, failed tasks, unreachable hosts, the PLAY RECAP.

Pure functions over ansible-runner's event dicts (`event`, `event_data.host`, `.task`, `.res`; the
`runner_on_*` / `playbook_on_*` names of ansible-runner's docs, "Runner Artifact Job Events") and over
ansible-playbook's text output. No Prefect, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# PLAY RECAP lines as ansible's default callback prints them (lib/ansible/plugins/callback/default.py,
# v2_playbook_on_stats): "host : ok=3 changed=1 unreachable=0 failed=0 skipped=0 rescued=0 ignored=0".
_RECAP_LINE = re.compile(r"^(?P<host>\S+)\s*:\s*(?P<counts>(?:[a-z]+=\d+\s*)+)$")
_COUNT = re.compile(r"([a-z]+)=(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
RECAP_KEYS = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
# Actions that wait for a person at the terminal: under ansible-runner nobody answers them.
_STATS_KEYS = {"ok": "ok", "changed": "changed", "unreachable": "dark", "failed": "failures",
               "skipped": "skipped", "rescued": "rescued", "ignored": "ignored"}
PROMPT_ACTIONS = {"pause", "ansible.builtin.pause", "ansible.legacy.pause"}


@dataclass
class TaskFailure:
    """A task that failed on a host, or a host that could not be reached."""

    host: str
    task: str
    message: str
    unreachable: bool = False

    def describe(self) -> str:
        what = "unreachable" if self.unreachable else "failed"
        return f"{self.host}: task {self.task!r} {what}: {self.message}"


@dataclass
class RunTally:
    """Counts per host from the events, failures in order, diffs of check mode, the prompt hit if any."""

    hosts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[TaskFailure] = field(default_factory=list)
    diffs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> task name -> res (registered)
    prompt: str | None = None
    # a `pause` task started and not yet answered by a host's result: under `when:` it is usually skipped
    # at once (kubespray's prompts are skipped when the confirmation variable is given)
    prompt_pending: str | None = None
    prompt_since: float = 0.0
    events: int = 0
    tasks_started: int = 0
    stats: dict[str, dict[str, int]] | None = None

    def waiting_at_prompt(self, grace_s: float = 3.0) -> bool:
        """Whether the run sits at a `pause` prompt: one started `grace_s` ago with no host's result since
        (nobody answers it under ansible-runner). Sets `prompt`."""
        import time

        if self.prompt is None and self.prompt_pending is not None and time.monotonic() - self.prompt_since > grace_s:
            self.prompt = self.prompt_pending
        return self.prompt is not None

    def _count(self, host: str, key: str) -> None:
        counts = self.hosts.setdefault(host, dict.fromkeys(RECAP_KEYS, 0))
        counts[key] += 1

    @property
    def unreachable_hosts(self) -> list[str]:
        return sorted({f.host for f in self.failures if f.unreachable})

    @property
    def failed_tasks(self) -> list[TaskFailure]:
        return [f for f in self.failures if not f.unreachable]


def _message(res: dict[str, Any]) -> str:
    msg = res.get("msg") or res.get("stderr") or res.get("reason") or ""
    if not msg and res.get("results"):  # a loop: the first failed item's message
        for item in res["results"]:
            if isinstance(item, dict) and item.get("failed"):
                return _message(item)
    return str(msg).strip()[:2000] or "(no message)"


def tally_event(tally: RunTally, event: dict[str, Any]) -> None:
    """Account one ansible-runner event."""
    tally.events += 1
    kind = event.get("event", "")
    data = event.get("event_data") or {}
    host = data.get("host") or data.get("remote_addr")
    task = str(data.get("task") or "").strip()
    res = data.get("res") if isinstance(data.get("res"), dict) else {}
    if kind == "playbook_on_task_start":
        tally.tasks_started += 1
        if data.get("task_action") in PROMPT_ACTIONS:
            import time

            tally.prompt_pending, tally.prompt_since = task or "pause", time.monotonic()
        return
    if kind.startswith("runner_on_") and kind != "runner_on_start" and tally.prompt_pending == (task or "pause"):
        tally.prompt_pending = None  # the pause task ended (skipped by its `when:`, or answered)
    if kind == "runner_on_ok" and host:
        tally._count(host, "changed" if res.get("changed") else "ok")
        if res.get("ansible_facts"):
            # setup returns `ansible_`-prefixed names; ansible_facts[...] in playbooks drops the prefix
            tally.facts.setdefault(host, {}).update(
                {k.removeprefix("ansible_"): v for k, v in res["ansible_facts"].items()})
        if res.get("diff"):
            diffs = res["diff"] if isinstance(res["diff"], list) else [res["diff"]]
            tally.diffs.setdefault(host, []).append({"task": task, "diff": diffs})
        tally.results.setdefault(host, {})[task] = res
    elif kind == "runner_on_failed" and host:
        if data.get("ignore_errors"):
            tally._count(host, "ignored")
        else:
            tally._count(host, "failed")
            tally.failures.append(TaskFailure(host, task, _message(res)))
    elif kind == "runner_on_unreachable" and host:
        tally._count(host, "unreachable")
        tally.failures.append(TaskFailure(host, task, _message(res), unreachable=True))
    elif kind == "runner_on_skipped" and host:
        tally._count(host, "skipped")
    elif kind == "playbook_on_stats":  # ansible's AggregateStats: `dark` is unreachable, `failures` failed
        hosts = set().union(*((data.get(src) or {}) for src in _STATS_KEYS.values()), data.get("processed") or {})
        tally.stats = {h: {k: int((data.get(src) or {}).get(h, 0)) for k, src in _STATS_KEYS.items()}
                       for h in sorted(hosts)}


def parse_recap(stdout: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of ansible-playbook's output: host -> ok/changed/unreachable/failed/... counts.

    Several plays' recaps (one run prints one; a concatenated log may hold more): the last one wins."""
    recap: dict[str, dict[str, int]] = {}
    in_recap = False
    for raw in stdout.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        if line.startswith("PLAY RECAP"):
            in_recap, recap = True, {}
            continue
        if not in_recap:
            continue
        m = _RECAP_LINE.match(line.strip())
        if m:
            counts = dict.fromkeys(RECAP_KEYS, 0)
            counts.update({k: int(v) for k, v in _COUNT.findall(m.group("counts"))})
            recap[m.group("host")] = counts
        elif line.strip():
            in_recap = False
    return recap


def progress_rows(tally: RunTally) -> list[dict[str, Any]]:
    """One row per host: the counts so far (what the progress table shows)."""
    return [{"host": h, **c} for h, c in sorted(tally.hosts.items())]
