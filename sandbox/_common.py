"""What the sandbox's parts share: ports, waits, readiness probes, processes and stand-in secrets.

A leaf module: it imports nothing from the sandbox, and every component (`sandbox/argo.py`,
`gitlab_host.py`, `prometheus.py`, `s3.py`, `webhook.py`, ...) takes its helpers from here, never
from the orchestrator `sandbox/platform.py` or from another component. The demo uses the same
process helpers, so a process is started, recorded and stopped one way everywhere.

Stand-in secrets: `new_secret()` is the one way one is made (`secrets.token_urlsafe`), and
`stand_in_secret(state_dir, name)` the one place one is kept: ``<state>/secrets/<name>``, a file of
mode 0600 in a folder of mode 0700. Nothing else in the state directory holds a secret value;
``state.json`` and ``platform.yaml`` hold references (the file path, the env variable's name).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

PYTHON = sys.executable
SECRETS_DIR = "secrets"  # under the state directory, mode 0700


class SandboxError(RuntimeError):
    pass


class SandboxLike(Protocol):
    """What a component needs of the sandbox it is part of (`sandbox.platform.Sandbox` is one)."""

    state_dir: Path
    gpu_nodes: int | None
    scrape_interval_s: int | None
    config: dict[str, Any]
    urls: dict[str, str]
    extra: dict[str, Any]
    secrets: dict[str, str]  # secret name -> its file, what state.json records

    def path(self, *parts: str) -> Path: ...

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen: ...

    def log_of(self, name: str) -> Path: ...

    def secret(self, name: str, *, prefix: str = "", env: bool = True) -> str: ...

    def secret_file(self, name: str) -> Path: ...


# -- ports and readiness ---------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int, *, below_ephemeral: bool = False) -> list[int]:
    """`count` different ports nothing listens on at 127.0.0.1 right now (`free_port()` may hand out the same
    one twice in a row). `below_ephemeral`: from 20000-32000, under Linux's ephemeral range (`ip_local_port_range`
    32768-60999, kernel docs *ip-sysctl*): a stopped server's port is then never taken by some connection's
    source port before it starts again (an etcd member's peers keep dialling it), which an ephemeral one can be."""
    import random

    ports: set[int] = set()
    for _ in range(200 * count):
        if len(ports) == count:
            return sorted(ports)
        if not below_ephemeral:
            ports.add(free_port())
            continue
        port = random.randint(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.add(port)
    if len(ports) == count:
        return sorted(ports)
    raise RuntimeError(f"no {count} free ports" + (" in 20000-32000" if below_ephemeral else ""))


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port (a connect succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    """Poll `check` until it returns True; `SandboxError` (with the log's tail) if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SandboxError(f"{what} exited with code {proc.returncode} while starting:\n{_tail(log)}")
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    raise SandboxError(f"{what} was not ready within {timeout_s:.0f}s\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-2000:] if log and log.exists() else ""


def http_ok(url: str) -> Callable[[], bool]:
    """Readiness probe: the URL answers with a status below 500."""
    return lambda: httpx.get(url, timeout=2.0).status_code < 500


def tcp_banner(port: int, prefix: bytes, host: str = "127.0.0.1") -> Callable[[], bool]:
    """Readiness probe: a connection to host:port is greeted with `prefix` (sshd's ``SSH-``)."""

    def check() -> bool:
        with socket.create_connection((host, port), timeout=1) as s:
            return s.recv(64).startswith(prefix)

    return check


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if not path:
        raise SandboxError(f"{name} not found: install the Debian package {package!r} (make install does)")
    return path


# -- processes -------------------------------------------------------------------------------


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_held = 0
_pending: list[int] = []


class StopRequested(KeyboardInterrupt):
    """Raised by `on_stop_signal` (SIGINT, SIGTERM, SIGHUP): unwinds like Ctrl-C, so `finally` blocks stop what
    was started."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def on_stop_signal(signum: int, _frame: Any) -> None:
    """Signal handler (the demo installs it for STOP_SIGNALS): raise `StopRequested`, or, inside
    `holding_stop_signals`, when the held section ends."""
    if _held:
        _pending.append(signum)
        return
    raise StopRequested(signum)


@contextlib.contextmanager
def holding_stop_signals():
    """A process is started and recorded inside this, so that a stop request cannot fall between the two
    and leave a process nobody knows about (it is acted on right after). Only with `on_stop_signal` installed."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if not _held and _pending:
        signum = _pending[0]
        _pending.clear()
        raise StopRequested(signum)


def spawn(argv: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `argv` in its own session (so its whole process group can be stopped), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd) if cwd else None, start_new_session=True)


def process_record(proc: subprocess.Popen | int, argv: list[str], log: Path | None = None) -> dict[str, Any]:
    """What is kept of a started process: pid, start time (guards against a reused pid), argv, log."""
    pid = proc if isinstance(proc, int) else proc.pid
    record: dict[str, Any] = {"pid": pid, "start": start_time(pid), "argv": argv}
    if log is not None:
        record["log"] = str(log)
    return record


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process' start time in clock ticks since boot (/proc/PID/stat field 22), None if gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True while `pid` runs (a zombie does not) and, given `start`, is still the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return False
    return start is None or int(fields[19]) == start


def _members(leader: int, start: int | None) -> set[int]:
    """The processes to stop with `leader`: its session (started after it) and, while it runs, its descendants
    (a Prefect worker starts each flow run in a session of its own)."""
    me = os.getpid()
    table: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, session, start)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[0] != "Z":
                table[int(entry)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    found = {pid for pid, (_, sid, began) in table.items() if sid == leader and (start is None or began >= start)}
    if leader in table and (start is None or table[leader][2] == start):
        found.add(leader)
        frontier = [leader]
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, _, _) in table.items():
                if ppid == parent and pid not in found:
                    found.add(pid)
                    frontier.append(pid)
    found.discard(me)
    return found


def stop_process(pid: int, start: int | None = None, timeout_s: float = 5.0) -> bool:
    """Stop a process started by `spawn` with everything it started: SIGTERM to each process group, then
    SIGKILL to what is left after `timeout_s`; waits until they are gone. True if something was running.
    With `start` (from `process_record`), a pid that now belongs to another process is left alone."""
    members = _members(pid, start)
    if not members:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = {g for g in (_safe(os.getpgid, p) for p in members) if g is not None}
        for group in groups - {os.getpgrp()}:
            _safe(os.killpg, group, sig)
        for p in members:
            _safe(os.kill, p, sig)
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline:
            for p in members:  # reap our own children so they do not linger as zombies
                _safe(os.waitpid, p, os.WNOHANG)
            members = {p for p in members if pid_alive(p)}
            if not members:
                return True
            time.sleep(0.05)
    return True


def _safe(fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except (ProcessLookupError, PermissionError, ChildProcessError):
        return None


# -- stand-in secrets ------------------------------------------------------------------------


def new_secret(prefix: str = "") -> str:
    """The one way a stand-in secret is made: a fresh random token, never a literal."""
    return prefix + secrets.token_urlsafe(24)


def secrets_dir(state_dir: Path) -> Path:
    """``<state>/secrets``, created with mode 0700 (and kept so)."""
    d = Path(state_dir) / SECRETS_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def write_secret_file(path: Path, data: bytes) -> None:
    """Write `data` to a file created with mode 0600 (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def stand_in_secret(state_dir: Path, name: str, prefix: str = "") -> tuple[str, Path]:
    """The secret `name` of the sandbox in `state_dir` and its file: made by `new_secret` on first use,
    read back from ``<state>/secrets/<name>`` afterwards (a restarted stand-in keeps its token)."""
    path = secrets_dir(state_dir) / name
    if not path.exists():
        write_secret_file(path, new_secret(prefix).encode())
    return path.read_text(), path


def read_secrets(state_dir: Path) -> dict[str, str]:
    """Every secret kept in ``<state>/secrets`` whose name is an environment variable's (SANDBOX_*),
    for a process that resolves the platform config's ``{env: NAME}`` references (the demo's children)."""
    d = Path(state_dir) / SECRETS_DIR
    if not d.is_dir():
        return {}
    return {p.name: p.read_text() for p in sorted(d.iterdir()) if p.name.startswith("SANDBOX_") and p.is_file()}


# -- emulated hosts over SSH -----------------------------------------------------------------


def client_key_pair(sb: SandboxLike, name: str, public: Path, comment: str) -> tuple[Path, str]:
    """The ed25519 key a project client logs in to emulated hosts with: the private key is the stand-in
    secret `name` (0600 under `<state>/secrets/`), its public line kept at `public`. Made once per state
    folder, reused by a restarted component. Returns (private key path, public key line)."""
    import asyncssh

    key_path = secrets_dir(sb.state_dir) / name
    if not key_path.exists() or not public.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        write_secret_file(key_path, key.export_private_key())
        public.parent.mkdir(parents=True, exist_ok=True)
        key.write_public_key(str(public))
    sb.secrets[name] = str(key_path)
    return key_path, public.read_text().strip()


def start_key_only_sshd(sb: SandboxLike, name: str, folder: Path, public_key: str, env: dict[str, str]) -> tuple[int, Path]:
    """A real OpenSSH `sshd` on 127.0.0.1:<free port> for an emulated host: key-only, root allowed by key,
    its own ed25519 host key pinned in a known_hosts file, `env` set for every session (`SetEnv`: PATH
    with the host's stand-in commands first, the host's root folder). Process `sshd-<name>`.
    Returns (port, known_hosts path). Like production servers, it does not deliver a client's signal
    requests (OpenSSH `session.c`: "session signalling requires privilege separation")."""
    import asyncssh

    sshd = require_binary("sshd", "openssh-server")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # sshd refuses a host key that others can read
    host_key = folder / "ssh_host_ed25519_key"
    if not host_key.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        write_secret_file(host_key, key.export_private_key())
        key.write_public_key(str(host_key) + ".pub")
    authorized = folder / "authorized_keys"
    authorized.write_text(public_key + "\n")
    os.chmod(authorized, 0o600)
    port = free_port()
    set_env = " ".join(f"{k}={v}" for k, v in env.items())
    config = folder / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {host_key}", f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}", "AuthenticationMethods publickey", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "StrictModes no", "UsePAM no", "PrintMotd no", "PrintLastLog no", "X11Forwarding no",
        "AllowTcpForwarding no", "PermitUserEnvironment no", "Subsystem sftp internal-sftp",
        "MaxStartups 50:30:100", "MaxSessions 20", "LogLevel ERROR", f"SetEnv {set_env}" if set_env else "", "",
    ]))
    proc = sb.spawn(f"sshd-{name}", [sshd, "-D", "-e", "-f", str(config)])
    wait_for(tcp_banner(port, b"SSH-"), f"sshd for emulated host {name}", 20, proc, sb.log_of(f"sshd-{name}"))
    known_hosts = folder / "known_hosts"
    key_type, key_b64 = Path(str(host_key) + ".pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")
    return port, known_hosts
