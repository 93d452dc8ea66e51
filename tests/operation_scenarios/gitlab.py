"""gitlab-restore as the operation contract drives it: the sandbox's production GitLab host (a real sshd whose
`gitlab-backup`, `gitlab-ctl` and `gitlab-rake` are the omnibus stand-ins, over the host's files) with the
backup that the `gitlab_backup_state` fixture took.

The scenario starts with work done in production after that backup (every project's last commit moved, one
project added), so that restoring the backup is visible in the host's own "database" (projects.json):
- applied: production's projects are the backup's again (read from the host's files and from the archive);
- change: GitLab is upgraded on the host while the approval waits (its version manifest, which its API
  reports): the plan's facts and a refusal differ;
- failure: injected after `gitlab-backup restore` ran (step 7, its reconfigure), so the data was replaced;
- way back: `gitlab-restore` of the safety backup named in the failure's message, approved;
- restored: production's projects are the ones before the failed restore, and GitLab serves again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
from datetime import datetime, timezone
from pathlib import Path

from tests.operation_scenarios import Scenario

_BEFORE: dict[str, list] = {}


def _root(sb) -> Path:
    return Path(sb.extra["gitlab_root_production"])


def _projects(sb) -> list[dict]:
    return json.loads((_root(sb) / "var/opt/gitlab/state/projects.json").read_text())


def _backup_id(sb) -> str:
    """The newest verified, off-site backup of the host (not a safety backup), from the manifests beside it."""
    found = [json.loads(p.read_text()) for p in (_root(sb) / "var/opt/gitlab/backups").glob(
        "*_gitlab_backup.manifest.json")]
    ok = [m for m in found if m.get("verified") and m.get("offsite") and not m.get("safety")]
    assert ok, "no verified off-site GitLab backup on the sandbox host (the gitlab_backup_state fixture makes one)"
    return max(ok, key=lambda m: m["finished_at"])["id"]


def backup_projects(sb, backup_id: str | None = None) -> list[dict]:
    """The projects inside a backup's archive on the host (its db dump), as the stand-in restores them
    (default: the scenario's backup)."""
    archive = _root(sb) / "var/opt/gitlab/backups" / f"{backup_id or _backup_id(sb)}_gitlab_backup.tar"
    with tarfile.open(archive) as tar:
        data = json.loads(gzip.decompress(tar.extractfile("db/database.sql.gz").read()))
    return data if isinstance(data, list) else data["projects"]


def _reset(sb) -> None:
    """GitLab running its installed version with production's config and secrets, no fault armed, and its
    data moved on since the backup."""
    from sandbox.gitlab_host import EDITION, PRODUCTION_RB, VERSION

    root = _root(sb)
    secret = sb.secret("gitlab_secret_production", env=False)
    for fault in ("gitlab-backup-restore", "gitlab-ctl-reconfigure"):
        (root / "faults" / f"{fault}.json").unlink(missing_ok=True)
    (root / "opt/gitlab/version-manifest.txt").write_text(f"gitlab-{EDITION} {VERSION}\n")
    (root / "etc/gitlab/gitlab.rb").write_text(PRODUCTION_RB)
    (root / "etc/gitlab/gitlab-secrets.json").write_text(
        json.dumps({"gitlab_rails": {"db_key_base": secret, "secret_key_base": secret[::-1]}}))
    state = root / "var/opt/gitlab/state"
    (state / "encrypted_with").write_text(hashlib.sha256(secret.encode()).hexdigest()[:16])
    services = json.loads((state / "services.json").read_text())
    (state / "services.json").write_text(json.dumps({s: "run" for s in services}))
    backed_up = backup_projects(sb)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")  # work after the backup: recent activity
    moved_on = [dict(p, last_commit=hashlib.sha1(p["last_commit"].encode()).hexdigest(), last_activity_at=now)
                for p in backed_up]
    moved_on.append(dict(backed_up[0], id=990, name="late", path_with_namespace="ml/late"))
    (state / "projects.json").write_text(json.dumps(moved_on))
    _BEFORE["projects"] = moved_on


def _applied(sb) -> bool:
    return _projects(sb) == backup_projects(sb)


def _change(sb) -> None:
    """GitLab upgraded on the host while the approval waits: its API reports 17.0.2 now."""
    (_root(sb) / "opt/gitlab/version-manifest.txt").write_text("gitlab-ee 17.0.2\n")


def _way_back(sb, failed):
    """Restore the safety backup the failed run took first, as its message says."""
    from flows.gitlab_restore import gitlab_restore
    from tests.approvals import APPROVE, run_and_answer

    m = re.search(r"gitlab-restore with backup_id=([A-Za-z0-9_.\-]+), dry_run=false", failed.message)
    assert m, f"the failure names no safety backup to restore: {failed.message}"
    return run_and_answer(gitlab_restore, {"platform": sb.config["name"], "backup_id": m.group(1),
                                           "dry_run": False, "poll_interval_s": 0.5}, APPROVE)


def _restored(sb) -> bool:
    services = json.loads((_root(sb) / "var/opt/gitlab/state/services.json").read_text())
    return _projects(sb) == _BEFORE["projects"] and services["puma"] == services["sidekiq"] == "run"


SCENARIOS = [Scenario("gitlab-restore", lambda sb: {"backup_id": _backup_id(sb)}, _applied, _change, _way_back,
                      restored=_restored, reset=_reset, fail_at=7, fixtures=("gitlab_backup_state",))]
