"""Platform add-ons (manual): the Helm releases of `configs/helm/releases.yaml`, in dependency order.

For each release (in the order its `after` lists give): read it (`helm list --all`, `helm get values`),
diff the deployed user values against the values file, and skip it when values, chart version and status
are unchanged (re-runs are idempotent: a second run changes nothing). Otherwise check that the Kubernetes
secrets it reads exist (the GitLab runner's token lives in one, never in a values file), then
`helm upgrade --install NAME CHART --repo R --version PINNED -n NS --create-namespace -f VALUES --atomic
--wait --timeout T`. A failed release stops the run (later releases may depend on it); `--atomic` has
already rolled it back. `dry_run=True` publishes the plan and the diffs and changes nothing. The run holds
the cluster's provisioning slot: never beside a kubespray run or node init on the same cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency

from blocks.platform import Platform
from flows.provisioning import provisioning_limit
from tasks.helm import HelmCli, HelmError, read_release, upgrade_install
from tasks.helm_releases import (
    RELEASES_FILE,
    install_order,
    judge,
    load_releases,
    load_values,
    values_diff,
)
from tasks.redact import Redactor
from tasks.reports import artifact_key, publish_markdown, publish_table


def missing_secrets(api_client: Any, namespace: str, required: list, timeout_s: float) -> list[str]:
    """The required secrets (or their keys) absent from `namespace`, read through the Kubernetes API."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    api = k8s.CoreV1Api(api_client)
    missing = []
    for sec in required:
        try:
            obj = api.read_namespaced_secret(sec.name, namespace, _request_timeout=timeout_s)
        except ApiException as exc:
            if exc.status == 404:
                missing.append(f"secret {namespace}/{sec.name}")
                continue
            raise
        data = {**(obj.data or {}), **(obj.string_data or {})}
        missing += [f"key {k} of secret {namespace}/{sec.name}" for k in sec.data_keys if k not in data]
    return missing


@flow(name="install-addons")
def install_addons(platform: str = "main", cluster: str | None = None, releases: list[str] | None = None,
                   dry_run: bool = False, helm_bin: str = "helm", releases_file: str | None = None,
                   lock_timeout_s: int = 3600) -> dict[str, Any]:
    """Install or upgrade the platform's Helm releases (`releases`: some of them, dependencies first)."""
    logger = get_run_logger()
    plat = Platform(platform)
    ccfg = plat.config.cluster(cluster)
    redactor = Redactor.of(plat.secrets())
    all_releases = load_releases(Path(releases_file) if releases_file else RELEASES_FILE)
    known = [r.name for r in all_releases]
    if releases is not None:
        unknown = [n for n in releases if n not in known]
        if unknown or not releases:
            raise ValueError(f"releases must be among {known}, unknown: {unknown}")
    chosen = [r for r in install_order(all_releases) if releases is None or r.name in releases]
    helm = HelmCli(binary=helm_bin, kubeconfig=ccfg.kubeconfig, context=ccfg.context)
    key = artifact_key("addons", ccfg.name)
    rows: list[dict[str, Any]] = []
    diffs: list[str] = []
    failure: str | None = None
    with concurrency(provisioning_limit(platform, ccfg.name), occupy=1, timeout_seconds=lock_timeout_s):
        for rel in chosen:
            row = {"release": rel.name, "namespace": rel.namespace, "chart": f"{rel.chart} {rel.version}"}
            if failure is not None:
                rows.append({**row, "action": "not run", "detail": "an earlier release failed"})
                continue
            wanted = load_values(rel.values)
            listed, current = read_release(helm, rel, redactor)
            action, why = judge(rel, listed, current, wanted)
            diff = redactor.text(values_diff(current, wanted, rel.name)) if action != "skip" else ""
            if diff:
                diffs.append(f"### {rel.name}\n\n```diff\n{diff}```\n")
            logger.info("%s: %s (%s)", rel.name, action, why)
            if action == "blocked":
                failure = f"{rel.name}: {why}"
                rows.append({**row, "action": "failed", "detail": why})
                continue
            if action == "skip" or dry_run:
                rows.append({**row, "action": action if action == "skip" else f"would {action}", "detail": why})
                continue
            missing = missing_secrets(plat.kubernetes(ccfg.name), rel.namespace, rel.secrets, ccfg.request_timeout_s) \
                if rel.secrets else []
            if missing:
                failure = f"{rel.name}: missing {', '.join(missing)}"
                rows.append({**row, "action": "failed", "detail": f"missing {', '.join(missing)}"})
                continue
            try:
                upgrade_install(helm, rel, redactor)
            except HelmError as exc:
                failure = str(exc)
                rows.append({**row, "action": "failed", "detail": str(exc)[:500]})
                continue
            rows.append({**row, "action": f"{action}ed" if action == "install" else "upgraded", "detail": why})
    publish_table(key, rows, f"install-addons on {ccfg.name}" + (" (dry run)" if dry_run else ""))
    if diffs:
        publish_markdown(key + "-diff", "## Values diffs (deployed -> file)\n\n" + "\n".join(diffs))
    result = {"dry_run": dry_run, "releases": rows, "diffs": len(diffs)}
    if failure is not None:
        raise RuntimeError(f"install-addons stopped: {failure}")
    return result
