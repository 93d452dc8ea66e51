"""The sandbox's control-plane and etcd hosts: real sshd, a kubeadm/kubespray PKI of real X.509, TLS
listeners serving it, a stand-in `kubeadm` and `systemctl`, and TLS secrets in the emulated API.

`start_control_plane(sb)` lays out, each under its own root folder (`<state>/control-plane/<node>/root`):

- control-plane hosts `cp-1`..`cp-3` as kubespray lays out a kubeadm control plane with stacked etcd
  (`etcd_deployment_type: kubeadm`; kubespray-defaults `kube_cert_dir` /etc/kubernetes/ssl, with
  `kube_cert_compat_dir` /etc/kubernetes/pki a symlink to it): the CAs, the leaves of `sandbox/pki.py`, the
  kubeconfigs with embedded client certificates (`super-admin.conf` only on cp-1, "the node where kubeadm
  init ran", as kubespray's `k8s-certs-renew.py.j2` says), `kubelet.conf` pointing at the kubelet's
  rotating `kubelet-client-current.pem`, static pod manifests, and the state of kubespray's
  `k8s-certs-renew.timer` / `.service` (`roles/kubernetes/control-plane/templates/`);
- an etcd host `etcd-1` as kubespray's etcd role leaves one (`etcd_deployment_type: host`,
  `roles/etcd/files/make-ssl-etcd.sh`: `/etc/ssl/etcd/ssl/ca.pem`, `member-<host>.pem`,
  `admin-<host>.pem`, `node-<host>.pem`, keys `*-key.pem`), serving the main and the events cluster
  (kubespray: client ports 2379 and 2383);
- `etcd-2`, a host that is down (its port has no listener).

The test cases are in the PKI on purpose (`CASES`): certificates that expire in days, one expired, one
not yet valid, one with a wrong SAN, a 1024-bit RSA key, a SHA-1 signature, a truncated PEM file and a
dangling symlink. The TLS listeners (`sandbox/tls_listeners.py`) serve each API server (with `/readyz`)
and etcd, an ingress controller with SNI (and its fake default certificate for unknown names) and a hung
endpoint. The emulated Kubernetes API gets `kubernetes.io/tls` and Opaque secrets (`seed_tls_secrets`).
A pristine copy of every root is kept: `reset_control_plane(sb)` puts it back (tests that renew).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx

from sandbox import pki
from sandbox._common import (
    PYTHON,
    SandboxLike,
    client_key_pair,
    free_ports,
    start_key_only_sshd,
    wait_for,
    write_secret_file,
)

SCRIPTS = Path(__file__).resolve().parent / "control_plane_scripts"
CLIENT_KEY = "control_plane_client_ed25519"
KUBE_TOKEN = "SANDBOX_KUBE_TOKEN"  # the emulated API's token (sandbox/platform.py KUBE_TOKEN)
CONTROL_PLANE = ("cp-1", "cp-2", "cp-3")
ETCD_HOSTS = ("etcd-1",)
DOWN_HOST = "etcd-2"
INGRESS_NAMES = ("grafana.sandbox.internal", "argo.sandbox.internal")
UNKNOWN_INGRESS_NAME = "kibana.sandbox.internal"  # no Ingress TLS secret: the controller's fake certificate
STATIC_PODS = ("kube-apiserver.yaml", "kube-controller-manager.yaml", "kube-scheduler.yaml", "etcd.yaml")
NOW = lambda: dt.datetime.now(dt.UTC)

# The deliberate cases: (node, file under the host root) -> what is special about it.
CASES: dict[str, tuple[str, str]] = {
    "expires-in-5-days": ("cp-1", "etc/kubernetes/ssl/apiserver-kubelet-client.crt"),
    "expires-in-20-days": ("cp-1", "etc/kubernetes/ssl/front-proxy-client.crt"),
    "expired": ("cp-2", "etc/kubernetes/ssl/apiserver-etcd-client.crt"),
    "wrong-san": ("cp-2", "etc/kubernetes/ssl/etcd/server.crt"),
    "not-yet-valid": ("cp-3", "etc/kubernetes/ssl/etcd/healthcheck-client.crt"),
    "rsa-1024": ("cp-3", "etc/kubernetes/ssl/front-proxy-client.crt"),
    "sha1": ("etcd-1", "etc/ssl/etcd/ssl/admin-etcd-1.pem"),
    "garbage-pem": ("cp-1", "etc/kubernetes/ssl/oidc-ca.crt"),
    "dangling-symlink": ("etcd-1", "etc/ssl/etcd/ssl/node-etcd-2.pem"),
}


def base(sb: SandboxLike) -> Path:
    return sb.state_dir / "control-plane"


def host_root(sb: SandboxLike, node: str) -> Path:
    return base(sb) / node / "root"


# --- the PKI -----------------------------------------------------------------------------------------


def _cas() -> dict[str, pki.Issued]:
    return {"ca": pki.issue("kubernetes", is_ca=True), "front-proxy-ca": pki.issue("front-proxy-ca", is_ca=True),
            "etcd/ca": pki.issue("etcd-ca", is_ca=True)}


def _leaf_sans(kind: str, node: str, index: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if kind == "apiserver":  # kubeadm's apiserver SANs (certlist.go, pkiutil.GetAPIServerAltNames) + kubespray's LB
        return ((node, "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local", "lb-apiserver.kubernetes.local", "localhost"),
                ("10.233.0.1", f"10.0.0.1{index}", "127.0.0.1"))
    if kind == "etcd":  # pkiutil.GetEtcdAltNames: the node name, localhost, its address and 127.0.0.1
        return (node, "localhost"), (f"10.0.0.1{index}", "127.0.0.1", "::1")
    return (), ()


def write_control_plane_host(root: Path, node: str, index: int, cas: dict[str, pki.Issued], server: str) -> None:
    """One kubeadm control-plane host under `root`, with the deliberate cases of `CASES` for `node`."""
    now = NOW()
    ssl_dir = root / "etc" / "kubernetes" / "ssl"
    for name, ca in cas.items():
        pki.write_pair(ca, ssl_dir / f"{name}.crt", ssl_dir / f"{name}.key")
    key = pki.new_key()
    (ssl_dir / "sa.key").write_bytes(pki.Issued(None, key).key_pem)  # the service-account key pair: not a cert
    os.chmod(ssl_dir / "sa.key", 0o600)
    for rel, ca_name, cn, orgs, usages, san_kind in pki.LEAVES:
        dns, ips = _leaf_sans(san_kind, node, index)
        kwargs: dict[str, Any] = {}
        path = f"etc/kubernetes/ssl/{rel}.crt"
        if CASES["expires-in-5-days"] == (node, path):
            kwargs["not_after"] = now + dt.timedelta(days=5)
        elif CASES["expires-in-20-days"] == (node, path):
            kwargs["not_after"] = now + dt.timedelta(days=20)
        elif CASES["expired"] == (node, path):
            kwargs.update(not_before=now - dt.timedelta(days=368), not_after=now - dt.timedelta(days=3))
        elif CASES["not-yet-valid"] == (node, path):
            kwargs.update(not_before=now + dt.timedelta(days=2), not_after=now + dt.timedelta(days=367))
        if CASES["wrong-san"] == (node, path):
            dns, ips = ("cp-1", "localhost"), ("10.0.0.11",)  # copied from cp-1 by hand
        if CASES["rsa-1024"] == (node, path):
            kwargs["key"] = pki.new_key("RSA-1024")
        issued = pki.issue(cn.format(node=node), issuer=cas[ca_name], orgs=orgs, dns=dns, ips=ips,
                           usages=usages, **kwargs)
        pki.write_pair(issued, ssl_dir / f"{rel}.crt", ssl_dir / f"{rel}.key")
    if node == CASES["garbage-pem"][0]:  # a CA bundle truncated by a failed copy
        (root / CASES["garbage-pem"][1]).write_text("-----BEGIN CERTIFICATE-----\nMIIC+zCCAeOgAwIBAgIJAKx0\n"
                                                    "this-is-not-base64!!\n-----END CERTIFICATE-----\n")
    (root / "etc" / "kubernetes" / "pki").symlink_to("ssl")  # kubespray's kube_cert_compat_dir
    kube = root / "etc" / "kubernetes"
    for conf, (user, cn, orgs) in pki.KUBECONFIG_USERS.items():
        if conf == "super-admin.conf" and index != 1:
            continue
        client = pki.issue(cn, issuer=cas["ca"], orgs=orgs, usages=("client",))
        _write_private(kube / conf, pki.kubeconfig(server, cas["ca"], client, user))
    # kubelet.conf points to the rotating client certificate (kubeadm `kubelet.conf`, kubelet --rotate-certificates)
    (kube / "kubelet.conf").write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: "
        + base64.b64encode(cas["ca"].cert_pem).decode() + f"\n    server: {server}\n  name: default-cluster\n"
        "contexts:\n- context:\n    cluster: default-cluster\n    namespace: default\n    user: default-auth\n"
        "  name: default-context\ncurrent-context: default-context\nusers:\n- name: default-auth\n  user:\n"
        "    client-certificate: /var/lib/kubelet/pki/kubelet-client-current.pem\n"
        "    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem\n")
    kubelet = root / "var" / "lib" / "kubelet" / "pki"
    kubelet.mkdir(parents=True)
    issued = pki.issue(f"system:node:{node}", issuer=cas["ca"], orgs=("system:nodes",), usages=("client",),
                       not_before=now - dt.timedelta(days=60), not_after=now + dt.timedelta(days=305))
    dated = kubelet / f"kubelet-client-{(now - dt.timedelta(days=60)):%Y-%m-%d-%H-%M-%S}.pem"
    _write_private(dated, (issued.cert_pem + issued.key_pem).decode())
    (kubelet / "kubelet-client-current.pem").symlink_to(dated.name)
    manifests = kube / "manifests"
    manifests.mkdir()
    for m in STATIC_PODS:
        (manifests / m).write_text(f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {m[:-5]}-{node}\n"
                                   "  namespace: kube-system\n")
    (kube / "kubeadm-config.yaml").write_text(
        "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\nencryptionAlgorithm: ECDSA-P256\n"
        "certificatesDir: /etc/kubernetes/ssl\n")
    _timer_state(root, index, now)


def _timer_state(root: Path, index: int, now: dt.datetime) -> None:
    """kubespray's renewal units: cp-1 healthy, cp-2 last fired 40 days ago and failed, cp-3 hung."""
    iso = lambda t: t.isoformat() if t else ""
    last = now - dt.timedelta(days={1: 10, 2: 40, 3: 20}[index])
    timer = {"LoadState": "loaded", "ActiveState": "active", "UnitFileState": "enabled",
             "LastTriggerUSec": iso(last), "NextElapseUSecRealtime": iso(now + dt.timedelta(days=18))}
    service = {"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead", "Result": "success",
               "ExecMainStatus": "0", "ExecMainExitTimestamp": iso(last + dt.timedelta(minutes=2)),
               "StateChangeTimestamp": iso(last + dt.timedelta(minutes=2))}
    if index == 2:
        service.update(ActiveState="failed", SubState="failed", Result="exit-code", ExecMainStatus="1")
    if index == 3:  # waiting for 127.0.0.1:6443 since it fired (k8s-certs-renew.py wait_for_apiserver)
        service.update(ActiveState="activating", SubState="start", ExecMainExitTimestamp="",
                       StateChangeTimestamp=iso(last))
    d = root / "run" / "systemd"
    d.mkdir(parents=True)
    (d / "k8s-certs-renew.timer.json").write_text(json.dumps(timer))
    (d / "k8s-certs-renew.service.json").write_text(json.dumps(service))


def write_etcd_host(root: Path, node: str, etcd_ca: pki.Issued) -> None:
    """kubespray's host-deployed etcd certificates (make-ssl-etcd.sh), with the SHA-1 and dangling cases."""
    d = root / "etc" / "ssl" / "etcd" / "ssl"
    pki.write_pair(etcd_ca, d / "ca.pem", d / "ca-key.pem")
    for kind, extra in (("member", {"dns": (node, "localhost"), "ips": ("127.0.0.1",), "usages": ("server", "client")}),
                        ("admin", {"usages": ("client",)}), ("node", {"usages": ("client",)})):
        path = f"etc/ssl/etcd/ssl/{kind}-{node}.pem"
        issued = pki.issue(f"etcd-{kind}-{node}", issuer=etcd_ca, key=pki.new_key(),
                           hash_name="sha1" if CASES["sha1"] == (node, path) else "sha256", **extra)
        pki.write_pair(issued, d / f"{kind}-{node}.pem", d / f"{kind}-{node}-key.pem")
    if CASES["dangling-symlink"][0] == node:  # the node's cert was removed by hand, its link left behind
        (root / CASES["dangling-symlink"][1]).symlink_to("node-etcd-2.pem.dpkg-old")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret_file(path, text.encode())


# --- ingress and secrets -----------------------------------------------------------------------------


def _ingress_pki(folder: Path) -> dict[str, Any]:
    """An internal CA with an intermediate issuing the ingress certificates (as cert-manager would), the
    controller's fake default certificate, and the certificates the seeded secrets hold."""
    now = NOW()
    root_ca = pki.issue("sandbox-internal-root", is_ca=True)
    issuer = pki.issue("sandbox-internal-issuer-1", issuer=root_ca, is_ca=True)
    grafana = pki.issue("grafana.sandbox.internal", issuer=issuer, dns=("grafana.sandbox.internal",),
                        usages=("server",), not_after=now + dt.timedelta(days=20))
    argo = pki.issue("argo.sandbox.internal", issuer=issuer, dns=("argo.sandbox.internal",), usages=("server",),
                     not_after=now + dt.timedelta(days=80))
    kibana = pki.issue("kibana.sandbox.internal", issuer=issuer, dns=("kibana.sandbox.internal",),
                       usages=("server",), not_before=now - dt.timedelta(days=100), not_after=now - dt.timedelta(days=10))
    tenants = pki.issue("*.apps.sandbox.internal", issuer=issuer, dns=("*.apps.sandbox.internal",),
                        usages=("server",), not_after=now + dt.timedelta(days=200))
    # ingress-nginx's default: "Kubernetes Ingress Controller Fake Certificate", SAN ingress.local, self-signed
    fake = pki.issue("Kubernetes Ingress Controller Fake Certificate", orgs=("Acme Co",), dns=("ingress.local",),
                     usages=("server",))
    files = {}
    for name, issued in (("root-ca", root_ca), ("issuer", issuer), ("grafana", grafana), ("argo", argo),
                         ("fake", fake)):
        pki.write_pair(issued, folder / f"{name}.crt", folder / f"{name}.key")
        files[name] = str(folder / f"{name}.crt")
    return {"files": files, "root_ca": root_ca, "issuer": issuer, "grafana": grafana, "argo": argo,
            "kibana": kibana, "tenants": tenants}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tls_secrets(ing: dict[str, Any], tenant_copies: int = 24) -> list[dict[str, Any]]:
    """The secrets the emulated API holds: Ingress TLS secrets, Opaque ones with tls.crt, and others."""
    chain = lambda leaf: leaf.cert_pem + ing["issuer"].cert_pem
    out = [
        ("monitoring", "grafana-tls", "kubernetes.io/tls", {"tls.crt": chain(ing["grafana"]),
                                                            "tls.key": ing["grafana"].key_pem}),
        ("logging", "kibana-tls", "kubernetes.io/tls", {"tls.crt": ing["kibana"].cert_pem,
                                                        "tls.key": ing["kibana"].key_pem}),
        ("argo", "argo-server-tls", "Opaque", {"tls.crt": ing["argo"].cert_pem, "tls.key": ing["argo"].key_pem,
                                               "ca.crt": ing["issuer"].cert_pem + ing["root_ca"].cert_pem}),
        ("default", "app-config", "Opaque", {"settings.yaml": b"replicas: 2\n"}),
        ("default", "regcred", "kubernetes.io/dockerconfigjson", {".dockerconfigjson": b'{"auths": {}}'}),
    ]
    out += [(f"tenant-{i % 6}", f"apps-wildcard-tls-{i}", "kubernetes.io/tls",
             {"tls.crt": chain(ing["tenants"]), "tls.key": ing["tenants"].key_pem}) for i in range(tenant_copies)]
    return [{"apiVersion": "v1", "kind": "Secret", "type": t, "metadata": {"namespace": ns, "name": name},
             "data": {k: _b64(v) for k, v in data.items()}} for ns, name, t, data in out]


def seed_tls_secrets(kube_url: str, token: str, secrets: list[dict[str, Any]]) -> int:
    """Create, through the emulated API, the secrets it does not hold yet (after `sandbox reset` too).
    Returns how many were created."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=kube_url, headers=headers, timeout=15) as client:
        have = {(s["metadata"]["namespace"], s["metadata"]["name"])
                for s in client.get("/api/v1/secrets").raise_for_status().json().get("items", [])}
        created = 0
        for s in secrets:
            meta = s["metadata"]
            if (meta["namespace"], meta["name"]) in have:
                continue
            client.post(f"/api/v1/namespaces/{meta['namespace']}/secrets", json=s).raise_for_status()
            created += 1
    return created


# --- processes ---------------------------------------------------------------------------------------


def _host_env(root: Path) -> dict[str, str]:
    return {"PATH": f"{SCRIPTS}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "CP_SANDBOX_ROOT": str(root),
            "CP_SANDBOX_PYTHON": sys.executable}


def start_control_plane(sb: SandboxLike) -> None:
    """The control-plane and etcd hosts, their TLS listeners and the TLS secrets; fills the config."""
    b = base(sb)
    shutil.rmtree(b, ignore_errors=True)
    b.mkdir(parents=True)
    key_path, public_key = client_key_pair(sb, CLIENT_KEY, sb.path("control-plane", f"{CLIENT_KEY}.pub"),
                                            "ai-platform-ops-sandbox-control-plane")
    cas = _cas()
    fresh = free_ports(3 * 2 + 2 + 2 + 2)
    ports = {n: {"api": fresh.pop(), "etcd": fresh.pop()} for n in CONTROL_PLANE}
    ports["etcd-1"] = {"etcd": fresh.pop(), "events": fresh.pop()}
    ports[DOWN_HOST] = {"ssh": fresh.pop(), "etcd": fresh.pop()}
    for i, node in enumerate(CONTROL_PLANE, start=1):
        write_control_plane_host(host_root(sb, node), node, i, cas, f"https://127.0.0.1:{ports[node]['api']}")
    kubespray_etcd_ca = pki.issue("etcd-ca", is_ca=True, key=pki.new_key("RSA-2048"))  # make-ssl-etcd.sh: genrsa 2048
    write_etcd_host(host_root(sb, "etcd-1"), "etcd-1", kubespray_etcd_ca)
    ing = _ingress_pki(b / "ingress")
    secrets = tls_secrets(ing)
    (b / "secrets.json").write_text(json.dumps(secrets))
    for node in (*CONTROL_PLANE, *ETCD_HOSTS):  # the pristine copies reset_control_plane puts back
        shutil.copytree(host_root(sb, node), b / node / "pristine", symlinks=True)

    hosts: dict[str, dict[str, Any]] = {}
    for node in (*CONTROL_PLANE, *ETCD_HOSTS):
        root = host_root(sb, node)
        port, known_hosts = start_key_only_sshd(sb, node, b / node / "sshd", public_key, _host_env(root))
        hosts[node] = {"name": node, "host": "127.0.0.1", "port": port, "user": "root",
                       "private_key_path": str(key_path), "known_hosts": str(known_hosts), "connect_timeout_s": 5,
                       "root": str(root)}
    for node in CONTROL_PLANE:
        hosts[node].update(apiserver_port=ports[node]["api"], etcd_port=ports[node]["etcd"])
    hosts["etcd-1"].update(apiserver_port=None, etcd_port=ports["etcd-1"]["etcd"],
                           etcd_events_port=ports["etcd-1"]["events"])
    hosts[DOWN_HOST] = {"name": DOWN_HOST, "host": "127.0.0.1", "port": ports[DOWN_HOST]["ssh"], "user": "root",
                        "private_key_path": str(key_path), "connect_timeout_s": 3, "apiserver_port": None,
                        "etcd_port": ports[DOWN_HOST]["etcd"], "root": str(b / DOWN_HOST / "root")}

    ingress_port, hung_port = fresh.pop(), fresh.pop()
    specs = _listener_specs(sb, ports, ing, ingress_port, hung_port)
    spec_file = b / "listeners.json"
    spec_file.write_text(json.dumps(specs, indent=1))
    proc = sb.spawn("tls-listeners", [PYTHON, "-m", "sandbox.tls_listeners", "--spec", str(spec_file)],
                    cwd=Path(__file__).resolve().parent.parent)
    for s in specs:
        wait_for(_tcp_open(s["port"]), f"TLS listener {s['name']}", 30, proc, sb.log_of("tls-listeners"))

    seed_tls_secrets(sb.urls["kube"], sb.secret(KUBE_TOKEN, env=False), secrets)
    ci_kubeconfig = b / "ci-kubeconfig.yaml"  # a kubeconfig handed to CI: cp-1's admin credentials
    shutil.copy2(host_root(sb, "cp-1") / "etc" / "kubernetes" / "admin.conf", ci_kubeconfig)
    os.chmod(ci_kubeconfig, 0o600)

    sb.extra["control_plane"] = {"roots": {n: str(host_root(sb, n)) for n in (*CONTROL_PLANE, *ETCD_HOSTS)},
                                 "ingress_port": ingress_port, "hung_port": hung_port,
                                 "ci_kubeconfig": str(ci_kubeconfig)}
    cluster = sb.config["clusters"][0]
    cluster["control_plane"] = [hosts[n] for n in CONTROL_PLANE]
    cluster["etcd"] = [hosts["etcd-1"], hosts[DOWN_HOST]]
    sb.config["certificates"] = {
        "endpoints": [
            *({"name": f"ingress {n.split('.')[0]}", "host": "127.0.0.1", "port": ingress_port, "server_name": n,
               "kind": "ingress"} for n in (*INGRESS_NAMES, UNKNOWN_INGRESS_NAME)),
            {"name": "hung endpoint", "host": "127.0.0.1", "port": hung_port, "kind": "other"},
        ],
        "kubeconfigs": [{"path": str(ci_kubeconfig), "refresh_from": "admin.conf"}],
        "layout": {"kubeadm": str(SCRIPTS / "kubeadm")},
        "timeouts": {"source_s": 60, "ssh_s": 20, "endpoint_s": 3, "kubeadm_s": 120, "static_pod_wait_s": 1,
                     "readyz_s": 20},
    }


def _tcp_open(port: int):
    import socket

    def check() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0
    return check


def _listener_specs(sb: SandboxLike, ports: dict, ing: dict, ingress_port: int, hung_port: int) -> list[dict]:
    specs = []
    for node in CONTROL_PLANE:
        root = host_root(sb, node)
        ssl_dir = root / "etc" / "kubernetes" / "ssl"
        manifests = root / "etc" / "kubernetes" / "manifests"
        specs.append({"name": f"kube-apiserver {node}", "port": ports[node]["api"], "cert": str(ssl_dir / "apiserver.crt"),
                      "key": str(ssl_dir / "apiserver.key"), "http": True,
                      "manifest": str(manifests / "kube-apiserver.yaml"), "fault": str(root / "faults" / "apiserver-not-ready")})
        specs.append({"name": f"etcd {node}", "port": ports[node]["etcd"], "cert": str(ssl_dir / "etcd" / "server.crt"),
                      "key": str(ssl_dir / "etcd" / "server.key"), "client_ca": str(ssl_dir / "etcd" / "ca.crt"),
                      "manifest": str(manifests / "etcd.yaml")})
    etcd_ssl = host_root(sb, "etcd-1") / "etc" / "ssl" / "etcd" / "ssl"
    for kind in ("etcd", "events"):  # kubespray: ETCD_CERT_FILE=member-<host>.pem for both clusters
        specs.append({"name": f"etcd-1 {kind}", "port": ports["etcd-1"][kind], "cert": str(etcd_ssl / "member-etcd-1.pem"),
                      "key": str(etcd_ssl / "member-etcd-1-key.pem"), "client_ca": str(etcd_ssl / "ca.pem")})
    f = ing["files"]
    specs.append({"name": "ingress-nginx", "port": ingress_port, "cert": f["fake"], "key": f["fake"][:-4] + ".key",
                  "sni": {n: {"cert": f[n.split(".")[0]], "key": f[n.split(".")[0]][:-4] + ".key",
                              "chain": [f["issuer"]]} for n in INGRESS_NAMES}})
    specs.append({"name": "hung", "port": hung_port, "kind": "hung"})
    return specs


def reset_control_plane(sb: SandboxLike) -> None:
    """Put every host root back as it was laid out (a renewal test changes them) and re-seed the secrets.
    The static pods are stopped (manifests removed) first, so the listeners start again on the restored files."""
    import time

    b = base(sb)
    for node in CONTROL_PLANE:  # stop the static pods first (the kubelet sees their manifests go)
        shutil.rmtree(host_root(sb, node) / "etc" / "kubernetes" / "manifests", ignore_errors=True)
    time.sleep(0.6)  # three polls of the listeners' kubelet loop
    for node in (*CONTROL_PLANE, *ETCD_HOSTS):
        root = host_root(sb, node)
        shutil.rmtree(root)
        shutil.copytree(b / node / "pristine", root, symlinks=True)
    shutil.copy2(host_root(sb, "cp-1") / "etc" / "kubernetes" / "admin.conf", b / "ci-kubeconfig.yaml")
    seed_tls_secrets(sb.urls["kube"], sb.secret(KUBE_TOKEN, env=False), json.loads((b / "secrets.json").read_text()))


def wait_serving(sb: SandboxLike, timeout_s: float = 20.0) -> None:
    """Until every API server and etcd listener serves the certificate now on its host's disk."""
    import ssl
    import time

    from cryptography import x509

    specs = [s for s in json.loads((base(sb) / "listeners.json").read_text()) if s.get("manifest")]
    deadline = time.monotonic() + timeout_s
    for s in specs:
        want = x509.load_pem_x509_certificate(Path(s["cert"]).read_bytes())
        while True:
            try:
                served = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", s["port"]),
                                                                                   timeout=2).encode())
                if served == want:
                    break
            except (OSError, ssl.SSLError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{s['name']} does not serve {s['cert']} after {timeout_s:g}s")
            time.sleep(0.1)
