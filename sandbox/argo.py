"""A stand-in Argo Server on loopback: Argo's ``/api/v1/workflows`` endpoints, with scripted runs.

    python -m sandbox.argo --port P [--token-file SECRETS/SANDBOX_ARGO_TOKEN] [--tick 0.2]

Answers as the Argo Server does; each behaviour cites argoproj/argo-workflows:

- errors are gRPC-gateway bodies ``{"code", "message"}`` with the HTTP status gRPC's code maps to
  (`server/workflow/workflow_server.go` returns `sutils.ToStatusError(err, codes.X)`; the gateway
  writes ``{code, message}``): 404/5 NotFound, 409/6 AlreadyExists, 400/3 InvalidArgument,
  401/16 Unauthenticated, 503/14 Unavailable, 500/13 Internal;
- ``POST /api/v1/workflows/{ns}`` create (``{"workflow": {...}}``, `WorkflowCreateRequest` in
  `pkg/apiclient/workflow/workflow.proto`): 409 AlreadyExists for a taken name, 400 for a
  workflow that does not validate against the Argo schema;
- ``GET /api/v1/workflows/{ns}`` list (``listOptions.labelSelector`` equality terms);
  ``GET /api/v1/workflows/{ns}/{name}``; ``DELETE`` the same;
- ``PUT .../{name}/stop`` and ``PUT .../{name}/terminate``: on a finished workflow, HTTP 500 with
  code 13 "cannot shutdown a completed workflow: workflow: "N", namespace: "NS""
  (`workflow/util/util.go` `patchShutdownStrategy` returns `AlreadyShutdownError`, which
  `StopWorkflow`/`TerminateWorkflow` wrap as `codes.Internal`);
- ``GET .../{name}/log?podName=`` one JSON object per line, ``{"result": {"content", "podName"}}``,
  read from the pods that exist *now* (`PodLogs` -> `util/logs/workflow-logger.go` lists the
  workflow's pods by label and name): a pod deleted by podGC gives an empty stream;
- pods are deleted as ``spec.podGC`` says (`workflow/controller/pod/cleanup.go`
  `determinePodCleanupAction`): OnPodCompletion deletes every finished pod, OnPodSuccess only
  succeeded ones, OnWorkflowCompletion all when the workflow ends, OnWorkflowSuccess all when it
  succeeds; none keeps them; ``deleteDelayDuration`` delays the deletion;
- with ``spec.archiveLogs`` (or a template's ``archiveLocation.archiveLogs``) a finished pod's log is
  saved as its node's output artifact ``main-logs`` (`workflow/executor/executor.go`
  `saveContainerLogs`; docs/configure-archive-logs.md) and served, after the pod is gone, by
  ``GET /artifact-files/{ns}/workflows/{name}/{nodeId}/outputs/main-logs``
  (`server/artifacts/artifact_server.go` `GetArtifactFile`; an unknown node or artifact is a 500).

Each workflow runs a script chosen by its label ``sandbox/scenario``: ``succeed`` (default),
``fail`` (the training step fails with a message), ``error`` (the pod is lost: phase Error) or
``stuck`` (runs until stopped). ``sandbox/stop: slow`` makes a stop hang (only terminate ends it).
The phase advances one step per ``--tick`` seconds after creation. A step whose image is
``moby/buildkit*`` and whose script runs ``buildctl ... --output type=image,name=REF,push=true``
pushes an image to REF when it succeeds, as BuildKit would (loopback registries only; an http
registry needs ``registry.insecure=true``, as with BuildKit, else the step fails).

Faults (``POST /control/fault``): ``{"kind": "down", "count": N}`` resets the next N connections
(N null: until healed), ``{"kind": "unavailable", "count": N}`` answers 503,
``"only": "GET"`` limits a fault to one HTTP method; ``{"kind": "lose-create-response"}`` stores the next created workflow and then drops the
connection without answering. ``POST /control/heal``, ``POST /control/reset``,
``GET /control/state`` (workflows, pods that exist, create attempts per name, request log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from sandbox._common import PYTHON, SandboxLike, free_port, http_ok, wait_for
from sandbox._http import JSONHandler

TOKEN_ENV = "SANDBOX_ARGO_TOKEN"

SCENARIO_LABEL = "sandbox/scenario"
STOP_LABEL = "sandbox/stop"
LOGS_ARTIFACT = "main-logs"
_BUILDKIT_PUSH_RE = re.compile(r"--output\s+'?type=image,name=([^,\s']+),push=true(,registry\.insecure=true)?")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def leaked_token(workflow: str) -> str:
    """The token-shaped value a failing stand-in step prints (never a real credential): tests compute it too."""
    import hashlib

    return "glpat-" + hashlib.sha256(f"leak:{workflow}".encode()).hexdigest()[:20]


def _fnv(text: str) -> str:
    h = 0x811C9DC5
    for ch in text.encode():
        h = ((h ^ ch) * 0x01000193) & 0xFFFFFFFF
    return str(h)


def _go_duration_s(text: str | None) -> float:
    """A Go duration (``30s``, ``5m``, ``1h30m``, ``250ms``) in seconds; 0 for none."""
    if not text:
        return 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


def _buildkit_push(image: str, insecure: bool) -> str | None:
    """Push `image` (host:port/repo:tag) as BuildKit's image exporter would; an error message, or None."""
    from sandbox.registry import push_image

    host, _, rest = image.partition("/")
    repository, _, tag = rest.rpartition(":")
    if not insecure:
        return (f"failed to push {image}: failed to do request: Head \"https://{host}/v2/{repository}/blobs/..."
                f"\": http: server gave HTTP response to HTTPS client")
    if host.split(":")[0] not in ("127.0.0.1", "localhost"):
        return f"failed to push {image}: dial tcp {host}: connect: network is unreachable"
    try:
        push_image(f"http://{host}", repository, tag)
    except Exception as exc:  # noqa: BLE001 - the step fails with the push error, as BuildKit's would
        return f"failed to push {image}: {exc}"
    return None


class _Run:
    """One workflow, its scripted progression and its pods."""

    def __init__(self, wf: dict[str, Any], tick: float):
        self.wf = wf
        self.tick = tick
        self.created = time.monotonic()
        self.created_wall = time.time()
        labels = wf["metadata"].get("labels") or {}
        self.scenario = labels.get(SCENARIO_LABEL, "succeed")
        self.slow_stop = labels.get(STOP_LABEL) == "slow"
        spec = wf["spec"]
        self.templates = {t["name"]: t for t in spec.get("templates", [])}
        entry = self.templates.get(spec.get("entrypoint", ""), {})
        self.step_templates: list[str] = []
        if "steps" in entry:
            for group in entry["steps"]:
                for step in group:
                    self.step_templates.append(step.get("template", step["name"]))
        else:
            self.step_templates.append(entry.get("name", "main"))
        self.exit_template = spec.get("onExit")
        gc = spec.get("podGC") or {}
        self.pod_gc = gc.get("strategy")
        self.gc_delay_ticks = _go_duration_s(gc.get("deleteDelayDuration")) / tick
        self.shutdown: str | None = None
        self.shutdown_at: float | None = None
        self.final: dict[str, Any] | None = None
        self.end_t: float | None = None  # when the workflow ended, in ticks after creation
        self.node_end: dict[str, float] = {}  # pod node id -> when it finished, in ticks
        self.executed: dict[str, str | None] = {}  # node id -> what its container's side effect gave

    def _elapsed(self) -> float:
        return (time.monotonic() - self.created) / self.tick

    def _archives(self, template: str) -> bool:
        tpl = self.templates.get(template) or {}
        return bool(self.wf["spec"].get("archiveLogs") or (tpl.get("archiveLocation") or {}).get("archiveLogs"))

    def _side_effect(self, node_id: str, template: str) -> str | None:
        """What the step's container does besides printing: a BuildKit step pushes its image (once)."""
        if node_id not in self.executed:
            tpl = self.templates.get(template) or {}
            body = tpl.get("script") or tpl.get("container") or {}
            m = _BUILDKIT_PUSH_RE.search(body.get("source", "") + " " + " ".join(body.get("args") or []))
            self.executed[node_id] = None
            if str(body.get("image", "")).startswith("moby/buildkit") and m:
                self.executed[node_id] = _buildkit_push(m.group(1), bool(m.group(2)))
        return self.executed[node_id]

    # the steps run one after the other, one tick each, then the exit handler (one tick)
    def status(self) -> dict[str, Any]:
        if self.final is not None:
            return self.final
        name = self.wf["metadata"]["name"]
        elapsed = self._elapsed()
        stop_t = None
        if self.shutdown == "Terminate" or (self.shutdown == "Stop" and not self.slow_stop):
            stop_t = (self.shutdown_at - self.created) / self.tick  # type: ignore[operator]
        at = lambda t: _ts(self.created_wall + t * self.tick)  # noqa: E731
        root_id = name
        nodes: dict[str, Any] = {root_id: {
            "id": root_id, "name": name, "displayName": name, "type": "Steps",
            "templateName": self.wf["spec"].get("entrypoint"), "phase": "Running", "startedAt": at(0)}}

        def node(template: str, node_name: str) -> dict[str, Any]:
            n = {"id": f"{name}-{_fnv(node_name)}", "name": node_name, "displayName": template, "type": "Pod",
                 "templateName": template, "phase": "Pending", "boundaryID": root_id}
            nodes[n["id"]] = n
            return n

        def finish(n: dict[str, Any], end: float, **fields: Any) -> None:
            n.update(finishedAt=at(end), **fields)
            self.node_end[n["id"]] = end
            if self._archives(n["templateName"]) and n["phase"] != "Error":
                n["outputs"] = {"artifacts": [{"name": LOGS_ARTIFACT, "s3": {
                    "key": f"{name}/{self.pod_of(n)}/main.log"}}]}

        t = 0.5
        failed: dict[str, Any] | None = None
        for i, template in enumerate(self.step_templates):
            n = node(template, f"{name}[{i}].{template}")
            if failed is not None:
                n["phase"] = "Omitted"
                continue
            if stop_t is not None and (self.scenario == "stuck" or stop_t < t + 1):
                n["phase"] = "Failed"
                finish(n, stop_t, message=f"Stopped with strategy '{self.shutdown}'")
                failed, t = n, max(stop_t, t)
                continue
            if elapsed >= t:
                n.update(phase="Running", startedAt=at(t))
            if self.scenario == "stuck":
                t = float("inf")
                break
            if elapsed >= t + 1:
                pushed = self._side_effect(n["id"], template)
                if self.scenario == "fail":
                    n["phase"] = "Failed"
                    finish(n, t + 1, message="Error (exit code 1)")
                    failed = n
                elif self.scenario == "error":
                    n["phase"] = "Error"
                    finish(n, t + 1, message="pod deleted")
                    failed = n
                elif pushed is not None:
                    n["phase"] = "Failed"
                    finish(n, t + 1, message="Error (exit code 1)")
                    failed = n
                else:
                    n["phase"] = "Succeeded"
                    finish(n, t + 1)
            t += 1
        exit_done = True
        if self.exit_template and self.shutdown != "Terminate":
            n = node(self.exit_template, f"{name}.onExit")
            exit_done = elapsed >= t + 1
            if exit_done:
                n.update(phase="Succeeded", startedAt=at(t))
                finish(n, t + 1)
            elif elapsed >= t:
                n.update(phase="Running", startedAt=at(t))
        pods = [n for n in nodes.values() if n["type"] == "Pod"]
        done = sum(1 for n in pods if n["phase"] in ("Succeeded", "Failed", "Error", "Omitted"))
        phase, message = "Running", ""
        if self.shutdown == "Terminate":
            phase, message = "Failed", "Stopped with strategy 'Terminate'"
        elif exit_done and elapsed >= t:
            if stop_t is not None:
                phase, message = "Failed", "Stopped with strategy 'Stop'"
            elif failed is not None and failed["phase"] == "Error":
                phase, message = "Error", f"child '{failed['id']}' errored"
            elif failed is not None:
                phase, message = "Failed", f"child '{failed['id']}' failed"
            else:
                phase = "Succeeded"
        nodes[root_id]["phase"] = phase
        status = {"phase": phase, "startedAt": at(0), "progress": f"{done}/{len(pods)}", "nodes": nodes}
        if message:
            status["message"] = message
        if phase != "Running":
            status["finishedAt"] = _now()
            self.final = status
            self.end_t = elapsed
        return status

    def view(self) -> dict[str, Any]:
        wf = json.loads(json.dumps(self.wf))
        if self.shutdown:
            wf["spec"]["shutdown"] = self.shutdown
        wf["status"] = self.status()
        return wf

    def pod_of(self, node: dict[str, Any]) -> str:
        return f"{self.wf['metadata']['name']}-{node['templateName']}-{node['id'].rsplit('-', 1)[-1]}"

    def pod_exists(self, node: dict[str, Any]) -> bool:
        """Whether the node's pod exists now: started, and not yet deleted by podGC (cleanup.go)."""
        if node["type"] != "Pod" or node["phase"] in ("Pending", "Omitted") or node["phase"] == "Error":
            return False  # not started; or lost (phase Error: "pod deleted")
        end = self.node_end.get(node["id"])
        if end is None:
            return True  # still running
        wf_phase = (self.final or {}).get("phase")
        strategy, delay, now = self.pod_gc, self.gc_delay_ticks, self._elapsed()
        if strategy == "OnPodCompletion" or (strategy == "OnPodSuccess" and node["phase"] == "Succeeded"):
            return now < end + delay
        if self.end_t is not None and (strategy == "OnWorkflowCompletion" or (
                strategy == "OnWorkflowSuccess" and wf_phase == "Succeeded")):
            return now < self.end_t + delay
        return True

    def log_lines(self, node: dict[str, Any]) -> list[str]:
        lines = [f"time=\"{_now()}\" level=info msg=\"starting {node['templateName']}\"",
                 "Cloning into '/workspace/src'... (git artifact, credentials from secret)",
                 "epoch 1/10 reward=0.12"]
        if node["phase"] == "Failed" and not node.get("message", "").startswith("Stopped"):
            pushed = self.executed.get(node["id"])
            if pushed:
                lines += [f"error: {pushed}"]
            else:
                # a training script that prints its clone URL with a token in it, as real ones do; the
                # token has GitLab's PAT shape (`glpat-` + 20 chars), derived from the workflow's name
                lines += [f"AUTH_URL is http://oauth2:{leaked_token(self.wf['metadata']['name'])}@gitlab.sandbox/team/rl.git",
                          "Traceback (most recent call last):",
                          "  File \"legged_gym/scripts/train.py\", line 42, in <module>",
                          "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]
        return lines

    def logs(self, pod: str | None) -> list[tuple[str, str]]:
        """The log lines of the pods that exist now (PodLogs streams from live pods only)."""
        out = []
        for node in self.status()["nodes"].values():
            if not self.pod_exists(node):
                continue
            pod_name = self.pod_of(node)
            if pod and pod != pod_name:
                continue
            out += [(pod_name, line) for line in self.log_lines(node)]
        return out

    def live_pods(self) -> list[str]:
        return [self.pod_of(n) for n in self.status()["nodes"].values() if self.pod_exists(n)]


class ArgoStandIn:
    def __init__(self, token: str | None, tick: float, validate: bool = True):
        self.token = token
        self.tick = tick
        self.lock = threading.Lock()
        self.runs: dict[tuple[str, str], _Run] = {}
        self.create_attempts: dict[str, int] = {}
        self.requests: list[dict[str, Any]] = []
        self.faults: dict[str, Any] = {}
        self.validator = None
        if validate:
            # a missing schema is an error (MissingContract), never a silent "accept everything"
            from contracts import argo_workflow_validator

            self.validator = argo_workflow_validator()

    def reset(self) -> None:
        with self.lock:
            self.runs.clear()
            self.create_attempts.clear()
            self.requests.clear()
            self.faults.clear()


def _handler(state: ArgoStandIn):
    class Handler(JSONHandler):

        # -- plumbing --------------------------------------------------------------------

        def _error(self, http: int, grpc: int, message: str) -> None:
            self._send(http, {"code": grpc, "message": message})

        def _drop(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else {}

        def _take_fault(self, kind: str, method: str | None = None) -> bool:
            with state.lock:
                fault = state.faults.get(kind)
                if fault is None or (fault.get("only") and method and fault["only"] != method):
                    return False
                if fault["count"] is not None:
                    fault["count"] -= 1
                    if fault["count"] <= 0:
                        del state.faults[kind]
                return True

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            parts = [p for p in url.path.split("/") if p]
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if parts[:1] == ["control"]:
                return self._control(method, parts[1:])
            with state.lock:
                state.requests.append({"method": method, "path": url.path, "at": time.time()})
                del state.requests[:-500]
            if self._take_fault("down", method):
                return self._drop()
            if self._take_fault("unavailable", method):
                return self._error(503, 14, "argo-server is unavailable")
            if parts[:1] == ["artifact-files"] and method == "GET":
                return self._artifact(parts)
            if parts[:3] != ["api", "v1", "workflows"] and parts[:2] != ["api", "v1"]:
                return self._error(404, 5, "Not Found")
            if parts[:3] == ["api", "v1", "version"]:
                return self._send(200, {"version": "v3.5.11-sandbox"})
            auth = self.headers.get("Authorization") or ""
            if state.token and auth != f"Bearer {state.token}":
                return self._error(401, 16, "token not valid")
            rest = parts[3:]
            if not rest:
                return self._error(404, 5, "Not Found")
            ns = rest[0]
            if len(rest) == 1 and method == "POST":
                return self._create(ns)
            if len(rest) == 1 and method == "GET":
                return self._list(ns, query)
            if len(rest) == 2 and method == "GET":
                return self._get(ns, rest[1])
            if len(rest) == 2 and method == "DELETE":
                with state.lock:
                    run = state.runs.pop((ns, rest[1]), None)
                return self._send(200, {}) if run else self._not_found(rest[1])
            if len(rest) == 3 and method == "PUT" and rest[2] in ("stop", "terminate"):
                self._body()
                return self._shutdown(ns, rest[1], "Stop" if rest[2] == "stop" else "Terminate")
            if len(rest) == 3 and method == "GET" and rest[2] == "log":
                return self._logs(ns, rest[1], query)
            return self._error(404, 5, "Not Found")

        def _not_found(self, name: str) -> None:
            self._error(404, 5, f'workflows.argoproj.io "{name}" not found')

        # -- the workflow API --------------------------------------------------------------

        def _create(self, ns: str) -> None:
            body = self._body()
            wf = body.get("workflow") or {}
            meta = wf.setdefault("metadata", {})
            if state.validator is not None:
                wf.setdefault("apiVersion", "argoproj.io/v1alpha1")
                wf.setdefault("kind", "Workflow")
                errors = sorted(state.validator.iter_errors(wf), key=lambda e: list(e.path))
                if errors:
                    e = errors[0]
                    where = ".".join(str(p) for p in e.path)
                    return self._error(400, 3, f"workflow is invalid: {where}: {e.message[:200]}")
            if not meta.get("name"):
                if not meta.get("generateName"):
                    return self._error(400, 3, "workflow must have a name or generateName")
                meta["name"] = meta["generateName"] + _fnv(str(time.time_ns()))[:5]
            name = meta["name"]
            meta["namespace"] = ns
            with state.lock:
                state.create_attempts[name] = state.create_attempts.get(name, 0) + 1
                if (ns, name) in state.runs:
                    exists = True
                else:
                    exists = False
                    meta["uid"] = f"uid-{_fnv(ns + name)}"
                    meta["creationTimestamp"] = _now()
                    meta["resourceVersion"] = "1"
                    meta.setdefault("labels", {})["workflows.argoproj.io/phase"] = "Running"
                    state.runs[(ns, name)] = _Run(wf, state.tick)
            if exists:
                return self._error(409, 6, f'workflows.argoproj.io "{name}" already exists')
            if self._take_fault("lose-create-response"):
                return self._drop()
            self._send(200, state.runs[(ns, name)].view())

        def _list(self, ns: str, query: dict[str, str]) -> None:
            selector = query.get("listOptions.labelSelector") or ""
            terms = [t.split("=", 1) for t in selector.split(",") if "=" in t]
            with state.lock:
                runs = [r for (n, _), r in state.runs.items() if n == ns]
            items = []
            for run in runs:
                labels = run.wf["metadata"].get("labels") or {}
                if all(labels.get(k.rstrip("=").strip()) == v.lstrip("=").strip() for k, v in terms):
                    items.append(run.view())
            self._send(200, {"metadata": {"resourceVersion": "1"}, "items": items})

        def _get(self, ns: str, name: str) -> None:
            with state.lock:
                run = state.runs.get((ns, name))
            if run is None:
                return self._not_found(name)
            self._send(200, run.view())

        def _shutdown(self, ns: str, name: str, strategy: str) -> None:
            with state.lock:
                run = state.runs.get((ns, name))
                if run is None:
                    return self._not_found(name)
                if run.status()["phase"] in ("Succeeded", "Failed", "Error"):
                    # workflow/util/util.go AlreadyShutdownError, wrapped as codes.Internal
                    return self._error(500, 13, f'cannot shutdown a completed workflow: workflow: "{name}", '
                                                f'namespace: "{ns}"')
                run.shutdown = strategy
                run.shutdown_at = time.monotonic()
            self._send(200, run.view())

        def _logs(self, ns: str, name: str, query: dict[str, str]) -> None:
            with state.lock:
                run = state.runs.get((ns, name))
            if run is None:
                return self._not_found(name)
            lines = run.logs(query.get("podName"))
            tail = int(query.get("logOptions.tailLines") or 0)
            if tail:
                lines = lines[-tail:]
            body = "".join(json.dumps({"result": {"content": c, "podName": p}}) + "\n" for p, c in lines)
            self._send(200, body.encode(), "application/json")

        def _artifact(self, parts: list[str]) -> None:
            """GET /artifact-files/{ns}/workflows/{name}/{nodeId}/outputs/{artifact} (artifact_server.go
            `GetArtifactFile`): plain-text file content; a bad token is 401, anything not found a 500."""
            if state.token and (self.headers.get("Authorization") or "") != f"Bearer {state.token}":
                return self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8")
            if len(parts) != 7 or parts[2] != "workflows" or parts[5] != "outputs":
                return self._send(400, b"Bad Request\n", "text/plain; charset=utf-8")
            ns, name, node_id, artifact = parts[1], parts[3], parts[4], parts[6]
            with state.lock:
                run = state.runs.get((ns, name))
            if run is None:
                return self._send(500, f'workflows.argoproj.io "{name}" not found\n'.encode(),
                                  "text/plain; charset=utf-8")
            node = run.status()["nodes"].get(node_id)
            arts = ((node or {}).get("outputs") or {}).get("artifacts") or []
            if node is None or not any(a["name"] == artifact for a in arts):
                return self._send(500, f"artifact not found: {artifact}\n".encode(), "text/plain; charset=utf-8")
            text = "\n".join(run.log_lines(node)) + "\n"
            self._send(200, text.encode(), "text/plain; charset=utf-8")

        # -- control -----------------------------------------------------------------------

        def _control(self, method: str, parts: list[str]) -> None:
            if parts == ["health"]:
                return self._send(200, {"ok": True})
            if parts == ["state"] and method == "GET":
                with state.lock:
                    workflows = {f"{ns}/{name}": r.view() for (ns, name), r in state.runs.items()}
                    pods = {f"{ns}/{name}": r.live_pods() for (ns, name), r in state.runs.items()}
                    return self._send(200, {"workflows": workflows, "pods": pods, "create_attempts": dict(state.create_attempts),
                                            "requests": list(state.requests), "faults": dict(state.faults)})
            if parts == ["fault"] and method == "POST":
                body = self._body()
                kind = body.get("kind")
                if kind not in ("down", "unavailable", "lose-create-response"):
                    return self._send(400, {"error": f"unknown fault {kind!r}"})
                count = body.get("count", 1 if kind == "lose-create-response" else None)
                only = body.get("only")  # an HTTP method: the fault hits only those requests
                with state.lock:
                    state.faults[kind] = {"count": count, "only": only}
                return self._send(200, {"applied": {"kind": kind, "count": count, "only": only}})
            if parts == ["heal"] and method == "POST":
                self._body()
                with state.lock:
                    state.faults.clear()
                return self._send(200, {"healed": True})
            if parts == ["reset"] and method == "POST":
                self._body()
                state.reset()
                return self._send(200, {"reset": True})
            return self._send(404, {"error": "no such control endpoint"})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def do_DELETE(self):
            self._route("DELETE")

    return Handler


def serve(port: int, token: str | None, tick: float, validate: bool = True) -> ThreadingHTTPServer:
    state = ArgoStandIn(token, tick, validate)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
    server.daemon_threads = True
    server.state = state  # type: ignore[attr-defined]
    return server


def start_argo(sb: SandboxLike) -> None:
    """Sandbox component: the Argo stand-in, and the platform config's `argo` section (token by reference)."""
    sb.secret(TOKEN_ENV)
    port = free_port()
    tick = os.environ.get("SANDBOX_ARGO_TICK", "0.5")
    proc = sb.spawn("argo", [PYTHON, "-m", "sandbox.argo", "--port", str(port), "--token-file", str(sb.secret_file(TOKEN_ENV)),
                             "--tick", tick])
    sb.urls["argo"] = f"http://127.0.0.1:{port}"
    wait_for(http_ok(f"{sb.urls['argo']}/control/health"), "argo stand-in", 30, proc, sb.log_of("argo"))
    # the stand-in has an artifact repository (it serves main-logs), so the sandbox archives logs
    sb.config["argo"] = {"url": sb.urls["argo"], "namespace": "argo-job", "token": {"env": TOKEN_ENV},
                         "verify_tls": False, "archive_logs": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.argo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token (none: no auth)")
    parser.add_argument("--tick", type=float, default=0.3, help="seconds per workflow step")
    parser.add_argument("--no-validate", action="store_true", help="do not check workflows against the schema")
    args = parser.parse_args(argv)
    token = args.token_file.read_text().strip() if args.token_file else None
    server = serve(args.port, token, args.tick, not args.no_validate)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

