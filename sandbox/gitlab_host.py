"""The sandbox GitLab host: a real `sshd` on loopback whose `gitlab-backup`, `gitlab-ctl` and
`gitlab-rake` are the stand-ins in `sandbox/gitlab_scripts/`, with every omnibus path under a
host root in the sandbox state dir.

The emulated host runs its omnibus commands the way omnibus does: `gitlab-ctl` as root (the SSH
user), `gitlab-backup` as the non-root `git` service user, which `ensure_service_user()` creates
(idempotently, `useradd --system`) when the sandbox starts as root. Backups, state and GitLab's
backup log belong to that user, as omnibus lays them out (docs *Back up GitLab*: backups in
`/var/opt/gitlab/backups`, owned by git, 0700).

Key-only auth as root (the current user), a generated host key pinned in a known_hosts file, a
generated client key kept with the stand-in secrets (``<state>/secrets``) and referenced by path
from platform.yaml; the API tokens are stand-in secrets referenced as ``{env: NAME}``. `start_gitlab(sb)` starts the
production host and a scratch host (for the restore drill), each with its API stand-in
(`sandbox/gitlab_api.py`) reading the same host root, and fills `sb.config["gitlab"]`.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

from sandbox._common import (
    SandboxLike,
    client_key_pair,
    free_port,
    http_ok,
    start_key_only_sshd,
    wait_for,
)

SCRIPTS = Path(__file__).resolve().parent / "gitlab_scripts"
VERSION = "17.0.1"
EDITION = "ee"
TOKEN_ENV = "SANDBOX_GITLAB_TOKEN"
CLIENT_KEY = "gitlab_client_ed25519"
SCRATCH_TOKEN_ENV = "SANDBOX_GITLAB_SCRATCH_TOKEN"
SERVICE_USER = "git"  # omnibus' service user (gitlab.rb `user['username']`, default "git")
# The production host's outward settings: what a drill must never carry onto the scratch host.
PRODUCTION_RB = """external_url 'https://gitlab.sandbox.internal'
gitlab_rails['backup_keep_time'] = 0
gitlab_rails['gitlab_email_enabled'] = true
gitlab_rails['gitlab_email_from'] = 'gitlab@sandbox.internal'
gitlab_rails['smtp_enable'] = true
gitlab_rails['smtp_address'] = 'smtp.sandbox.internal'
gitlab_rails['incoming_email_enabled'] = true
gitlab_rails['incoming_email_address'] = 'incoming+%{key}@sandbox.internal'
gitlab_rails['object_store']['enabled'] = true
gitlab_rails['object_store']['objects']['artifacts']['bucket'] = 'prod-gitlab-artifacts'
gitlab_rails['object_store']['objects']['uploads']['bucket'] = 'prod-gitlab-uploads'
# No registry_external_url: the container registry is disabled, as on most omnibus installs.
"""
SCRATCH_EXTERNAL_URL = "https://gitlab-drill.sandbox.internal"
SCRATCH_RB = "external_url '{url}'\ngitlab_rails['backup_keep_time'] = 0\n"


def ensure_service_user(name: str = SERVICE_USER) -> tuple[int, int]:
    """The host's non-root service user: (uid, gid). Created once, as a system user without a login
    shell, when the sandbox runs as root; an existing user of that name is used as it is. Without root
    the stand-in cannot switch users and runs everything as the current user."""
    try:
        user = pwd.getpwnam(name)
        return user.pw_uid, user.pw_gid
    except KeyError:
        pass
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/var/opt/gitlab",
                    "--shell", "/usr/sbin/nologin", "--comment", "GitLab service user (ai-platform-ops sandbox)",
                    name], check=True, capture_output=True)
    user = pwd.getpwnam(name)
    return user.pw_uid, user.pw_gid


def seed_projects(count: int, salt: str) -> list[dict]:
    import hashlib

    return [{
        "id": i, "name": f"model-{i}", "path_with_namespace": f"ml/model-{i}",
        "last_commit": hashlib.sha1(f"{salt}-{i}".encode()).hexdigest(),
        "last_activity_at": "2024-05-01T00:00:00.000Z", "default_branch": "main",
    } for i in range(1, count + 1)]


def host_root(sb: SandboxLike, name: str) -> Path:
    return sb.state_dir / "gitlab" / name / "root"


def init_host_root(root: Path, projects: list[dict], secret: str, version: str = VERSION,
                   edition: str = EDITION, gitlab_rb: str = PRODUCTION_RB,
                   service_user: str = SERVICE_USER) -> dict[str, str]:
    """Lay out the omnibus paths under `root`, owned as omnibus owns them; returns the config's path fields."""
    import hashlib

    uid, gid = ensure_service_user(service_user)
    etc = root / "etc" / "gitlab"
    backups = root / "var" / "opt" / "gitlab" / "backups"
    state = root / "var" / "opt" / "gitlab" / "state"
    rails_log = root / "var" / "log" / "gitlab" / "gitlab-rails"
    for d in (etc / "config_backup", backups, state, rails_log, root / "faults", root / "opt" / "gitlab",
              root / "run"):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    (etc / "gitlab.rb").write_text(gitlab_rb)
    os.chmod(etc / "gitlab.rb", 0o600)
    secrets_file = etc / "gitlab-secrets.json"
    secrets_file.write_text(json.dumps({"gitlab_rails": {"db_key_base": secret, "secret_key_base": secret[::-1]}}))
    os.chmod(secrets_file, 0o600)
    (state / "encrypted_with").write_text(hashlib.sha256(secret.encode()).hexdigest()[:16])
    (root / "opt" / "gitlab" / "version-manifest.txt").write_text(f"gitlab-{edition} {version}\n")
    (state / "projects.json").write_text(json.dumps(projects))
    (state / "data_bytes").write_text(str(256 * 1024))
    (state / "services.json").write_text(json.dumps({s: "run" for s in (
        "alertmanager", "gitaly", "gitlab-workhorse", "logrotate", "nginx", "postgresql", "puma", "redis",
        "sidekiq")}))
    # what the git user owns on omnibus: the backup directory (0700), the data, the Rails logs
    for d in (backups, state, rails_log):
        for p in [d, *d.rglob("*")]:
            os.chown(p, uid, gid)
    return {"backup_path": str(backups), "config_backup_path": str(etc / "config_backup"),
            "secrets_file": str(secrets_file), "gitlab_rb": str(etc / "gitlab.rb"),
            "backup_log": str(rails_log / "backup_json.log"), "control_dir": str(root / "run" / "ai-platform-ops")}


def start_sshd(sb: SandboxLike, name: str, root: Path, public_key: str) -> tuple[int, Path]:
    """sshd on 127.0.0.1:<free port> for GitLab host `name`; returns (port, known_hosts path).

    As on a production host, sshd does not deliver the client's signal requests: OpenSSH answers them
    with "session_signal_req: session signalling requires privilege separation" (session.c) here, and
    many production servers refuse or ignore them. A client that times out must stop its remote
    command from a second session (tasks.ssh.run_supervised); the tests rely on that.
    """
    path = f"{SCRIPTS}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    env = {"PATH": path, "GITLAB_SANDBOX_ROOT": str(root), "GITLAB_SANDBOX_PYTHON": sys.executable,
           "GITLAB_SANDBOX_USER": SERVICE_USER}
    return start_key_only_sshd(sb, name, sb.path("gitlab", name, "sshd", "x").parent, public_key, env)


def start_api(sb: SandboxLike, name: str, root: Path, token_env: str) -> str:
    port = free_port()
    proc = sb.spawn(f"gitlab-api-{name}", [sys.executable, "-m", "sandbox.gitlab_api", "--port", str(port),
                                           "--root", str(root), "--token-file", str(sb.secret_file(token_env))],
                    cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    wait_for(http_ok(f"{url}/-/readiness"), f"GitLab API stand-in {name}", 20, proc, sb.log_of(f"gitlab-api-{name}"))
    return url


def start_gitlab(sb: SandboxLike) -> None:
    """Production and scratch GitLab hosts (sshd + API stand-in each), and the `gitlab` config section."""
    key_path, public_key = client_key_pair(sb, CLIENT_KEY, sb.path("gitlab", f"{CLIENT_KEY}.pub"),
                                            "ai-platform-ops-sandbox")
    hosts = {}
    for name, projects, token_env in (("production", seed_projects(12, "prod"), TOKEN_ENV),
                                      ("scratch", seed_projects(2, "scratch"), SCRATCH_TOKEN_ENV)):
        root = host_root(sb, name)
        rb = PRODUCTION_RB if name == "production" else SCRATCH_RB.format(url=SCRATCH_EXTERNAL_URL)
        # the host's own gitlab-secrets.json (what a backup must carry); read it with sb.secret("gitlab_secret_NAME")
        paths = init_host_root(root, projects, sb.secret(f"gitlab_secret_{name}", env=False), gitlab_rb=rb)
        port, known_hosts = start_sshd(sb, name, root, public_key)
        sb.secret(token_env, prefix="glpat-")
        api_url = start_api(sb, name, root, token_env)
        sb.urls[f"gitlab-{name}"] = api_url
        sb.extra[f"gitlab_root_{name}"] = str(root)
        hosts[name] = {
            "api_url": api_url, "token": {"env": token_env},
            "ssh": {"host": "127.0.0.1", "port": port, "user": "root", "private_key_path": str(key_path),
                    "known_hosts": str(known_hosts), "connect_timeout_s": 10},
            **paths,
        }
    prod, scratch = hosts["production"], hosts["scratch"]
    host_fields = ("backup_path", "config_backup_path", "secrets_file", "gitlab_rb", "backup_log", "control_dir")
    sb.config["gitlab"] = {
        "api_url": prod["api_url"], "token": prod["token"], "ssh": prod["ssh"],
        **{k: prod[k] for k in host_fields},
        # no SKIP: the registry is disabled in gitlab.rb, and GitLab leaves it out by itself
        "backup_options": {"STRATEGY": "copy", "GZIP_RSYNCABLE": "yes", "CRON": "1"},
        "backup_user": f"{SERVICE_USER}:{SERVICE_USER}",
        "scratch": {"api_url": scratch["api_url"], "token": scratch["token"], "ssh": scratch["ssh"],
                    **{k: scratch[k] for k in host_fields}, "external_url": SCRATCH_EXTERNAL_URL},
    }
