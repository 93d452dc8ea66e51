"""The sandbox's kubespray cluster: the control-plane hosts of `sandbox/control_plane.py` (cp-1..cp-3, real
sshd) and two GPU worker hosts started here (real sshd, the same client key), named as the emulated API's
nodes, so a kubespray run against them post-verifies against the emulated cluster. `clusters[0].kubespray`
points at the stand-in checkout `sandbox/kubespray_checkout/` (see its README) and at the project's
`configs/kubespray/override.yml`. The `etcd` host `etcd-2` of the control plane is down: it is what an
unreachable host looks like (its port has no listener)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sandbox._common import SandboxLike, start_key_only_sshd

REPO = Path(__file__).resolve().parent.parent
CHECKOUT = Path(__file__).resolve().parent / "kubespray_checkout"
WORKERS = ("gpu-node-0001", "gpu-node-0002")


def start_provisioning(sb: SandboxLike) -> None:
    cluster = sb.config["clusters"][0]
    cps = {h["name"]: h for h in cluster.get("control_plane", [])}
    if not cps:
        return  # no control-plane component: nothing to provision
    key_path = Path(next(iter(cps.values()))["private_key_path"])
    public_key = Path(sb.path("control-plane", "control_plane_client_ed25519.pub")).read_text().strip()
    base = sb.path("provisioning")
    base.mkdir(parents=True, exist_ok=True)
    ports: dict[str, int] = {n: h["port"] for n, h in cps.items()}
    known = [Path(h["known_hosts"]).read_text() for h in cps.values()]
    for node in WORKERS:
        port, known_hosts = start_key_only_sshd(sb, f"kubespray-{node}", base / node / "sshd", public_key, {})
        ports[node] = port
        known.append(known_hosts.read_text())
    known_file = base / "known_hosts"
    known_file.write_text("".join(known))
    state = base / "state"
    state.mkdir(exist_ok=True)
    # node_init (configs/ansible/roles/node_init) on GPU hosts fetches the NVIDIA repository key: here a local
    # stand-in file (file:// URL, its sha256 pinned), so even check mode never leaves the machine
    key_file = base / "nvidia-gpgkey.asc"
    key_file.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\nstand-in key of the sandbox\n"
                        "-----END PGP PUBLIC KEY BLOCK-----\n")
    key_sha = hashlib.sha256(key_file.read_bytes()).hexdigest()
    hosts: list[dict[str, Any]] = []
    for i, node in enumerate(cps, start=1):
        hosts.append({"name": node, "ansible_host": "127.0.0.1", "ip": "127.0.0.1", "access_ip": "127.0.0.1",
                      "etcd_member_name": f"etcd{i}", "groups": ["kube_control_plane", "etcd"],
                      "vars": {"ansible_port": ports[node]}})
    for node in WORKERS:
        hosts.append({"name": node, "ansible_host": "127.0.0.1", "ip": "127.0.0.1", "groups": ["kube_node", "gpu-node"],
                      "vars": {"ansible_port": ports[node]}})
    sb.extra["provisioning"] = {"state_dir": str(state), "ports": ports}
    cluster["kubespray"] = {
        "checkout": str(CHECKOUT), "version": "v2.26.0", "overrides": [str(REPO / "configs/kubespray/override.yml")],
        "private_key_path": str(key_path), "known_hosts": str(known_file), "hosts": hosts,
        "groups": {"gpu-node": {"taints": ["nvidia.com/gpu=present:NoSchedule"]},
                   "k8s_cluster": {"children": ["kube_control_plane", "kube_node", "calico_rr"]},
                   "all": {"vars": {"standin_state_dir": str(state),
                                    # the stand-in's kubelet registers nodes with, and remove-node deletes them
                                    # from, the emulated API (kubespray_checkout/README.md)
                                    "standin_kube_api": sb.urls["kube"],
                                    "standin_kube_token_file": str(sb.secret_file("SANDBOX_KUBE_TOKEN")),
                                    "ansible_python_interpreter": "/usr/bin/python3",
                                    # ansible logs in as root here: no sudo needed (nor installed)
                                    "node_init_become": False,
                                    "node_init_nvidia_gpgkey_url": key_file.as_uri(),
                                    "node_init_nvidia_gpgkey_checksum": f"sha256:{key_sha}"}}},
        # the sandbox's hosts share one machine: its real ports are in use by the other stand-ins
        "preflight": {"min_disk_free_gb": 1, "ports_control_plane": [6443, 2380, 10257, 10259],
                      "ports_node": [10250]},
        "playbook_timeout": "10m",
    }
