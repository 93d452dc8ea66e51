"""Talking to an omnibus GitLab (SSH + API), and what its backups mean.

Pure functions (no Prefect, no network): backup ids and archive names as GitLab writes them,
`backup_information.yml`, archive checks, the retention plan, free-space and version checks, the
drill's comparison. Tasks: the SSH commands (`gitlab-backup`, `gitlab-ctl`, `gitlab-rake`), SFTP
streams between the host and the backup store, and API reads (python-gitlab).

Every remote command is an argv list quoted by `tasks.ssh`; every value from a parameter (a
backup id, a file name) is validated against GitLab's naming first. Secrets never reach a log:
`gitlab-secrets.json` is copied on the host (`cp -p`, keeping 0600) and streamed, never printed.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

# --- names -----------------------------------------------------------------------------------------

BACKUP_ID_RE = re.compile(r"^(?P<epoch>\d{9,11})_(?P<date>\d{4}_\d{2}_\d{2})_(?P<version>\d{1,3}\.\d{1,3}\.\d{1,3})"
                          r"(?P<edition>-ee)?\Z")
ARCHIVE_SUFFIX = "_gitlab_backup.tar"
CONFIG_STAMP_RE = re.compile(r"^(?P<epoch>\d{9,11})_(?P<date>\d{4}_\d{2}_\d{2})\Z")
CONFIG_ARCHIVE_RE = re.compile(r"^gitlab_config_(?P<stamp>\d{9,11}_\d{4}_\d{2}_\d{2})\.tar\Z")
COMPONENTS = ["db", "repositories", "uploads", "builds", "artifacts", "pages", "lfs", "terraform_state", "registry",
              "packages", "ci_secure_files"]
BACKUP_OPTION_KEYS = {"STRATEGY", "SKIP", "GZIP_RSYNCABLE", "CRON", "COMPRESS_CMD", "DECOMPRESS_CMD",
                      "INCREMENTAL", "PREVIOUS_BACKUP", "GITLAB_BACKUP_MAX_CONCURRENCY",
                      "GITLAB_BACKUP_MAX_STORAGE_CONCURRENCY", "REPOSITORIES_SERVER_SIDE"}
_OPTION_VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:\-]{0,200}\Z")


class BackupId(BaseModel):
    value: str
    epoch: int
    date: str
    version: str
    edition: Literal["ee", "ce"]

    @property
    def archive(self) -> str:
        return f"{self.value}{ARCHIVE_SUFFIX}"

    @property
    def gitlab_version(self) -> str:
        return f"{self.version}-ee" if self.edition == "ee" else self.version


def parse_backup_id(value: Any) -> BackupId:
    """A GitLab backup id such as ``1717000000_2024_05_29_17.0.1-ee``; anything else is a ValueError."""
    if not isinstance(value, str) or len(value) > 64 or not BACKUP_ID_RE.match(value):
        raise ValueError(f"{str(value)[:80]!r} is not a GitLab backup id: expected <epoch>_<YYYY_MM_DD>_<version>"
                         "[-ee], e.g. 1717000000_2024_05_29_17.0.1-ee (see the backup report for ids)")
    m = BACKUP_ID_RE.match(value)
    return BackupId(value=value, epoch=int(m["epoch"]), date=m["date"], version=m["version"],
                    edition="ee" if m["edition"] else "ce")


def backup_id_from_archive(name: str) -> BackupId | None:
    if not name.endswith(ARCHIVE_SUFFIX):
        return None
    try:
        return parse_backup_id(name[: -len(ARCHIVE_SUFFIX)])
    except ValueError:
        return None


def config_stamp_from_archive(name: str) -> str | None:
    m = CONFIG_ARCHIVE_RE.match(name)
    return m["stamp"] if m else None


def secrets_copy_name(stamp: str) -> str:
    if not CONFIG_STAMP_RE.match(stamp):
        raise ValueError(f"bad config backup stamp {stamp!r}")
    return f"gitlab-secrets_{stamp}.json"


def backup_option_args(options: dict[str, str]) -> list[str]:
    """`KEY=VALUE` arguments for `gitlab-backup create`, validated (they reach the remote shell)."""
    out = []
    for key, value in sorted(options.items()):
        if key not in BACKUP_OPTION_KEYS:
            raise ValueError(f"unknown gitlab-backup option {key!r}; known: {sorted(BACKUP_OPTION_KEYS)}")
        if not _OPTION_VALUE_RE.match(str(value)):
            raise ValueError(f"gitlab-backup option {key} has a value with characters outside [A-Za-z0-9_.,:-]")
        if key == "SKIP":
            bad = [s for s in str(value).split(",") if s and s not in COMPONENTS + ["tar", "remote"]]
            if bad:
                raise ValueError(f"SKIP names unknown components {bad}; known: {COMPONENTS + ['tar', 'remote']}")
        out.append(f"{key}={value}")
    return out


def version_string(version: str, edition: str) -> str:
    """GitLab's own spelling: '17.0.1-ee' for Enterprise, '17.0.1' for Community."""
    base = version.removesuffix("-ee")
    return f"{base}-ee" if edition == "ee" else base


# --- backup_information.yml and the archive ------------------------------------------------------


def parse_backup_information(text: str) -> dict[str, str]:
    """`backup_information.yml` (Ruby symbol keys such as ``:gitlab_version:``) as a plain dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ": " not in line and not line.rstrip().endswith(":"):
            continue
        key, _, value = line.partition(":" if not line.startswith(":") else ": ")
        if line.startswith(":"):
            key, _, value = line[1:].partition(": ")
        out[key.strip()] = value.strip().strip("'\"")
    return out


class ArchiveCheck(BaseModel):
    ok: bool
    gitlab_version: str | None = None
    components: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)


def component_present(component: str, member_names: set[str]) -> bool:
    if component == "db":
        return any(n.startswith("db/") for n in member_names)
    if component == "repositories":
        return any(n.startswith("repositories/") or n == "repositories" for n in member_names)
    return f"{component}.tar.gz" in member_names


def check_archive(members: list[tuple[str, int]], info_text: str | None, expected_version: str) -> ArchiveCheck:
    """Does a data archive hold what `backup_information.yml` promises, for the version we expect?"""
    problems = []
    if info_text is None:
        return ArchiveCheck(ok=False, problems=["backup_information.yml is missing: not a GitLab backup archive"])
    info = parse_backup_information(info_text)
    version = info.get("gitlab_version")
    if version != expected_version:
        problems.append(f"backup_information.yml names GitLab {version!r}, expected {expected_version!r}")
    skipped = [s for s in info.get("skipped", "").split(",") if s and s in COMPONENTS]
    names = {n.lstrip("./") for n, _ in members}
    components = [c for c in COMPONENTS if c not in skipped]
    missing = [c for c in components if not component_present(c, names)]
    if missing:
        problems.append(f"components missing from the archive: {', '.join(missing)}")
    return ArchiveCheck(ok=not problems, gitlab_version=version, components=components, skipped=skipped,
                        problems=problems)


# --- manifests ---------------------------------------------------------------------------------------


class BackupFile(BaseModel):
    role: Literal["data", "config", "secrets"]
    name: str
    host_path: str
    size: int
    sha256: str
    offsite: str | None = None


class Manifest(BaseModel):
    id: str
    kind: Literal["data", "config"]
    platform: str
    host: str
    gitlab_version: str
    edition: str
    components: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    files: list[BackupFile] = Field(default_factory=list)
    etc_dir: str = "/etc/gitlab"
    started_at: datetime
    finished_at: datetime
    verified: bool = False
    offsite: bool = False
    safety: bool = False

    def file(self, role: str) -> BackupFile | None:
        return next((f for f in self.files if f.role == role), None)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


# --- retention ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupRecord:
    id: str
    created_at: datetime
    verified: bool
    size: int = 0


@dataclass(frozen=True)
class RetentionDecision:
    id: str
    action: Literal["keep", "delete"]
    reason: str
    created_at: datetime


def plan_retention(records: list[BackupRecord], *, now: datetime, keep_days: int, keep_count: int,
                   run_succeeded: bool) -> list[RetentionDecision]:
    """What to keep and delete, newest first, each with its reason.

    A verified backup is kept while it is among the `keep_count` newest verified ones *and*
    younger than `keep_days`; an unverified one is kept while younger than `keep_days`. Two
    rules override everything: the newest verified backup is never deleted, and nothing is
    deleted when the current run failed (or when no verified backup exists at all).
    """
    ordered = sorted(records, key=lambda r: r.created_at, reverse=True)
    verified = [r for r in ordered if r.verified]
    newest = verified[0].id if verified else None
    out = []
    rank = 0
    for r in ordered:
        age_days = (now - r.created_at).total_seconds() / 86400
        if not run_succeeded:
            out.append(RetentionDecision(r.id, "keep", "the current run failed: nothing is deleted", r.created_at))
            continue
        if newest is None:
            out.append(RetentionDecision(r.id, "keep", "no verified backup exists: nothing is deleted", r.created_at))
            continue
        if r.id == newest:
            rank += 1
            out.append(RetentionDecision(r.id, "keep", "newest verified backup", r.created_at))
            continue
        if r.verified:
            rank += 1
            if rank > keep_count:
                out.append(RetentionDecision(r.id, "delete", f"beyond the {keep_count} newest verified backups",
                                             r.created_at))
            elif age_days > keep_days:
                out.append(RetentionDecision(r.id, "delete", f"older than {keep_days} days ({age_days:.1f})",
                                             r.created_at))
            else:
                out.append(RetentionDecision(r.id, "keep", f"verified, #{rank} of {keep_count}, {age_days:.1f} days "
                                             "old", r.created_at))
        elif age_days > keep_days:
            out.append(RetentionDecision(r.id, "delete", f"unverified and older than {keep_days} days; a newer "
                                         "verified backup exists", r.created_at))
        else:
            out.append(RetentionDecision(r.id, "keep", "unverified but within the age limit", r.created_at))
    return out


# --- preflight, restore plan, drill -------------------------------------------------------------


def parse_df(output: str) -> int:
    """Available bytes from `df -PB1 PATH`."""
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"unexpected df output: {output[:200]!r}")
    return int(lines[-1].split()[3])


def space_problem(free_bytes: int, needed_bytes: int, what: str) -> str | None:
    if free_bytes < needed_bytes:
        return (f"not enough free space for {what}: {human_bytes(free_bytes)} free, {human_bytes(needed_bytes)} "
                "needed; free some space or move backup_path")
    return None


def version_problem(installed: str, installed_edition: str, backup: BackupId) -> str | None:
    if installed_edition != backup.edition or installed.removesuffix("-ee") != backup.version:
        return (f"backup {backup.value} was made by GitLab {backup.version} {backup.edition.upper()}; this host runs "
                f"{installed.removesuffix('-ee')} {installed_edition.upper()}. GitLab only restores onto the same "
                f"version and edition: install {backup.gitlab_version} first")
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s or not seconds else ""]
    return " ".join(p for p in parts if p)


class ProjectState(BaseModel):
    id: int
    path: str
    last_commit: str | None
    last_activity_at: datetime | None = None


class DrillComparison(BaseModel):
    ok: bool
    production_projects: int
    restored_projects: int
    sampled: int
    matching: int
    changed_since_backup: list[str] = Field(default_factory=list)
    mismatched: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)


def compare_restore(production_count: int, restored_count: int, production: list[ProjectState],
                    restored: list[ProjectState], backup_time: datetime) -> DrillComparison:
    """Restored data vs production: a difference is only a failure when production did not change it
    after the backup was taken (its last activity is older than the backup)."""
    by_id = {p.id: p for p in restored}
    matching, changed, mismatched, missing = 0, [], [], []
    for p in production:
        r = by_id.get(p.id)
        recent = p.last_activity_at is not None and p.last_activity_at > backup_time
        if r is None:
            (changed if recent else missing).append(p.path)
        elif r.last_commit == p.last_commit:
            matching += 1
        else:
            (changed if recent else mismatched).append(p.path)
    ok = not mismatched and not missing and restored_count > 0 and (
        restored_count == production_count or bool(changed))
    return DrillComparison(ok=ok, production_projects=production_count, restored_projects=restored_count,
                           sampled=len(production), matching=matching, changed_since_backup=changed,
                           mismatched=mismatched, missing=missing)


def sample_ids(ids: list[int], size: int) -> list[int]:
    """A deterministic spread of `size` ids (first, last and evenly between)."""
    ids = sorted(ids)
    if len(ids) <= size:
        return ids
    step = (len(ids) - 1) / (size - 1)
    return sorted({ids[round(i * step)] for i in range(size)})


# === tasks =============================================================================================
#
# Tasks receive what they work on: the `GitLabHost` block (which host: production or scratch is the
# flow's choice of block), the `GitLabAPI` block, the off-site `Store`, and a `Redactor` for what
# they log and return. They never load a block by name.

from prefect import get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from tasks._retry import TRANSIENT_RETRIES  # noqa: E402
from tasks.redact import Redactor  # noqa: E402
from tasks.ssh import SFTPWriter, connect, run_command, sftp_chunks  # noqa: E402
from tasks.storage import (  # noqa: E402
    ChecksumMismatch,
    CopyResult,
    NullSink,
    Store,
    TarStreamVerifier,
    VerificationError,
    copy_stream_async,
)

if TYPE_CHECKING:
    from blocks.connections import GitLabAPI, GitLabHost

GITLAB_COMMANDS = {"gitlab-backup", "gitlab-ctl", "gitlab-rake"}
_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9_.@/\-]+\Z")


def _safe_path(path: str) -> str:
    if not _SAFE_PATH_RE.match(path) or ".." in path.split("/"):
        raise ValueError(f"refusing remote path {path!r}: absolute paths of [A-Za-z0-9_.@/-] only, no '..'")
    return path


def _within(directory: str, name: str) -> str:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"bad file name {name!r}")
    return _safe_path(posixpath.join(directory, name))


async def ensure_host_limit(name: str) -> str:
    """The global concurrency limit that keeps backups and restores of one GitLab host apart."""
    from prefect.client.orchestration import get_client

    limit_name = f"gitlab-host-{name}"
    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(limit_name, 1)
    return limit_name


@task(name="gitlab-command", cache_policy=NONE, timeout_seconds=7200)
async def gitlab_command(host: GitLabHost, argv: list[str], timeout_s: float, redactor: Redactor) -> dict:
    """Run one of omnibus' commands on the host, output streamed into the flow's log. Not retried:
    these commands change state; a failure is reported, not repeated."""
    if not argv or argv[0] not in GITLAB_COMMANDS:
        raise ValueError(f"only {sorted(GITLAB_COMMANDS)} run through gitlab_command, got {argv[:1]}")
    async with connect(host.connect_kwargs()) as conn:
        r = await run_command(conn, argv, timeout_s=timeout_s, logger=get_run_logger(), redact=redactor)
    return redactor.value({"argv": argv, "exit_status": r.exit_status, "seconds": round(r.seconds, 1),
                           "tail": r.stdout[-20:]})


@task(name="gitlab-preflight", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def gitlab_preflight(host: GitLabHost, api: GitLabAPI, redactor: Redactor) -> dict:
    """Readiness, version and edition from the API; free space, last backup size, secrets file over SSH."""
    import gitlab.exceptions
    import httpx

    out: dict[str, Any] = {"host": f"{host.host}:{host.port}", "problems": []}
    async with httpx.AsyncClient(timeout=api.timeout_s) as client:
        r = await client.get(f"{api.url}/-/readiness")
        out["ready"] = r.status_code == 200 and r.json().get("status") == "ok"
        if not out["ready"]:
            out["problems"].append(f"GitLab is not ready: /-/readiness answered {r.status_code}")
    if out["ready"]:  # unknown is not healthy: a GitLab that is not ready gets no version, and the run stops
        try:
            info = await asyncio.to_thread(lambda: api.get_client().http_get("/version"))
        except gitlab.exceptions.GitlabAuthenticationError as exc:
            raise PermissionError(f"the GitLab API refused the token ({exc.response_code}): check the GitLab API "
                                  "block") from None
        out["edition"] = "ee" if info.get("enterprise") or info["version"].endswith("-ee") else "ce"
        out["version"] = info["version"].removesuffix("-ee")
        out["gitlab_version"] = version_string(out["version"], out["edition"])
    else:
        out.update(edition=None, version=None, gitlab_version=None)
    backup_path = _safe_path(host.backup_path)
    async with connect(host.connect_kwargs()) as conn:
        df = await run_command(conn, ["df", "-PB1", "--", backup_path], timeout_s=30, redact=redactor)
        out["free_bytes"] = parse_df(df.text)
        secrets = await run_command(conn, ["test", "-f", _safe_path(host.secrets_file)], timeout_s=30, check=False)
        out["secrets_present"] = secrets.exit_status == 0
        async with conn.start_sftp_client() as sftp:
            archives = [(n.filename, n.attrs.size or 0) for n in await sftp.readdir(backup_path)
                        if backup_id_from_archive(n.filename)]
    archives.sort(key=lambda a: backup_id_from_archive(a[0]).epoch)
    out["last_backup"] = archives[-1][0] if archives else None
    out["last_backup_size"] = archives[-1][1] if archives else 0
    if not out["secrets_present"]:
        out["problems"].append(f"{host.secrets_file} is missing: a backup without it cannot be restored "
                               "(restore it from the last config backup first)")
    return redactor.value(out)


@task(name="gitlab-backup-create", cache_policy=NONE, timeout_seconds=6 * 3600, **TRANSIENT_RETRIES)
async def create_data_backup(host: GitLabHost, redactor: Redactor, options: dict[str, str] | None = None,
                             timeout_s: float = 6 * 3600) -> str:
    """`gitlab-backup create` with the host's options; returns the new backup id. A lost session is retried."""
    opts = dict(host.backup_options if options is None else options)
    argv = ["gitlab-backup", "create", *backup_option_args(opts)]
    backup_path = _safe_path(host.backup_path)
    async with connect(host.connect_kwargs()) as conn:
        async with conn.start_sftp_client() as sftp:
            before = {n.filename for n in await sftp.readdir(backup_path)}
        r = await run_command(conn, argv, timeout_s=timeout_s, logger=get_run_logger(), redact=redactor)
        async with conn.start_sftp_client() as sftp:
            after = {n.filename for n in await sftp.readdir(backup_path)}
    new = sorted((b for b in (backup_id_from_archive(n) for n in after - before) if b), key=lambda b: b.epoch)
    named = re.findall(r"Backup (\S+) is done", r.text)
    if named:
        return parse_backup_id(named[-1]).value
    if new:
        return new[-1].value
    raise RuntimeError("gitlab-backup create exited 0 but wrote no archive in "
                       f"{backup_path}: check gitlab_rails['backup_path'] in gitlab.rb")


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
                       store_key: str | None = None, expected_version: str | None = None) -> dict:
    """Stream a file from the host: SHA-256, tar check (archives) and off-site copy in one pass.

    Without a `store` (and `store_key`) the file is verified in place, not copied. The off-site
    copy only becomes visible once the store confirms it (see tasks.storage). Returns size,
    sha256, components, location.
    """
    if (store is None) != (store_key is None):
        raise ValueError("copy_offsite needs both a store and a store_key, or neither (verify in place)")
    path = _safe_path(remote_path)
    verifier = TarStreamVerifier(capture={"backup_information.yml"}) if archive else None
    sink = store.sink(store_key) if store is not None else NullSink()
    async with connect(host.connect_kwargs()) as conn:
        async with conn.start_sftp_client() as sftp:
            result: CopyResult = await copy_stream_async(posixpath.basename(path), sftp_chunks(sftp, path), sink,
                                                         verifier)
    out = {"name": result.name, "size": result.size, "sha256": result.sha256,
           "location": result.location if store is not None else None, "seconds": round(result.seconds, 2)}
    if archive and expected_version is not None:
        info = result.captured.get("backup_information.yml")
        check = check_archive(result.members, info.decode() if info else None, expected_version)
        if not check.ok:
            if store is not None:  # the copy we just made: never a pre-existing object
                await asyncio.to_thread(store.delete, [store_key])
            raise VerificationError(f"{result.name}: " + "; ".join(check.problems))
        out.update(components=check.components, skipped=check.skipped, gitlab_version=check.gitlab_version)
    elif archive:
        out["members"] = len(result.members)
    get_run_logger().info("%s: %d bytes, sha256 %s, %s", result.name, result.size, result.sha256,
                          f"copied to {result.location}" if store is not None else "verified in place")
    return out


@task(name="write-host-manifest", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def write_host_manifest(host: GitLabHost, path: str, manifest: dict) -> str:
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    async with connect(host.connect_kwargs()) as conn:
        async with conn.start_sftp_client() as sftp:
            async with SFTPWriter(sftp, _safe_path(path)) as w:
                await w.write(body)
                await w.commit()
    return path


@task(name="list-host-backups", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def list_host_backups(host: GitLabHost) -> dict:
    """Data archives and config archives on the host, with their manifests (if any)."""
    out: dict[str, list[dict]] = {"data": [], "config": []}
    async with connect(host.connect_kwargs()) as conn:
        async with conn.start_sftp_client() as sftp:
            for kind, directory in (("data", host.backup_path), ("config", host.config_backup_path)):
                directory = _safe_path(directory)
                names = {n.filename: n.attrs for n in await sftp.readdir(directory)}
                for name, attrs in names.items():
                    if kind == "data":
                        bid = backup_id_from_archive(name)
                        if not bid:
                            continue
                        backup_id, created = bid.value, bid.epoch
                        manifest_name = f"{bid.value}_gitlab_backup.manifest.json"
                        extra = [manifest_name]
                    else:
                        stamp = config_stamp_from_archive(name)
                        if not stamp:
                            continue
                        backup_id, created = stamp, int(stamp.split("_")[0])
                        manifest_name = f"gitlab_config_{stamp}.manifest.json"
                        extra = [manifest_name, secrets_copy_name(stamp)]
                    manifest = None
                    if manifest_name in names:
                        async with sftp.open(posixpath.join(directory, manifest_name), "rb") as f:
                            try:
                                manifest = json.loads(await f.read())
                            except ValueError:
                                manifest = None
                    out[kind].append({"id": backup_id, "created": created, "size": attrs.size or 0,
                                      "files": [posixpath.join(directory, n) for n in [name] + extra if n in names],
                                      "verified": bool(manifest and manifest.get("verified")),
                                      "manifest": manifest})
    return out


_DELETABLE_RE = re.compile(r"^(\d+_\d{4}_\d{2}_\d{2}(_[\d.]+(-ee)?_gitlab_backup)?|gitlab_config_\d+_\d{4}_\d{2}_\d{2})"
                           r"\.manifest\.json$|^gitlab-secrets_\d+_\d{4}_\d{2}_\d{2}\.json$")


@task(name="delete-host-backups", cache_policy=NONE, timeout_seconds=300, **TRANSIENT_RETRIES)
async def delete_host_files(host: GitLabHost, paths: list[str]) -> list[str]:
    """Delete backup files on the host; only names GitLab's backups use, only in the backup directories."""
    allowed_dirs = {_safe_path(host.backup_path).rstrip("/"), _safe_path(host.config_backup_path).rstrip("/")}
    for p in paths:
        name = posixpath.basename(_safe_path(p))
        if posixpath.dirname(p) not in allowed_dirs or not (
                backup_id_from_archive(name) or CONFIG_ARCHIVE_RE.match(name) or _DELETABLE_RE.match(name)):
            raise ValueError(f"refusing to delete {p!r}: not a backup file in the backup directories")
    async with connect(host.connect_kwargs()) as conn:
        async with conn.start_sftp_client() as sftp:
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


@task(name="fetch-to-host", cache_policy=NONE, timeout_seconds=6 * 3600, **TRANSIENT_RETRIES)
async def fetch_to_host(host: GitLabHost, store: Store, store_key: str, remote_path: str, expected_sha256: str,
                        archive: bool = False) -> dict:
    """Stream an off-site copy onto the host (`NAME.part`, renamed only when its SHA-256 matches)."""
    import hashlib

    path = _safe_path(remote_path)
    verifier = TarStreamVerifier() if archive else None
    sha, size = hashlib.sha256(), 0
    iterator = store.chunks(store_key)
    async with connect(host.connect_kwargs()) as conn:
        async with conn.start_sftp_client() as sftp:
            async with SFTPWriter(sftp, path) as w:
                while True:
                    chunk = await asyncio.to_thread(next, iterator, None)
                    if chunk is None:
                        break
                    sha.update(chunk)
                    size += len(chunk)
                    if verifier:
                        verifier.feed(chunk)
                    await w.write(chunk)
                if verifier:
                    verifier.finish()
                if sha.hexdigest() != expected_sha256:
                    raise ChecksumMismatch(f"off-site copy {store.describe(store_key)} has sha256 "
                                           f"{sha.hexdigest()[:16]}..., the manifest says {expected_sha256[:16]}...: "
                                           "it is corrupt; nothing was written to the host")
                await w.commit()
    get_run_logger().info("fetched %s to %s (%d bytes, sha256 verified)", store.describe(store_key), path, size)
    return {"path": path, "size": size, "sha256": expected_sha256}


@task(name="restore-config-files", cache_policy=NONE, timeout_seconds=600)
async def restore_config_files(host: GitLabHost, config_archive: str | None, secrets_copy: str,
                               source_etc_dir: str) -> dict:
    """Unpack the config archive into the host's /etc/gitlab, then put the secrets copy in place (0600).
    Member paths are rebased from the backed-up host's etc dir to this host's (`--strip-components`)."""
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


@task(name="gitlab-api-health", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def api_health(api: GitLabAPI, redactor: Redactor, wait_s: float = 60) -> dict:
    """Readiness, version and project count through the API; waits up to `wait_s` for readiness."""
    return redactor.value(await asyncio.to_thread(_api_health, api, wait_s))


def _api_health(api: GitLabAPI, wait_s: float) -> dict:
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        try:
            r = httpx.get(f"{api.url}/-/readiness", timeout=api.timeout_s)
            status = r.status_code
            if status == 200:
                break
        except httpx.TransportError as exc:
            status = f"unreachable ({type(exc).__name__})"
        if time.monotonic() > deadline:
            return {"ready": False, "status": status}
        time.sleep(1)
    gl = api.get_client()
    info = gl.http_get("/version")
    projects = gl.projects.list(per_page=1, get_all=False, iterator=True)
    return {"ready": True, "status": status, "version": info["version"], "projects": projects.total}


@task(name="gitlab-project-states", cache_policy=NONE, timeout_seconds=300, **TRANSIENT_RETRIES)
async def project_states(api: GitLabAPI, redactor: Redactor, ids: list[int] | None = None, sample: int = 20) -> dict:
    """Project count, and last commit SHA of a sample of projects (all pages walked, ids sampled)."""
    return redactor.value(await asyncio.to_thread(_project_states, api, ids, sample))


def _project_states(api: GitLabAPI, ids: list[int] | None, sample: int) -> dict:
    gl = api.get_client()
    listing = list(gl.projects.list(iterator=True, per_page=100, order_by="id", sort="asc"))
    chosen = ids if ids is not None else sample_ids([p.id for p in listing], sample)
    by_id = {p.id: p for p in listing}
    states = []
    for pid in chosen:
        p = by_id.get(pid)
        if p is None:
            continue
        commits = p.commits.list(per_page=1, get_all=False)
        states.append(ProjectState(id=p.id, path=p.path_with_namespace,
                                   last_commit=commits[0].id if commits else None,
                                   last_activity_at=p.last_activity_at).model_dump(mode="json"))
    return {"count": len(listing), "sampled": states}
