"""Kubespray's playbooks through ansible-runner: preflight of the hosts, the playbook run, the post-verify;
and what names the target of a provisioning run: the cluster's `kube-system` namespace UID and its nodes'
UIDs read through the Kubernetes API, or, before a cluster exists, the inventory hosts' SSH host keys read
over SSH.

Tasks receive what they need (the cluster's `KubesprayConfig`, a generated inventory, an ApiClient, a
`Redactor`) from the flow; they never load blocks. Every text they return or log is redacted.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from blocks.config import KubesprayConfig
from tasks.ansible import (
    PlaybookRun,
    SSHAccess,
    run_playbook,
    run_with_unreachable_retries,
)
from tasks.provisioning_checks import (
    ClusterVerdict,
    HostCheck,
    judge_cluster,
    judge_preflight,
)
from tasks.redact import Redactor
from tasks.reports import run_logger

PREFLIGHT = Path(__file__).resolve().parent.parent / "configs" / "ansible" / "preflight.yml"
_HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}$")


def provisioning_lock(platform: str, cluster: str) -> str:
    """The one-slot concurrency limit every provisioning run on a cluster takes after its approval (kubespray
    runs, node init, add-ons: never two at once on one cluster)."""
    return f"provisioning-{platform}-{cluster}"


def check_hosts(names: list[str] | None, known: list[str]) -> list[str] | None:
    """`names` when each is an inventory host of the cluster (they reach ansible's --limit and `node=`)."""
    if names is None:
        return None
    bad = [n for n in names if not _HOST_RE.match(n)]
    unknown = [n for n in names if n not in known]
    if bad or unknown or not names:
        raise ValueError(f"hosts must be inventory hosts of the cluster: bad {bad}, unknown {unknown}, known {known}")
    return names


class PlaybookFailed(RuntimeError):
    """A kubespray playbook failed: the message names each failed host, task and message."""


def ssh_access(cfg: KubesprayConfig) -> SSHAccess:
    return SSHAccess(user=cfg.ssh_user, private_key_path=cfg.private_key_path, known_hosts=cfg.known_hosts)


def _log(redactor: Redactor):
    logger = run_logger("ai_platform_ops.kubespray")
    return lambda line: logger.info("%s", redactor.text(line))


@task(name="preflight-hosts")
def preflight_hosts(cfg: KubesprayConfig, inventory: Path, hosts: list[str] | None, check_ports: bool,
                    redactor: Redactor) -> list[HostCheck]:
    """Read every targeted host (one ansible run) and judge it; unreachable hosts are reported, not skipped."""
    started = time.time()
    run = run_playbook(PREFLIGHT.parent, PREFLIGHT.name, inventory, ssh=ssh_access(cfg), limit=hosts,
                       timeout_s=600, redactor=redactor)
    groups = {h.name: h.groups for h in cfg.hosts}
    unreachable = {f.host: f.message for f in run.tally.failures if f.unreachable}
    failed = {f.host: f.message for f in run.tally.failed_tasks}
    checks = []
    for name in hosts or [h.name for h in cfg.hosts]:
        res = run.tally.results.get(name, {}).get("List listening TCP ports") or {}
        check = judge_preflight(name, run.tally.facts.get(name), res.get("stdout"), groups.get(name, []),
                                cfg.preflight, started, check_ports=check_ports,
                                unreachable=unreachable.get(name))
        if name in failed:
            check.ok = False
            check.problems.append(f"preflight task failed: {failed[name]}")
        check.problems = [redactor.text(p) for p in check.problems]
        checks.append(check)
    return checks


@task(name="run-kubespray")
def run_kubespray(cfg: KubesprayConfig, playbook: str, inventory: Path, redactor: Redactor,
                  extravars: dict[str, Any] | None = None, limit: list[str] | None = None,
                  progress_key: str | None = None, flush_every_s: float = 2.0) -> PlaybookRun:
    """Run a kubespray playbook of the checkout; unreachable hosts alone are retried (limited to them).

    Raises `PlaybookFailed` naming the host, task and message of each failure, or the prompt it stopped at."""
    from blocks.config import parse_duration

    log = _log(redactor)
    checkout = Path(cfg.checkout)
    if not (checkout / playbook).is_file():
        raise FileNotFoundError(f"{playbook} is not in the kubespray checkout {checkout} (kubespray.checkout)")

    def attempt(retry_hosts: list[str] | None) -> PlaybookRun:
        return run_playbook(checkout, playbook, inventory, ssh=ssh_access(cfg), extravars=extravars,
                            extravar_files=list(cfg.overrides), limit=retry_hosts or limit,
                            timeout_s=parse_duration(cfg.playbook_timeout), redactor=redactor, log=log,
                            progress_key=progress_key, flush_every_s=flush_every_s)

    started = time.time()
    result = run_with_unreachable_retries(attempt, cfg.unreachable_retries, log)
    retried = len(result.attempts) - 1
    result.attempts.append({"started": started, "finished": time.time()})
    if result.stopped_at_prompt is not None:
        raise PlaybookFailed(f"{playbook} stopped at its interactive prompt {result.stopped_at_prompt!r}: nobody "
                             "answers it under ansible-runner; pass the confirmation variable (reset_confirmation, "
                             "skip_confirmation) after approval")
    problems = [f.describe() for f in result.failed_tasks]
    problems += [f"{h}: unreachable after {retried} retry(ies)" for h in result.unreachable]
    if problems or result.status != "successful":
        raise PlaybookFailed(redactor.text(f"{playbook} failed ({result.status}, rc={result.rc}): "
                                           + ("; ".join(problems) or result.stdout_tail[-500:])))
    return result


@task(name="verify-cluster", cache_policy=NONE)
def verify_cluster(api_client: Any, expected: list[str], kube_version: str | None, absent: list[str] | None,
                   timeout_s: float, redactor: Redactor) -> ClusterVerdict:
    """Post-verify through the Kubernetes API: nodes Ready at the expected kubelet version, /readyz?verbose."""
    from kubernetes import client as k8s

    nodes = k8s.CoreV1Api(api_client).list_node(_request_timeout=timeout_s).to_dict()["items"]
    nodes = [{"metadata": {"name": n["metadata"]["name"]},
              "status": {"conditions": [{"type": c["type"], "status": c["status"]}
                                        for c in (n.get("status") or {}).get("conditions") or []],
                         "nodeInfo": {"kubeletVersion": ((n.get("status") or {}).get("node_info") or {})
                                      .get("kubelet_version")}}} for n in nodes]
    try:
        method, url, headers, body, post = api_client.param_serialize(
            method="GET", resource_path="/readyz", query_params=[("verbose", "true")], auth_settings=["BearerToken"])
        resp = api_client.call_api(method, url, headers, body, post, _request_timeout=timeout_s)
        resp.read()
        readyz = resp.data.decode() if isinstance(resp.data, bytes) else str(resp.data)
    except Exception as exc:  # noqa: BLE001 - a 500 carries the failed checks; anything else is unknown
        get_run_logger().warning("/readyz: %s", redactor.error(exc))
        body = getattr(exc, "body", None)
        readyz = body.decode() if isinstance(body, bytes) else body
    verdict = judge_cluster(nodes, expected, kube_version, readyz, absent)
    verdict.problems = [redactor.text(p) for p in verdict.problems]
    return verdict


@task(name="read-cluster-identity", cache_policy=NONE)
def read_cluster_identity(api_client: Any, timeout_s: float) -> tuple[str, dict[str, dict[str, Any]]]:
    """The `kube-system` namespace's metadata.uid (Kubernetes API conventions, *Metadata*: "uid: a unique in
    time and space value ... used to distinguish between objects with the same name that have been deleted
    and recreated") and each node's uid, kubelet version and Ready condition. Two reads."""
    from kubernetes import client as k8s

    core = k8s.CoreV1Api(api_client)
    uid = core.read_namespace("kube-system", _request_timeout=timeout_s).metadata.uid
    if not uid:
        raise RuntimeError("the cluster's kube-system namespace has no metadata.uid: the target cannot be identified")
    nodes = {}
    for n in core.list_node(_request_timeout=timeout_s).items:
        ready = next((c.status for c in (n.status.conditions or []) if c.type == "Ready"), "Unknown")
        nodes[n.metadata.name] = {"uid": n.metadata.uid, "ready": ready,
                                  "kubelet": (n.status.node_info.kubelet_version if n.status.node_info else None)}
    return uid, nodes


@task(name="read-host-keys", cache_policy=NONE)
def read_host_keys(cfg: KubesprayConfig, hosts: list[str] | None = None, timeout_s: float = 15) -> dict[str, str]:
    """Each inventory host's SSH host key fingerprint (SHA256), read from the host's sshd over SSH (the key it
    presents in the key exchange, RFC 4253 section 8), not from a config file; all hosts at once."""
    import asyncio

    import asyncssh

    wanted = [h for h in cfg.hosts if hosts is None or h.name in hosts]

    async def one(h: Any) -> tuple[str, str]:
        port = int(h.vars.get("ansible_port", 22))
        try:
            key = await asyncio.wait_for(asyncssh.get_server_host_key(str(h.ansible_host), port), timeout_s)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            raise ConnectionError(f"{h.name}: its SSH host key could not be read from {h.ansible_host}:{port}: "
                                  f"{exc or type(exc).__name__}") from exc
        if key is None:
            raise ConnectionError(f"{h.name}: {h.ansible_host}:{port} presented no host key")
        return h.name, key.get_fingerprint("sha256")

    async def all_hosts() -> dict[str, str]:
        return dict(await asyncio.gather(*(one(h) for h in wanted)))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # its own event loop, whatever loop the caller runs on
        return pool.submit(asyncio.run, all_hosts()).result()


def expected_kube_version(cfg: KubesprayConfig) -> str | None:
    """The kubelet version a run should leave: `kube_version` of the config, else the last override's."""
    import yaml

    version = cfg.kube_version
    if version:
        return version
    for path in cfg.overrides:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        version = doc.get("kube_version", version)
    return version
