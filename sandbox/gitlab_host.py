"""The sandbox GitLab host: a real `sshd` on loopback whose `gitlab-backup`, `gitlab-ctl` and
`gitlab-rake` are the stand-ins in `sandbox/gitlab_scripts/`, with every omnibus path under a
host root in the sandbox state dir.

Key-only auth as root (the current user), a generated host key pinned in a known_hosts file, a
generated client key kept with the stand-in secrets (``<state>/secrets``) and referenced by path
from platform.yaml; the API tokens are stand-in secrets referenced as ``{env: NAME}``. `start_gitlab(sb)` starts the
production host and a scratch host (for the restore drill), each with its API stand-in
(`sandbox/gitlab_api.py`) reading the same host root, and fills `sb.config["gitlab"]`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sandbox._common import (
    SandboxLike,
    free_port,
    http_ok,
    require_binary,
    secrets_dir,
    tcp_banner,
    wait_for,
    write_secret_file,
)

SCRIPTS = Path(__file__).resolve().parent / "gitlab_scripts"
VERSION = "17.0.1"
EDITION = "ee"
TOKEN_ENV = "SANDBOX_GITLAB_TOKEN"
CLIENT_KEY = "gitlab_client_ed25519"
SCRATCH_TOKEN_ENV = "SANDBOX_GITLAB_SCRATCH_TOKEN"


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
                   edition: str = EDITION) -> dict[str, str]:
    """Lay out the omnibus paths under `root`; returns the config's path fields."""
    etc = root / "etc" / "gitlab"
    backups = root / "var" / "opt" / "gitlab" / "backups"
    state = root / "var" / "opt" / "gitlab" / "state"
    for d in (etc / "config_backup", backups, state, root / "faults", root / "opt" / "gitlab"):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    (etc / "gitlab.rb").write_text("external_url 'https://gitlab.sandbox.internal'\n"
                                   "gitlab_rails['backup_keep_time'] = 0\n")
    secrets_file = etc / "gitlab-secrets.json"
    secrets_file.write_text(json.dumps({"gitlab_rails": {"db_key_base": secret, "secret_key_base": secret[::-1]}}))
    os.chmod(secrets_file, 0o600)
    (root / "opt" / "gitlab" / "version-manifest.txt").write_text(f"gitlab-{edition} {version}\n")
    (state / "projects.json").write_text(json.dumps(projects))
    (state / "data_bytes").write_text(str(256 * 1024))
    (state / "services.json").write_text(json.dumps({s: "run" for s in (
        "alertmanager", "gitaly", "gitlab-workhorse", "logrotate", "nginx", "postgresql", "puma", "redis",
        "sidekiq")}))
    return {"backup_path": str(backups), "config_backup_path": str(etc / "config_backup"),
            "secrets_file": str(secrets_file)}


def _keys(sb: SandboxLike) -> tuple[Path, str]:
    """The client key pair shared by both hosts: (private key path, public key line)."""
    import asyncssh

    key_path = secrets_dir(sb.state_dir) / CLIENT_KEY
    public = sb.path("gitlab", f"{CLIENT_KEY}.pub")
    if not key_path.exists() or not public.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="ai-platform-ops-sandbox")
        write_secret_file(key_path, key.export_private_key())
        key.write_public_key(str(public))
    sb.secrets[CLIENT_KEY] = str(key_path)
    return key_path, public.read_text().strip()


def start_sshd(sb: SandboxLike, name: str, root: Path, public_key: str) -> tuple[int, Path]:
    """sshd on 127.0.0.1:<free port> for host `name`; returns (port, known_hosts path)."""
    import asyncssh

    sshd = require_binary("sshd", "openssh-server")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    d = sb.path("gitlab", name, "sshd", "x").parent
    os.chmod(d, 0o700)  # the emulated host's own keys: sshd refuses a host key others can read
    host_key = d / "ssh_host_ed25519_key"
    if not host_key.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        write_secret_file(host_key, key.export_private_key())
        key.write_public_key(str(host_key) + ".pub")
    authorized = d / "authorized_keys"
    authorized.write_text(public_key + "\n")
    os.chmod(authorized, 0o600)
    port = free_port()
    path = f"{SCRIPTS}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    config = d / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {host_key}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}", "AuthenticationMethods publickey", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "StrictModes no", "UsePAM no", "PrintMotd no", "PrintLastLog no", "X11Forwarding no",
        "AllowTcpForwarding no", "PermitUserEnvironment no", "Subsystem sftp internal-sftp",
        "MaxStartups 50:30:100", "MaxSessions 20", "LogLevel ERROR",
        f"SetEnv PATH={path} GITLAB_SANDBOX_ROOT={root} GITLAB_SANDBOX_PYTHON={sys.executable}", "",
    ]))
    proc = sb.spawn(f"sshd-{name}", [sshd, "-D", "-e", "-f", str(config)])
    wait_for(tcp_banner(port, b"SSH-"), f"sshd for GitLab host {name}", 20, proc, sb.log_of(f"sshd-{name}"))
    known_hosts = d / "known_hosts"
    key_type, key_b64 = Path(str(host_key) + ".pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")
    return port, known_hosts


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
    key_path, public_key = _keys(sb)
    hosts = {}
    for name, projects, token_env in (("production", seed_projects(12, "prod"), TOKEN_ENV),
                                      ("scratch", seed_projects(2, "scratch"), SCRATCH_TOKEN_ENV)):
        root = host_root(sb, name)
        # the host's own gitlab-secrets.json (what a backup must carry); read it with sb.secret("gitlab_secret_NAME")
        paths = init_host_root(root, projects, sb.secret(f"gitlab_secret_{name}", env=False))
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
    sb.config["gitlab"] = {
        "api_url": prod["api_url"], "token": prod["token"], "ssh": prod["ssh"],
        "backup_path": prod["backup_path"], "config_backup_path": prod["config_backup_path"],
        "secrets_file": prod["secrets_file"],
        "backup_options": {"STRATEGY": "copy", "SKIP": "registry", "GZIP_RSYNCABLE": "yes", "CRON": "1"},
        "scratch": {"api_url": scratch["api_url"], "token": scratch["token"], "ssh": scratch["ssh"],
                    "backup_path": scratch["backup_path"], "config_backup_path": scratch["config_backup_path"],
                    "secrets_file": scratch["secrets_file"]},
    }
