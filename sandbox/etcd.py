"""The real etcd 3.4 (Debian `etcd-server`, `etcdctl` from `etcd-client`) as kubespray runs it on hosts.

`start_etcd(sb)` lays out, under `<state>/etcd/`:

- a kubespray etcd PKI (`roles/etcd/files/make-ssl-etcd.sh`: an RSA-2048 `ca.pem`, and per host
  `member-<host>.pem`, `admin-<host>.pem`, `node-<host>.pem` with `*-key.pem`) in each host's
  `/etc/ssl/etcd/ssl` (kubespray-defaults `etcd_cert_dir`), written by `control_plane.write_etcd_host`;
- the main cluster: `etcd1`..`etcd3` (kubespray's member names, `etcd_member_name`), each a real `etcd`
  with client and peer TLS and client-certificate auth, as `roles/etcd/templates/etcd.env.j2` sets it
  (`ETCD_CLIENT_CERT_AUTH=true`, `ETCD_PEER_CLIENT_CERT_AUTH=true`, `ETCD_CERT_FILE=member-<host>.pem`,
  `ETCD_TRUSTED_CA_FILE=ca.pem`, `ETCD_AUTO_COMPACTION_RETENTION=8`, `ETCD_QUOTA_BACKEND_BYTES`);
- the events cluster (`etcd_events_cluster_setup: true`, `etcd-events.env.j2`): one member `etcd1-events`
  with its own data dir (`/var/lib/etcd-events`) and the same certificates;
- a real `sshd` on the etcd host `etcd1` so `etcdctl` runs on the host, as kubespray's backup tasks do
  (`roles/etcd/handlers/backup.yml`: `etcdctl snapshot save` with `ETCDCTL_CERT=admin-<host>.pem`);
- a scratch host `etcd-scratch` (sshd, the same CA) for restore drills.

`--quota-backend-bytes` is small (`QUOTA_BYTES`) so that a real `NOSPACE` alarm is reachable in a test
(etcd v3.4 docs *Maintenance*, "Space quota"). The hosts are folders, not chroots: every path in the
config is prefixed by the host's `root`. Data is written through etcd's v3 JSON gateway (`put_keys`),
so snapshots hold real keys. Faults: `stop_member`/`start_member` (a member down), `pause_member`/
`resume_member` (SIGSTOP: a hung member that accepts connections and never answers).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx

from sandbox import pki
from sandbox._common import (
    SandboxLike,
    client_key_pair,
    free_ports,
    require_binary,
    start_key_only_sshd,
    wait_for,
)
from sandbox.control_plane import write_etcd_host

MAIN = ("etcd1", "etcd2", "etcd3")
EVENTS = ("etcd1-events",)
SSH_HOSTS = ("etcd1", "etcd-scratch")
CLIENT_KEY = "etcd_client_ed25519"
QUOTA_BYTES = 24 * 1024 * 1024  # main cluster; events get EVENTS_QUOTA_BYTES
EVENTS_QUOTA_BYTES = 16 * 1024 * 1024
# Not a credential: etcd's --initial-cluster-token only tells clusters apart at bootstrap (etcd v3.4 docs
# *Clustering*); kubespray etcd.env.j2 sets ETCD_INITIAL_CLUSTER_TOKEN=k8s_etcd (events: k8s_events).
INITIAL_CLUSTER_NAME = "k8s_etcd"


def base(sb: SandboxLike) -> Path:
    return sb.state_dir / "etcd"


def host_root(sb: SandboxLike, host: str) -> Path:
    return base(sb) / host / "root"


def cert_dir(root: Path) -> Path:
    return root / "etc" / "ssl" / "etcd" / "ssl"


def member_argv(etcd: str, name: str, root: Path, data_dir: Path, client: int, peer: int, cluster: str,
                token: str, quota: int) -> list[str]:
    """etcd's flags as kubespray's `etcd.env.j2` sets them (environment there, flags here)."""
    ssl = cert_dir(root)
    host = name.removesuffix("-events")
    return [etcd, "--name", name, "--data-dir", str(data_dir),
            "--listen-client-urls", f"https://127.0.0.1:{client}", "--advertise-client-urls", f"https://127.0.0.1:{client}",
            "--listen-peer-urls", f"https://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"https://127.0.0.1:{peer}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new", "--initial-cluster-token", token,
            "--cert-file", str(ssl / f"member-{host}.pem"), "--key-file", str(ssl / f"member-{host}-key.pem"),
            "--trusted-ca-file", str(ssl / "ca.pem"), "--client-cert-auth",
            "--peer-cert-file", str(ssl / f"member-{host}.pem"), "--peer-key-file", str(ssl / f"member-{host}-key.pem"),
            "--peer-trusted-ca-file", str(ssl / "ca.pem"), "--peer-client-cert-auth",
            "--auto-compaction-retention", "8", "--quota-backend-bytes", str(quota), "--snapshot-count", "10000",
            "--logger", "zap", "--log-level", "warn"]


def start_etcd(sb: SandboxLike, quota_bytes: int | None = None) -> None:
    """`quota_bytes` overrides the main cluster's small test quota (the benchmark loads hundreds of MB)."""
    etcd = require_binary("etcd", "etcd-server")
    require_binary("etcdctl", "etcd-client")
    b = base(sb)
    shutil.rmtree(b, ignore_errors=True)
    b.mkdir(parents=True)
    key_path, public_key = client_key_pair(sb, CLIENT_KEY, base(sb) / f"{CLIENT_KEY}.pub",
                                            "ai-platform-ops-sandbox-etcd")
    ca = pki.issue("etcd-ca", is_ca=True, key=pki.new_key("RSA-2048"))  # make-ssl-etcd.sh: genrsa 2048
    hosts = (*MAIN, "etcd-scratch")
    for h in hosts:
        root = host_root(sb, h)
        for other in MAIN:  # kubespray copies every member's certificates to every etcd host
            write_etcd_host(root, other, ca)
        if h not in MAIN:
            write_etcd_host(root, h, ca)
        (root / "var" / "backups").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)
    # below the ephemeral range: a stopped member's port stays free for its restart (`free_ports`)
    fresh = free_ports(2 * len((*MAIN, *EVENTS)), below_ephemeral=True)
    ports = {n: (fresh.pop(), fresh.pop()) for n in (*MAIN, *EVENTS)}
    members: dict[str, dict[str, Any]] = {}
    main_quota = quota_bytes or QUOTA_BYTES
    for group, names, token, quota, sub in (("main", MAIN, INITIAL_CLUSTER_NAME, main_quota, "etcd"),
                                            ("events", EVENTS, "k8s_events", EVENTS_QUOTA_BYTES, "etcd-events")):
        cluster = ",".join(f"{n}=https://127.0.0.1:{ports[n][1]}" for n in names)
        for n in names:
            root = host_root(sb, n.removesuffix("-events"))
            argv = member_argv(etcd, n, root, root / "var" / "lib" / sub, ports[n][0], ports[n][1], cluster, token,
                               quota)
            sb.spawn(f"etcd-{n}", argv)
            members[n] = {"cluster": group, "host": n.removesuffix("-events"), "client_port": ports[n][0],
                          "peer_port": ports[n][1], "argv": argv}
    ssh: dict[str, dict[str, Any]] = {}
    for h in SSH_HOSTS:
        root = host_root(sb, h)
        bin_dir = _fault_wrappers(b / h, root)
        env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "ETCD_SANDBOX_ROOT": str(root)}
        port, known_hosts = start_key_only_sshd(sb, f"etcd-{h}", b / h / "sshd", public_key, env)
        ssh[h] = {"name": h, "host": "127.0.0.1", "port": port, "user": "root", "private_key_path": str(key_path),
                  "known_hosts": str(known_hosts), "connect_timeout_s": 5, "root": str(root)}
    info = {"members": members, "ssh": ssh, "roots": {h: str(host_root(sb, h)) for h in hosts},
            "quota_bytes": {"main": main_quota, "events": EVENTS_QUOTA_BYTES}}
    for n in members:
        wait_for(lambda n=n: _healthy(info, n), f"etcd member {n}", 60, None, sb.log_of(f"etcd-{n}"))
    # A Kubernetes cluster's etcd is never empty: the API server writes its objects under its --etcd-prefix
    # (default "/registry", kube-apiserver reference, *Options*) from its first start. Seed both clusters so
    # a snapshot (the demo's, a test's) has real content; a never-written etcd answers a snapshot of revision
    # 0 against a live revision of 1, which no platform ever backs up.
    put_keys(info, "etcd1", 50, prefix="/registry/sandbox/")
    put_keys(info, "etcd1-events", 20, prefix="/registry/events/default/")  # kube-apiserver's --etcd-servers-overrides
    sb.extra["etcd"] = info
    sb.config["etcd"] = platform_section(info)


def platform_section(info: dict) -> dict:
    """The platform config's `etcd` section (blocks/config.py `EtcdConfig`) for this sandbox: etcdctl on `etcd1`,
    the two clusters with their small quotas, the scratch host for drills, short time limits."""
    def eps(cluster: str) -> list[str]:
        return [f"https://127.0.0.1:{m['client_port']}" for m in info["members"].values() if m["cluster"] == cluster]
    drill_ports = free_ports(2, below_ephemeral=True)  # the members listen on theirs: never handed out here
    return {
        "hosts": [dict(info["ssh"]["etcd1"])],
        "clusters": [{"name": "main", "endpoints": eps("main"), "quota_bytes": info["quota_bytes"]["main"]},
                     {"name": "events", "endpoints": eps("events"), "quota_bytes": EVENTS_QUOTA_BYTES}],
        "etcdctl": "etcdctl",
        "snapshot_dir": "/var/backups/etcd-snapshots",
        "sample_keys": 10,
        "thresholds": {"fragmented_min_bytes": 4 * 1024 * 1024},
        "timeouts": {"dial": "2s", "command": "5s", "snapshot": "20s", "transfer": "5m", "defrag": "1m",
                     "drill": "5m"},
        "retention": {"keep_days": 7, "keep_count": 4},
        "scratch": {**info["ssh"]["etcd-scratch"], "etcd": "etcd", "work_dir": "/var/lib/etcd-drill",
                    "client_port": drill_ports[0], "peer_port": drill_ports[1]},
    }


# The "corrupt snapshot file" fault: a disk or filesystem that damages what was written (a torn write, a full
# disk under a non-atomic copy). The real etcdctl runs; when `<root>/faults/corrupt-snapshot` exists, the file
# that `snapshot save` completed is cut to a third, as a torn file is; `snapshot status` then refuses it
# (bolt's consistency check, `clientv3/snapshot/v3_snapshot.go` Status: "invalid database" / "snapshot file
# integrity check failed").
_ETCDCTL_WRAPPER = """#!/bin/sh
{real} "$@" || exit $?
[ -f "$ETCD_SANDBOX_ROOT/faults/corrupt-snapshot" ] || exit 0
p2=; p1=
for a in "$@"; do
  if [ "$p2" = snapshot ] && [ "$p1" = save ] && [ -f "$a" ]; then
    truncate -s $(( $(stat -c %s "$a") / 3 )) "$a"
  fi
  p2=$p1; p1=$a
done
"""


def _fault_wrappers(host_dir: Path, root: Path) -> Path:
    bin_dir = host_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (root / "faults").mkdir(parents=True, exist_ok=True)
    w = bin_dir / "etcdctl"
    w.write_text(_ETCDCTL_WRAPPER.format(real=shutil.which("etcdctl")))
    w.chmod(0o755)
    return bin_dir


def client_cert(info: dict, host: str = "etcd1") -> tuple[str, str, str]:
    """(ca, cert, key) of `admin-<host>` on the host's disk."""
    d = cert_dir(Path(info["roots"][host]))
    return str(d / "ca.pem"), str(d / f"admin-{host}.pem"), str(d / f"admin-{host}-key.pem")


def _client(info: dict, timeout: float = 5.0) -> httpx.Client:
    ca, cert, key = client_cert(info)
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return httpx.Client(verify=ctx, timeout=timeout)


def url(info: dict, member: str) -> str:
    return f"https://127.0.0.1:{info['members'][member]['client_port']}"


def _healthy(info: dict, member: str) -> bool:
    """etcd's `/health` (etcd v3.4 docs *Monitoring*: {"health":"true"} once it has a leader)."""
    try:
        with _client(info, 2) as c:
            r = c.get(url(info, member) + "/health")
            return r.status_code == 200 and r.json().get("health") == "true"
    except (httpx.HTTPError, ValueError, OSError):
        return False


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def put_keys(info: dict, member: str, count: int, *, prefix: str = "/registry/sandbox/", value_size: int = 256,
             start: int = 0) -> int:
    """Write `count` keys through etcd's v3 JSON gateway (`POST /v3/kv/put`, etcd v3.4 docs *gRPC
    gateway*). Returns the revision after the last write; raises on an etcd error (NOSPACE included)."""
    rev = 0
    with _client(info, 30) as c:
        for i in range(start, start + count):
            value = (f"{i}:".encode() + os.urandom(value_size // 2).hex().encode())[:value_size]
            r = c.post(url(info, member) + "/v3/kv/put", json={"key": _b64(f"{prefix}{i:08d}"), "value": _b64(value)})
            body = r.json()
            if r.status_code != 200 or "error" in body:
                raise RuntimeError(f"etcd put refused: {body.get('error') or body}")
            rev = int(body["header"]["revision"])
    return rev


def delete_prefix(info: dict, member: str, prefix: str) -> int:
    """Delete every key under `prefix` (`POST /v3/kv/deleterange` with range_end = prefix + 1, etcd v3.4 docs
    *gRPC gateway*; allowed under a NOSPACE alarm, *Maintenance* "Space quota"). Returns how many went."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    with _client(info, 30) as c:
        r = c.post(url(info, member) + "/v3/kv/deleterange", json={"key": _b64(prefix), "range_end": _b64(end)})
        body = r.json()
        if r.status_code != 200 or "error" in body:
            raise RuntimeError(f"etcd deleterange refused: {body.get('error') or body}")
        return int(body.get("deleted", 0))


def stop_member(sb: SandboxLike, member: str) -> None:
    """A member down: its process stopped (the port refuses connections)."""
    sb.stop_process(f"etcd-{member}")


def start_member(sb: SandboxLike, member: str) -> None:
    info = sb.extra["etcd"]
    sb.spawn(f"etcd-{member}", info["members"][member]["argv"])
    wait_for(lambda: _healthy(info, member), f"etcd member {member}", 60, None, sb.log_of(f"etcd-{member}"))


def pause_member(sb: SandboxLike, member: str, resume: bool = False) -> None:
    """A hung member (SIGSTOP): the kernel still accepts its connections, nothing answers."""
    os.kill(sb.processes[f"etcd-{member}"]["pid"], signal.SIGCONT if resume else signal.SIGSTOP)


def compacted_past(info: dict, member: str, revision: int) -> bool:
    """Whether the history at `revision` was compacted away: a range read at that revision answers
    "mvcc: required revision has been compacted" (etcd v3.4 *Maintenance*, "History compaction";
    `POST /v3/kv/range` with `revision`, *gRPC gateway*)."""
    with _client(info, 10) as c:
        r = c.post(url(info, member) + "/v3/kv/range", json={"key": _b64("/registry/"), "revision": revision})
        body = r.json()
    return "compacted" in str(body.get("error") or body.get("message") or "")


def alarm(info: dict, member: str, action: str, alarm_type: str = "NOSPACE") -> dict:
    """`POST /v3/maintenance/alarm` (etcdserverpb.AlarmRequest: action GET/ACTIVATE/DEACTIVATE, memberID 0 =
    every member for GET/DEACTIVATE): raise or clear an alarm as etcd does when a member runs out of quota."""
    with _client(info, 10) as c:
        status = c.post(url(info, member) + "/v3/maintenance/status", json={}).json()
        member_id = status["header"]["member_id"]
        r = c.post(url(info, member) + "/v3/maintenance/alarm",
                   json={"action": action, "memberID": member_id, "alarm": alarm_type})
        body = r.json()
    if r.status_code != 200 or "error" in body:
        raise RuntimeError(f"etcd alarm {action} refused: {body}")
    return body
