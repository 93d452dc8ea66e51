"""The platform health check's I/O: one probe per component, each returning a `tasks.health.Check`.

A probe fetches what its check needs in a constant number of calls (paged listings, never one call per
node or pod) and hands the answers to the pure functions in `tasks.health`. Timeouts are the caller's
(`run_check`, the task `flows/platform_health.py` runs each probe in, waits for it under `asyncio.wait_for`);
every HTTP call also carries its own. A component's own endpoint that does not answer makes its check
critical (the component is down); a source the check reads through (Prometheus for its targets, the API
server for nodes and pods, the Prefect API for the other lifecycles' runs) that does not answer makes the
check unknown, never ok.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NONE

from tasks import health
from tasks.health import Check, unknown
from tasks.redact import Redactor

PAGE_SIZE = 500
# A check whose own component gives no answer in time is critical (the component is down for us);
# the other checks read through a source, and a silent source makes them unknown.
_COMPONENTS = {"kube-api", "argo", "gitlab", "prometheus", "registry"}


def _now() -> datetime:
    return datetime.now(UTC)


# --- Kubernetes ---------------------------------------------------------------------------------


def _get_text(api: k8s.ApiClient, path: str, timeout_s: float, query: list[tuple[str, str]] | None = None
              ) -> tuple[int, str]:
    """GET a non-resource path of the API server (`/readyz`, `/livez`): (HTTP status, body text)."""
    try:
        method, url, headers, body, post = api.param_serialize(
            method="GET", resource_path=path, query_params=query or [], header_params={"Accept": "text/plain"},
            auth_settings=["BearerToken"])
        resp = api.call_api(method, url, header_params=headers, body=body, post_params=post,
                            _request_timeout=timeout_s)
        resp.read()
        return resp.status, (resp.data or b"").decode(errors="replace")
    except ApiException as exc:  # a 500 from /readyz is an answer, not a failure to ask
        return exc.status, exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")


def apiserver_checks(api: k8s.ApiClient, timeout_s: float) -> tuple[Check, Check]:
    """`/readyz?verbose` and `/livez` (Kubernetes API health endpoints): the API server and etcd checks."""
    try:
        readyz = _get_text(api, "/readyz", timeout_s, [("verbose", "true")])
        livez = _get_text(api, "/livez", timeout_s)
    except Exception as exc:  # noqa: BLE001 - no answer at all: the API server is down for us
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return (Check("kube-api", "critical", f"the API server does not answer: {error}", [error]),
                health.unknown("etcd", f"the API server does not answer ({type(exc).__name__})"))
    return health.analyse_apiserver(readyz, livez)


def _paged(fetch: Any, timeout_s: float, **kwargs: Any) -> list[dict[str, Any]]:
    """Every item of a list call, PAGE_SIZE at a time (`limit`/`continue`)."""
    items: list[dict[str, Any]] = []
    cont = None
    while True:
        extra = {"_continue": cont} if cont else {}
        body = orjson.loads(fetch(limit=PAGE_SIZE, _preload_content=False, _request_timeout=timeout_s,
                                  **kwargs, **extra).data)
        items += body.get("items") or []
        cont = (body.get("metadata") or {}).get("continue")
        if not cont:
            return items


def nodes_check(api: k8s.ApiClient, timeout_s: float) -> Check:
    return health.analyse_nodes(_paged(k8s.CoreV1Api(api).list_node, timeout_s))


def workloads_check(api: k8s.ApiClient, namespaces: list[str], timeout_s: float) -> Check:
    core = k8s.CoreV1Api(api)
    pods = {ns: _paged(core.list_namespaced_pod, timeout_s, namespace=ns) for ns in namespaces}
    return health.analyse_workloads(pods, _now())


def pvcs_check(api: k8s.ApiClient, timeout_s: float) -> Check:
    pvcs = _paged(k8s.CoreV1Api(api).list_persistent_volume_claim_for_all_namespaces, timeout_s)
    return health.analyse_pvcs(pvcs, _now())


def argo_check(argo: Any, api: k8s.ApiClient, controller_namespace: str, controller_selector: str,
               timeout_s: float) -> Check:
    """The Argo Server's `/api/v1/version` (Argo's info service) and the workflow controller's pods."""
    try:
        r = httpx.get(f"{argo.url.rstrip('/')}/api/v1/version", timeout=timeout_s, verify=argo.verify_tls)
        version: tuple[int, Any] = (r.status_code, _json(r))
    except httpx.HTTPError as exc:
        return Check("argo", "critical", f"the Argo Server does not answer: {type(exc).__name__}", [str(exc)[:200]])
    try:
        pods = _paged(k8s.CoreV1Api(api).list_namespaced_pod, timeout_s, namespace=controller_namespace,
                      label_selector=controller_selector)
    except Exception as exc:  # noqa: BLE001 - the server answered; the controller is unknown
        return health.unknown("argo", f"workflow-controller pods: {type(exc).__name__}")
    return health.analyse_argo(version, pods)


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text[:200]


# --- HTTP components ----------------------------------------------------------------------------


async def gitlab_check(api: Any, timeout_s: float) -> Check:
    """`/-/readiness?all=1` and `/-/liveness` (GitLab docs, administration/monitoring/health_check)."""
    base = api.url.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            ready, live = await asyncio.gather(http.get(f"{base}/-/readiness", params={"all": "1"}),
                                               http.get(f"{base}/-/liveness"))
    except httpx.HTTPError as exc:
        return Check("gitlab", "critical", f"GitLab does not answer: {type(exc).__name__}", [str(exc)[:200]])
    return health.analyse_gitlab((ready.status_code, _json(ready)), (live.status_code, _json(live)))


async def runners_check(api: Any, timeout_s: float) -> Check:
    """Every runner through `GET /api/v4/runners/all` (admin; offset pagination, 100 a page)."""
    base = api.url.rstrip("/")
    runners: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(timeout=timeout_s, headers={"PRIVATE-TOKEN": api.token.get_secret_value()}
                                     ) as http:
            page: str | None = "1"
            while page:
                r = await http.get(f"{base}/api/v4/runners/all", params={"per_page": "100", "page": page})
                if r.status_code != 200:
                    return health.unknown("gitlab-runners", f"GET /runners/all answered HTTP {r.status_code}")
                runners += r.json()
                page = r.headers.get("X-Next-Page") or None
    except httpx.HTTPError as exc:
        return health.unknown("gitlab-runners", f"{type(exc).__name__}")
    return health.analyse_runners(runners)


async def prometheus_checks(prom: Any, timeout_s: float) -> tuple[Check, Check]:
    """Prometheus' `/-/ready`, then its active targets (`/api/v1/targets?state=active`)."""
    base = prom.url.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            ready = await http.get(f"{base}/-/ready")
            targets = await http.get(f"{base}/api/v1/targets", params={"state": "active"})
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return (Check("prometheus", "critical", f"Prometheus does not answer: {type(exc).__name__}", [error]),
                health.unknown("prometheus-targets", "Prometheus does not answer"))
    own = (Check("prometheus", "ok", "ready", [f"/-/ready HTTP {ready.status_code}"]) if ready.status_code == 200
           else Check("prometheus", "critical", f"not ready (HTTP {ready.status_code})", [ready.text[:200]]))
    if targets.status_code != 200:
        return own, health.unknown("prometheus-targets", f"/api/v1/targets answered HTTP {targets.status_code}")
    return own, health.analyse_targets((targets.json().get("data") or {}).get("activeTargets") or [])


async def registry_check(registry: Any, timeout_s: float) -> Check:
    """The registry's `/v2/` (distribution API spec, "API Version Check": 200, or 401 when auth is needed)."""
    auth = None
    if registry.username and registry.password is not None:
        auth = (registry.username, registry.password.get_secret_value())
    try:
        async with httpx.AsyncClient(timeout=timeout_s, auth=auth) as http:
            r = await http.get(f"{registry.url.rstrip('/')}/v2/")
    except httpx.HTTPError as exc:
        return Check("registry", "critical", f"the registry does not answer: {type(exc).__name__}", [str(exc)[:200]])
    api_version = r.headers.get("Docker-Distribution-Api-Version", "-")
    ev = [f"/v2/ HTTP {r.status_code}", f"Docker-Distribution-Api-Version: {api_version}"]
    if r.status_code == 200:
        return Check("registry", "ok", "the v2 API answers", ev)
    if r.status_code == 401:
        return Check("registry", "warning", "the v2 API answers but rejects our credentials", ev)
    return Check("registry", "critical", f"/v2/ answered HTTP {r.status_code}", ev)


# --- the other lifecycles, through the Prefect API ------------------------------------------------


async def latest_run(client: Any, flow_name: str, platform: str, states: list[str] | None = None,
                     scan: int = 20) -> Any | None:
    """The newest run of `flow_name` for `platform` (its `platform` parameter), optionally in `states`."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    run_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))) if states else None
    runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                       flow_run_filter=run_filter, sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                                       limit=scan)
    for run in runs:
        if (run.parameters or {}).get("platform", "main") == platform:
            return run
    return None


async def _table(client: Any, run: Any, key_prefix: str) -> list[dict[str, Any]] | None:
    """The rows of the run's table artifact whose key starts with `key_prefix` (None when it has none)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), type=ArtifactFilterType(any_=["table"])))
    rows = None
    for art in arts:
        if (art.key or "").startswith(key_prefix):
            data = json.loads(art.data) if isinstance(art.data, str) else art.data
            rows = (rows or []) + [r for r in data if r != {"result": "none"}]
    return rows


async def lifecycle_checks(platform: str, cert_warn_days: float, cert_critical_days: float,
                           backup_warn_h: float, backup_critical_h: float) -> list[Check]:
    """The newest verified GitLab backup's age, the fewest days left on a certificate and the last GPU sweep's
    critical findings, read from those flows' latest runs (not recomputed)."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client

    async with get_client() as client:
        backup, certs, sweep = await asyncio.gather(
            latest_run(client, "gitlab-backup", platform, ["COMPLETED"]),
            latest_run(client, "certificate-check", platform, ["COMPLETED", "FAILED"]),
            latest_run(client, "gpu-monitoring-sweep", platform, ["COMPLETED", "FAILED", "PAUSED"]))
        cert_rows = await _table(client, certs, "certificate-table-") if certs else None
        sweep_rows = await _table(client, sweep, "gpu-findings-") if sweep else None
    return [
        health.analyse_backup_age(backup.end_time if backup else None, backup.name if backup else None, _now(),
                                  timedelta(hours=backup_warn_h), timedelta(hours=backup_critical_h)),
        health.analyse_certificates(cert_rows, certs.name if certs else None, cert_warn_days, cert_critical_days),
        health.analyse_gpu_sweep(sweep_rows, sweep.name if sweep else None,
                                 sweep.state_type.value if sweep and sweep.state_type else None),
    ]


# --- running a probe ------------------------------------------------------------------------------


@task(name="health-check", task_run_name="check-{names}", cache_policy=NONE, persist_result=False)
async def run_check(names: str, probe: Callable[[], Any], timeout_s: float, redactor: Redactor) -> list[Check]:
    """Run one probe (sync probes in a thread) under `timeout_s`; whatever goes wrong is that check's evidence."""
    started = time.monotonic()
    try:
        result = probe()
        if asyncio.iscoroutine(result):
            out = await asyncio.wait_for(result, timeout_s)
        else:
            out = result
    except TimeoutError:
        out = [Check(n, "critical" if n in _COMPONENTS else "unknown", f"no answer within {timeout_s:g} s",
                     [f"timeout {timeout_s:g} s"]) for n in names.split(",")]
    except Exception as exc:  # noqa: BLE001 - a probe that breaks makes its checks unknown, never ok
        out = [unknown(n, redactor.error(exc)[:300]) for n in names.split(",")]
    checks = list(out) if isinstance(out, (list, tuple)) else [out]
    for c in checks:
        c.seconds = time.monotonic() - started
        c.summary, c.evidence = redactor.text(c.summary), [redactor.text(e) for e in c.evidence]
    return checks


def threaded(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A sync probe as `run_check` takes it: called, it runs `fn(*args)` in a thread."""
    return lambda: asyncio.to_thread(fn, *args)
