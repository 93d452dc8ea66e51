"""Stand-in for omnibus GitLab's `gitlab-backup`, `gitlab-ctl` and `gitlab-rake` (sandbox only).

Every GitLab path lives under a host root ($GITLAB_SANDBOX_ROOT) laid out like omnibus:

    etc/gitlab/gitlab.rb, etc/gitlab/gitlab-secrets.json (root, 0600), etc/gitlab/config_backup/
    var/opt/gitlab/backups/            <backup id>_gitlab_backup.tar (owned by git, 0600), dir git 0700
    var/opt/gitlab/state/projects.json what the API stand-in serves (the "database"), owned by git
    var/opt/gitlab/state/services.json puma/sidekiq/... run or down
    var/log/gitlab/gitlab-rails/backup_json.log  Gitlab::BackupLogger's JSON log, owned by git
    opt/gitlab/version-manifest.txt    "gitlab-ee 17.0.1": the installed version and edition
    faults/<command>.json              {"kind": ..., "times": N, "seconds": S}: make the next N runs fail

How it models omnibus (each rule cites its source):
- `gitlab-ctl` runs as root (the SSH user); `gitlab-backup create/restore` run the Rake task as the
  `git` user ($GITLAB_SANDBOX_USER; omnibus' `gitlab-rake` wrapper runs `chpst -u git:git`), so
  archives belong to git and a restore reads the archive as git: a root-owned 0600 archive cannot
  be opened, and an archive not owned by git is refused (docs *Restore GitLab*: "The backup file
  needs to be owned by the git user"). The git side works from the backup directory (GitLab:
  `Dir.chdir(backup_path)`) and the state directory, opened before dropping privileges.
- archives are written with `gitlab_rails['backup_archive_permissions']` (default 0600; docs
  *Back up GitLab*, "Backup archive permissions"); ids are `<epoch>_<YYYY_MM_DD>_<Gitlab::VERSION>`
  or `BACKUP=<name>` (lib/backup/manager.rb `build_backup_information`).
- a disabled task (the registry without `registry_external_url`, or `registry['enable'] = false`:
  lib/backup/tasks/registry.rb `enabled`) logs "Dumping container registry images ... [DISABLED]",
  is absent from the archive and is not listed under `:skipped:` (which holds SKIP= only); a GitLab
  without repositories writes no `repositories/` entry (`destination_optional`).
- `CRON=1` silences progress output; errors still go to stderr; every message also goes to
  `backup_json.log` as JSON (lib/gitlab/backup_logger.rb).
- one backup or restore at a time: a lock on `backup_restore.pid` (lib/tasks/gitlab/backup.rake).
- a restore needs `force=yes` (or prompts), the same version (lib/backup/manager.rb
  `verify_backup_version`), and fails while puma or sidekiq hold database connections.
- `gitlab-ctl reconfigure` applies gitlab.rb: services with `<svc>['enable'] = false` go down and
  leave `gitlab-ctl status`; every enabled service is (re)started (runit).
- `gitlab-rake gitlab:check` and `gitlab:doctor:secrets` print their failures and exit 0;
  `gitlab:env:info` prints the installed version (it needs the database, not puma).
Stdlib only: it runs under whatever python the sshd session finds.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import pwd
import re
import signal
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(os.environ.get("GITLAB_SANDBOX_ROOT", "/nonexistent"))
ETC = ROOT / "etc" / "gitlab"
BACKUPS = ROOT / "var" / "opt" / "gitlab" / "backups"
CONFIG_BACKUPS = ETC / "config_backup"
STATE = ROOT / "var" / "opt" / "gitlab" / "state"
RAILS_LOG = ROOT / "var" / "log" / "gitlab" / "gitlab-rails"
PID_FILE = ROOT / "opt" / "gitlab" / "embedded" / "service" / "gitlab-rails" / "tmp" / "backup_restore.pid"
SERVICE_USER = os.environ.get("GITLAB_SANDBOX_USER", "git")
ARCHIVE_SUFFIX = "_gitlab_backup.tar"
# lib/backup/manager.rb `backup_tasks` (GitLab 17.0) and each task's human name.
COMPONENTS = {"db": "database", "repositories": "repositories", "uploads": "uploads", "builds": "builds",
              "artifacts": "artifacts", "pages": "pages", "lfs": "lfs objects", "terraform_state": "terraform states",
              "registry": "container registry images", "packages": "packages", "ci_secure_files": "ci secure files"}
SERVICES = ["alertmanager", "gitaly", "gitlab-workhorse", "logrotate", "nginx", "postgresql", "puma", "redis",
            "sidekiq"]
CRON = False


def _log(severity: str, msg: str) -> None:
    """Gitlab::BackupLogger: every message to backup_json.log (the fd is opened before privileges drop)."""
    line = json.dumps({"severity": severity, "time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                       "correlation_id": None, "message": msg}) + "\n"
    if _LOG_FD is not None:
        os.write(_LOG_FD, line.encode())


_LOG_FD: int | None = None


def say(msg: str, err: bool = False) -> None:
    _log("ERROR" if err else "INFO", msg)
    if CRON and not err:  # CRON=1: "hides all progress output if there aren't any errors"
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"{stamp} -- {msg}", file=sys.stderr if err else sys.stdout, flush=True)


def fail(msg: str) -> None:
    _log("ERROR", msg)
    print(msg, file=sys.stderr, flush=True)


def log_command(argv: list[str]) -> None:
    with open(STATE / "commands.log", "a") as f:
        f.write(json.dumps({"at": time.time(), "argv": argv}) + "\n")


def installed_version() -> tuple[str, str]:
    """('17.0.1', 'ee') from version-manifest.txt's first line, as omnibus writes it."""
    first = (ROOT / "opt" / "gitlab" / "version-manifest.txt").read_text().splitlines()[0]
    name, version = first.split()
    return version, "ee" if name.endswith("-ee") else "ce"


def version_string() -> str:
    version, edition = installed_version()
    return f"{version}-ee" if edition == "ee" else version


def take_fault(command: str) -> dict | None:
    """The fault armed for `command` (consumed: each run uses up one of its `times`)."""
    path = ROOT / "faults" / f"{command}.json"
    if not path.exists():
        return None
    fault = json.loads(path.read_text())
    times = int(fault.get("times", 1))
    if times <= 1:
        path.unlink()
    else:
        path.write_text(json.dumps(dict(fault, times=times - 1)))
    return fault


def services() -> dict[str, str]:
    path = STATE / "services.json"
    return json.loads(path.read_text()) if path.exists() else {s: "run" for s in SERVICES}


def set_services(state: dict[str, str]) -> None:
    (STATE / "services.json").write_text(json.dumps(state))


def gitlab_rb() -> str:
    p = ETC / "gitlab.rb"
    return p.read_text() if p.exists() else ""


def rb_setting(section: str, key: str) -> str | None:
    """The last uncommented `section['key'] = value` of gitlab.rb."""
    value = None
    for line in gitlab_rb().splitlines():
        m = re.match(rf"^\s*{re.escape(section)}\[['\"]{re.escape(key)}['\"]\]\s*=\s*(.+?)\s*(#.*)?$", line)
        if m:
            value = m[1].strip().strip("'\"")
    return value


def enabled_services() -> list[str]:
    """omnibus: `<service>['enable'] = false` in gitlab.rb leaves the service out after reconfigure."""
    return [s for s in SERVICES if rb_setting(s.replace("-", "_"), "enable") != "false"]


def registry_enabled() -> bool:
    """Omnibus enables the registry only with `registry_external_url` (docs *GitLab container registry
    administration*), unless `registry['enable'] = false` / `gitlab_rails['registry_enabled'] = false`."""
    if rb_setting("registry", "enable") == "false" or rb_setting("gitlab_rails", "registry_enabled") == "false":
        return False
    return bool(re.search(r"^\s*registry_external_url\s+['\"]", gitlab_rb(), re.M))


def key_fingerprint() -> str:
    """What the database's encrypted columns were encrypted with: a digest of db_key_base."""
    try:
        base = json.loads((ETC / "gitlab-secrets.json").read_text())["gitlab_rails"]["db_key_base"]
    except (OSError, ValueError, KeyError):
        return "none"
    return hashlib.sha256(base.encode()).hexdigest()[:16]


def drop_ssh_session() -> None:
    """Kill the sshd session process this command runs under: the client sees the connection drop."""
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)
        comm = fields[0].split("(", 1)[1]
        ppid = int(fields[1].split()[1])
        if comm.startswith("sshd"):
            os.kill(pid, signal.SIGKILL)
            return
        pid = ppid


def as_service_user(fn, *args) -> int:
    """Run `fn(state_fd, *args)` as the git user, in a child, from the backup directory (GitLab's
    `Dir.chdir(backup_path)`); the state directory and the backup log are opened before privileges drop."""
    global _LOG_FD
    RAILS_LOG.mkdir(parents=True, exist_ok=True)
    _LOG_FD = os.open(RAILS_LOG / "backup_json.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    state_fd = os.open(STATE, os.O_RDONLY | os.O_DIRECTORY)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(BACKUPS)
            if os.geteuid() == 0:
                user = pwd.getpwnam(SERVICE_USER)
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
            code = fn(state_fd, *args)
        except BaseException as exc:  # noqa: BLE001 - the child reports and exits
            print(f"rake aborted!\n{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    return os.waitstatus_to_exitcode(status) if status else 0


def _lock() -> int | None:
    """One backup or restore at a time (lib/tasks/gitlab/backup.rake: `backup_restore.pid` lock)."""
    PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(PID_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"Backup or restore is already running (see {PID_FILE}): try again when it has finished")
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _read_state(state_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=state_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _write_state(state_fd: int, name: str, data: bytes) -> None:
    fd = os.open(f"{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=state_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(f"{name}.tmp", name, src_dir_fd=state_fd, dst_dir_fd=state_fd)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _filler(size: int) -> io.RawIOBase:
    class Filler(io.RawIOBase):
        left = size

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            n = min(len(b), self.left)
            b[:n] = os.urandom(n) if n <= 65536 else os.urandom(65536) * (n // 65536) + os.urandom(n % 65536)
            self.left -= n
            return n

    return Filler()


# --- gitlab-backup ----------------------------------------------------------------------------


def backup_create(opts: dict[str, str]) -> int:
    if not services().get("postgresql") == "run":
        say("Dumping PostgreSQL database gitlabhq_production ... [FAILED]", err=True)
        print("rake aborted!\nPG::ConnectionBad: could not connect to server", file=sys.stderr)
        return 1
    skipped = [s for s in opts.get("SKIP", "").split(",") if s]
    unknown = [s for s in skipped if s not in list(COMPONENTS) + ["tar", "remote"]]
    if unknown:
        print(f"rake aborted!\nInvalid SKIP value(s): {','.join(unknown)}", file=sys.stderr)
        return 1
    fault = take_fault("gitlab-backup-create") or {}
    plan = {
        "skipped": skipped, "version": version_string(), "registry": registry_enabled(),
        "perms": int(rb_setting("gitlab_rails", "backup_archive_permissions") or "0600", 8),
        "key": key_fingerprint(), "custom": os.path.basename(opts["BACKUP"]) if opts.get("BACKUP") else None,
    }
    lock = _lock()
    if lock is None:
        return 1
    if fault.get("kind") == "ssh-drop":  # the network drops the session (root may kill sshd; git may not)
        drop_ssh_session()
    return as_service_user(_create_as_git, plan, fault)


def _create_as_git(state_fd: int, plan: dict, fault: dict) -> int:
    """The Rake task's part, as git, from the backup directory (relative names)."""
    kind = fault.get("kind")
    version, skipped = plan["version"], plan["skipped"]
    while True:
        epoch = int(time.time())
        backup_id = plan["custom"] or f"{epoch}_{time.strftime('%Y_%m_%d', time.gmtime(epoch))}_{version}"
        archive = f"{backup_id}{ARCHIVE_SUFFIX}"
        if plan["custom"] or not os.path.exists(archive):
            break
        time.sleep(0.3)
    projects = json.loads(_read_state(state_fd, "projects.json"))
    say("Dumping database ... ")
    say("Dumping PostgreSQL database gitlabhq_production ... ")
    if kind == "ssh-drop":  # the session is gone; the backup goes on, unsupervised unless stopped
        time.sleep(float(fault.get("seconds", 5)))
    if kind == "hang":  # a backup of a large GitLab: hours of silence with CRON=1
        time.sleep(float(fault.get("seconds", 600)))
    say("Dumping PostgreSQL database gitlabhq_production ... done")
    tmp = f"tmp-{backup_id}.partial"
    if kind == "disk-full":
        with open(tmp, "wb") as f:
            f.write(b"\0" * 4096)
        say("Dumping repositories ... ")
        fail(f"tar: {tmp}: Cannot write: No space left on device")
        fail("tar: Error is not recoverable: exiting now")
        os.unlink(tmp)
        fail("Backup failed")
        fail(f"rake aborted!\nErrno::ENOSPC: No space left on device @ io_write - {archive}")
        return 1
    try:
        size = int(_read_state(state_fd, "data_bytes"))
    except (OSError, ValueError):
        size = 262144
    info = {
        ":backup_id": backup_id,
        ":db_version": 20240508085441,
        ":backup_created_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch)),
        ":gitlab_version": version,
        ":tar_version": "tar (GNU tar) 1.34",
        ":installation_type": "omnibus-gitlab",
        ":skipped": ",".join(skipped),
        ":repositories_server_side": False,
    }
    info_yml = "---\n" + "".join(f"{k}: {json.dumps(v) if isinstance(v, bool) else v}\n" for k, v in info.items())
    old = os.umask(0o077)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, plan["perms"])
    os.umask(old)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _add_bytes(tar, "backup_information.yml", info_yml.encode())
        for comp, human in COMPONENTS.items():
            if comp == "registry" and not plan["registry"]:
                say(f"Dumping {human} ... [DISABLED]")
                continue
            if comp in skipped:
                say(f"Dumping {human} ... [SKIPPED]")
                continue
            say(f"Dumping {human} ... ")
            if comp == "db":
                body = json.dumps({"projects": projects, "encrypted_with": plan["key"]}).encode()
                _add_bytes(tar, "db/database.sql.gz", gzip.compress(body, 1))
            elif comp == "repositories":
                if projects:  # destination_optional: no repositories, no entry
                    entry = tarfile.TarInfo("repositories/@hashed/6b/86/6b86b273ff34fce19d6b804eff5a3f57.bundle")
                    entry.size, entry.mtime, entry.mode = size, epoch, 0o600
                    tar.addfile(entry, io.BufferedReader(_filler(size), 1 << 20))
            else:
                _add_bytes(tar, f"{comp}.tar.gz", gzip.compress(f"{comp}\n".encode()))
            say(f"Dumping {human} ... done")
    say(f"Creating backup archive: {archive} ... ")
    os.chmod(tmp, plan["perms"])
    if kind == "corrupt":  # a short write nobody noticed: the archive ends in the middle of a member
        with open(tmp, "r+b") as f:
            f.truncate(os.path.getsize(tmp) // 2)
    os.replace(tmp, archive)
    say(f"Creating backup archive: {archive} ... done")
    say("Uploading backup archive to remote storage  ... [SKIPPED]")
    say("Deleting old backups ... [SKIPPED]")
    say(f"Backup {backup_id} is done.")
    return 0


def backup_restore(opts: dict[str, str]) -> int:
    backup_id = opts.get("BACKUP")
    archives = sorted(p.name for p in BACKUPS.glob(f"*{ARCHIVE_SUFFIX}"))
    if not backup_id:
        if len(archives) != 1:
            print("Found more than one backup:\n" + "\n".join(" " + a[: -len(ARCHIVE_SUFFIX)] for a in archives),
                  file=sys.stderr)
            print("Please specify which one you want to restore:\nrake gitlab:backup:restore "
                  "BACKUP=timestamp_of_backup", file=sys.stderr)
            return 1
        backup_id = archives[0][: -len(ARCHIVE_SUFFIX)]
    plan = {"backup_id": os.path.basename(backup_id), "version": version_string(), "force": opts.get("force"),
            "running": [s for s in ("puma", "sidekiq") if services().get(s) == "run"],
            "registry": registry_enabled(), "skip": [s for s in opts.get("SKIP", "").split(",") if s]}
    lock = _lock()
    if lock is None:
        return 1
    fault = take_fault("gitlab-backup-restore") or {}
    return as_service_user(_restore_as_git, plan, fault)


def _restore_as_git(state_fd: int, plan: dict, fault: dict) -> int:
    archive = f"{plan['backup_id']}{ARCHIVE_SUFFIX}"
    if not os.path.isfile(archive):
        fail(f"The backup file {archive} does not exist!")
        return 1
    st = os.stat(archive)
    if st.st_uid != os.geteuid():
        # docs *Restore GitLab*: "The backup file needs to be owned by the git user"
        fail(f"The backup file {archive} is owned by uid {st.st_uid}, not by {SERVICE_USER}: "
             f"chown {SERVICE_USER}:{SERVICE_USER} it before restoring")
        return 1
    say("Unpacking backup ... ")
    try:
        with tarfile.open(archive) as tar:  # as git: a root-owned 0600 archive cannot even be opened
            info_text = tar.extractfile("backup_information.yml").read().decode()
            db = tar.extractfile("db/database.sql.gz").read()
            names = set(tar.getnames())
    except PermissionError as exc:
        fail(f"tar: {archive}: Cannot open: {exc.strerror}")
        fail("Unpacking backup failed")
        return 1
    except (tarfile.TarError, KeyError, EOFError, OSError) as exc:
        fail(f"Unpacking backup failed: {exc}")
        return 1
    say("Unpacking backup ... done")
    info = dict(line.split(": ", 1) for line in info_text.splitlines() if ": " in line)
    backup_version = info.get(":gitlab_version", "").strip()
    if backup_version != plan["version"]:
        fail("GitLab version mismatch:\n"
             f"  Your current GitLab version ({plan['version']}) differs from the GitLab version in the backup!\n"
             "  Please switch to the following version and try again:\n"
             f"  version: {backup_version}\n\nHint: git checkout v{backup_version}")
        return 1
    if plan["force"] != "yes" and os.environ.get("GITLAB_ASSUME_YES") != "1":
        fail("Do you want to continue (yes/no)? Quitting...")
        return 1
    say("Restoring database ... ")
    if plan["running"]:  # puma and sidekiq hold connections: the database cannot be dropped
        fail(f"ERROR:  database \"gitlabhq_production\" is being accessed by other users ({', '.join(plan['running'])}"
             " running)\nrake aborted!\nRestore failed: stop puma and sidekiq first")
        return 1
    data = json.loads(gzip.decompress(db))
    projects, key = (data, None) if isinstance(data, list) else (data["projects"], data.get("encrypted_with"))
    if fault.get("kind") == "fail":  # psql failed part-way: some tables are already gone
        _write_state(state_fd, "projects.json", b"[]")
        fail("ERROR:  relation \"projects\" does not exist")
        fail("rake aborted!\nRestore failed: psql exited with 3")
        return 1
    _write_state(state_fd, "projects.json", json.dumps(projects).encode())
    if key:
        _write_state(state_fd, "encrypted_with", key.encode())
    say("Restoring database ... done")
    for comp, human in list(COMPONENTS.items())[1:]:
        if comp == "registry" and not plan["registry"]:
            say(f"Restoring {human} ... [DISABLED]")
            continue
        if comp in plan["skip"]:
            continue
        present = any(n.startswith(comp) for n in names)
        if comp == "repositories" or present:
            say(f"Restoring {human} ... ")
            say(f"Restoring {human} ... done")
    say("Restore task is done.")
    return 0


# --- gitlab-ctl -------------------------------------------------------------------------------


def ctl(args: list[str]) -> int:
    if not args:
        print("usage: gitlab-ctl COMMAND", file=sys.stderr)
        return 1
    cmd, rest = args[0], args[1:]
    state = services()
    if cmd == "backup-etc":
        path = CONFIG_BACKUPS
        if "--backup-path" in rest:
            path = Path(rest[rest.index("--backup-path") + 1])
        if (take_fault("gitlab-ctl-backup-etc") or {}).get("kind") == "disk-full":
            print("tar: Cannot write: No space left on device", file=sys.stderr)
            return 1
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        epoch = int(time.time())
        name = f"gitlab_config_{epoch}_{time.strftime('%Y_%m_%d', time.gmtime(epoch))}.tar"
        print("Running configuration backup")
        print(f"Creating configuration backup archive: {name}")
        target = path / name
        old = os.umask(0o077)
        try:
            with tarfile.open(target, "w") as tar:
                for f in sorted(ETC.iterdir()):
                    if f.is_file() and not f.name.endswith(".pre-drill"):
                        print(str(f))
                        tar.add(str(f), arcname=str(f))  # absolute names, as --absolute-names does
        finally:
            os.umask(old)
        os.chmod(target, 0o600)
        print(f"Configuration backup archive complete: {target}")
        return 0
    enabled = enabled_services()
    if cmd in ("stop", "start", "restart"):
        names = rest or (list(SERVICES) if cmd == "stop" else enabled)
        for n in names:
            if n not in SERVICES:
                print(f"{n} does not exist.", file=sys.stderr)
                return 1
            if cmd != "stop" and n not in enabled:
                print(f"{n} does not exist.", file=sys.stderr)  # runit: a disabled service has no service dir
                return 1
            state[n] = "down" if cmd == "stop" else "run"
            print(f"ok: {'down' if cmd == 'stop' else 'run'}: {n}: 0s")
        set_services(state)
        return 0
    if cmd == "status":
        down = 0
        for i, n in enumerate(SERVICES):
            if n not in enabled:
                continue
            if state.get(n) == "run":
                print(f"run: {n}: (pid {1000 + i}) 42s; run: log: (pid {900 + i}) 42s")
            else:
                down = 1
                print(f"down: {n}: 5s, normally up; run: log: (pid {900 + i}) 42s")
        return 6 if down else 0
    if cmd == "reconfigure":
        if (take_fault("gitlab-ctl-reconfigure") or {}).get("kind") == "fail":
            print("Chef Infra Client failed. 3 resources updated", file=sys.stderr)
            return 1
        print("Starting Chef Infra Client, version 18.3.0")
        print("Recipe: gitlab::default")
        for n in SERVICES:  # runit: enabled services are brought up, disabled ones removed
            state[n] = "run" if n in enabled else "down"
        set_services(state)
        print("Chef Infra Client finished, 12/800 resources updated in 15 seconds")
        print("gitlab Reconfigured!")
        return 0
    print(f"I don't know that command: {cmd}", file=sys.stderr)
    return 1


# --- gitlab-rake ------------------------------------------------------------------------------


def rake(args: list[str]) -> int:
    task = args[0] if args else ""
    if task == "gitlab:check":
        return rake_check(args)
    if task == "gitlab:doctor:secrets":
        return rake_doctor_secrets()
    if task == "gitlab:env:info":
        return rake_env_info()
    print(f"rake aborted!\nDon't know how to build task '{task}' (See the list of available tasks with "
          "`rake --tasks`)", file=sys.stderr)
    return 1


def rake_env_info() -> int:
    """`gitlab:env:info` (lib/tasks/gitlab/info.rake): boots Rails (the database, not puma) and prints the
    system's and GitLab's information; "Version:" under "GitLab information" is Gitlab::VERSION."""
    if services().get("postgresql") != "run":
        print("rake aborted!\nPG::ConnectionBad: could not connect to server", file=sys.stderr)
        return 1
    print("\nSystem information\nSystem:\t\tUbuntu 22.04\nCurrent User:\tgit\nUsing RVM:\tno\n"
          "Ruby Version:\t3.1.5p253\n")
    print(f"GitLab information\nVersion:\t{version_string()}\nRevision:\t6f3a0b1c2d4\n"
          "Directory:\t/opt/gitlab/embedded/service/gitlab-rails\nDB Adapter:\tPostgreSQL\n")
    return 0


def rake_check(args: list[str]) -> int:
    """Prints "... no" and "Try fixing it:" for a failed check and exits 0, as GitLab's does."""
    ok = True
    print("Checking GitLab subtasks ...\n")
    print("Checking GitLab Shell ...\nGitLab Shell: ... GitLab Shell version >= 14.35.0 ? ... OK (14.35.0)")
    try:
        json.loads((ETC / "gitlab-secrets.json").read_text())
        print("Secrets file present and valid? ... yes")
    except (OSError, ValueError):
        print("Secrets file present and valid? ... no\n  Try fixing it:\n  Restore gitlab-secrets.json")
        ok = False
    print("\nChecking Sidekiq ...\n")
    up = services().get("sidekiq") == "run"
    print(f"Sidekiq: ... Running? ... {'yes' if up else 'no'}")
    if not up:
        print("  Try fixing it:\n  sudo -u git -H RAILS_ENV=production bin/background_jobs start")
        ok = False
    projects = json.loads((STATE / "projects.json").read_text())
    print(f"\nChecking GitLab App ...\n\nProjects: {len(projects)}")
    if "SANITIZE=true" not in args:
        for p in projects:
            print(f"{p['path_with_namespace']} ... repository OK")
    print("\nChecking GitLab App ... Finished" if ok else "\nPlease fix the error above and rerun the checks.")
    return 0


def rake_doctor_secrets() -> int:
    """`gitlab:doctor:secrets`: rows the current secrets cannot decrypt, per model; exits 0 either way."""
    path = STATE / "encrypted_with"
    encrypted_with = path.read_text().strip() if path.exists() else key_fingerprint()
    bad = 0 if encrypted_with == key_fingerprint() else 3
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000", time.gmtime())
    pid = os.getpid()
    for msg in ("Checking encrypted values in the database", "- ApplicationSetting failures: 0",
                f"- Ci::Variable failures: {bad}", "- User failures: 0", f"Total: {bad} row(s) affected", "Done!"):
        print(f"I, [{stamp} #{pid}]  INFO -- : {msg}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    global CRON
    prog, args = argv[0], argv[1:]
    log_command([prog] + args)
    if prog == "gitlab-backup":
        if not args or args[0] not in ("create", "restore"):
            print("Usage: gitlab-backup create|restore [OPTIONS]", file=sys.stderr)
            return 1
        opts = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        CRON = bool(opts.get("CRON"))
        return backup_create(opts) if args[0] == "create" else backup_restore(opts)
    if prog == "gitlab-ctl":
        return ctl(args)
    if prog == "gitlab-rake":
        return rake(args)
    print(f"unknown stand-in {prog}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
