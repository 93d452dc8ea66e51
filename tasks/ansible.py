"""Run ansible-playbook through ansible-runner: events streamed to the log, batched progress, the recap.

`run_playbook` is the one way the project runs a playbook. It gives ansible-runner a private data dir in
a temporary folder with everything ansible writes kept there (`ANSIBLE_HOME`, the SSH control path dir,
local temp: a worker's home stays clean and two runs never share a ControlPersist socket), puts this
virtual environment's `bin` first on PATH (so the `ansible-playbook` of the installed ansible-core runs,
with the same Python), and reaches hosts with the SSH user, key and known_hosts it is given.

While the playbook runs, each event's text goes to the run's log (redacted) and the per-host counts go to
one progress artifact, updated at most every `flush_every_s` seconds (never one Prefect call per event).
A `pause` prompt that is still waiting a few seconds after its task started (not skipped by its `when:`)
stops the run: under ansible-runner nobody answers it and the run would hang (kubespray's reset.yml and remove-node.yml prompt unless told not to).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.ansible_events import (
    RunTally,
    TaskFailure,
    parse_recap,
    progress_rows,
    tally_event,
)
from tasks.redact import Redactor
from tasks.reports import md_table

_TAIL_CHARS = 20000


@dataclass(frozen=True)
class SSHAccess:
    """How ansible reaches the hosts: user, private key file, known_hosts (None: no checking, sandbox)."""

    user: str = "root"
    private_key_path: Path | None = None
    known_hosts: Path | None = None
    connect_timeout_s: int = 10


@dataclass
class PlaybookRun:
    """What one ansible-playbook run did."""

    playbook: str
    status: str  # ansible-runner's: successful, failed, timeout, canceled
    rc: int | None
    recap: dict[str, dict[str, int]]
    tally: RunTally
    limit: list[str] | None = None
    stopped_at_prompt: str | None = None
    progress_updates: int = 0
    stdout_tail: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "successful" and not self.tally.failures and self.stopped_at_prompt is None

    @property
    def unreachable(self) -> list[str]:
        return sorted({h for h, c in self.recap.items() if c.get("unreachable")} | set(self.tally.unreachable_hosts))

    @property
    def failed_tasks(self) -> list[TaskFailure]:
        return self.tally.failed_tasks

    def summary(self) -> dict[str, Any]:
        return {"playbook": self.playbook, "status": self.status, "rc": self.rc, "limit": self.limit,
                "recap": self.recap, "unreachable": self.unreachable,
                "failed": [f.describe() for f in self.failed_tasks], "stopped_at_prompt": self.stopped_at_prompt,
                "events": self.tally.events, "progress_updates": self.progress_updates}


def runner_env(home: Path, ssh: SSHAccess) -> dict[str, str]:
    """The environment of ansible-playbook under ansible-runner (everything under `home`)."""
    venv_bin = str(Path(sys.executable).parent)
    known = (f"-o UserKnownHostsFile={ssh.known_hosts} -o StrictHostKeyChecking=yes" if ssh.known_hosts
             else "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no")
    env = {
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "ANSIBLE_HOME": str(home / "ansible"),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        # a short path: a unix socket's path is at most 108 bytes
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(home / "cp"),
        # over kubespray's ansible.cfg (ConnectionAttempts=100 would make an unreachable host take minutes)
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=60s -o ConnectionAttempts=1",
        "ANSIBLE_SSH_COMMON_ARGS": known,
        "ANSIBLE_TIMEOUT": str(ssh.connect_timeout_s),
        "ANSIBLE_REMOTE_USER": ssh.user,
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
    }
    if ssh.private_key_path is not None:
        env["ANSIBLE_PRIVATE_KEY_FILE"] = str(ssh.private_key_path)
    return env


class ProgressSink:
    """The progress artifact of a run: per-host counts in its description, updated in batches."""

    def __init__(self, key: str | None, expected_tasks: int | None, flush_every_s: float,
                 create: Callable[..., Any] | None = None, update: Callable[..., Any] | None = None):
        self.key, self.expected, self.flush_every_s = key, expected_tasks, flush_every_s
        self._create, self._update = create, update
        self._id = None
        self._last = 0.0
        self.calls = 0

    def _pct(self, tally: RunTally, done: bool) -> float:
        if done:
            return 100.0
        expected = self.expected or tally.tasks_started + 10
        return round(min(95.0, 100.0 * tally.tasks_started / max(expected, 1)), 1)

    def flush(self, tally: RunTally, done: bool = False, force: bool = False) -> None:
        now = time.monotonic()
        if self.key is None or self._create is None or (not force and not done and now - self._last < self.flush_every_s):
            return
        self._last = now
        description = f"**{tally.tasks_started} tasks started**\n\n" + md_table(
            progress_rows(tally), ["host", "ok", "changed", "failed", "unreachable", "skipped"], limit=200)
        if self._id is None:
            self._id = self._create(progress=self._pct(tally, done), key=self.key, description=description)
        else:
            self._update(artifact_id=self._id, progress=self._pct(tally, done), description=description)
        self.calls += 1


def _prefect_progress(key: str | None) -> tuple[Callable | None, Callable | None]:
    from tasks.reports import _in_run_context, artifact_key

    if key is None or not _in_run_context():
        return None, None
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    return (lambda **kw: create_progress_artifact(**{**kw, "key": artifact_key(kw["key"])}),
            update_progress_artifact)


def run_playbook(project_dir: Path, playbook: str, inventory: Path, *, ssh: SSHAccess,
                 extravars: dict[str, Any] | None = None, extravar_files: list[Path] | None = None,
                 limit: list[str] | None = None, check: bool = False, diff: bool = False,
                 timeout_s: int = 3600, redactor: Redactor | None = None, log: Callable[[str], None] | None = None,
                 progress_key: str | None = None, expected_tasks: int | None = None,
                 flush_every_s: float = 2.0) -> PlaybookRun:
    """Run `playbook` of `project_dir` against `inventory` (limited to `limit`), with events streamed to
    `log` and a batched progress artifact `progress_key`. Never raises for a failed play: the result says."""
    import ansible_runner

    redactor = redactor or Redactor()
    tally = RunTally()
    create, update = _prefect_progress(progress_key)
    sink = ProgressSink(progress_key, expected_tasks, flush_every_s, create, update)
    home = Path(tempfile.mkdtemp(prefix="aprun-"))
    stdout_parts: list[str] = []
    state = {"stop": False}

    def on_event(event: dict[str, Any]) -> bool:
        tally_event(tally, event)
        text = event.get("stdout") or ""
        if text.strip():
            stdout_parts.append(text)
            if log is not None:
                log(redactor.text(text.strip()))
        sink.flush(tally)
        return True

    def stop() -> bool:  # polled by ansible-runner while it waits for output, not only on events
        if tally.waiting_at_prompt():
            state["stop"] = True  # nobody will answer a pause prompt here
        return state["stop"]

    cmdline = []
    for f in extravar_files or []:
        cmdline += ["-e", f"@{Path(f).resolve()}"]
    if check:
        cmdline.append("--check")
    if diff:
        cmdline.append("--diff")
    try:
        (home / "cp").mkdir()
        (home / "tmp").mkdir()
        (home / "pdd").mkdir()
        runner = ansible_runner.run(
            private_data_dir=str(home / "pdd"), project_dir=str(Path(project_dir).resolve()), playbook=playbook,
            inventory=str(Path(inventory).resolve()), extravars=dict(extravars or {}),
            limit=",".join(limit) if limit else None, cmdline=" ".join(cmdline) or None,
            envvars=runner_env(home, ssh), event_handler=on_event, cancel_callback=stop,
            timeout=timeout_s, quiet=True, json_mode=False, ident="run",
            settings={"suppress_ansible_output": True, "pexpect_timeout": 2},
        )
        status, rc = runner.status, runner.rc
        try:
            full = runner.stdout.read()
        except Exception:  # noqa: BLE001 - the events' text is the fallback
            full = "".join(stdout_parts)
    finally:
        _stop_leftovers(Path(inventory).resolve())
        shutil.rmtree(home, ignore_errors=True)
    sink.flush(tally, done=True)
    recap = parse_recap(full) or (tally.stats or {})
    return PlaybookRun(playbook=playbook, status=status, rc=rc, recap=recap, tally=tally, limit=limit,
                       stopped_at_prompt=tally.prompt, progress_updates=sink.calls,
                       stdout_tail=redactor.text(full[-_TAIL_CHARS:]))


def _stop_leftovers(inventory: Path) -> None:
    """Kill what this run's `ansible-playbook` left behind. When a run is cancelled at a `pause` prompt,
    ansible-runner stops the controller, but a forked worker waiting on the prompt can live on in its own
    session; it is found by this run's unique inventory path on its command line."""
    import psutil

    needle = str(inventory)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any("ansible-playbook" in part for part in cmd) and needle in cmd:
            try:
                proc.kill()
            except psutil.Error:
                pass


def run_with_unreachable_retries(run: Callable[[list[str] | None], PlaybookRun], retries: int,
                                 log: Callable[[str], None] | None = None) -> PlaybookRun:
    """`run(limit)`, then again limited to the hosts that were unreachable (only those, and only while no
    task failed), at most `retries` times. The last run's result, with every attempt listed."""
    result = run(None)
    attempts = [result.summary()]
    while retries > 0 and result.unreachable and not result.failed_tasks and result.stopped_at_prompt is None:
        retries -= 1
        hosts = result.unreachable
        if log is not None:
            log(f"retrying only the unreachable hosts {hosts}")
        result = run(hosts)
        attempts.append(result.summary())
    result.attempts = attempts
    return result
