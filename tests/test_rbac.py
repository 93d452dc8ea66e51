"""configs/k8s/rbac.yaml against the code: every Kubernetes API call the flows make (found in the source,
its verb and resource read from the official client's own request paths) is allowed to the flows' service
account, and every rule serves a call (least privilege: no wildcard, no built-in admin role, secrets only
listed). `kubectl apply --dry-run=client` accepts the manifests (against a discovery stub on loopback)."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from kubernetes import client as k8s

from scripts.work_pools import NAMESPACE, SERVICE_ACCOUNT, k8s_template
from tests.conftest import REPO, need_binary

MANIFESTS = list(yaml.safe_load_all((REPO / "configs" / "k8s" / "rbac.yaml").read_text()))
SOURCES = sorted(p for d in ("flows", "tasks", "blocks") for p in (REPO / d).rglob("*.py"))
APIS = {"CoreV1Api": k8s.CoreV1Api, "BatchV1Api": k8s.BatchV1Api}
PRUNE_NAMESPACE = "kube-system"  # blocks/config.py thresholds.images.prune_namespace's default

# Calls that do not run as the service account: install-addons drives Helm with the cluster's admin
# kubeconfig (clusters[].kubeconfig) from platform-local, the way kubespray does.
NOT_AS_SERVICE_ACCOUNT = {"flows/addons.py"}
# Namespaced calls made in one known namespace (the rest may be made in any namespace: cluster-wide grant).
NAMESPACE_OF = {("tasks/node_images.py", "create_namespaced_job"): PRUNE_NAMESPACE,
                ("tasks/node_images.py", "list_namespaced_job"): PRUNE_NAMESPACE,
                ("tasks/node_images.py", "read_namespaced_pod_log"): PRUNE_NAMESPACE}
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def _api_methods() -> dict[str, tuple[str, str]]:
    """client method name -> (HTTP method, resource path), from the generated client's request builders."""
    out = {}
    for cls in APIS.values():
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            builder = getattr(cls, f"_{name}_serialize", None)
            if name.startswith("_") or builder is None:
                continue
            src = inspect.getsource(builder)
            method = re.search(r"method='(\w+)'", src).group(1)
            path = re.search(r"resource_path='([^']+)'", src).group(1)
            out[name] = (method, path)
    return out


def permission(method: str, path: str) -> tuple[str, str, str, bool]:
    """(apiGroup, resource[/subresource], verb, namespaced) that RBAC checks for one request
    (kubernetes.io/docs/reference/access-authn-authz/authorization, "Determine the request verb")."""
    m = re.fullmatch(r"/api/v1(/.*)|/apis/([^/]+)/[^/]+(/.*)", path)
    group, rest = ("", m.group(1)) if m.group(1) else (m.group(2), m.group(3))
    namespaced = rest.startswith("/namespaces/{namespace}/")
    if namespaced:
        rest = rest[len("/namespaces/{namespace}"):]
    parts = rest.strip("/").split("/")
    resource, named = parts[0], len(parts) > 1 and parts[1] == "{name}"
    if len(parts) > 2:
        resource += "/" + parts[2]
    verb = VERBS[method]
    if method == "GET" and not named:
        verb = "list"
    elif method == "DELETE" and not named:
        verb = "deletecollection"
    return group, resource, verb, namespaced


def code_calls() -> set[tuple[str, str, str, str | None]]:
    """(apiGroup, resource, verb, namespace or None for any/cluster-wide) of every call in the source."""
    methods = _api_methods()
    needed = set()
    for path in SOURCES:
        rel = str(path.relative_to(REPO))
        if rel in NOT_AS_SERVICE_ACCOUNT:
            continue
        text = path.read_text()
        for cls in re.findall(r"\bk8s\.(\w+Api)\(", text) + re.findall(r"\bclient\.(\w+Api)\(", text):
            assert cls in APIS, f"{rel} uses {cls}: teach this test its calls"
        for name in set(re.findall(r"\.(\w+)\b", text)) & set(methods):
            group, resource, verb, namespaced = permission(*methods[name])
            ns = NAMESPACE_OF.get((rel, name)) if namespaced else None
            needed.add((group, resource, verb, ns))
        if "call_api" in text:
            for url in re.findall(r'"(/(?:readyz|livez|healthz|version))"', text):
                needed.add(("nonResourceURL", url, "get", None))
    return needed


def granted() -> set[tuple[str, str, str, str | None]]:
    """What the manifests give the flows' service account: (group, resource, verb, namespace or None)."""
    roles = {(m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]): m for m in MANIFESTS
             if m["kind"] in ("Role", "ClusterRole")}
    out = set()
    for b in (m for m in MANIFESTS if m["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        ref = b["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role["rules"]:
            for verb in rule["verbs"]:
                if "nonResourceURLs" in rule:
                    out |= {("nonResourceURL", u, verb, None) for u in rule["nonResourceURLs"]}
                    continue
                out |= {(g, r, verb, ns) for g in rule["apiGroups"] for r in rule["resources"]}
    return out


def _allowed(call, grants) -> bool:
    group, resource, verb, ns = call
    return (group, resource, verb, None) in grants or (ns is not None and call in grants)


def test_permission_is_derived_from_the_request_path():
    assert permission("GET", "/api/v1/nodes") == ("", "nodes", "list", False)
    assert permission("GET", "/api/v1/nodes/{name}/proxy/{path}") == ("", "nodes/proxy", "get", False)
    assert permission("POST", "/api/v1/namespaces/{namespace}/pods/{name}/eviction") == \
        ("", "pods/eviction", "create", True)
    assert permission("GET", "/apis/batch/v1/namespaces/{namespace}/jobs") == ("batch", "jobs", "list", True)


def test_every_call_the_flows_make_is_allowed():
    needed = code_calls()
    # the calls this file has to know about are there (a regex that finds nothing would pass anything)
    assert {("", "nodes", "list", None), ("", "nodes", "patch", None), ("", "pods/eviction", "create", None),
            ("", "secrets", "list", None), ("batch", "jobs", "create", PRUNE_NAMESPACE),
            ("nonResourceURL", "/readyz", "get", None)} <= needed
    grants = granted()
    assert sorted(c for c in needed if not _allowed(c, grants)) == []


def test_every_rule_serves_a_call():
    needed = code_calls()
    unused = {g for g in granted()
              if not any(_allowed(c, {g}) for c in needed)}
    assert sorted(unused) == []


def test_least_privilege():
    text = (REPO / "configs" / "k8s" / "rbac.yaml").read_text()
    for m in MANIFESTS:
        for rule in m.get("rules", []):
            for key in ("apiGroups", "resources", "verbs", "nonResourceURLs"):
                assert "*" not in json.dumps(rule.get(key, [])), f"wildcard in {m['metadata']['name']}"
            assert not {"escalate", "bind", "impersonate", "watch"} & set(rule["verbs"])
            if "secrets" in rule.get("resources", []):
                assert m["metadata"]["name"] == "ai-platform-ops-certificate-reader" and rule["verbs"] == ["list"]
        if "roleRef" in m:
            assert m["roleRef"]["name"].startswith("ai-platform-ops-"), "no built-in role (cluster-admin, admin, edit)"
    assert "cluster-admin" not in text.replace("cluster-admin kubeconfig", "")
    # the dangerous verbs live apart from the read-only role
    reader = next(m for m in MANIFESTS if m["metadata"]["name"] == "ai-platform-ops-reader")
    assert {v for r in reader["rules"] for v in r["verbs"]} <= {"get", "list"}


def test_the_work_pool_runs_flows_as_this_service_account():
    props = k8s_template()["variables"]["properties"]
    assert props["service_account_name"]["default"] == SERVICE_ACCOUNT
    assert props["namespace"]["default"] == NAMESPACE
    sa = next(m for m in MANIFESTS if m["kind"] == "ServiceAccount")
    assert (sa["metadata"]["name"], sa["metadata"]["namespace"]) == (SERVICE_ACCOUNT, NAMESPACE)


# --- kubectl apply --dry-run=client -----------------------------------------------------------------
# Client dry-run still reads the API's discovery documents (to map kinds to resources) and GETs each
# object (to choose create or patch): a stub answers those, as an empty cluster would.

_DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": "rbac.authorization.k8s.io", "versions": [{"groupVersion": "rbac.authorization.k8s.io/v1",
                                                             "version": "v1"}],
         "preferredVersion": {"groupVersion": "rbac.authorization.k8s.io/v1", "version": "v1"}}]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
         "verbs": ["create", "get", "list", "patch"]},
        {"name": "serviceaccounts", "singularName": "serviceaccount", "namespaced": True, "kind": "ServiceAccount",
         "verbs": ["create", "get", "list", "patch"]}]},
    "/apis/rbac.authorization.k8s.io/v1": {"kind": "APIResourceList", "groupVersion": "rbac.authorization.k8s.io/v1",
                                           "resources": [
        {"name": n, "singularName": n[:-1].lower(), "namespaced": ns, "kind": k, "verbs": ["create", "get", "list", "patch"]}
        for n, k, ns in (("roles", "Role", True), ("rolebindings", "RoleBinding", True),
                         ("clusterroles", "ClusterRole", False), ("clusterrolebindings", "ClusterRoleBinding", False))]},
}


class _Discovery(BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?")[0]
        body = _DISCOVERY.get(path)
        code = 200 if body else 404
        if body is None:
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def discovery_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_kubectl_accepts_the_manifests(discovery_server, tmp_path):
    kubectl = need_binary("kubectl", "kubernetes-client")
    env = {"HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([kubectl, "apply", "--dry-run=client", "--validate=false", "-s", discovery_server,
                        "-f", str(REPO / "configs" / "k8s" / "rbac.yaml"), "-o", "name"],
                       check=False, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    assert len(names) == len(MANIFESTS)
    assert "serviceaccount/ai-platform-ops-flows" in names
    assert "clusterrole.rbac.authorization.k8s.io/ai-platform-ops-reader" in names


def test_manifests_are_well_typed():
    """Every object, read into the client's typed models and written back, is unchanged: no misspelt or
    misplaced field (which kubectl --validate=false would not catch without the server's schema)."""
    api = k8s.ApiClient()
    models = {"Namespace": "V1Namespace", "ServiceAccount": "V1ServiceAccount", "ClusterRole": "V1ClusterRole",
              "Role": "V1Role", "ClusterRoleBinding": "V1ClusterRoleBinding", "RoleBinding": "V1RoleBinding"}

    for m in MANIFESTS:
        obj = api.deserialize(json.dumps(m), models[m["kind"]], "application/json")
        assert api.sanitize_for_serialization(obj) == m, m["metadata"]["name"]
