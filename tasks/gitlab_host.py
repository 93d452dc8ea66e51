"""The omnibus GitLab host over SSH: `gitlab-backup`, `gitlab-ctl`, `gitlab-rake`, and SFTP streams
between the host and the backup store.

Tasks receive the `GitLabHost` block (production's or scratch's: the flow's choice), a `HostLayout`
(what the platform config says about that host beyond the block), the off-site `Store` and a
`Redactor`; they never load a block by name. What outputs and archives mean lives in
`tasks.gitlab_rules`.

- Every remote command is an argv list quoted by `tasks.ssh`; every value from a parameter (a backup
  id, a path, a user) is validated first.
- Long commands that change state (`gitlab-backup create/restore`, `gitlab-ctl reconfigure`, ...) run
  under `tasks.ssh.run_supervised`: a host-side lock per command, a recorded process group, and a
  second session that stops it on timeout or cancellation. They are retried only when the session
  failed before the command started; the lock makes even that retry unable to start a second copy.
- `gitlab-backup restore` runs as the `git` user and reads the archive as `git` (docs *Restore
  GitLab*: "The backup file needs to be owned by the git user"): an archive written here over SFTP
  (as the SSH user) is handed to `HostLayout.backup_user`, mode 0600, before a restore.
- Secrets never reach a log: `gitlab-secrets.json` is copied on the host (`cp -p`, keeping 0600)
  and streamed, never printed.
- Long transfers and commands keep a progress artifact, updated every `PROGRESS_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES
from tasks.gitlab_rules import (
    CONFIG_ARCHIVE_RE,
    COMPONENTS,
    BackupFile,
    DrillOverlay,
    Manifest,
    apply_drill_overlay,
    backup_id_from_archive,
    backup_option_args,
    check_archive,
    config_stamp_from_archive,
    gitlab_rb_setting,
    log_messages,
    parse_backup_id,
    parse_backup_log,
    parse_ctl_status,
    parse_df,
    parse_env_info,
    parse_gitlab_version,
    secrets_copy_name,
    version_string,
)
from tasks.redact import Redactor
from tasks.reports import run_logger
from tasks.ssh import (
    SFTPWriter,
    Supervision,
    connect,
    host_key_fingerprint,
    run_command,
    run_supervised,
    sftp_chunks,
    upload_chunks,
)
from tasks.storage import (
    CopyResult,
    NullSink,
    Store,
    TarStreamVerifier,
    VerificationError,
    copy_stream_async,
)

if TYPE_CHECKING:
    from blocks.connections import GitLabHost

PROGRESS_INTERVAL_S = 3.0
_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9_.@/\-]+\Z")
_OWNER_RE = re.compile(r"^[a-z_][a-z0-9_\-]{0,31}(:[a-z_][a-z0-9_\-]{0,31})?\Z")
GITLAB_COMMANDS = {"gitlab-backup", "gitlab-ctl", "gitlab-rake"}


def _safe_path(path: str) -> str:
    if not _SAFE_PATH_RE.match(path) or ".." in path.split("/"):
        raise ValueError(f"refusing remote path {path!r}: absolute paths of [A-Za-z0-9_.@/-] only, no '..'")
    return path


def _within(directory: str, name: str) -> str:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"bad file name {name!r}")
    return _safe_path(posixpath.join(directory, name))


@dataclass(frozen=True)
class HostLayout:
    """What the platform config says about one GitLab host beyond its SSH block."""

    backup_user: str = "git:git"  # owner of archives `gitlab-backup restore` reads
    gitlab_rb: str = "/etc/gitlab/gitlab.rb"
    backup_log: str = "/var/log/gitlab/gitlab-rails/backup_json.log"  # Gitlab::BackupLogger's JSON log
    control_dir: str = "/run/ai-platform-ops"  # locks and recorded process groups of supervised commands

    def __post_init__(self) -> None:
        if not _OWNER_RE.match(self.backup_user):
            raise ValueError(f"bad backup_user {self.backup_user!r}: expected user[:group], e.g. git:git")
        for p in (self.gitlab_rb, self.backup_log, self.control_dir):
            _safe_path(p)

    def supervision(self, name: str) -> Supervision:
        return Supervision(self.control_dir, name)


def host_limit_name(name: str) -> str:
    """The name of the global concurrency limit that keeps backups and restores of one GitLab host apart
    (`name`: the platform for production, `<platform>-scratch` for the drill's host)."""
    return f"gitlab-host-{name}"


async def ensure_host_limit(name: str) -> str:
    """The global concurrency limit that keeps backups and restores of one GitLab host apart."""
    from tasks.concurrency import exclusive_limit

    return await exclusive_limit(host_limit_name(name))


@task(name="gitlab-host-key", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def host_key(host: GitLabHost) -> str:
    """The SHA-256 fingerprint of the SSH host key the host presents (checked against the block's
    known_hosts by the connection): what names the host and cannot be renamed."""
    async with connect(host.connect_kwargs()) as conn:
        return host_key_fingerprint(conn)


def _progress_failed(exc: BaseException) -> None:
    """A progress artifact update that failed: logged in the run's log, never silent, never fatal to the work."""
    run_logger("ai_platform_ops.progress").warning("progress artifact not updated: %s", type(exc).__name__)


class _Feed:
    """A progress artifact fed by a value (0..1) that callers set; pushed every PROGRESS_INTERVAL_S at most."""

    def __init__(self, key: str | None, description: str):
        self.key, self.description, self.value = key, description, 0.0
        self._progress: Any = None
        self._task: asyncio.Task | None = None
        self._sent = -1.0

    async def __aenter__(self) -> _Feed:
        if self.key:
            from tasks.reports import AsyncProgress

            self._progress = await AsyncProgress.start(self.key, 1000, self.description)
            self._task = asyncio.create_task(self._loop())
        return self

    async def _push(self) -> None:
        if self._progress is not None and self.value != self._sent:
            self._sent = self.value
            await self._progress.set(int(min(1.0, max(0.0, self.value)) * 1000))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            try:
                await self._push()
            except Exception as exc:  # noqa: BLE001 - progress is a courtesy; the work goes on, said in the log
                _progress_failed(exc)

    async def __aexit__(self, exc_type, *_) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - the loop's own cancellation
                pass
            if exc_type is None:
                self.value = 1.0
                try:
                    await self._push()
                except Exception as exc:  # noqa: BLE001 - as above
                    _progress_failed(exc)


# --- preflight ---------------------------------------------------------------------------------------


@task(name="gitlab-host-preflight", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def host_preflight(host: GitLabHost, layout: HostLayout, redactor: Redactor) -> dict:
    """Free space, the secrets file, the newest archive, and GitLab's own `backup_keep_time` (from gitlab.rb)."""
    out: dict[str, Any] = {"host": f"{host.host}:{host.port}"}
    backup_path = _safe_path(host.backup_path)
    async with connect(host.connect_kwargs()) as conn:
        df = await run_command(conn, ["df", "-PB1", "--", backup_path], timeout_s=30, redact=redactor)
        out["free_bytes"] = parse_df(df.text)
        secrets = await run_command(conn, ["test", "-f", _safe_path(host.secrets_file)], timeout_s=30, check=False)
        out["secrets_present"] = secrets.exit_status == 0
        async with conn.start_sftp_client() as sftp:
            archives = [(n.filename, n.attrs.size or 0, n.attrs.mtime or 0) for n in await sftp.readdir(backup_path)
                        if backup_id_from_archive(n.filename)]
            try:
                async with sftp.open(_safe_path(layout.gitlab_rb), "r") as f:
                    rb = await f.read()
            except _missing_errors():
                rb = None
    archives.sort(key=lambda a: backup_id_from_archive(a[0]).epoch or a[2])
    out["last_backup"] = archives[-1][0] if archives else None
    out["last_backup_size"] = archives[-1][1] if archives else 0
    keep = gitlab_rb_setting(rb, "gitlab_rails", "backup_keep_time") if rb is not None else None
    try:
        out["backup_keep_time"] = int(keep) if keep is not None else 0
    except ValueError:
        out["backup_keep_time"] = None
    out["gitlab_rb_read"] = rb is not None
    return redactor.value(out)


# --- backup ------------------------------------------------------------------------------------------


def _missing_errors() -> tuple[type[BaseException], ...]:
    import asyncssh

    return (OSError, asyncssh.SFTPError)


async def _log_size(sftp: Any, path: str) -> int:
    try:
        return (await sftp.stat(path)).size or 0
    except _missing_errors():
        return 0


async def _log_lines_since(sftp: Any, path: str, offset: int) -> list[str]:
    try:
        async with sftp.open(path, "rb") as f:
            await f.seek(offset)
            data = await f.read()
    except _missing_errors():
        return []
    return data.decode("utf-8", "replace").splitlines() if data else []


@task(name="gitlab-backup-create", cache_policy=NONE, timeout_seconds=6 * 3600 + 600, **TRANSIENT_RETRIES)
async def create_data_backup(host: GitLabHost, layout: HostLayout, redactor: Redactor,
                             options: dict[str, str] | None = None, timeout_s: float = 6 * 3600,
                             progress_key: str | None = None) -> dict:
    """`gitlab-backup create` under supervision; returns the backup id and what GitLab's log said.

    With CRON=1 GitLab prints nothing unless it fails; its backup logger still writes every message to
    `backup_json.log`, which is read (and followed for progress) from the offset it had at the start.
    A custom `BACKUP=` name that already names an archive is refused: GitLab would overwrite it.
    """
    opts = dict(host.backup_options if options is None else options)
    argv = ["gitlab-backup", "create", *backup_option_args(opts)]
    backup_path = _safe_path(host.backup_path)
    custom = parse_backup_id(opts["BACKUP"]) if "BACKUP" in opts else None
    kw = host.connect_kwargs()
    async with connect(kw) as conn, conn.start_sftp_client() as sftp:
        before = {n.filename for n in await sftp.readdir(backup_path)}
        if custom is not None and custom.archive in before:
            raise ValueError(f"BACKUP={custom.value}: {custom.archive} already exists on the host and GitLab would "
                             "overwrite it; choose another name")
        log_path = _safe_path(layout.backup_log)
        offset = await _log_size(sftp, log_path)
        out_lines: list[str] = []
        async with _Feed(progress_key, "gitlab-backup create: components done") as feed:
            async def follow() -> None:
                while True:
                    await asyncio.sleep(PROGRESS_INTERVAL_S)
                    seen = parse_backup_log(out_lines + await _log_lines_since(sftp, log_path, offset))
                    feed.value = 0.9 * seen.finished_components / len(COMPONENTS) + (0.05 if seen.archive_started
                                                                                      else 0)

            follower = asyncio.create_task(follow())
            try:
                r = await run_supervised(conn, kw, argv, layout.supervision("gitlab-backup-create"),
                                         timeout_s=timeout_s, logger=get_run_logger(), redact=redactor,
                                         on_line=out_lines.append)
            finally:
                follower.cancel()
        log_lines = await _log_lines_since(sftp, log_path, offset)
        after = {n.filename for n in await sftp.readdir(backup_path)}
    log = parse_backup_log(r.stdout + log_lines)
    get_run_logger().info("GitLab's backup log: dumped %s; disabled: %s; skipped: %s", ", ".join(log.done) or "-",
                          ", ".join(log.disabled) or "-", ", ".join(log.skipped) or "-")
    new = sorted((b for b in (backup_id_from_archive(n) for n in after - before) if b),
                 key=lambda b: b.epoch or 0)
    if custom is not None:
        backup_id = custom.value
    elif log.backup_id:
        backup_id = parse_backup_id(log.backup_id).value
    elif new:
        backup_id = new[-1].value
    else:
        raise RuntimeError("gitlab-backup create exited 0 but wrote no archive in "
                           f"{backup_path}: check gitlab_rails['backup_path'] in gitlab.rb")
    return redactor.value({"backup_id": backup_id, "log": {"done": log.done, "skipped": log.skipped,
                                                           "disabled": log.disabled, "read": bool(log_lines)}})


@task(name="gitlab-backup-etc", cache_policy=NONE, timeout_seconds=900, **TRANSIENT_RETRIES)
async def create_config_backup(host: GitLabHost, redactor: Redactor) -> dict:
    """`gitlab-ctl backup-etc` and a copy of gitlab-secrets.json beside it (cp -p: still 0600)."""
    directory = _safe_path(host.config_backup_path)
    async with connect(host.connect_kwargs()) as conn:
        r = await run_command(conn, ["gitlab-ctl", "backup-etc", "--backup-path", directory], timeout_s=600,
                              logger=get_run_logger(), redact=redactor)
        names = re.findall(r"(gitlab_config_\d+_\d{4}_\d{2}_\d{2}\.tar)", r.text)
        if not names:
            raise RuntimeError("gitlab-ctl backup-etc did not name the archive it wrote")
        archive = names[-1]
        stamp = config_stamp_from_archive(archive)
        secrets_copy = secrets_copy_name(stamp)
        await run_command(conn, ["cp", "-p", "--", _safe_path(host.secrets_file), _within(directory, secrets_copy)],
                          timeout_s=60, log_output=False, redact=redactor)
    return {"stamp": stamp, "config_archive": archive, "secrets_copy": secrets_copy, "directory": directory}


@task(name="verify-and-copy-offsite", cache_policy=NONE, timeout_seconds=6 * 3600, **TRANSIENT_RETRIES)
async def copy_offsite(host: GitLabHost, remote_path: str, *, archive: bool, store: Store | None = None,
                       store_key: str | None = None, expected_version: str | None = None,
                       log: dict | None = None, expected: list[str] | None = None, encrypt: bool = False,
                       progress_key: str | None = None) -> dict:
    """Stream a file from the host: SHA-256, tar check (archives) and off-site copy in one pass.

    Without a `store` (and `store_key`) the file is verified in place, not copied. The off-site
    copy only becomes visible once the store confirms it (see tasks.storage). An archive is checked
    against what GitLab declared (`log`: its backup log of the run; `expected`: a manifest's
    components). Returns size, sha256, components, location.
    """
    from tasks.gitlab_rules import BackupLog

    if (store is None) != (store_key is None):
        raise ValueError("copy_offsite needs both a store and a store_key, or neither (verify in place)")
    path = _safe_path(remote_path)
    verifier = TarStreamVerifier(capture={"backup_information.yml"}) if archive else None
    sink = (store.sink(store_key, encrypt=True) if encrypt else store.sink(store_key)) if store is not None \
        else NullSink()
    async with connect(host.connect_kwargs()) as conn, conn.start_sftp_client() as sftp:
        total = (await sftp.stat(path)).size or 1
        async with _Feed(progress_key, f"{posixpath.basename(path)}: bytes streamed") as feed:
            async def on_progress(done: int) -> None:
                feed.value = done / total

            result: CopyResult = await copy_stream_async(posixpath.basename(path), sftp_chunks(sftp, path), sink,
                                                         verifier, on_progress=on_progress)
    out = {"name": result.name, "size": result.size, "sha256": result.sha256,
           "location": result.location if store is not None else None, "seconds": round(result.seconds, 2)}
    if archive and (expected_version is not None or log is not None or expected is not None):
        info = result.captured.get("backup_information.yml")
        backup_log = BackupLog(**{k: log[k] for k in ("done", "skipped", "disabled")}) if log else None
        check = check_archive(result.members, info.decode() if info else None, expected_version, backup_log,
                              expected)
        if not check.ok:
            if store is not None:  # the copy we just made: never a pre-existing object
                await asyncio.to_thread(store.delete, [store_key])
            raise VerificationError(f"{result.name}: " + "; ".join(check.problems))
        out.update(components=check.components, skipped=check.skipped, disabled=check.disabled,
                   gitlab_version=check.gitlab_version, notes=check.notes)
    elif archive:
        out["members"] = len(result.members)
    if encrypt and store is not None:
        out["encryption"] = await asyncio.to_thread(store.encryption, store_key)
    get_run_logger().info("%s: %d bytes, sha256 %s, %s", result.name, result.size, result.sha256,
                          f"copied to {result.location}" if store is not None else "verified in place")
    return out


@task(name="write-host-manifest", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def write_host_manifest(host: GitLabHost, path: str, manifest: dict) -> str:
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    async with connect(host.connect_kwargs()) as conn, conn.start_sftp_client() as sftp:
        async with SFTPWriter(sftp, _safe_path(path)) as w:
            await w.write(body)
            await w.commit()
    return path


def _manifest_name(kind: str, backup_id: str) -> str:
    return f"{backup_id}_gitlab_backup.manifest.json" if kind == "data" else f"gitlab_config_{backup_id}.manifest.json"


@task(name="list-host-backups", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def list_host_backups(host: GitLabHost) -> dict:
    """Data archives (every id form, custom names by their mtime) and config archives, with manifests."""
    out: dict[str, list[dict]] = {"data": [], "config": []}
    async with connect(host.connect_kwargs()) as conn, conn.start_sftp_client() as sftp:
        for kind, directory in (("data", host.backup_path), ("config", host.config_backup_path)):
            directory = _safe_path(directory)
            names = {n.filename: n.attrs for n in await sftp.readdir(directory)}
            for name, attrs in names.items():
                if kind == "data":
                    bid = backup_id_from_archive(name)
                    if not bid:
                        continue
                    backup_id, created = bid.value, bid.epoch or int(attrs.mtime or 0)
                    extra = [_manifest_name(kind, backup_id)]
                else:
                    stamp = config_stamp_from_archive(name)
                    if not stamp:
                        continue
                    backup_id, created = stamp, int(stamp.split("_")[0])
                    extra = [_manifest_name(kind, stamp), secrets_copy_name(stamp)]
                manifest = None
                if extra[0] in names:
                    async with sftp.open(posixpath.join(directory, extra[0]), "rb") as f:
                        try:
                            manifest = json.loads(await f.read())
                        except ValueError:
                            manifest = None
                out[kind].append({"id": backup_id, "created": created, "size": attrs.size or 0,
                                  "files": [posixpath.join(directory, n) for n in [name] + extra if n in names],
                                  "verified": bool(manifest and manifest.get("verified")), "manifest": manifest})
    return out


def _deletable(name: str) -> bool:
    if backup_id_from_archive(name) or CONFIG_ARCHIVE_RE.match(name):
        return True
    if name.endswith("_gitlab_backup.manifest.json"):
        return backup_id_from_archive(name.removesuffix(".manifest.json") + ".tar") is not None
    m = re.match(r"^gitlab_config_(\d+_\d{4}_\d{2}_\d{2})\.manifest\.json$|^gitlab-secrets_(\d+_\d{4}_\d{2}_\d{2})\.json$",
                 name)
    return bool(m)


@task(name="delete-host-backups", cache_policy=NONE, timeout_seconds=300, **TRANSIENT_RETRIES)
async def delete_host_files(host: GitLabHost, paths: list[str]) -> list[str]:
    """Delete backup files on the host; only names GitLab's backups use, only in the backup directories."""
    allowed_dirs = {_safe_path(host.backup_path).rstrip("/"), _safe_path(host.config_backup_path).rstrip("/")}
    for p in paths:
        name = posixpath.basename(_safe_path(p))
        if posixpath.dirname(p) not in allowed_dirs or not _deletable(name):
            raise ValueError(f"refusing to delete {p!r}: not a backup file in the backup directories")
    async with connect(host.connect_kwargs()) as conn, conn.start_sftp_client() as sftp:
        for p in paths:
            await sftp.remove(p)
    return paths


@task(name="host-file-sha256", cache_policy=NONE, timeout_seconds=3600, **TRANSIENT_RETRIES)
async def host_file_sha256(host: GitLabHost, path: str) -> dict | None:
    """(size, sha256) of a file on the host, computed there with `sha256sum`; None if it does not exist."""
    path = _safe_path(path)
    async with connect(host.connect_kwargs()) as conn:
        exists = await run_command(conn, ["test", "-f", path], timeout_s=30, check=False)
        if exists.exit_status != 0:
            return None
        r = await run_command(conn, ["sha256sum", "--", path], timeout_s=3000)
        size = await run_command(conn, ["stat", "-c", "%s", "--", path], timeout_s=30)
    return {"path": path, "sha256": r.text.split()[0], "size": int(size.text.strip())}


# --- restore -----------------------------------------------------------------------------------------


async def find_manifest(store: Store, source_host: GitLabHost, backup_id: str) -> Manifest | None:
    """The backup's manifest off-site, else the one beside it on the (production) host it was taken on
    (a safety backup's); None when neither exists (the backup was never verified)."""
    from tasks.storage import read_offsite_manifest

    data = await read_offsite_manifest(store, "data", backup_id)
    if data is None:
        on_host = await list_host_backups(source_host)
        data = next((b["manifest"] for b in on_host["data"] if b["id"] == backup_id and b["manifest"]), None)
    return None if data is None else Manifest.model_validate(data)


async def take_safety_backup(host: GitLabHost, layout: HostLayout, redactor: Redactor, *, platform: str,
                             pre: dict, create_timeout_s: float, grace_s: float, transfer_s: float,
                             progress_key: str | None = None) -> Manifest:
    """A backup of the host as it is, before a restore changes it, complete as `gitlab-backup` writes one:
    the data archive (verified: GitLab's log against the archive, its version), `gitlab-ctl backup-etc` and
    the gitlab-secrets.json copy (their SHA-256), and a manifest listing all three beside the archive, so
    that `gitlab-restore` of its id puts back data, configuration and secrets. It stays on the host."""
    started = datetime.now(timezone.utc)
    created = await create_data_backup.with_options(timeout_seconds=create_timeout_s + grace_s + 300)(
        host, layout, redactor, timeout_s=create_timeout_s, progress_key=progress_key)
    safety_id = created["backup_id"]
    archive = parse_backup_id(safety_id).archive
    path = posixpath.join(_safe_path(host.backup_path), archive)
    checked = await copy_offsite.with_options(timeout_seconds=transfer_s)(
        host, path, archive=True, expected_version=pre["gitlab_version"], log=created["log"])
    files = [BackupFile(role="data", name=archive, host_path=path, size=checked["size"], sha256=checked["sha256"])]
    cfg = await create_config_backup(host, redactor)
    for role, name, is_archive in (("config", cfg["config_archive"], True), ("secrets", cfg["secrets_copy"], False)):
        p = posixpath.join(cfg["directory"], name)
        c = await copy_offsite(host, p, archive=is_archive)  # verified in place: size and SHA-256
        files.append(BackupFile(role=role, name=name, host_path=p, size=c["size"], sha256=c["sha256"]))
    manifest = Manifest(id=safety_id, kind="data", platform=platform, host=pre["host"],
                        gitlab_version=pre["gitlab_version"], edition=pre["edition"],
                        components=checked["components"], skipped=checked["skipped"], disabled=checked["disabled"],
                        files=files, etc_dir=posixpath.dirname(host.secrets_file), started_at=started,
                        finished_at=datetime.now(timezone.utc), verified=True, safety=True)
    await write_host_manifest(host, posixpath.join(host.backup_path, f"{safety_id}_gitlab_backup.manifest.json"),
                              manifest.model_dump(mode="json"))
    return manifest


@task(name="fetch-to-host", cache_policy=NONE, timeout_seconds=6 * 3600, **TRANSIENT_RETRIES)
async def fetch_to_host(host: GitLabHost, store: Store, store_key: str, remote_path: str, expected_sha256: str,
                        archive: bool = False, owner: str | None = None, progress_key: str | None = None) -> dict:
    """Stream an off-site copy onto the host (`NAME.part`, 0600, renamed only when its SHA-256 matches);
    with `owner`, the file is then handed to that user (`chown`), still 0600: readable only by it."""
    path = _safe_path(remote_path)
    if owner is not None and not _OWNER_RE.match(owner):
        raise ValueError(f"bad owner {owner!r}")
    verifier = TarStreamVerifier() if archive else None
    total = await asyncio.to_thread(store.size, store_key) or 1
    async with connect(host.connect_kwargs()) as conn:
        async with conn.start_sftp_client() as sftp, \
                _Feed(progress_key, f"{posixpath.basename(path)}: bytes fetched") as feed:
            size, _ = await upload_chunks(sftp, path, store.chunks(store_key), expected_sha256=expected_sha256,
                                          name=store.describe(store_key), verifier=verifier,
                                          on_progress=lambda n: setattr(feed, "value", n / total))
        if owner is not None:
            await hand_to(conn, path, owner)
    get_run_logger().info("fetched %s to %s (%d bytes, sha256 verified%s)", store.describe(store_key), path, size,
                          f", owned by {owner}, 0600" if owner else "")
    return {"path": path, "size": size, "sha256": expected_sha256, "owner": owner}


async def hand_to(conn: Any, path: str, owner: str) -> None:
    """`chown owner path; chmod 0600 path`: the file belongs to `owner` and only it can read it."""
    await run_command(conn, ["chown", "--", owner, _safe_path(path)], timeout_s=60)
    await run_command(conn, ["chmod", "0600", "--", path], timeout_s=60)


@task(name="hand-archive-to-backup-user", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def hand_archive_to(host: GitLabHost, path: str, owner: str) -> dict:
    """An archive already on the host (copied by hand, or as root) handed to the backup user, 0600."""
    if not _OWNER_RE.match(owner):
        raise ValueError(f"bad owner {owner!r}")
    async with connect(host.connect_kwargs()) as conn:
        await hand_to(conn, path, owner)
        r = await run_command(conn, ["stat", "-c", "%U:%G %a", "--", _safe_path(path)], timeout_s=30)
    return {"path": path, "owner_mode": r.text.strip()}


@task(name="restore-config-files", cache_policy=NONE, timeout_seconds=600)
async def restore_config_files(host: GitLabHost, config_archive: str | None, secrets_copy: str,
                               source_etc_dir: str) -> dict:
    """Production: unpack the config archive (gitlab.rb, ...) into the host's /etc/gitlab, then put the
    secrets copy in place (0600). Member paths are rebased from the backed-up host's etc dir to this host's."""
    target_etc = posixpath.dirname(_safe_path(host.secrets_file))
    strip = len([p for p in _safe_path(source_etc_dir).split("/") if p])
    async with connect(host.connect_kwargs()) as conn:
        if config_archive:
            await run_command(conn, ["tar", "-xpf", _safe_path(config_archive), "-C", target_etc,
                                     f"--strip-components={strip}"], timeout_s=300, log_output=False)
        await run_command(conn, ["install", "-m", "0600", "--", _safe_path(secrets_copy),
                                 _safe_path(host.secrets_file)], timeout_s=60, log_output=False)
    get_run_logger().info("restored %s and %s into %s", config_archive or "(no config archive)",
                          posixpath.basename(secrets_copy), target_etc)
    return {"etc_dir": target_etc}


@task(name="drill-config", cache_policy=NONE, timeout_seconds=600)
async def drill_config(host: GitLabHost, layout: HostLayout, secrets_copy: str, overlay: DrillOverlay) -> dict:
    """The scratch host keeps its own identity: only gitlab-secrets.json (needed to decrypt) is put back,
    and the drill overlay goes onto scratch's *own* gitlab.rb (the previous one kept as gitlab.rb.pre-drill)."""
    rb_path = _safe_path(layout.gitlab_rb)
    async with connect(host.connect_kwargs()) as conn:
        await run_command(conn, ["install", "-m", "0600", "--", _safe_path(secrets_copy),
                                 _safe_path(host.secrets_file)], timeout_s=60, log_output=False)
        async with conn.start_sftp_client() as sftp:
            async with sftp.open(rb_path, "r") as f:
                current = await f.read()
            await run_command(conn, ["cp", "-p", "--", rb_path, rb_path + ".pre-drill"], timeout_s=60)
            async with SFTPWriter(sftp, rb_path) as w:
                await w.write(apply_drill_overlay(current, overlay).encode())
                await w.commit()
    get_run_logger().info("scratch keeps its own gitlab.rb (%s), with the drill overlay; secrets installed", rb_path)
    return {"gitlab_rb": rb_path, "external_url": overlay.external_url}


@task(name="gitlab-command", cache_policy=NONE, timeout_seconds=None)
async def gitlab_command(host: GitLabHost, layout: HostLayout, argv: list[str], timeout_s: float,
                         redactor: Redactor, progress_key: str | None = None,
                         progress: Callable[[list[str]], float] | None = None, check: bool = True) -> dict:
    """One of omnibus' commands, supervised (lock, process group, stopped on timeout or cancellation),
    output streamed into the flow's log. Not retried: these commands change state. Returns the
    (redacted) output for the caller to parse; `progress(lines)` maps output so far to 0..1."""
    if not argv or argv[0] not in GITLAB_COMMANDS:
        raise ValueError(f"only {sorted(GITLAB_COMMANDS)} run through gitlab_command, got {argv[:1]}")
    name = "-".join(re.sub(r"[^a-z0-9]+", "-", a.lower()).strip("-") for a in argv[:2])[:60]
    kw = host.connect_kwargs()
    lines: list[str] = []
    async with connect(kw) as conn, _Feed(progress_key, f"{' '.join(argv[:2])}") as feed:
        def on_line(line: str) -> None:
            lines.append(line)
            if progress is not None:
                feed.value = progress(lines)

        r = await run_supervised(conn, kw, argv, layout.supervision(name), timeout_s=timeout_s,
                                 logger=get_run_logger(), redact=redactor, on_line=on_line, check=check)
    return redactor.value({"argv": argv, "exit_status": r.exit_status, "seconds": round(r.seconds, 1),
                           "output": r.stdout[-400:] + r.stderr[-100:], "tail": r.stdout[-20:]})


def restore_progress(lines: list[str]) -> float:
    """`gitlab-backup restore` progress from its own output: components restored of those in the archive."""
    done = sum(1 for m in log_messages(lines) if re.match(r"Restoring .+ \.\.\. ?(done|\[DISABLED\])$", m))
    return min(0.95, done / len(COMPONENTS))


@task(name="gitlab-host-version", cache_policy=NONE, timeout_seconds=900, **TRANSIENT_RETRIES)
async def host_gitlab_state(host: GitLabHost, redactor: Redactor) -> dict:
    """What the host itself says while its API is not ready: `gitlab-ctl status` ({service: run|down}) and the
    installed version from `gitlab-rake gitlab:env:info` (it boots Rails, not puma), as `api_preflight` does."""
    async with connect(host.connect_kwargs()) as conn:
        status = await run_command(conn, ["gitlab-ctl", "status"], timeout_s=60, check=False, redact=redactor)
        info = await run_command(conn, ["gitlab-rake", "gitlab:env:info"], timeout_s=600, check=False,
                                 redact=redactor)
    services = parse_ctl_status(status.text)
    out: dict[str, Any] = {"services": services, "down": sorted(s for s, v in services.items() if v != "run"),
                           "version": None, "edition": None, "gitlab_version": None}
    text = parse_env_info(info.text) if info.exit_status == 0 else None
    if text:
        version, pre, edition = parse_gitlab_version(text)
        out.update(version=f"{version}{pre or ''}", edition=edition,
                   gitlab_version=version_string(f"{version}{pre or ''}", edition))
    return out


@task(name="gitlab-ctl-status", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def services_status(host: GitLabHost, redactor: Redactor) -> dict:
    """`gitlab-ctl status` parsed into {service: run|down} (it exits non-zero when a service is down)."""
    async with connect(host.connect_kwargs()) as conn:
        r = await run_command(conn, ["gitlab-ctl", "status"], timeout_s=60, check=False, redact=redactor)
    return {"services": parse_ctl_status(r.text), "exit_status": r.exit_status}
