"""What the provisioning flows check, as pure functions: each host before kubespray runs (preflight) and
the cluster after it (post-verify through the Kubernetes API). No Prefect, no network."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from blocks.config import KubesprayConfig, KubesprayPreflight

_PORT = re.compile(r":(\d+)\s")


@dataclass
class HostCheck:
    host: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def listening_ports(ss_output: str) -> set[int]:
    """Local ports of `ss -Htln` lines ("LISTEN 0 128 127.0.0.1:6443 0.0.0.0:*")."""
    out = set()
    for line in ss_output.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            m = _PORT.search(parts[3] + " ")
            if m:
                out.add(int(m.group(1)))
    return out


def judge_preflight(host: str, facts: dict[str, Any] | None, ss_output: str | None, groups: list[str],
                    rules: KubesprayPreflight, now_epoch: float, check_ports: bool = True,
                    unreachable: str | None = None) -> HostCheck:
    """One host's preflight: reachable, OS and version, CPUs, memory, free disk on /, swap off, clock, ports."""
    if unreachable is not None:
        return HostCheck(host, False, [f"SSH unreachable: {unreachable}"])
    if not facts:
        return HostCheck(host, False, ["no facts gathered (unknown is not ready)"])
    problems = []
    dist = f"{facts.get('distribution', '?')} {facts.get('distribution_major_version', '?')!s}"
    if dist not in rules.os:
        problems.append(f"OS {dist} is not one of {rules.os}")
    cpus = int(facts.get("processor_vcpus") or facts.get("processor_count") or 0)
    if cpus < rules.min_cpus:
        problems.append(f"{cpus} CPUs < {rules.min_cpus}")
    control = "kube_control_plane" in groups
    need_mb = rules.min_memory_mb_control_plane if control else rules.min_memory_mb_node
    mem = int(facts.get("memtotal_mb") or 0)
    if mem < need_mb:
        problems.append(f"{mem} MB memory < {need_mb} MB")
    root = next((m for m in facts.get("mounts", []) if m.get("mount") == "/"), None)
    if root is None:
        problems.append("no / mount in the facts (free disk unknown)")
    elif root.get("size_available", 0) / 1e9 < rules.min_disk_free_gb:
        problems.append(f"{root['size_available'] / 1e9:.1f} GB free on / < {rules.min_disk_free_gb} GB")
    if int(facts.get("swaptotal_mb") or 0) > 0:
        problems.append(f"swap is on ({facts['swaptotal_mb']} MB): kubelet needs it off")
    epoch = (facts.get("date_time") or {}).get("epoch")
    if epoch is None:
        problems.append("host time unknown")
    elif abs(float(epoch) - now_epoch) > rules.max_clock_skew_s + 60:  # facts are read up to a minute earlier
        problems.append(f"clock is {float(epoch) - now_epoch:+.0f}s off the worker's")
    if check_ports:
        if ss_output is None:
            problems.append("listening ports unknown")
        else:
            wanted = set(rules.ports_control_plane if control else rules.ports_node)
            busy = sorted(wanted & listening_ports(ss_output))
            if busy:
                problems.append(f"required ports already in use: {busy}")
    return HostCheck(host, not problems, problems, {"os": dist, "cpus": cpus, "memory_mb": mem})


@dataclass
class ClusterVerdict:
    ok: bool
    problems: list[str]
    nodes: list[dict[str, Any]]
    readyz: str


def expected_nodes(cfg: KubesprayConfig, exclude: set[str] | None = None) -> list[str]:
    """The inventory hosts that become Kubernetes nodes (kubespray's k8s_cluster: control plane and nodes)."""
    return [h.name for h in cfg.hosts if ({"kube_control_plane", "kube_node"} & set(h.groups))
            and h.name not in (exclude or set())]


def judge_cluster(nodes: list[dict[str, Any]], expected: list[str], kube_version: str | None,
                  readyz: str | None, absent: list[str] | None = None) -> ClusterVerdict:
    """Post-verify: every expected node Ready at `kube_version`, `absent` nodes gone, /readyz?verbose passing
    (its `[+]etcd ok` line is the API server's own etcd check). An unanswered /readyz is a problem."""
    by_name = {n["metadata"]["name"]: n for n in nodes}
    problems, rows = [], []
    for name in expected:
        node = by_name.get(name)
        if node is None:
            problems.append(f"node {name} is not registered")
            continue
        ready = next((c.get("status") for c in node.get("status", {}).get("conditions", []) if c.get("type") == "Ready"),
                     "Unknown")
        version = node.get("status", {}).get("nodeInfo", {}).get("kubeletVersion")
        rows.append({"node": name, "ready": ready, "kubelet": version})
        if ready != "True":
            problems.append(f"node {name} is not Ready ({ready})")
        if kube_version and version != kube_version:
            problems.append(f"node {name} runs kubelet {version}, expected {kube_version}")
    for name in absent or []:
        if name in by_name:
            problems.append(f"node {name} is still registered")
    if readyz is None:
        problems.append("control plane health unknown: /readyz did not answer")
    else:
        failed = [ln for ln in readyz.splitlines() if ln.startswith("[-]")]
        if failed or "readyz check passed" not in readyz:
            problems.append("control plane not ready: " + ("; ".join(failed) or readyz.strip()[:200]))
        if "[+]etcd ok" not in readyz:
            problems.append("etcd health not reported ok by the API server")
    return ClusterVerdict(not problems, problems, rows, readyz or "")
