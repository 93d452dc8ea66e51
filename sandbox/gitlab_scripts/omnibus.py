"""Stand-in for omnibus GitLab's `gitlab-backup`, `gitlab-ctl` and `gitlab-rake` (sandbox only).

Every GitLab path lives under a host root ($GITLAB_SANDBOX_ROOT) laid out like omnibus:

    etc/gitlab/gitlab.rb, etc/gitlab/gitlab-secrets.json (0600), etc/gitlab/config_backup/
    var/opt/gitlab/backups/            <epoch>_<YYYY_MM_DD>_<version>_gitlab_backup.tar
    var/opt/gitlab/state/projects.json what the API stand-in serves (the "database")
    var/opt/gitlab/state/services.json puma/sidekiq/... run or down
    opt/gitlab/version-manifest.txt    "gitlab-ee 17.0.1": the installed version and edition
    faults/<command>.json              {"kind": ..., "times": N}: make the next N runs fail

Archives are real tar files with `backup_information.yml` and the component entries GitLab
writes; `db/database.sql.gz` carries the projects, so a restore changes what the API returns.
Stdlib only: it runs under whatever python the sshd session finds.
"""

from __future__ import annotations

import gzip
import io
import json
import os
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
COMPONENTS = ["db", "repositories", "uploads", "builds", "artifacts", "pages", "lfs", "terraform_state",
              "registry", "packages", "ci_secure_files"]
SERVICES = ["alertmanager", "gitaly", "gitlab-workhorse", "logrotate", "nginx", "postgresql", "puma", "redis",
            "sidekiq"]


def say(msg: str, err: bool = False) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"{stamp} -- {msg}", file=sys.stderr if err else sys.stdout, flush=True)


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


def take_fault(command: str) -> str | None:
    """The fault armed for `command` (consumed: each run uses up one of its `times`)."""
    path = ROOT / "faults" / f"{command}.json"
    if not path.exists():
        return None
    fault = json.loads(path.read_text())
    times = int(fault.get("times", 1))
    if times <= 1:
        path.unlink()
    else:
        fault["times"] = times - 1
        path.write_text(json.dumps(fault))
    return fault["kind"]


def services() -> dict[str, str]:
    path = STATE / "services.json"
    return json.loads(path.read_text()) if path.exists() else {s: "run" for s in SERVICES}


def set_services(state: dict[str, str]) -> None:
    (STATE / "services.json").write_text(json.dumps(state))


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
            time.sleep(5)
            return
        pid = ppid


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
    fault = take_fault("gitlab-backup-create")
    skipped = [s for s in opts.get("SKIP", "").split(",") if s]
    unknown = [s for s in skipped if s not in COMPONENTS + ["tar", "remote"]]
    if unknown:
        print(f"rake aborted!\nInvalid SKIP value(s): {','.join(unknown)}", file=sys.stderr)
        return 1
    version = version_string()
    while True:
        epoch = int(time.time())
        backup_id = f"{epoch}_{time.strftime('%Y_%m_%d', time.gmtime(epoch))}_{version}"
        archive = BACKUPS / f"{backup_id}_gitlab_backup.tar"
        if not archive.exists():
            break
        time.sleep(0.3)
    projects = (STATE / "projects.json").read_bytes()
    say("Dumping database ... ")
    say("Dumping PostgreSQL database gitlabhq_production ... ")
    if fault == "ssh-drop":
        drop_ssh_session()
    say("Dumping PostgreSQL database gitlabhq_production ... done")
    tmp = BACKUPS / f"tmp-{backup_id}.partial"
    if fault == "disk-full":
        tmp.write_bytes(b"\0" * 4096)
        say("Dumping repositories ... ")
        print(f"tar: {tmp}: Cannot write: No space left on device", file=sys.stderr)
        print("tar: Error is not recoverable: exiting now", file=sys.stderr)
        tmp.unlink()
        print("Backup failed", file=sys.stderr)
        print(f"rake aborted!\nErrno::ENOSPC: No space left on device @ io_write - {archive}", file=sys.stderr)
        return 1
    size = int((STATE / "data_bytes").read_text()) if (STATE / "data_bytes").exists() else 262144
    info = {
        ":db_version": 20240508085441,
        ":backup_created_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch)),
        ":gitlab_version": version,
        ":tar_version": "tar (GNU tar) 1.34",
        ":installation_type": "omnibus-gitlab",
        ":skipped": ",".join(skipped),
        ":repositories_server_side": False,
    }
    info_yml = "---\n" + "".join(f"{k}: {json.dumps(v) if isinstance(v, bool) else v}\n" for k, v in info.items())
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        _add_bytes(tar, "backup_information.yml", info_yml.encode())
        for comp in COMPONENTS:
            if comp in skipped:
                say(f"Dumping {comp} ... [SKIPPED]")
                continue
            say(f"Dumping {comp} ... ")
            if comp == "db":
                _add_bytes(tar, "db/database.sql.gz", gzip.compress(projects, 1))
            elif comp == "repositories":
                entry = tarfile.TarInfo("repositories/@hashed/6b/86/6b86b273ff34fce19d6b804eff5a3f57.bundle")
                entry.size, entry.mtime, entry.mode = size, epoch, 0o600
                tar.addfile(entry, io.BufferedReader(_filler(size), 1 << 20))
            else:
                _add_bytes(tar, f"{comp}.tar.gz", gzip.compress(f"{comp}\n".encode()))
            say(f"Dumping {comp} ... done")
    say(f"Creating backup archive: {archive.name} ... ")
    os.chmod(tmp, 0o600)
    if fault == "corrupt":  # a short write nobody noticed: the archive ends in the middle of a member
        with open(tmp, "r+b") as f:
            f.truncate(os.path.getsize(tmp) // 2)
    os.replace(tmp, archive)
    say(f"Creating backup archive: {archive.name} ... done")
    say("Uploading backup archive to remote storage  ... [SKIPPED]")
    say("Deleting old backups ... [SKIPPED]")
    say(f"Backup {backup_id} is done.")
    return 0


def backup_restore(opts: dict[str, str]) -> int:
    backup_id = opts.get("BACKUP")
    archives = sorted(BACKUPS.glob("*_gitlab_backup.tar"))
    if not backup_id:
        if len(archives) != 1:
            print("Found more than one backup:\n" + "\n".join(" " + a.name[:-18] for a in archives), file=sys.stderr)
            print("Specify the backup to restore with BACKUP=timestamp_of_backup", file=sys.stderr)
            return 1
        backup_id = archives[0].name[: -len("_gitlab_backup.tar")]
    archive = BACKUPS / f"{backup_id}_gitlab_backup.tar"
    if not archive.is_file():
        print(f"The backup file {archive.name} does not exist!", file=sys.stderr)
        return 1
    say(f"Unpacking backup ... ")
    try:
        with tarfile.open(archive) as tar:
            info_text = tar.extractfile("backup_information.yml").read().decode()
            db = tar.extractfile("db/database.sql.gz").read()
    except (tarfile.TarError, KeyError, EOFError, OSError) as exc:
        say("Unpacking backup ... [FAILED]", err=True)
        print(f"rake aborted!\nunpacking backup failed: {exc}", file=sys.stderr)
        return 1
    say("Unpacking backup ... done")
    info = dict(line.split(": ", 1) for line in info_text.splitlines() if ": " in line)
    backup_version = info.get(":gitlab_version", "").strip()
    if backup_version != version_string():
        print("GitLab version mismatch:", file=sys.stderr)
        print(f"  Your current GitLab version ({version_string()}) differs from the GitLab version in the backup!",
              file=sys.stderr)
        print("  Please switch to the following version and try again:", file=sys.stderr)
        print(f"  version: {backup_version}", file=sys.stderr)
        print("\nHint: git checkout v" + backup_version, file=sys.stderr)
        return 1
    if opts.get("force") != "yes":
        print("Do you want to continue (yes/no)? Quitting...", file=sys.stderr)
        return 1
    running = [s for s in ("puma", "sidekiq") if services().get(s) == "run"]
    if running:
        print(f"WARNING: {', '.join(running)} running during restore; stop them with gitlab-ctl stop",
              file=sys.stderr)
    fault = take_fault("gitlab-backup-restore")
    say("Restoring database ... ")
    if fault == "fail":
        print("ERROR:  relation \"projects\" does not exist", file=sys.stderr)
        print("rake aborted!\nRestore failed: psql exited with 3", file=sys.stderr)
        return 1
    tmp = STATE / "projects.json.tmp"
    tmp.write_bytes(gzip.decompress(db))
    os.replace(tmp, STATE / "projects.json")
    say("Restoring database ... done")
    for comp in COMPONENTS[1:]:
        say(f"Restoring {comp} ... done")
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
        if take_fault("gitlab-ctl-backup-etc") == "disk-full":
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
                    if f.is_file():
                        print(str(f))
                        tar.add(str(f), arcname=str(f))  # absolute names, as --absolute-names does
        finally:
            os.umask(old)
        os.chmod(target, 0o600)
        print(f"Configuration backup archive complete: {target}")
        return 0
    if cmd in ("stop", "start", "restart"):
        names = rest or list(SERVICES)
        for n in names:
            if n not in SERVICES:
                print(f"{n} does not exist.", file=sys.stderr)
                return 1
            state[n] = "down" if cmd == "stop" else "run"
            print(f"ok: {'down' if cmd == 'stop' else 'run'}: {n}: 0s")
        set_services(state)
        return 0
    if cmd == "status":
        down = 0
        for i, n in enumerate(SERVICES):
            if state.get(n) == "run":
                print(f"run: {n}: (pid {1000 + i}) 42s; run: log: (pid {900 + i}) 42s")
            else:
                down = 1
                print(f"down: {n}: 5s, normally up; run: log: (pid {900 + i}) 42s")
        return 6 if down else 0
    if cmd == "reconfigure":
        if take_fault("gitlab-ctl-reconfigure") == "fail":
            print("Chef Infra Client failed. 3 resources updated", file=sys.stderr)
            return 1
        print("Starting Chef Infra Client, version 18.3.0")
        print("Recipe: gitlab::default")
        print("Chef Infra Client finished, 12/800 resources updated in 15 seconds")
        print("gitlab Reconfigured!")
        return 0
    print(f"I don't know that command: {cmd}", file=sys.stderr)
    return 1


# --- gitlab-rake ------------------------------------------------------------------------------


def rake(args: list[str]) -> int:
    if not args or args[0] != "gitlab:check":
        print(f"Don't know how to build task '{args[0] if args else ''}'", file=sys.stderr)
        return 1
    ok = True
    print("Checking GitLab subtasks ...\n")
    print("Checking GitLab Shell ...\nGitLab Shell: ... GitLab Shell version >= 14.35.0 ? ... OK (14.35.0)")
    secrets = ETC / "gitlab-secrets.json"
    try:
        json.loads(secrets.read_text())
        print("Secrets file present and valid? ... yes")
    except (OSError, ValueError):
        print("Secrets file present and valid? ... no\n  Try fixing it: restore gitlab-secrets.json")
        ok = False
    for svc in ("puma", "sidekiq"):
        up = services().get(svc) == "run"
        print(f"{svc.capitalize()} running? ... {'yes' if up else 'no'}")
        ok = ok and up
    projects = json.loads((STATE / "projects.json").read_text())
    print(f"Projects: {len(projects)}")
    if "SANITIZE=true" not in args:
        for p in projects:
            print(f"{p['path_with_namespace']} ... repository OK")
    print("\nChecking GitLab App ... Finished" if ok else "\nPlease fix the error above and rerun the checks.")
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    prog, args = argv[0], argv[1:]
    log_command([prog] + args)
    if prog == "gitlab-backup":
        if not args or args[0] not in ("create", "restore"):
            print("Usage: gitlab-backup create|restore [OPTIONS]", file=sys.stderr)
            return 1
        opts = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        return backup_create(opts) if args[0] == "create" else backup_restore(opts)
    if prog == "gitlab-ctl":
        return ctl(args)
    if prog == "gitlab-rake":
        return rake(args)
    print(f"unknown stand-in {prog}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
