"""GitLab API stand-in: the `/api/v4` endpoints the flows use, one server per GitLab host.

    python -m sandbox.gitlab_api --port P --root HOST_ROOT --token-file SECRETS/SANDBOX_GITLAB_TOKEN

One GitLab answers both lifecycles, as a real one does:

Backup routes, answered from the GitLab host's files under HOST_ROOT. It reads
`var/opt/gitlab/state/projects.json` and `services.json` and `opt/gitlab/version-manifest.txt` on
every request, so a `gitlab-backup restore` on the host (which rewrites projects.json) changes what
the API returns. Endpoints, as GitLab documents them: `GET /-/readiness`, `GET /api/v4/version`,
`GET /api/v4/projects` (offset pagination with X-Total, X-Total-Pages, X-Page, X-Per-Page,
X-Next-Page and Link headers), `GET /api/v4/projects/:id`, `GET /api/v4/projects/:id/repository/commits`; and for the health
check (issue 15) `GET /-/readiness?all=1`, `GET /-/liveness` and `GET /api/v4/runners/all`.

CI routes, over repositories kept in memory (`CIRoutes`; GitLab REST API docs *Projects*,
*Repository files*, *Commits*, *Notes*; `:id` is a number or the URL-encoded project path):

- ``GET /api/v4/projects/:id`` (with ``http_url_to_repo``)
- ``GET /api/v4/projects/:id/repository/files/:file_path/raw?ref=`` (404 "404 File Not Found")
- ``POST /api/v4/projects/:id/statuses/:sha`` with GitLab's rules (`lib/api/commit_statuses.rb`,
  `app/services/ci/create_commit_status_service.rb`, `app/models/commit_status.rb`): the post
  updates the *pending or running* status of that name and ref, else creates a new one; the state
  is reached by the state machine's events (pending: ``enqueue``, running: ``enqueue`` then ``run``,
  success, failed: ``drop``, canceled: ``cancel``, skipped: ``skip``), so posting ``pending`` on a
  pending status or ``running`` on a running one is a 400 "Cannot transition status via :EVENT
  from :STATE", while a repeated final state makes a new status and is accepted (201). The
  service runs under an exclusive lease per (project, sha); when it cannot get it the API answers
  409 "Another update to this commit status is in progress" (the fault ``status-lock`` plays it).
  An unknown commit is a 404 "404 Commit Not Found".
- ``GET /api/v4/projects/:id/repository/commits/:sha/statuses``
- ``POST|GET /api/v4/projects/:id/repository/commits/:sha/comments`` (note)
- ``POST|GET /api/v4/projects/:id/merge_requests/:iid/notes`` (body)

CI projects get ids from 1001 and are not listed by ``GET /api/v4/projects`` (that list is the
host's projects.json, which the backup lifecycle backs up and restores). A wrong or missing
`PRIVATE-TOKEN` gets 401 like GitLab; with puma stopped every `/api/v4` route answers 502.

Control (not GitLab's): ``POST /control/projects`` (``{"path", "commits": [SHA], "files": {REF: {PATH:
TEXT}}}``), ``POST /control/fault`` (``{"kind": "status-lock", "count": N}``), ``POST /control/heal``,
``GET /control/state`` (projects; ``statuses``: every accepted status post in order, ``jobs``: the
commit statuses as GitLab keeps them; comments, MR notes, every status post with its answer),
``POST /control/reset``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlparse

from sandbox._http import JSONHandler

CI_PROJECT_ID_BASE = 1000
FINAL = {"success", "failed", "canceled", "skipped"}
# state -> (event, the states that event leaves from): app/models/commit_status.rb `state_machine :status`
_EVENTS = {
    "pending": ("enqueue", {"created", "skipped", "manual", "scheduled"}),
    "running": ("run", {"pending"}),
    "success": ("success", {"created", "waiting_for_resource", "preparing", "waiting_for_callback", "pending",
                            "running"}),
    "failed": ("drop", {"created", "waiting_for_resource", "preparing", "waiting_for_callback", "pending", "running",
                        "manual", "scheduled"}),
    "canceled": ("cancel", {"created", "waiting_for_resource", "preparing", "pending", "running", "scheduled",
                            "manual"}),
    "skipped": ("skip", {"created", "waiting_for_resource", "preparing", "pending"}),
}
JSON = "application/json"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class CIRoutes:
    """In-memory repositories, commit statuses and notes; `handle()` answers one authenticated request."""

    def __init__(self, base_url: str = "http://127.0.0.1"):
        self.base_url = base_url
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.projects: dict[int, dict[str, Any]] = {}
        self.commits: dict[int, set[str]] = {}
        self.files: dict[tuple[int, str, str], str] = {}
        self.statuses: dict[tuple[int, str], list[dict[str, Any]]] = {}  # the commit statuses (GitLab's jobs)
        self.transitions: dict[tuple[int, str], list[dict[str, Any]]] = {}  # every accepted post, in order
        self.comments: dict[tuple[int, str], list[dict[str, Any]]] = {}
        self.mr_notes: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.status_posts: list[dict[str, Any]] = []
        self.faults: dict[str, int] = {}
        self.seq = 0

    def add_project(self, path: str, files: dict[str, dict[str, str]] | None = None,
                    default_branch: str = "main", commits: list[str] | None = None) -> dict[str, Any]:
        with self.lock:
            existing = [p for p in self.projects.values() if p["path_with_namespace"] == path]
            if existing:
                project = existing[0]
            else:
                pid = CI_PROJECT_ID_BASE + len(self.projects) + 1
                project = {"id": pid, "path_with_namespace": path, "name": path.rsplit("/", 1)[-1],
                           "default_branch": default_branch,
                           "http_url_to_repo": f"{self.base_url}/{path}.git",
                           "web_url": f"{self.base_url}/{path}"}
                self.projects[pid] = project
            shas = self.commits.setdefault(project["id"], set())
            shas.update(commits or [])
            for ref, tree in (files or {}).items():
                if re.fullmatch(r"[0-9a-f]{40}", ref):
                    shas.add(ref)
                for file_path, text in tree.items():
                    self.files[(project["id"], ref, file_path)] = text
            return project

    def state(self) -> dict[str, Any]:
        with self.lock:
            by_path = {p["id"]: p["path_with_namespace"] for p in self.projects.values()}
            return {
                "projects": list(self.projects.values()),
                "statuses": {f"{by_path[pid]}@{sha}": v for (pid, sha), v in self.transitions.items()},
                "jobs": {f"{by_path[pid]}@{sha}": v for (pid, sha), v in self.statuses.items()},
                "comments": {f"{by_path[pid]}@{sha}": v for (pid, sha), v in self.comments.items()},
                "mr_notes": {f"{by_path[pid]}!{iid}": v for (pid, iid), v in self.mr_notes.items()},
                "status_posts": list(self.status_posts), "faults": dict(self.faults),
            }

    def project(self, ident: str) -> dict[str, Any] | None:
        ident = unquote(ident)
        with self.lock:
            if ident.isdigit():
                return self.projects.get(int(ident))
            return next((p for p in self.projects.values() if p["path_with_namespace"] == ident), None)

    def handle(self, method: str, project: dict[str, Any], rest: list[str], query: dict[str, str],
               body: dict[str, Any]) -> tuple[int, Any, str]:
        """(HTTP status, body, content type) for one request under ``/api/v4/projects/:id``."""
        with self.lock:
            pid = project["id"]
            if not rest and method == "GET":
                return 200, project, JSON
            if rest[:2] == ["repository", "files"] and len(rest) >= 4 and rest[-1] == "raw" and method == "GET":
                file_path = "/".join(rest[2:-1])
                ref = query.get("ref") or project["default_branch"]
                text = self.files.get((pid, ref, file_path))
                if text is None:
                    return 404, {"message": "404 File Not Found"}, JSON
                return 200, text.encode(), "text/plain; charset=utf-8"
            if len(rest) == 2 and rest[0] == "statuses" and method == "POST":
                return self._post_status(project, rest[1], body)
            if len(rest) == 4 and rest[:2] == ["repository", "commits"] and rest[3] == "statuses" and method == "GET":
                return 200, list(self.statuses.get((pid, rest[2]), [])), JSON
            if len(rest) == 4 and rest[:2] == ["repository", "commits"] and rest[3] == "comments":
                if rest[2] not in self.commits.get(pid, set()):
                    return 404, {"message": "404 Commit Not Found"}, JSON
                notes = self.comments.setdefault((pid, rest[2]), [])
                if method == "POST":
                    if not body.get("note"):
                        return 400, {"message": "400 Bad request - note is missing"}, JSON
                    note = {"note": body["note"], "author": {"username": "ai-platform-bot"}, "created_at": _now()}
                    notes.append(note)
                    return 201, note, JSON
                return 200, list(notes), JSON
            if len(rest) == 3 and rest[0] == "merge_requests" and rest[2] == "notes" and rest[1].isdigit():
                notes = self.mr_notes.setdefault((pid, int(rest[1])), [])
                if method == "POST":
                    if not body.get("body"):
                        return 400, {"message": "400 Bad request - body is missing"}, JSON
                    self.seq += 1
                    note = {"id": self.seq, "body": body["body"], "author": {"username": "ai-platform-bot"},
                            "created_at": _now(), "noteable_type": "MergeRequest"}
                    notes.append(note)
                    return 201, note, JSON
                return 200, list(notes), JSON
        return 404, {"message": "404 Not Found"}, JSON

    def _post_status(self, project: dict[str, Any], sha: str, body: dict[str, Any]) -> tuple[int, Any, str]:
        pid = project["id"]
        state = body.get("state")
        self.status_posts.append({"project": project["path_with_namespace"], "sha": sha, "state": state,
                                  "at": time.time()})
        if self.faults.get("status-lock", 0) > 0:
            # in_lock(pipeline_lock_key) gave up: the API's documented 409 (lib/api/commit_statuses.rb)
            self.faults["status-lock"] -= 1
            if not self.faults["status-lock"]:
                del self.faults["status-lock"]
            return 409, {"message": "Another update to this commit status is in progress"}, JSON
        if sha not in self.commits.get(pid, set()):
            return 404, {"message": "404 Commit Not Found"}, JSON
        if state not in _EVENTS:
            return 400, {"message": "state does not have a valid value"}, JSON
        name = body.get("name") or body.get("context") or "default"
        ref = body.get("ref") or project["default_branch"]
        history = self.statuses.setdefault((pid, sha), [])
        # external_commit_status_scope: the running-or-pending status of this name and ref, else a new one
        current = next((s for s in reversed(history) if s["name"] == name and s["ref"] == ref
                        and s["status"] in ("pending", "running")), None)
        status = current or {"status": "created"}
        if state == "running" and status["status"] in _EVENTS["pending"][1]:
            status["status"] = "pending"  # `job.enqueue` (no bang: a no-op when it cannot) before `run!`
        event, sources = _EVENTS[state]
        if status["status"] not in sources:
            return 400, {"message": f"Cannot transition status via :{event} from :{status['status']}"}, JSON
        if current is None:
            self.seq += 1
            status.update(id=self.seq, sha=sha, ref=ref, name=name, created_at=_now(),
                          author={"username": "ai-platform-bot"})
            history.append(status)
        status.update(status=state, target_url=body.get("target_url", status.get("target_url")),
                      description=body.get("description", status.get("description")))
        if state in FINAL:
            status["finished_at"] = _now()
        self.transitions.setdefault((pid, sha), []).append(dict(status))
        return 201, dict(status), JSON


def make_handler(root: Path, token: str, ci: CIRoutes | None = None):
    state = root / "var" / "opt" / "gitlab" / "state"
    ci = ci or CIRoutes()

    def version() -> dict:
        name, ver = (root / "opt" / "gitlab" / "version-manifest.txt").read_text().split()[:2]
        ee = name.endswith("-ee")
        return {"version": f"{ver}-ee" if ee else ver, "revision": "6f3a0b1c2d4", "kas": {"enabled": False},
                "enterprise": ee}

    def services() -> dict:
        return json.loads((state / "services.json").read_text())

    def projects() -> list[dict]:
        return json.loads((state / "projects.json").read_text())

    class Handler(JSONHandler):

        def _send(self, code: int, body, headers: dict | None = None,  # type: ignore[override]
                  content_type: str = JSON) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not raw:
                return {}
            if "json" in (self.headers.get("Content-Type") or ""):
                return json.loads(raw)
            return {k: v[-1] for k, v in parse_qs(raw.decode()).items()}

        def _control(self, method: str, path: str, body: dict[str, Any]) -> None:
            if path == "/control/health":
                return self._send(200, {"ok": True})
            if path == "/control/state":
                return self._send(200, ci.state())
            if path == "/control/reset" and method == "POST":
                with ci.lock:
                    ci.reset()
                return self._send(200, {"reset": True})
            if path == "/control/projects" and method == "POST":
                return self._send(200, ci.add_project(body["path"], body.get("files"),
                                                      body.get("default_branch", "main"), body.get("commits")))
            if path == "/control/fault" and method == "POST":
                if body.get("kind") != "status-lock":
                    return self._send(400, {"error": f"unknown fault {body.get('kind')!r}"})
                with ci.lock:
                    ci.faults["status-lock"] = int(body.get("count", 1))
                return self._send(200, {"applied": {"kind": "status-lock", "count": ci.faults["status-lock"]}})
            if path == "/control/heal" and method == "POST":
                with ci.lock:
                    ci.faults.clear()
                return self._send(200, {"healed": True})
            return self._send(404, {"error": "no such control endpoint"})

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            path = url.path
            body = self._body() if method in ("POST", "PUT") else {}
            if path.startswith("/control/"):
                return self._control(method, path, body)
            if path == "/-/readiness" and method == "GET":
                svc = services()
                ok = all(svc.get(s) == "run" for s in ("puma", "postgresql", "redis", "gitaly"))
                checks = {"status": "ok" if ok else "failed"}
                body = {"status": checks["status"], "master_check": [checks]}
                if query.get("all") == "1":  # issue 15: one result per dependency (health_check docs, `all=1`)
                    body.update(_readiness_all(svc))
                return self._send(200 if ok else 503, body)
            if path == "/-/liveness" and method == "GET":
                # GitLab docs administration/monitoring/health_check: 200 {"status":"ok"} while Puma serves
                live = services().get("puma") == "run"
                return self._send(200 if live else 503, {"status": "ok" if live else "failed"})
            if not path.startswith("/api/v4/"):
                return self._send(404, {"message": "404 Not Found"})
            given = self.headers.get("PRIVATE-TOKEN") or query.get("private_token")
            if given != token:
                return self._send(401, {"message": "401 Unauthorized"})
            if services().get("puma") != "run":
                return self._send(502, {"message": "502 Bad Gateway: GitLab is not responding"})
            rest = path[len("/api/v4"):]
            if method == "GET" and self._backup_route(rest, query):
                return None
            parts = [unquote(p) for p in rest.split("/") if p]
            if len(parts) >= 2 and parts[0] == "projects":
                project = ci.project(parts[1])
                if project is None:
                    return self._send(404, {"message": "404 Project Not Found"})
                code, payload, content_type = ci.handle(method, project, parts[2:], query, body)
                return self._send(code, payload, content_type=content_type)
            return self._send(404, {"message": "404 Not Found"})

        def _backup_route(self, rest: str, query: dict[str, str]) -> bool:
            """The backup lifecycle's routes over the host's files; False when `rest` is not one of them."""
            if rest == "/version":
                self._send(200, version())
                return True
            if rest == "/runners/all":
                self._send(200, *_runners_page(state, query))
                return True
            if rest == "/projects":
                items = sorted(projects(), key=lambda p: p["id"])
                per_page = max(1, min(100, int(query.get("per_page", 20))))
                page = max(1, int(query.get("page", 1)))
                total_pages = max(1, -(-len(items) // per_page))
                chunk = items[(page - 1) * per_page: page * per_page]
                headers = {"X-Total": str(len(items)), "X-Total-Pages": str(total_pages), "X-Page": str(page),
                           "X-Per-Page": str(per_page), "X-Next-Page": str(page + 1) if page < total_pages else "",
                           "X-Prev-Page": str(page - 1) if page > 1 else ""}
                host = self.headers.get("Host", "127.0.0.1")
                links = []
                for rel, p in (("prev", page - 1), ("next", page + 1), ("first", 1), ("last", total_pages)):
                    if 1 <= p <= total_pages and not (rel == "prev" and page == 1) and not (
                            rel == "next" and page >= total_pages):
                        q = dict(query, page=str(p), per_page=str(per_page))
                        q.pop("private_token", None)
                        links.append(f'<http://{host}/api/v4/projects?{urlencode(q)}>; rel="{rel}"')
                headers["Link"] = ", ".join(links)
                self._send(200, [_project(p) for p in chunk], headers)
                return True
            m = re.fullmatch(r"/projects/(\d+)(/repository/commits)?", rest)
            if not m or (int(m.group(1)) > CI_PROJECT_ID_BASE and ci.project(m.group(1)) is not None):
                return False
            found = [p for p in projects() if p["id"] == int(m.group(1))]
            if not found:
                self._send(404, {"message": "404 Project Not Found"})
                return True
            p = found[0]
            if m.group(2):
                self._send(200, [{"id": p["last_commit"], "short_id": p["last_commit"][:8],
                                  "title": "train: update config", "committed_date":
                                  p["last_activity_at"]}][: int(query.get("per_page", 20))],
                           {"X-Page": "1", "X-Per-Page": query.get("per_page", "20")})
                return True
            self._send(200, _project(p))
            return True

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

    return Handler


def _readiness_all(svc: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """`/-/readiness?all=1`'s per-dependency results (GitLab docs, administration/monitoring/health_check.md,
    "Readiness": db_check, redis_check, gitaly_check...; a failed one carries a message)."""
    out = {}
    for check, service in (("db_check", "postgresql"), ("redis_check", "redis"), ("gitaly_check", "gitaly")):
        up = svc.get(service) == "run"
        result: dict[str, Any] = {"status": "ok" if up else "failed"}
        if check == "gitaly_check":
            result["labels"] = {"shard": "default"}
        if not up:
            result["message"] = f"{service} is not running"
        out[check] = [result]
    return out


# Issue 15: `GET /runners/all` (GitLab docs api/runners.md, "List all runners": administrators only, offset
# pagination, 20 a page by default; each runner with id, description, ip_address, active (deprecated),
# paused, is_shared, runner_type, name, online and status: online, offline, stale or never_contacted). The
# runners are read from the host's `var/opt/gitlab/state/runners.json` when it exists (tests write it),
# else one online instance runner, as the guide registers for the training CI.
_DEFAULT_RUNNERS = [{"id": 1, "description": "k8s-gpu-runner", "ip_address": "127.0.0.1", "active": True,
                     "paused": False, "is_shared": True, "runner_type": "instance_type", "name": "gitlab-runner",
                     "online": True, "status": "online"}]


def _runners_page(state: Path, query: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    file = state / "runners.json"
    runners = json.loads(file.read_text()) if file.exists() else _DEFAULT_RUNNERS
    if query.get("status"):
        runners = [r for r in runners if r.get("status") == query["status"]]
    if query.get("paused") in ("true", "false"):
        runners = [r for r in runners if bool(r.get("paused")) == (query["paused"] == "true")]
    per_page = max(1, min(100, int(query.get("per_page", 20))))
    page = max(1, int(query.get("page", 1)))
    total_pages = max(1, -(-len(runners) // per_page))
    headers = {"X-Total": str(len(runners)), "X-Total-Pages": str(total_pages), "X-Page": str(page),
               "X-Per-Page": str(per_page), "X-Next-Page": str(page + 1) if page < total_pages else ""}
    return runners[(page - 1) * per_page: page * per_page], headers


def _project(p: dict) -> dict:
    return {"id": p["id"], "name": p["name"], "path_with_namespace": p["path_with_namespace"],
            "default_branch": p.get("default_branch", "main"), "last_activity_at": p["last_activity_at"]}


def serve(port: int, root: Path, token: str) -> ThreadingHTTPServer:
    ci = CIRoutes(base_url=f"http://127.0.0.1:{port}")
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(root, token, ci))
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the accepted token")
    args = parser.parse_args()
    serve(args.port, args.root, args.token_file.read_text().strip()).serve_forever()


if __name__ == "__main__":
    main()


# --- the sandbox's training project ---------------------------------------------------------------

TRAINING_PROJECT = "ml/rl-demo"


def training_spec_text(registry_url: str) -> str:
    """The `.aiplatform/train.yaml` of the sandbox's training project (what a developer would push)."""
    host = registry_url.split("://", 1)[-1]
    return "\n".join([
        "name: rl-demo",
        f"image: {host}/ai-base:demo",
        "command: [python, legged_gym/scripts/train.py, --headless]",
        "code: {credentials: {secret: gitlab-clone}}   # the pushed repository, at the pushed commit",
        "resources: {cpu: '4', memory: 16Gi, gpu: {count: 1}, shm_size: 8Gi}",
        "volumes: [{name: datasets, claim: rl-datasets, mount_path: /data}]",
        "parameters: {MAX_ITERATIONS: '10'}",
        "exit_handler: {script: 'echo training ended: {{workflow.status}}'}",
        "",
    ])


def seed_training_project(sb) -> None:
    """A project with `.aiplatform/train.yaml` at one commit, on the production GitLab's API stand-in;
    `sb.extra["training_project"]` says which (the demo pushes it to `train-on-push`)."""
    import hashlib

    import httpx

    api = sb.config["gitlab"]["api_url"]
    sha = hashlib.sha1(f"{sb.state_dir}-rl-demo".encode()).hexdigest()
    files = {sha: {".aiplatform/train.yaml": training_spec_text(sb.config["registry"]["url"])}}
    httpx.post(f"{api}/control/projects", json={"path": TRAINING_PROJECT, "files": files}, timeout=10,
               ).raise_for_status()
    sb.extra["training_project"] = {"project": TRAINING_PROJECT, "commit_sha": sha, "ref": "main"}
