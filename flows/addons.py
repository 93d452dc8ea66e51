"""Platform add-ons (manual): the Helm releases of `configs/helm/releases.yaml`, in dependency order, as an
operation (`tasks.operation`).

The plan reads each chosen release (`helm list --all`, `helm get values`), diffs the deployed user values
against the values file, and gives one step per release that differs (chart version, values or status):
`helm upgrade --install NAME CHART --repo R --version PINNED -n NS --create-namespace -f VALUES --atomic
--wait --timeout T`, checked by reading the release back (deployed, at the pinned chart, with the file's
values). Unchanged releases are no step (a second run changes nothing). A release in a pending state, or a
Kubernetes secret it reads (the GitLab runner's token lives in one, never in a values file) missing,
refuses the plan. Its target is the cluster's `kube-system` namespace UID, read through its API.

A dry run (the default) publishes the plan and the diffs and stops. A real run pauses for approval, takes
the cluster's provisioning slot (never beside a kubespray run or node init on the same cluster), plans again
and refuses if a release changed meanwhile (its revision, values or status), then applies. A failed release
stops the run (later releases may depend on it; `--atomic` has already rolled that one back). The way back
is this flow with `rollback_to` ({release: revision}): `helm rollback` to the revision each release had
before, `helm uninstall` (revision 0) for a release the run installed.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prefect import flow

from blocks.platform import Platform
from tasks.helm import HelmCli, read_release, rollback, upgrade_install
from tasks.helm_releases import RELEASES_FILE, install_order, judge, load_releases, load_values, values_diff
from tasks.kubespray import provisioning_lock, read_cluster_identity
from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, lock_timeout, run_operation_sync
from tasks.redact import Redactor
from tasks.reports import md_table


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


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@flow(name="install-addons")
def install_addons(platform: str = "main", cluster: str | None = None, releases: list[str] | None = None,
                   dry_run: bool = True, helm_bin: str = "helm", releases_file: str | None = None,
                   rollback_to: dict[str, int] | None = None, approval_timeout_s: int | None = None,
                   poll_interval_s: float = 10) -> Any:
    """Install or upgrade the platform's Helm releases (`releases`: some of them, dependencies first). Dry run
    by default. `rollback_to` ({release: revision}, 0: uninstall) is the way back of an earlier run."""
    plat = Platform(platform)
    ccfg = plat.config.cluster(cluster)
    redactor = Redactor.of(plat.secrets())
    all_releases = load_releases(Path(releases_file) if releases_file else RELEASES_FILE)
    known = [r.name for r in all_releases]
    asked = releases if rollback_to is None else list(rollback_to)
    if asked is not None:
        unknown = [n for n in asked if n not in known]
        if unknown or not asked:
            raise ValueError(f"releases must be among {known}, unknown: {unknown}")
    chosen = [r for r in install_order(all_releases) if asked is None or r.name in asked]
    if rollback_to is not None:
        chosen.reverse()  # going back: dependents first
    helm = HelmCli(binary=helm_bin, kubeconfig=ccfg.kubeconfig, context=ccfg.context)
    api = plat.kubernetes(ccfg.name)
    same = {"cluster": ccfg.name, "helm_bin": helm_bin, **({"releases_file": releases_file} if releases_file else {})}

    def planner(_: Any) -> Plan:
        uid, _nodes = read_cluster_identity(api, ccfg.request_timeout_s)
        steps, refusals, rows, diffs, facts, before = [], [], [], [], {}, {}
        for rel in chosen:
            listed, current = read_release(helm, rel, redactor)
            revision = int(listed["revision"]) if listed else 0
            before[rel.name] = revision
            state = {"revision": revision, "status": (listed or {}).get("status"), "chart": (listed or {}).get("chart"),
                     "values": _digest(current)}
            if rollback_to is not None:
                to = int(rollback_to[rel.name])
                facts[rel.name] = {**state, "to": to}
                rows.append({"release": rel.name, "namespace": rel.namespace, "revision": revision,
                             "action": "uninstall" if to == 0 else f"rollback to {to}"})
                if listed is None:
                    refusals.append(f"{rel.name}: not installed, nothing to go back from")
                    continue
                steps.append(Step(f"helm {'uninstall' if to == 0 else 'rollback'} {rel.name}",
                                  f"release {rel.namespace}/{rel.name}: revision {revision} -> "
                                  + ("uninstalled" if to == 0 else f"the chart and values of revision {to}"),
                                  "helm list: the release is gone" if to == 0 else "helm list: deployed",
                                  "install-addons without rollback_to applies the values files again",
                                  lambda rel=rel, to=to: rollback(helm, rel, to, redactor),
                                  lambda _r, rel=rel, to=to: _check_back(helm, rel, to, redactor)))
                continue
            wanted = load_values(rel.values)
            action, why = judge(rel, listed, current, wanted)
            facts[rel.name] = {**state, "action": action, "wanted": {"chart": f"{rel.chart}-{rel.version}",
                                                                       "values": _digest(wanted)}}
            rows.append({"release": rel.name, "namespace": rel.namespace, "chart": f"{rel.chart} {rel.version}",
                         "revision": revision or "-", "action": action, "why": why})
            if action == "skip":
                continue
            diff = redactor.text(values_diff(current, wanted, rel.name))
            if diff:
                diffs.append(f"### {rel.name}\n\n```diff\n{diff}```\n")
            if action == "blocked":
                refusals.append(f"{rel.name}: {why}")
                continue
            missing = missing_secrets(api, rel.namespace, rel.secrets, ccfg.request_timeout_s) if rel.secrets else []
            if missing:
                refusals.append(f"{rel.name}: missing {', '.join(missing)}")
                continue
            undo = f"helm rollback {rel.name} {revision}" if revision else f"helm uninstall {rel.name} (a new release)"
            steps.append(Step(f"helm upgrade --install {rel.name}",
                              f"release {rel.namespace}/{rel.name}: {why} (chart {rel.chart} {rel.version})",
                              "helm list: deployed at the pinned chart; helm get values: the values file's", undo,
                              lambda rel=rel: upgrade_install(helm, rel, redactor),
                              lambda _r, rel=rel, wanted=wanted: _check_release(helm, rel, wanted, redactor)))

        def way_back(applied: int) -> WayBack | None:
            if rollback_to is not None:
                return WayBack("A rollback is undone by running install-addons again without rollback_to.",
                               "install-addons", {**same, "releases": list(rollback_to), "dry_run": False})
            names = [s.name.rsplit(" ", 1)[-1] for s in steps[:applied]]
            if not names:
                return None
            back = {n: before[n] for n in names}
            return WayBack(f"helm rollback each release the run changed to its revision before (0: helm uninstall, "
                           f"it was new): install-addons with rollback_to={json.dumps(back)}.", "install-addons",
                           {**same, "rollback_to": back, "dry_run": False})

        details = md_table(rows) + ("\n## Values diffs (deployed -> file)\n\n" + "\n".join(diffs) if diffs else "")
        return Plan(Target("Kubernetes cluster (kube-system namespace UID)", ccfg.name, uid), steps,
                    title=f"install-addons on {ccfg.name}" + (" (rollback)" if rollback_to is not None else ""),
                    details=details, facts=facts, refusals=refusals, way_back=way_back)

    @asynccontextmanager
    async def session():
        try:
            yield api
        finally:  # no idle connection is kept while an approval waits
            api.rest_client.pool_manager.clear()

    op = Operation("install-addons", platform, planner, session, lock=provisioning_lock(platform, ccfg.name),
                   approval_timeout_s=approval_timeout(plat.config, approval_timeout_s),
                   lock_timeout_s=lock_timeout(plat.config), poll_interval_s=poll_interval_s, redactor=redactor,
                   key=ccfg.name)
    return run_operation_sync(op, dry_run=dry_run)


def _check_release(helm: HelmCli, rel: Any, wanted: dict, redactor: Redactor) -> str:
    listed, values = read_release.fn(helm, rel, redactor)
    want_chart = f"{rel.chart.rsplit('/', 1)[-1]}-{rel.version}"
    if listed is None or listed.get("status") != "deployed" or listed.get("chart") != want_chart or values != wanted:
        raise RuntimeError(f"{rel.name}: after the upgrade helm lists {listed and listed.get('status')} "
                           f"{listed and listed.get('chart')}, values {'as the file' if values == wanted else 'not the file'}")
    return f"deployed, revision {listed['revision']}"


def _check_back(helm: HelmCli, rel: Any, to: int, redactor: Redactor) -> str:
    listed, _ = read_release.fn(helm, rel, redactor)
    if to == 0 and listed is not None:
        raise RuntimeError(f"{rel.name}: still installed after helm uninstall")
    if to and (listed is None or listed.get("status") != "deployed"):
        raise RuntimeError(f"{rel.name}: not deployed after the rollback ({listed and listed.get('status')})")
    return "uninstalled" if to == 0 else f"deployed, revision {listed['revision']}"
