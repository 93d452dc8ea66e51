"""What GitLab's backups mean: pure rules, no Prefect, no network.

Backup ids and archive names as GitLab writes them, `backup_information.yml` and GitLab's backup
log, the archive check, manifests, retention, preflight and restore refusals, the output of
`gitlab-ctl status`, `gitlab-rake gitlab:check` and `gitlab-rake gitlab:doctor:secrets`, the
restore drill's overlay for the scratch host's `gitlab.rb`, and the drill's comparison. (The restore's steps,
and so the state a failed restore leaves, are written once, in tasks/gitlab_plans.py.)

Sources (GitLab's own, quoted where a rule depends on them):
- `lib/backup/manager.rb` (`backup_file?`, `backup_contents`, `build_backup_information`,
  `remove_old`, the `Dumping <task> ... [DISABLED]` / `[SKIPPED]` / `done` messages);
- `lib/backup/tasks/*.rb` (each task's id, human name, `enabled`, `destination_optional`);
- docs *Back up GitLab*, *Backup archive process* (backup id, `backup_keep_time`, `SKIP`,
  `BACKUP=`, `CRON=1`) and *Restore GitLab* (archive owned by `git`, `gitlab-ctl stop puma` /
  `sidekiq`, `gitlab-ctl status`, reconfigure after the secrets, `gitlab:check SANITIZE=true`,
  `gitlab:doctor:secrets`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

# --- backup ids --------------------------------------------------------------------------------------
#
# GitLab's backup manager recognises (lib/backup/manager.rb, `backup_file?`):
#   /^(\d{10})(?:_\d{4}_\d{2}_\d{2}(_\d+\.\d+\.\d+((-|\.)(pre|rc\d))?(-ee)?)?)?_gitlab_backup\.tar$/
# i.e. a bare timestamp, timestamp + date, and timestamp + date + version with an optional
# pre-release ("-pre", ".rc1") and "-ee". Its documentation (*Backup archive process*, *Restore
# GitLab*) shows "1493107454_2018_04_25_10.6.4-ce" and "11493107454_2018_04_25_10.6.4-ce": a "-ce"
# edition and an 11-digit timestamp. With `BACKUP=<name>` `build_backup_information` takes
# `File.basename(name)` as the id, whatever it is: our rule for those is CUSTOM_ID_RE.

ARCHIVE_SUFFIX = "_gitlab_backup.tar"
TIMESTAMP_ID_RE = re.compile(
    r"^(?P<epoch>\d{10,11})"
    r"(?:_(?P<date>\d{4}_\d{2}_\d{2})"
    r"(?:_(?P<version>\d{1,3}\.\d{1,3}\.\d{1,3})(?P<pre>[-.](?:pre|rc\d{1,3}))?(?P<edition>-ee|-ce)?)?)?\Z")
# A custom `BACKUP=` name: starts with a letter (so it never passes for a timestamp id), then up to
# 63 letters, digits, '_', '.', '-'; no '..'; not a whole archive file name.
CUSTOM_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}\Z")
ID_FORMS = ("<epoch> | <epoch>_<YYYY_MM_DD> | <epoch>_<YYYY_MM_DD>_<version>[-pre|-rcN|.rcN][-ee|-ce] "
            "(e.g. 1717000000_2024_05_29_17.0.1-ee), or a custom BACKUP= name: a letter, then up to 63 of "
            "[A-Za-z0-9_.-], no '..'")
CONFIG_STAMP_RE = re.compile(r"^(?P<epoch>\d{10,11})_(?P<date>\d{4}_\d{2}_\d{2})\Z")
CONFIG_ARCHIVE_RE = re.compile(r"^gitlab_config_(?P<stamp>\d{10,11}_\d{4}_\d{2}_\d{2})\.tar\Z")


class BackupId(BaseModel):
    value: str
    kind: Literal["timestamp", "custom"]
    epoch: int | None = None
    date: str | None = None
    version: str | None = None  # "17.0.1"
    pre: str | None = None  # "-pre", "-rc1", ".rc1"
    edition: Literal["ee", "ce"] | None = None  # None: the id does not say

    @property
    def archive(self) -> str:
        return f"{self.value}{ARCHIVE_SUFFIX}"

    @property
    def gitlab_version(self) -> str | None:
        """GitLab's spelling of the version the id names (``Gitlab::VERSION``), or None."""
        if self.version is None:
            return None
        return f"{self.version}{self.pre or ''}{'-ee' if self.edition == 'ee' else ''}"


def parse_backup_id(value: Any) -> BackupId:
    """The one parser of backup ids (create, discovery, preflight, retention, restore).

    Anything that is not a form GitLab writes or documents, nor a custom name under our rule, is a
    ValueError showing the expected forms.
    """
    text = value if isinstance(value, str) else None
    if text is not None and len(text) <= 80:
        m = TIMESTAMP_ID_RE.match(text)
        if m:
            edition = (m["edition"] or "").lstrip("-") or None
            if m["version"] and edition is None:
                edition = "ce"  # Gitlab::VERSION carries "-ee" for Enterprise only
            return BackupId(value=text, kind="timestamp", epoch=int(m["epoch"]), date=m["date"],
                            version=m["version"], pre=m["pre"], edition=edition)
        if CUSTOM_ID_RE.match(text) and ".." not in text and not text.endswith(ARCHIVE_SUFFIX):
            return BackupId(value=text, kind="custom")
    shown = repr(value if text is None else text[:80])
    hint = ""
    if text and text.endswith(ARCHIVE_SUFFIX):
        hint = f" (leave out {ARCHIVE_SUFFIX!r}: GitLab's BACKUP= takes the id, not the file name)"
    elif text and text[:1].isdigit():
        hint = " (it starts like a timestamp id but does not follow GitLab's form)"
    raise ValueError(f"{shown} is not a GitLab backup id{hint}: expected {ID_FORMS}; see the backup report for ids")


def backup_id_from_archive(name: str) -> BackupId | None:
    if not name.endswith(ARCHIVE_SUFFIX):
        return None
    try:
        return parse_backup_id(name[: -len(ARCHIVE_SUFFIX)])
    except ValueError:
        return None


def gitlab_removes(archive_name: str) -> bool:
    """Whether GitLab's own `remove_old` (``backup_keep_time``) would consider this archive: only names its
    `backup_file?` matches (10-digit timestamp, single-digit rc, no '-ce'); custom names are never pruned."""
    return bool(re.match(r"^(\d{10})(?:_\d{4}_\d{2}_\d{2}(_\d+\.\d+\.\d+((-|\.)(pre|rc\d))?(-ee)?)?)?_gitlab_backup\.tar$",
                         archive_name))


def config_stamp_from_archive(name: str) -> str | None:
    m = CONFIG_ARCHIVE_RE.match(name)
    return m["stamp"] if m else None


def secrets_copy_name(stamp: str) -> str:
    if not CONFIG_STAMP_RE.match(stamp):
        raise ValueError(f"bad config backup stamp {stamp!r}: expected <epoch>_<YYYY_MM_DD>")
    return f"gitlab-secrets_{stamp}.json"


def parse_gitlab_version(text: str) -> tuple[str, str | None, str]:
    """('17.0.1', pre, 'ee'|'ce') from GitLab's version string ('17.0.1-ee', '16.7.0-rc1-ee', '17.0.1')."""
    m = re.match(r"^(\d+\.\d+\.\d+)([-.](?:pre|rc\d+))?(-ee|-ce)?$", text.strip())
    if not m:
        raise ValueError(f"unexpected GitLab version {text!r}")
    return m[1], m[2], "ee" if m[3] == "-ee" else "ce"


def same_gitlab(a: str | None, b: str | None) -> bool:
    """Same version, pre-release and edition ('17.0.1-ce' and '17.0.1' are the same Community build)."""
    if not a or not b:
        return False
    try:
        return parse_gitlab_version(a) == parse_gitlab_version(b)
    except ValueError:
        return a == b


def version_string(version: str, edition: str) -> str:
    """GitLab's own spelling: '17.0.1-ee' for Enterprise, '17.0.1' for Community."""
    base = version.removesuffix("-ee").removesuffix("-ce")
    return f"{base}-ee" if edition == "ee" else base


# --- gitlab-backup options ---------------------------------------------------------------------------

BACKUP_OPTION_KEYS = {"STRATEGY", "SKIP", "GZIP_RSYNCABLE", "CRON", "COMPRESS_CMD", "DECOMPRESS_CMD",
                      "INCREMENTAL", "PREVIOUS_BACKUP", "GITLAB_BACKUP_MAX_CONCURRENCY",
                      "GITLAB_BACKUP_MAX_STORAGE_CONCURRENCY", "REPOSITORIES_SERVER_SIDE", "BACKUP"}
_OPTION_VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:\-]{0,200}\Z")


def backup_option_args(options: dict[str, str]) -> list[str]:
    """`KEY=VALUE` arguments for `gitlab-backup create`, validated (they reach the remote shell)."""
    out = []
    for key, value in sorted(options.items()):
        if key not in BACKUP_OPTION_KEYS:
            raise ValueError(f"unknown gitlab-backup option {key!r}; known: {sorted(BACKUP_OPTION_KEYS)}")
        if not _OPTION_VALUE_RE.match(str(value)):
            raise ValueError(f"gitlab-backup option {key} has a value with characters outside [A-Za-z0-9_.,:-]")
        if key == "SKIP":
            bad = [s for s in str(value).split(",") if s and s not in SKIPPABLE]
            if bad:
                raise ValueError(f"SKIP names unknown components {bad}; known: {sorted(SKIPPABLE)}")
        if key in ("BACKUP", "PREVIOUS_BACKUP"):
            parse_backup_id(str(value))
        out.append(f"{key}={value}")
    return out


# --- components --------------------------------------------------------------------------------------
#
# GitLab's backup tasks (lib/backup/manager.rb `backup_tasks`, lib/backup/tasks/*.rb): id -> the human
# name its log prints ("Dumping <human name> ... done") and its archive entry.

COMPONENT_NAMES = {
    "db": "database", "repositories": "repositories", "uploads": "uploads", "builds": "builds",
    "artifacts": "artifacts", "pages": "pages", "lfs": "lfs objects", "terraform_state": "terraform states",
    "registry": "container registry images", "packages": "packages", "ci_secure_files": "ci secure files",
    "external_diffs": "external diffs",
}
COMPONENTS = list(COMPONENT_NAMES)
# Tasks whose `enabled` depends on configuration: `Registry#enabled = Gitlab.config.registry.enabled`
# (disabled on most omnibus installs); a disabled task logs "[DISABLED]", is left out of
# `backup_contents`, and is NOT listed under `:skipped:` (which serialises SKIP= only).
DISABLEABLE = {"registry"}
# `destination_optional` tasks: `Repositories#destination_optional = true` (a GitLab without
# repositories writes no `repositories/` entry).
OPTIONAL = {"repositories"}
# Tasks newer than GitLab 17.0's manager (external_diffs): required only when GitLab says it dumped them.
NEWER = {"external_diffs"}
# SKIP= values: the task ids, plus `tar` and `remote` (docs *Back up GitLab*, "Excluding specific data").
SKIPPABLE = set(COMPONENTS) | {"tar", "remote"}


def parse_backup_information(text: str) -> dict[str, str]:
    """`backup_information.yml` (Ruby symbol keys such as ``:gitlab_version:``) as a plain dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            key, _, value = line[1:].partition(":")
        elif ": " in line:
            key, _, value = line.partition(": ")
        else:
            continue
        out[key.strip()] = value.strip().strip("'\"")
    return out


@dataclass
class BackupLog:
    """What GitLab's backup logger said about one `gitlab-backup create` (its stdout, or with CRON=1
    its `backup_json.log`, where `Gitlab::BackupLogger` writes every message as JSON)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    backup_id: str | None = None
    archive_started: bool = False

    @property
    def finished_components(self) -> int:
        return len(set(self.done) | set(self.skipped) | set(self.disabled))

    @property
    def declared(self) -> bool:
        return bool(self.done or self.skipped or self.disabled)


_BY_HUMAN = {v: k for k, v in COMPONENT_NAMES.items()}
_DUMP_RE = re.compile(r"Dumping (?P<name>.+?) \.\.\. ?(?P<what>done|\[DISABLED\]|\[SKIPPED\])\s*$")


def log_messages(lines: list[str]) -> list[str]:
    """Messages from stdout lines ("2024-05-29 17:00:00 UTC -- Dumping ...") or backup_json.log lines."""
    out = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(str(json.loads(line).get("message", "")))
                continue
            except ValueError:
                pass
        out.append(line.split(" -- ", 1)[1] if " -- " in line else line)
    return out


def parse_backup_log(lines: list[str]) -> BackupLog:
    log = BackupLog()
    for msg in log_messages(lines):
        m = _DUMP_RE.search(msg)
        if m and m["name"] in _BY_HUMAN:
            comp = _BY_HUMAN[m["name"]]
            {"done": log.done, "[DISABLED]": log.disabled, "[SKIPPED]": log.skipped}[m["what"]].append(comp)
            continue
        f = re.search(r"Dumping (.+?) failed", msg)
        if f and f[1] in _BY_HUMAN:
            log.failed.append(_BY_HUMAN[f[1]])
        if msg.startswith("Creating backup archive:"):
            log.archive_started = True
        d = re.search(r"Backup (\S+) is done\.", msg)
        if d:
            log.backup_id = d[1]
    return log


class ArchiveCheck(BaseModel):
    ok: bool
    gitlab_version: str | None = None
    components: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    disabled: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


def component_present(component: str, member_names: set[str]) -> bool:
    if component == "db":
        return any(n.startswith("db/") for n in member_names)
    if component == "repositories":
        return any(n.startswith("repositories/") or n == "repositories" for n in member_names)
    return f"{component}.tar.gz" in member_names


def check_archive(members: list[tuple[str, int]], info_text: str | None, expected_version: str | None,
                  log: BackupLog | None = None, expected: list[str] | None = None) -> ArchiveCheck:
    """Does a data archive hold what this GitLab declared it would?

    What is required, strongest source first: the components GitLab's log says it dumped in this
    run (`log`); else `expected` (the components a verified manifest recorded); else GitLab 17's
    tasks minus those that may legitimately be absent (disabled registry, optional repositories,
    newer tasks). Components under `:skipped:` are never required. The version must match.
    """
    if info_text is None:
        return ArchiveCheck(ok=False, problems=["backup_information.yml is missing: not a GitLab backup archive"])
    problems, notes = [], []
    info = parse_backup_information(info_text)
    version = info.get("gitlab_version")
    if expected_version is not None and not same_gitlab(version, expected_version):
        problems.append(f"backup_information.yml names GitLab {version!r}, expected {expected_version!r}")
    skipped = [s for s in info.get("skipped", "").split(",") if s and s in COMPONENT_NAMES]
    names = {n.removeprefix("./") for n, _ in members}
    present = [c for c in COMPONENTS if component_present(c, names)]
    disabled: list[str] = []
    if log is not None and log.declared:
        disabled = [c for c in log.disabled if c not in present]
        required = [c for c in log.done if c not in OPTIONAL]
        source = "GitLab's backup log reports as dumped"
    elif expected is not None:
        required = [c for c in expected if c not in OPTIONAL and c not in skipped]
        source = "the verified manifest lists"
    else:
        required = [c for c in COMPONENTS if c not in set(skipped) | DISABLEABLE | OPTIONAL | NEWER]
        source = "GitLab 17 always writes"
        absent = [c for c in COMPONENTS if c not in present and c not in skipped]
        if absent:
            notes.append(f"not in the archive (disabled, optional or not part of this GitLab): {', '.join(absent)}")
    missing = [c for c in required if c not in present and c not in skipped]
    if missing:
        problems.append(f"components {source} are missing from the archive: {', '.join(missing)}")
    return ArchiveCheck(ok=not problems, gitlab_version=version, components=present, skipped=skipped,
                        disabled=disabled, problems=problems, notes=notes)


# --- manifests ---------------------------------------------------------------------------------------


class BackupFile(BaseModel):
    role: Literal["data", "config", "secrets"]
    name: str
    host_path: str
    size: int
    sha256: str
    offsite: str | None = None
    store_key: str | None = None  # key relative to the store's prefix (secrets live under their own prefix)


class Manifest(BaseModel):
    id: str
    kind: Literal["data", "config"]
    platform: str
    host: str
    gitlab_version: str
    edition: str
    components: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    disabled: list[str] = Field(default_factory=list)
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


def offsite_key(kind: str, backup_id: str, role: str, name: str) -> str:
    """Where a file of a backup lives in the store: secrets apart from the data, under `secrets/`."""
    return f"secrets/{kind}/{backup_id}/{name}" if role == "secrets" else f"{kind}/{backup_id}/{name}"


def store_key_of(f: BackupFile, kind: str, backup_id: str) -> str:
    """A manifest file's store key (manifests before `store_key` kept everything under `<kind>/<id>/`)."""
    if f.store_key:
        return f.store_key
    return f"{kind}/{backup_id}/{f.name}"


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


def gitlab_rb_setting(text: str, section: str, key: str) -> str | None:
    """The last uncommented `section['key'] = value` in a gitlab.rb (Ruby: the last assignment wins)."""
    value = None
    pattern = re.compile(rf"^\s*{re.escape(section)}\[['\"]{re.escape(key)}['\"]\]\s*=\s*(.+?)\s*(#.*)?$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            value = m[1].strip().strip("'\"")
    return value


def keep_time_warning(keep_time_s: int | None, keep_days: int) -> str | None:
    """GitLab's `remove_old` deletes local archives older than `backup_keep_time` at the end of every
    `gitlab-backup create` (docs *Back up GitLab*, "Limit backup lifetime for local files"); it knows
    nothing of verification or of the newest verified backup this project always keeps."""
    if not keep_time_s or keep_time_s <= 0:
        return None
    if keep_time_s < keep_days * 86400:
        return (f"gitlab.rb sets gitlab_rails['backup_keep_time'] = {keep_time_s} ({keep_time_s / 86400:.1f} days): "
                f"GitLab itself deletes local archives that retention keeps ({keep_days} days, and always the "
                "newest verified one); set it to 0 and let retention decide")
    return (f"gitlab.rb sets gitlab_rails['backup_keep_time'] = {keep_time_s}: GitLab deletes local archives older "
            "than that even when no newer verified backup exists; set it to 0 and let retention decide")


# --- preflight and restore refusals ------------------------------------------------------------------


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


def version_problem(installed: str, installed_edition: str, backup_version: str) -> str | None:
    """GitLab restores only onto exactly the same version and edition (docs *Restore GitLab*)."""
    target = version_string(installed, installed_edition)
    if not same_gitlab(target, backup_version):
        return (f"the backup was made by GitLab {backup_version}; this host runs {target}. GitLab only restores "
                f"onto the same version and edition: install {backup_version} first")
    return None


@dataclass(frozen=True)
class HostFile:
    role: str
    name: str
    present: bool
    matches: bool | None  # None when absent
    offsite: bool


# What a restore stops itself before `gitlab-backup restore` (docs *Restore GitLab*): a host where only these are
# down (as a failed restore leaves it) can be restored; the rest of GitLab must run.
STOPPED_BY_RESTORE = ("puma", "sidekiq")


def restore_refusals(*, ready: bool, installed_version: str | None, installed_edition: str | None,
                     backup_version: str, files: list[HostFile], has_secrets: bool, free_bytes: int,
                     needed_bytes: int, down: list[str] | None = None) -> list[str]:
    """Why a restore must not start (nothing has been changed yet); empty when it may. `down`: the services
    `gitlab-ctl status` shows down when the API is not ready (None: not read)."""
    out = []
    if not ready and (down is None or not set(down) <= set(STOPPED_BY_RESTORE)):
        out.append("GitLab on the target is not ready (its readiness check failed"
                   + (f"; down: {', '.join(down)}" if down else "") + "): GitLab must be running before a restore, "
                   "only puma and sidekiq may be stopped (docs *Restore GitLab*); start it with `gitlab-ctl start`")
    if installed_version is None or installed_edition is None:
        out.append("the installed GitLab version is unknown (neither the API nor `gitlab-rake gitlab:env:info` "
                   "answered): start GitLab so its version can be checked against the backup")
    elif p := version_problem(installed_version, installed_edition, backup_version):
        out.append(p)
    if not has_secrets:
        out.append("the backup has no gitlab-secrets.json copy: restoring it would leave encrypted data unreadable")
    for f in files:
        if not f.present and not f.offsite:
            out.append(f"{f.name} is neither on the host nor off-site")
        elif f.present and f.matches is False:
            out.append(f"{f.name} on the host does not match the manifest's SHA-256: it is corrupt or another file; "
                       "move it away and run again (it will be fetched from off-site)")
    if p := space_problem(free_bytes, needed_bytes, "the restore (the archive unpacked beside itself)"):
        out.append(p)
    return out


def same_host(a: tuple[str, int], b: tuple[str, int]) -> bool:
    return (a[0].lower(), a[1]) == (b[0].lower(), b[1])


# --- output of gitlab-ctl and gitlab-rake --------------------------------------------------------------


def parse_ctl_status(text: str) -> dict[str, str]:
    """`gitlab-ctl status` (runit): "run: puma: (pid 1) 5s; run: log: ..." / "down: puma: 5s, normally up"."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(run|down|fail|finish|warning):\s*([A-Za-z0-9_\-]+):", line.strip())
        if m:
            out[m[2]] = "run" if m[1] == "run" else "down"
    return out


def parse_env_info(text: str) -> str | None:
    """GitLab's version from `gitlab-rake gitlab:env:info` ("GitLab information" ... "Version: 17.0.1-ee"), the
    way to read it on the host while puma (and so the API) is down; None when it does not say."""
    _, _, gitlab = text.partition("GitLab information")
    m = re.search(r"^\s*Version:\s+(\S+)\s*$", gitlab, re.M)
    if not m:
        return None
    try:
        parse_gitlab_version(m[1])
    except ValueError:
        return None
    return m[1]


def services_still_up(status: dict[str, str], services: tuple[str, ...] = ("puma", "sidekiq")) -> list[str]:
    """Which of `services` `gitlab-ctl status` does not show down (a service it does not list is not running)."""
    return [s for s in services if status.get(s) == "run"]


def check_failures(text: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """Failures `gitlab-rake gitlab:check` printed. It reports a failed check as "<check>? ... no" (or
    "... failed"), adds "Try fixing it:" and ends with "Please fix the error above and rerun the checks."
    while still exiting 0 (lib/system_check/simple_executor.rb): its exit status proves nothing."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if re.search(r"\.\.\. (no|failed|FAILED|Failed)\b", s) and not any(a.lower() in s.lower() for a in allowed):
            out.append(s)
    if not out and "Please fix the error above" in text and not allowed:
        out.append("gitlab:check asked to fix an error above")
    return out


def doctor_secrets_failures(text: str) -> list[str]:
    """Failures `gitlab-rake gitlab:doctor:secrets` printed: "- <Model> failures: N" with N > 0, or a
    run that never printed "Done!" (docs *Check a GitLab installation*, "Verify database values can be
    decrypted using the current secrets"). It exits 0 either way."""
    out = [f"{m[1]}: {m[2]} rows cannot be decrypted" for m in re.finditer(r"-\s+([\w:]+) failures:\s+(\d+)", text)
           if int(m[2]) > 0]
    if "Done!" not in text:
        out.append("gitlab:doctor:secrets did not finish (no 'Done!')")
    return out


# --- the drill's overlay for scratch's own gitlab.rb ----------------------------------------------------

OVERLAY_BEGIN = "# BEGIN ai-platform-ops restore drill overlay (managed: rewritten by every drill)"
OVERLAY_END = "# END ai-platform-ops restore drill overlay"


@dataclass(frozen=True)
class DrillOverlay:
    external_url: str
    object_store_bucket: str | None = None  # None: object storage off on scratch


def drill_overlay_lines(o: DrillOverlay) -> list[str]:
    """Settings that keep a scratch GitLab from acting as production (omnibus gitlab.rb keys):
    its own URL; no outgoing or incoming mail (`gitlab_email_enabled`, `smtp_enable`,
    `incoming_email_enabled`, `service_desk_email_enabled`); Sidekiq off, which runs every mirror
    update, scheduled (cron) job and mail delivery; object storage off or on a scratch bucket."""
    if not re.match(r"^https?://[A-Za-z0-9.\-:\[\]]+/?$", o.external_url):
        raise ValueError(f"bad scratch external_url {o.external_url!r}")
    lines = [OVERLAY_BEGIN, f"external_url '{o.external_url}'",
             "gitlab_rails['gitlab_email_enabled'] = false", "gitlab_rails['smtp_enable'] = false",
             "gitlab_rails['incoming_email_enabled'] = false", "gitlab_rails['service_desk_email_enabled'] = false",
             "sidekiq['enable'] = false"]
    if o.object_store_bucket:
        if not re.match(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$", o.object_store_bucket):
            raise ValueError(f"bad scratch bucket {o.object_store_bucket!r}")
        lines += ["gitlab_rails['object_store']['enabled'] = true"] + [
            f"gitlab_rails['object_store']['objects']['{t}']['bucket'] = '{o.object_store_bucket}'"
            for t in ("artifacts", "external_diffs", "lfs", "uploads", "packages", "dependency_proxy",
                      "terraform_state", "pages", "ci_secure_files")]
    else:
        lines.append("gitlab_rails['object_store']['enabled'] = false")
    return lines + [OVERLAY_END]


def apply_drill_overlay(gitlab_rb: str, overlay: DrillOverlay) -> str:
    """Scratch's own gitlab.rb with the overlay at the end (Ruby: the last assignment wins); the
    overlay of an earlier drill is replaced, everything else kept."""
    kept, inside = [], False
    for line in gitlab_rb.splitlines():
        if line.strip() == OVERLAY_BEGIN:
            inside = True
            continue
        if line.strip() == OVERLAY_END:
            inside = False
            continue
        if not inside:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept + [""] + drill_overlay_lines(overlay)) + "\n"


# --- reports -----------------------------------------------------------------------------------------


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


# --- the drill's comparison --------------------------------------------------------------------------


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
