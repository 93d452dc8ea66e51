"""Running commands on a host over SSH (asyncssh): argv lists, quoted, streamed, with timeouts.

`run_command(conn, argv)` joins `argv` with `shlex.quote` (never a shell string built from
parameters), streams each output line to the Prefect run logger as it arrives, keeps the last
lines for the error message, and raises:

- `RemoteCommandError` for a non-zero exit (not retried: the command ran and failed),
- `SessionLost` (a `TransientError`) when the session drops before an exit status arrives,
- `TimeoutError` when the command outlives `timeout_s` (a signal is requested, but sshd refuses
  signal requests in most configurations: OpenSSH's `session_signal_req` "session signalling requires
  privilege separation", and older servers ignore them, so the remote command may keep running).

Long commands that change state run under `run_supervised`: a host-side lock (`flock`) so a
second copy never starts, a new process group recorded on the host (`setsid`), and on timeout,
cancellation or a lost session a *second* session that stops that group and checks it stopped.

`redact=` takes a `tasks.redact.Redactor` (or the secret values to build one from): every streamed
line, every kept line and so every error tail is redacted before it is logged or kept, and so is
the text of the errors raised here. Other lifecycles (certificate checks, node initialisation)
reuse this module.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

from tasks._retry import TransientError
from tasks.redact import Redactor

DEFAULT_TIMEOUT_S = 600.0
SFTP_CHUNK = 4 * 1024 * 1024


class RemoteCommandError(RuntimeError):
    """A remote command exited non-zero. `tail` holds its last output lines (already redacted)."""

    def __init__(self, argv: Sequence[str], exit_status: int, tail: list[str]):
        self.argv = list(argv)
        self.exit_status = exit_status
        self.tail = tail
        last = "\n    ".join(tail[-8:]) or "(no output)"
        super().__init__(f"`{shlex.join(argv)}` exited with status {exit_status}; last output:\n    {last}")


class SessionLost(TransientError):
    """The SSH session ended before the command reported an exit status (network, sshd restart).

    `started` says whether the remote command had been started: only a command that never started
    may simply be run again (see `run_supervised`)."""

    def __init__(self, message: str, started: bool = True):
        super().__init__(message)
        self.started = started


@dataclass
class CommandResult:
    argv: list[str]
    exit_status: int
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "\n".join(self.stdout)


def quote_argv(argv: Sequence[str]) -> str:
    """The one way a command line is built: every element quoted."""
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise ValueError(f"argv must be a non-empty list of non-empty strings, got {argv!r}")
    return shlex.join(argv)


def as_redactor(redact: Redactor | Iterable[str] | None) -> Redactor:
    """A `Redactor` from one, from secret values, or (None) one that masks credentials of known shapes."""
    if isinstance(redact, Redactor):
        return redact
    return Redactor.of(redact or ())


@asynccontextmanager
async def connect(connect_kwargs: dict[str, Any]) -> AsyncIterator[Any]:
    """An asyncssh connection from a block's `connect_kwargs()`; connection errors are transient."""
    import asyncssh

    try:
        conn = await asyncssh.connect(**connect_kwargs, keepalive_interval=15, keepalive_count_max=4)
    except (OSError, asyncssh.Error) as exc:
        if isinstance(exc, asyncssh.PermissionDenied | asyncssh.HostKeyNotVerifiable):
            raise PermissionError(
                f"SSH to {connect_kwargs.get('host')}:{connect_kwargs.get('port')} refused: {exc.reason}; "
                "check the key and known_hosts in the GitLab host block") from None
        raise TransientError(f"cannot reach {connect_kwargs.get('host')}:{connect_kwargs.get('port')} over SSH: "
                             f"{exc}") from exc
    try:
        yield conn
    finally:
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), 5)
        except (TimeoutError, OSError):
            pass


def host_key_fingerprint(conn: Any) -> str:
    """The SHA-256 fingerprint of the host key the server presented on `conn` (`SHA256:...`, as
    `ssh-keygen -lf` prints it): what names an SSH host, since a host name can be moved to another machine."""
    key = conn.get_server_host_key()
    if key is None:
        raise RuntimeError("the SSH server presented no host key (a certificate-only or GSS exchange?)")
    return key.get_fingerprint("sha256")


async def run_command(
    conn: Any,
    argv: Sequence[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    log_output: bool = True,
    check: bool = True,
    redact: Redactor | Iterable[str] | None = None,
    keep: int = 200,
    on_line: Callable[[str], None] | None = None,
) -> CommandResult:
    """Run `argv` on `conn`, streaming output lines to `logger`; see the module docstring."""
    import asyncssh

    command = quote_argv(argv)
    redactor = as_redactor(redact)
    shown = redactor.text(command)
    out: deque[str] = deque(maxlen=keep)
    err: deque[str] = deque(maxlen=keep)
    start = time.monotonic()
    if logger is not None:
        logger.info("$ %s", shown)

    async def pump(stream, sink: deque[str], level: int) -> None:
        async for raw in stream:
            line = redactor.text(raw.rstrip("\n"))
            sink.append(line)
            if on_line is not None:
                on_line(line)
            if logger is not None and log_output and line.strip():
                logger.log(level, "%s", line)

    try:
        proc = await conn.create_process(command, encoding="utf-8", errors="replace")
    except (asyncssh.Error, OSError) as exc:
        raise SessionLost(redactor.text(f"could not start `{command}`: {exc}"), started=False) from exc
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(pump(proc.stdout, out, logging.INFO), pump(proc.stderr, err, logging.WARNING))
            completed = await proc.wait(check=False)
    except TimeoutError:
        proc.terminate()
        proc.close()
        raise TimeoutError(f"`{shown}` did not finish within {timeout_s:.0f}s; a SIGTERM was requested (sshd may not deliver it)") from None
    except (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError, ConnectionError) as exc:
        raise SessionLost(redactor.text(f"SSH session lost while running `{command}`: {exc}")) from exc
    status = completed.exit_status
    if status is None or status < 0:
        raise SessionLost(f"SSH session lost while running `{shown}` (no exit status"
                          f"{', signal ' + str(completed.exit_signal[0]) if completed.exit_signal else ''})")
    result = CommandResult(list(argv), status, list(out), list(err), time.monotonic() - start)
    if check and status != 0:
        raise RemoteCommandError(redactor.value(list(argv)), status, (list(out) + list(err))[-keep:])
    return result


async def sftp_chunks(sftp: Any, path: str, chunk_size: int = SFTP_CHUNK,
                      timeout_s: float = 120.0) -> AsyncIterator[bytes]:
    """Read a remote file in chunks (each read bounded by `timeout_s`)."""
    async with sftp.open(path, "rb") as f:
        while True:
            chunk = await asyncio.wait_for(f.read(chunk_size), timeout_s)
            if not chunk:
                return
            yield chunk


class SFTPWriter:
    """Write a remote file at `path + '.part'` with mode 0600; `commit()` renames it into place."""

    def __init__(self, sftp: Any, path: str, timeout_s: float = 120.0):
        self.sftp, self.path, self.part, self.timeout_s = sftp, path, path + ".part", timeout_s
        self._f = None

    async def __aenter__(self) -> SFTPWriter:
        import asyncssh

        self._f = await self.sftp.open(self.part, "wb", attrs=asyncssh.SFTPAttrs(permissions=0o600))
        return self

    async def write(self, chunk: bytes) -> None:
        await asyncio.wait_for(self._f.write(chunk), self.timeout_s)

    async def commit(self) -> None:
        await self._f.close()
        self._f = None
        await self.sftp.posix_rename(self.part, self.path)

    async def __aexit__(self, *exc) -> None:
        if self._f is not None:  # not committed: remove the partial file
            try:
                await self._f.close()
            finally:
                try:
                    await self.sftp.remove(self.part)
                except Exception:  # noqa: BLE001 - best effort cleanup of our own partial file
                    pass


async def upload_chunks(sftp: Any, path: str, chunks: Iterable[bytes], *, expected_sha256: str | None = None,
                        name: str = "", verifier: Any = None,
                        on_progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Stream `chunks` (a blocking iterator, e.g. a `Store`'s `chunks`: each read on a worker thread) into
    `path` over SFTP (`SFTPWriter`: `.part`, 0600, renamed only when complete), never the whole object in
    memory, hashing it on the way; each chunk is fed to `verifier` (`tasks.storage.TarStreamVerifier`) and the
    bytes so far to `on_progress` when given. With `expected_sha256`, another digest raises `ChecksumMismatch`
    and nothing is renamed into place. Returns (size, sha256)."""
    import hashlib

    from tasks.storage import ChecksumMismatch

    it, sha, size = iter(chunks), hashlib.sha256(), 0
    async with SFTPWriter(sftp, path) as w:
        while (chunk := await asyncio.to_thread(next, it, None)) is not None:
            sha.update(chunk)
            size += len(chunk)
            if verifier is not None:
                verifier.feed(chunk)
            if on_progress is not None:
                on_progress(size)
            await w.write(chunk)
        if verifier is not None:
            verifier.finish()
        if expected_sha256 is not None and sha.hexdigest() != expected_sha256:
            raise ChecksumMismatch(f"off-site copy {name} has sha256 {sha.hexdigest()[:16]}..., the manifest says "
                                   f"{expected_sha256[:16]}...: it is corrupt; nothing was written to the host")
        await w.commit()
    return size, sha.hexdigest()


# --- supervised remote commands ----------------------------------------------------------------------

LOCKED_EXIT = 75  # flock --conflict-exit-code: the lock is held, the command was not started
_SAFE_DIR_RE = __import__("re").compile(r"^/[A-Za-z0-9_.@/\-]+\Z")
_NAME_RE = __import__("re").compile(r"^[a-z][a-z0-9\-]{0,63}\Z")
# Runs inside the new session: `$$` is the session's and process group's id; it is recorded, then the
# command replaces the shell (same pid, same group). Its children inherit the group.
_RECORD_AND_EXEC = 'echo "$$" > "$1.tmp" && mv -f "$1.tmp" "$1" && shift && exec "$@"'
# Stops a recorded group: TERM, up to $2 seconds of grace, then KILL; exit 0 when no member is left.
# `env kill` is procps' kill(1): the shell builtin of dash (Debian's /bin/sh) takes no negative pid.
_STOP_GROUP = ('[ -s "$1" ] || exit 0; g=$(cat "$1"); case "$g" in *[!0-9]*|"") exit 3;; esac; '
               'env kill -0 -- "-$g" 2>/dev/null || exit 0; env kill -TERM -- "-$g" 2>/dev/null; i=0; '
               'while env kill -0 -- "-$g" 2>/dev/null; do i=$((i+1)); [ "$i" -gt "$2" ] && break; sleep 1; done; '
               'env kill -0 -- "-$g" 2>/dev/null || exit 0; env kill -KILL -- "-$g" 2>/dev/null; sleep 1; '
               '! env kill -0 -- "-$g" 2>/dev/null')


class AlreadyRunning(RuntimeError):
    """The host-side lock is held: an earlier run of the command is still going; nothing was started."""


class RemoteTimeout(RuntimeError):
    """A supervised command outlived its timeout and was stopped (not retried: it had started)."""


class CommandInterrupted(RuntimeError):
    """A supervised command lost its session or was cancelled after it started; it was stopped."""


@dataclass(frozen=True)
class Supervision:
    """Where a supervised command keeps its lock and its recorded process group on the host."""

    control_dir: str
    name: str

    def __post_init__(self) -> None:
        if not _SAFE_DIR_RE.match(self.control_dir) or ".." in self.control_dir.split("/"):
            raise ValueError(f"bad control_dir {self.control_dir!r}: an absolute path of [A-Za-z0-9_.@/-]")
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad supervision name {self.name!r}")

    @property
    def lock(self) -> str:
        return f"{self.control_dir.rstrip('/')}/{self.name}.lock"

    @property
    def pgid_file(self) -> str:
        return f"{self.control_dir.rstrip('/')}/{self.name}.pgid"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` under the lock, in a new session whose process group id is recorded first."""
        return ["flock", "--nonblock", "--conflict-exit-code", str(LOCKED_EXIT), self.lock,
                "setsid", "--wait", "sh", "-c", _RECORD_AND_EXEC, "sh", self.pgid_file, *argv]

    def stop_argv(self, grace_s: int) -> list[str]:
        return ["sh", "-c", _STOP_GROUP, "sh", self.pgid_file, str(int(grace_s))]

    def idle_argv(self) -> list[str]:
        """Exits 0 when the lock is free (nothing runs), LOCKED_EXIT when it is held."""
        return ["flock", "--nonblock", "--conflict-exit-code", str(LOCKED_EXIT), self.lock, "true"]


async def stop_supervised(connect_kwargs: dict[str, Any], sup: Supervision, grace_s: int = 30,
                          settle_s: float = 10.0) -> dict:
    """From a second session: stop the recorded process group, then check the lock is free again.

    Returns {"pgid", "stopped"}; `stopped` is False when something still holds the lock."""
    async with connect(connect_kwargs) as conn:
        pgid = await run_command(conn, ["cat", "--", sup.pgid_file], timeout_s=30, check=False)
        r = await run_command(conn, sup.stop_argv(grace_s), timeout_s=grace_s + 60, check=False)
        deadline = time.monotonic() + settle_s
        while True:  # the lock's holders (flock, the group) exit just after the group is gone
            idle = await run_command(conn, sup.idle_argv(), timeout_s=30, check=False)
            if idle.exit_status == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    return {"pgid": (pgid.stdout or [""])[0].strip() or None, "stopped": r.exit_status == 0 and idle.exit_status == 0}


def _stop_now(connect_kwargs: dict[str, Any], sup: Supervision, grace_s: int) -> dict:
    """`stop_supervised` on its own thread and event loop: it runs to the end even while the caller's task
    is being cancelled (a cancel scope would cut every await of the caller's loop)."""
    import threading

    box: dict = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(stop_supervised(connect_kwargs, sup, grace_s))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name=f"stop-{sup.name}", daemon=True)
    t.start()
    t.join(grace_s + 180)
    if "result" in box:
        return box["result"]
    return {"pgid": None, "stopped": False, "error": f"{type(box.get('error')).__name__}: {box.get('error')}"}


async def run_supervised(
    conn: Any,
    connect_kwargs: dict[str, Any],
    argv: Sequence[str],
    sup: Supervision,
    *,
    timeout_s: float,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    redact: Redactor | Iterable[str] | None = None,
    on_line: Callable[[str], None] | None = None,
    stop_grace_s: int = 30,
    check: bool = True,
) -> CommandResult:
    """Run `argv` on `conn` under `sup` (lock + recorded process group).

    - The lock is held: `AlreadyRunning`, nothing started (a retry never starts a second copy).
    - The session could not start the command: `SessionLost(started=False)`, transient.
    - Timeout, cancellation or a session lost after the start: a second session (`connect_kwargs`)
      stops the group and checks it stopped; then `RemoteTimeout` / `CommandInterrupted` (never
      retried), or the cancellation goes on.
    """
    redactor = as_redactor(redact)
    await run_command(conn, ["mkdir", "-p", "-m", "0700", "--", sup.control_dir], timeout_s=30, redact=redactor)
    shown = redactor.text(quote_argv(argv))
    # The errors raised after a start are raised outside the `except` blocks, without a cause or
    # context: the retry policy follows causes, and a lost session (transient) must not make a
    # command that had started look retryable.
    interrupted: str | None = None
    try:
        result = await run_command(conn, sup.argv(argv), timeout_s=timeout_s, logger=logger, redact=redactor,
                                   check=False, on_line=on_line)
    except SessionLost as exc:
        if not exc.started:
            raise
        interrupted = f"the SSH session was lost while `{shown}` ran ({exc})"
    except TimeoutError:
        interrupted = f"`{shown}` did not finish within {timeout_s:.0f}s"
    except BaseException:  # cancelled (Prefect timeout or cancellation): stop the remote command first
        _stop_now(connect_kwargs, sup, stop_grace_s)
        raise
    if interrupted is not None:
        stopped = await asyncio.to_thread(_stop_now, connect_kwargs, sup, stop_grace_s)
        if interrupted.startswith("the SSH session"):
            raise CommandInterrupted(f"{interrupted}; {_stopped_text(stopped, sup)}; it is not started again "
                                     "automatically")
        raise RemoteTimeout(f"{interrupted}; {_stopped_text(stopped, sup)}")
    if result.exit_status == LOCKED_EXIT:
        raise AlreadyRunning(f"`{shown}` was not started: {sup.lock} on the host is held by an earlier run that is "
                             f"still going (its process group is in {sup.pgid_file}); wait for it or stop it")
    if check and result.exit_status != 0:
        raise RemoteCommandError(redactor.value(list(argv)), result.exit_status,
                                 (result.stdout + result.stderr)[-200:])
    return result


def _stopped_text(stopped: dict, sup: Supervision) -> str:
    if stopped.get("stopped"):
        return f"its process group {stopped.get('pgid')} on the host was stopped and the lock is free"
    return (f"its process group ({stopped.get('pgid') or 'see ' + sup.pgid_file}) could NOT be confirmed stopped "
            f"({stopped.get('error', 'the lock is still held')}): check the host (`kill -- -<pgid>`)")
