"""Running commands on a host over SSH (asyncssh): argv lists, quoted, streamed, with timeouts.

`run_command(conn, argv)` joins `argv` with `shlex.quote` (never a shell string built from
parameters), streams each output line to the Prefect run logger as it arrives, keeps the last
lines for the error message, and raises:

- `RemoteCommandError` for a non-zero exit (not retried: the command ran and failed),
- `SessionLost` (a `TransientError`) when the session drops before an exit status arrives,
- `TimeoutError` when the command outlives `timeout_s` (the remote process gets SIGTERM first).

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
from typing import Any, AsyncIterator, Iterable, Sequence

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
    """The SSH session ended before the command reported an exit status (network, sshd restart)."""


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
            if logger is not None and log_output and line.strip():
                logger.log(level, "%s", line)

    try:
        proc = await conn.create_process(command, encoding="utf-8", errors="replace")
    except (asyncssh.Error, OSError) as exc:
        raise SessionLost(redactor.text(f"could not start `{command}`: {exc}")) from exc
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(pump(proc.stdout, out, logging.INFO), pump(proc.stderr, err, logging.WARNING))
            completed = await proc.wait(check=False)
    except TimeoutError:
        proc.terminate()
        proc.close()
        raise TimeoutError(f"`{shown}` did not finish within {timeout_s:.0f}s; it was sent SIGTERM") from None
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
