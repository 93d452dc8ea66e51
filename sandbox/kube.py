"""An emulated Kubernetes API server: kmock's `KubernetesEmulator`, extended where it falls short.

kmock stores objects and answers list/get/create/patch/delete/watch. Real clients also rely on:

- ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and
  ``fieldSelector`` (``metadata.name``, ``metadata.namespace``, ``spec.nodeName``,
  ``status.phase``, ``spec.unschedulable``: any dotted path, ``=``/``==``/``!=``);
- ``limit``/``continue`` pagination in a stable order, with ``metadata.continue`` and
  ``remainingItemCount``, and ``410 Gone`` for an expired token;
- ``metadata.resourceVersion``, ``uid`` and ``creationTimestamp`` on every object;
- the ``status`` subresource (PATCH/PUT ``.../nodes/NAME/status``);
- pod eviction (POST ``.../pods/NAME/eviction``) that honours PodDisruptionBudgets with
  ``429`` as the real API server answers;
- a bounded request log: kmock keeps every request for assertions, which makes a long-running
  server slower and bigger with each request; this server keeps the last few hundred;
- list snapshots: the API server serves lists from its watch cache and pages through one
  consistent snapshot (the continue token carries the resourceVersion the list started at:
  Kubernetes API concepts, "Retrieving large results sets in chunks"). This server keeps the last
  few list results, each object serialized once, keyed by the request's selectors and the store's
  state, and pages through them; any write makes a new state. So a repeated 10,000-node listing
  costs the stand-in a join of cached bytes, not a Python walk and serialization of every object
  (which a real API server, in Go, does in a fraction of the time): benchmarks measure the client.
"""

from __future__ import annotations

import base64
import copy
import datetime
import itertools
import json
import re
import uuid
from collections import OrderedDict
from typing import Any

import aiohttp.web
from kmock import KubernetesEmulator
from kmock._internal import enums, rendering

REQUEST_LOG_KEEP = 200
LIST_SNAPSHOTS_KEEP = 8
_TERM = re.compile(r"^\s*(!)?\s*([A-Za-z0-9_./\-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9_.\-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    terms, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        terms.append(cur)
    return terms


class SelectorError(ValueError):
    pass


def parse_label_selector(selector: str):
    """Return a predicate over a labels dict. Raises SelectorError on syntax errors."""
    checks = []
    for term in _split_terms(selector or ""):
        m = _TERM.match(term)
        if not m:
            raise SelectorError(f"unable to parse requirement: {term!r}")
        neg, key, op, value, setop, values = m.groups()
        if neg and (op or setop):
            raise SelectorError(f"invalid requirement: {term!r}")
        if setop:
            vals = {v.strip() for v in values.split(",") if v.strip()}
            if setop == "in":
                checks.append(lambda labels, k=key, vs=vals: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=vals: labels.get(k) not in vs)
        elif op in ("=", "=="):
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif neg:
            checks.append(lambda labels, k=key: k not in labels)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(c(labels) for c in checks)


def _path_value(obj: dict[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return "false" if path == "spec.unschedulable" else ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def parse_field_selector(selector: str):
    checks = []
    for term in _split_terms(selector or ""):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if not m:
            raise SelectorError(f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        if op == "!=":
            checks.append(lambda o, p=path, v=value: _path_value(o, p) != v)
        else:
            checks.append(lambda o, p=path, v=value: _path_value(o, p) == v)
    return lambda o: all(c(o) for c in checks)


_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
# What discovery announces (kubectl needs it to map `get nodes` to a URL).
RESOURCES: dict[str, dict[str, Any]] = {
    "v1/nodes": {"namespaced": False, "kind": "Node", "singular": "node", "verbs": _VERBS,
                 "shortnames": ["no"], "categories": [], "subresources": ["status", "proxy"]},
    "v1/pods": {"namespaced": True, "kind": "Pod", "singular": "pod", "verbs": _VERBS,
                "shortnames": ["po"], "categories": ["all"], "subresources": ["status", "eviction", "log"]},
    "v1/namespaces": {"namespaced": False, "kind": "Namespace", "singular": "namespace", "verbs": _VERBS,
                      "shortnames": ["ns"], "categories": [], "subresources": ["status"]},
    "v1/secrets": {"namespaced": True, "kind": "Secret", "singular": "secret", "verbs": _VERBS,
                   "shortnames": [], "categories": [], "subresources": []},
    "v1/configmaps": {"namespaced": True, "kind": "ConfigMap", "singular": "configmap", "verbs": _VERBS,
                      "shortnames": ["cm"], "categories": [], "subresources": []},
    "v1/events": {"namespaced": True, "kind": "Event", "singular": "event", "verbs": _VERBS,
                  "shortnames": ["ev"], "categories": [], "subresources": []},
    "policy/v1/poddisruptionbudgets": {"namespaced": True, "kind": "PodDisruptionBudget",
                                       "singular": "poddisruptionbudget", "verbs": _VERBS, "shortnames": ["pdb"],
                                       "categories": [], "subresources": ["status"]},
    "apps/v1/daemonsets": {"namespaced": True, "kind": "DaemonSet", "singular": "daemonset", "verbs": _VERBS,
                           "shortnames": ["ds"], "categories": ["all"], "subresources": ["status"]},
    # issue 15: the health check lists PersistentVolumeClaims (pending ones) cluster-wide
    "v1/persistentvolumeclaims": {"namespaced": True, "kind": "PersistentVolumeClaim",
                                  "singular": "persistentvolumeclaim", "verbs": _VERBS, "shortnames": ["pvc"],
                                  "categories": [], "subresources": ["status"]},
    "batch/v1/jobs": {"namespaced": True, "kind": "Job", "singular": "job", "verbs": _VERBS,
                      "shortnames": [], "categories": ["all"], "subresources": ["status"]},
}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str, details: dict | None = None) -> aiohttp.web.Response:
    return aiohttp.web.json_response(
        {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
         "code": code, "reason": reason, "message": message, "details": details or {}},
        status=code,
    )


class SandboxKubernetes(KubernetesEmulator):
    """kmock's emulator with selectors, pagination, metadata, status subresource and eviction."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = info
        self._rv = itertools.count(1000)
        self.last_rv = "1000"
        # Fault injection: when set, every API request answers this HTTP status.
        self.fail_with: int | None = None
        self.requests_served = 0
        # list snapshots: (resource, namespace, selectors, state) -> (id, serialized objects in list order)
        self._writes = 0
        self._snapshots: OrderedDict[tuple, tuple[int, list[bytes]]] = OrderedDict()
        self._snapshot_ids = itertools.count(1)
        self._resources_at: tuple[tuple, list[Any]] | None = None
        # Simulated node agents (sandbox/kubelet.py): `async hook(request, method)` answering a request
        # (a Response) or letting it through (None): the node proxy, pod logs, Jobs the kubelet runs.
        self.hooks: list[Any] = []

    async def _serve_server_version(self, request: rendering.Request) -> Any:
        # issue 15: kmock answers v1.26.4+k3s1; a kubespray cluster's API server is the nodes' version
        # (kubeadm keeps kube-apiserver and kubelet on one release; `/version` is apimachinery's version.Info)
        return server_version()

    async def _serve_version(self, request: rendering.Request) -> Any:
        # kmock announces the core group as "/v1" and gives subresources the parent's short
        # names; kubectl then finds no "nodes" and warns on "pdb". Answer as the API server does.
        body = await super()._serve_version(request)
        if isinstance(body, dict):
            if body.get("groupVersion", "").startswith("/"):
                body["groupVersion"] = body["groupVersion"][1:]
            for res in body.get("resources", []):
                if "/" in res["name"]:
                    res["shortNames"] = []
                    res["categories"] = []
                    res["verbs"] = ["get", "patch", "update"] if not res["name"].endswith("eviction") else ["create"]
        return body

    # -- object stamping ---------------------------------------------------------------------

    def next_rv(self) -> str:
        self.last_rv = str(next(self._rv))
        return self.last_rv

    def stamp_new(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = self.next_rv()
        return obj

    def put_object(self, resource: str, namespace: str | None, name: str, obj: dict[str, Any]) -> None:
        """Seed or replace an object directly (no HTTP); stamps its metadata."""
        self._writes += 1
        self.objects[resource, namespace, name] = self.stamp_new(obj)

    def patch_object(self, resource: str, namespace: str | None, name: str, patch: dict[str, Any]) -> None:
        self._writes += 1
        patch = copy.deepcopy(patch)
        patch.setdefault("metadata", {})["resourceVersion"] = self.next_rv()
        self.objects[resource, namespace, name].patch(patch)

    def get_object(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            obj = self.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def live_objects(self, plural: str) -> list[dict[str, Any]]:
        """The current state of every object of one resource (by plural), for assertions."""
        return [obj.raw for (res, _ns, _n), obj in self.objects.items() if res.plural == plural and not obj.deleted]

    # -- request handling --------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self.requests_served += 1
        if request.url.path in ("/readyz", "/livez"):  # issue 14: the API server's health endpoints
            return _health(request.url.path[1:], self.fail_with is None, "verbose" in request.params)
        if request.url.path == SSAR_PATH and str(request.method).upper().endswith("POST"):
            return _self_subject_access_review(request.data)
        ns_get = _NAMESPACE_PATH.fullmatch(request.url.path)
        if ns_get and str(request.method).upper().endswith("GET") and self.fail_with is None:
            # GET /api/v1/namespaces/NAME: kmock reads the path as a list in namespace NAME. The operations
            # name a cluster by its kube-system namespace's metadata.uid (API conventions, "Metadata": uid).
            obj = self.get_object("v1/namespaces", None, ns_get.group(1))
            if obj is None:
                return _status(404, "NotFound", f'namespaces "{ns_get.group(1)}" not found')
            return aiohttp.web.Response(body=_dumps(obj), content_type="application/json")
        if len(self._requests) > REQUEST_LOG_KEEP * 2:
            del self._requests[:-REQUEST_LOG_KEEP]
        if request.resource is not None and request.resource.plural:
            if self.fail_with is not None:
                return _status(self.fail_with, "ServiceUnavailable", "the sandbox API server is failing on purpose")
            method = str(request.method).upper().split(".")[-1]
            if method not in ("GET", "HEAD"):
                self._writes += 1  # a new state: list snapshots taken before it are not reused
            for hook in self.hooks:
                answer = await hook(request, method)
                if answer is not None:
                    return answer
            if request.subresource == "eviction" and method == "POST":
                return await self._evict(request)
            if request.subresource == "status" and method in ("PATCH", "PUT"):
                return await self._update_status(request, replace=(method == "PUT"))
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                # The API server puts the URL's namespace on a created object, and refuses an object that
                # names another one (apiserver `rest.BeforeCreate` / `EnsureObjectNamespaceMatchesRequestNamespace`).
                if request.namespace:
                    meta = request.data.setdefault("metadata", {})
                    if meta.get("namespace") not in (None, "", request.namespace):
                        return _status(400, "BadRequest", "the namespace of the provided object does not match "
                                                          "the namespace sent on the request")
                    meta["namespace"] = request.namespace
                self.stamp_new(request.data)
            elif request.action == enums.action.UPDATE and isinstance(request.data, dict):
                if isinstance(request.data, list):
                    return _status(415, "UnsupportedMediaType", "JSON patch lists are not supported here")
                request.data.setdefault("metadata", {})["resourceVersion"] = self.next_rv()
            elif request.action == enums.action.LIST:
                return await self._list(request)
            elif request.action == enums.action.FETCH and not request.subresource and _wants_table(request):
                obj = self.get_object(request.resource, request.namespace, request.name)
                if obj is None:
                    return _status(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
                table = as_table(request.resource.plural, [obj], {"resourceVersion": self.last_rv})
                return aiohttp.web.Response(body=_dumps(table), content_type="application/json")
        return await super()._handle(request)

    def _get_resources(self) -> list[Any]:
        # kmock's version walks every stored object for their resources on each call, and every list
        # request asks (72,000 objects at 10,000 nodes: ~20 ms of the emulator's CPU per page). A real
        # API server serves resources from a table built when an API group is installed or a CRD is
        # established, not from the objects stored (kubernetes.io "The Kubernetes API", section
        # "Discovery API"; KEP-3352 "Aggregated Discovery": built-ins, CRDs, aggregated servers). Here
        # the table still comes from the store (kmock knows resources by their objects), rebuilt only
        # when the store changes.
        state = (self._state(), len(self.resources))  # declared resources, and the stored objects' ones
        if self._resources_at is None or self._resources_at[0] != state:
            self._resources_at = (state, super()._get_resources())
        return list(self._resources_at[1])

    def _state(self) -> tuple[int, str, int]:
        """Changes with every write (HTTP, seeding, patching) and every direct deletion from the store."""
        return (self._writes, self.last_rv, len(self.objects))

    def _snapshot(self, request: rendering.Request, label_ok: Any, field_ok: Any, snap_id: int | None
                  ) -> tuple[int, list[bytes]]:
        """The serialized objects a list answers, in its stable order: the continued snapshot `snap_id`
        when it is still kept, else a snapshot of the store as it is now (cached per state)."""
        params = request.params
        if snap_id is not None:
            for sid, items in self._snapshots.values():
                if sid == snap_id:
                    return sid, items
        key = (request.resource, request.namespace, params.get("labelSelector", ""), params.get("fieldSelector", ""),
               self._state())
        hit = self._snapshots.get(key)
        if hit is not None:
            self._snapshots.move_to_end(key)
            return hit
        matching = []
        for (res, ns, name), obj in self.objects.items():
            if res != request.resource or obj.deleted:
                continue
            if request.namespace is not None and ns != request.namespace:
                continue
            raw = obj.raw
            if not label_ok((raw.get("metadata") or {}).get("labels") or {}):
                continue
            if params.get("fieldSelector") and not field_ok(raw):
                continue
            matching.append(((ns or "", name), raw))
        matching.sort(key=lambda pair: pair[0])
        snap = (next(self._snapshot_ids), [_dumps(raw) for _, raw in matching])
        self._snapshots[key] = snap
        while len(self._snapshots) > LIST_SNAPSHOTS_KEEP:
            self._snapshots.popitem(last=False)
        return snap

    async def _list(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        params = request.params
        try:
            label_ok = parse_label_selector(params.get("labelSelector", ""))
            field_ok = parse_field_selector(params.get("fieldSelector", ""))
        except SelectorError as exc:
            return _status(400, "BadRequest", str(exc))
        known = {r for r in self._get_resources()}
        if request.resource not in known:
            return _status(404, "NotFound", f"the server could not find the requested resource ({request.resource})")
        offset, snap_id = 0, None
        if params.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(params["continue"].encode()))
                offset = int(token["offset"])
                snap_id = int(token["snapshot"]) if "snapshot" in token else None
            except (ValueError, KeyError, TypeError):
                return _status(410, "Expired", "The provided continue parameter is too old or invalid")
        async with self._lock:
            snap_id, items = self._snapshot(request, label_ok, field_ok, snap_id)
        limit = int(params.get("limit") or 0)
        page = items[offset: offset + limit] if limit > 0 else items[offset:]
        meta: dict[str, Any] = {"resourceVersion": self.last_rv}
        end = offset + len(page)
        if limit > 0 and end < len(items):
            meta["continue"] = base64.urlsafe_b64encode(json.dumps({"offset": end, "snapshot": snap_id}).encode()
                                                        ).decode()
            meta["remainingItemCount"] = len(items) - end
        if _wants_table(request):
            objs = [json.loads(b) for b in page]
            return aiohttp.web.Response(body=_dumps(as_table(request.resource.plural, objs, meta)),
                                        content_type="application/json")
        body = b"".join([b'{"apiVersion":"v1","kind":"List","metadata":', _dumps(meta), b',"items":[',
                         b",".join(page), b"]}"])
        return aiohttp.web.Response(body=body, content_type="application/json")

    async def _update_status(self, request: rendering.Request, replace: bool) -> aiohttp.web.StreamResponse:
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return _status(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
            data = request.data if isinstance(request.data, dict) else {}
            status = data.get("status", {})
            if replace:
                self.objects[key].patch({"status": None})
            self.objects[key].patch({"status": status, "metadata": {"resourceVersion": self.next_rv()}})
            raw = self.objects[key].raw
        return aiohttp.web.json_response(raw)

    async def _evict(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return _status(404, "NotFound", f'pods "{request.name}" not found')
            pod = self.objects[key].raw
            labels = (pod.get("metadata") or {}).get("labels") or {}
            for (res, ns, pdb_name), pdb_obj in self.objects.items():
                if res.plural != "poddisruptionbudgets" or ns != request.namespace or pdb_obj.deleted:
                    continue
                pdb = pdb_obj.raw
                match = ((pdb.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
                if match and all(labels.get(k) == v for k, v in match.items()):
                    allowed = int((pdb.get("status") or {}).get("disruptionsAllowed", 0))
                    if allowed <= 0:
                        return _status(
                            429, "TooManyRequests",
                            "Cannot evict pod as it would violate the pod's disruption budget.",
                            {"causes": [{"reason": "DisruptionBudget",
                                         "message": f"The disruption budget {pdb_name} needs more healthy pods"}]},
                        )
                    pdb_obj.patch({"status": {"disruptionsAllowed": allowed - 1}})
            self.objects[key].delete()
            self.next_rv()
        return aiohttp.web.json_response(
            {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success", "code": 201}, status=201
        )


SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces/([a-z0-9-]+)")


def server_version() -> dict[str, str]:
    """`GET /version` as kube-apiserver answers it (k8s.io/apimachinery pkg/version `Info`), for the release
    the seeded nodes' kubelets run (`sandbox.cluster.KUBELET_VERSION`)."""
    from sandbox.cluster import KUBELET_VERSION

    major, minor, _patch = KUBELET_VERSION.lstrip("v").split(".")
    return {"major": major, "minor": minor, "gitVersion": KUBELET_VERSION,
            "gitCommit": "fd8a1e4fb8a4c6a8dc95c1a6b3b4bc5a0d5e1f0c", "gitTreeState": "clean",
            "buildDate": "2024-05-14T10:42:02Z", "goVersion": "go1.21.10", "compiler": "gc",
            "platform": "linux/amd64"}


def _self_subject_access_review(data: Any) -> aiohttp.web.Response:
    """`kubectl auth can-i` (POST selfsubjectaccessreviews, authorization.k8s.io/v1): the sandbox's one user is
    cluster-admin, so every review is allowed, echoed back with its status as the API server does
    (kubernetes pkg/registry/authorization/selfsubjectaccessreview/rest.go: 201 with `status.allowed`)."""
    body = data if isinstance(data, dict) else {}
    return aiohttp.web.json_response(
        {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
         "metadata": {"creationTimestamp": None}, "spec": body.get("spec") or {},
         "status": {"allowed": True, "reason": "the sandbox user is bound to cluster-admin"}}, status=201)


def _health(kind: str, healthy: bool, verbose: bool) -> aiohttp.web.Response:
    """`/readyz` and `/livez` as kube-apiserver answers them (k8s.io/apiserver pkg/server/healthz: one
    `[+]name ok` / `[-]name failed: reason withheld` line per check with `?verbose`, then the verdict;
    HTTP 500 when a check fails)."""
    checks = ["ping", "log", "etcd", "informer-sync", "poststarthook/start-apiextensions-controllers"]
    lines = [f"[+]{c} ok" if healthy or c != "etcd" else f"[-]{c} failed: reason withheld" for c in checks]
    verdict = f"{kind} check passed" if healthy else f"{kind} check failed"
    body = ("\n".join(lines) + "\n" if verbose else "") + verdict + "\n"
    return aiohttp.web.Response(text=body if verbose or not healthy else "ok", status=200 if healthy else 500)


def _wants_table(request: rendering.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        then = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "<unknown>"
    secs = int((datetime.datetime.now(tz=datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _node_cells(obj: dict[str, Any]) -> list[Any]:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
    ready = next((c.get("status") for c in status.get("conditions", []) if c.get("type") == "Ready"), "Unknown")
    state = {"True": "Ready", "False": "NotReady"}.get(ready, "NotReady")
    if spec.get("unschedulable"):
        state += ",SchedulingDisabled"
    roles = sorted(k.split("/", 1)[1] for k in meta.get("labels", {}) if k.startswith("node-role.kubernetes.io/"))
    return [meta.get("name"), state, ",".join(roles) or "<none>", _age(meta.get("creationTimestamp")),
            status.get("nodeInfo", {}).get("kubeletVersion", "")]


def _pod_cells(obj: dict[str, Any]) -> list[Any]:
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status", {})
    containers = len(spec.get("containers", []))
    ready = containers if status.get("phase") == "Running" else 0
    return [meta.get("name"), f"{ready}/{containers}", status.get("phase", "Unknown"), 0,
            _age(meta.get("creationTimestamp")), spec.get("nodeName", "<none>")]


_TABLES = {
    "nodes": (["Name", "Status", "Roles", "Age", "Version"], _node_cells),
    "pods": (["Name", "Ready", "Status", "Restarts", "Age", "Node"], _pod_cells),
}


def as_table(plural: str, items: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Server-side printing (`Accept: ...;as=Table`), as kubectl asks for: its STATUS/ROLES columns."""
    columns, cells = _TABLES.get(plural, (["Name", "Age"], lambda o: [o.get("metadata", {}).get("name"),
                                                                       _age(o.get("metadata", {}).get(
                                                                           "creationTimestamp"))]))
    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
        "columnDefinitions": [{"name": c, "type": "integer" if c == "Restarts" else "string",
                               "format": "name" if c == "Name" else "", "description": c,
                               "priority": 1 if c == "Node" else 0} for c in columns],
        "rows": [{"cells": cells(o), "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                               "metadata": o.get("metadata", {})}} for o in items],
    }


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        import orjson

        return orjson.dumps(body)
    except ImportError:  # pragma: no cover
        return json.dumps(body).encode()
