"""A stand-in for the GitLab API endpoints the training flows use, on loopback.

    python -m sandbox.gitlab_ci_api --port P --token-file SECRETS/SANDBOX_GITLAB_CI_TOKEN

Separate from `sandbox.gitlab_api` (the backup lifecycle's stand-in, answered from a GitLab host's
files): this one keeps repositories, commit statuses and notes in memory. Endpoints, as GitLab
documents them (`:id` is a number or the URL-encoded project path):

- ``GET /api/v4/projects/:id``
- ``GET /api/v4/projects/:id/repository/files/:file_path/raw?ref=``
- ``POST /api/v4/projects/:id/statuses/:sha`` (state, ref, name, target_url, description), with
  GitLab's transition rule: posting the state a status already has is a 400;
- ``GET /api/v4/projects/:id/repository/commits/:sha/statuses``
- ``POST|GET /api/v4/projects/:id/repository/commits/:sha/comments`` (note)
- ``POST|GET /api/v4/projects/:id/merge_requests/:iid/notes`` (body)

A wrong or missing ``PRIVATE-TOKEN`` gets 401. Control: ``POST /control/projects``
(``{"path", "files": {REF: {PATH: TEXT}}}``), ``GET /control/state``, ``POST /control/reset``.
`CIRoutes.handle` holds all of it, so another stand-in can mount these routes.
"""

from __future__ import annotations

import argparse
import json
import threading
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from sandbox._common import PYTHON, SandboxLike, free_port, http_ok, wait_for
from sandbox._http import JSONHandler

TOKEN_ENV = "SANDBOX_GITLAB_CI_TOKEN"

STATES = ("pending", "running", "success", "failed", "canceled", "skipped")
FINAL = {"success", "failed", "canceled", "skipped"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class CIRoutes:
    """In-memory repositories, commit statuses and notes; `handle()` answers one request."""

    def __init__(self, token: str, base_url: str = "http://127.0.0.1"):
        self.token = token
        self.base_url = base_url
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.projects: dict[int, dict[str, Any]] = {}
        self.files: dict[tuple[int, str, str], str] = {}
        self.statuses: dict[tuple[int, str], list[dict[str, Any]]] = {}
        self.comments: dict[tuple[int, str], list[dict[str, Any]]] = {}
        self.mr_notes: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.seq = 0

    def add_project(self, path: str, files: dict[str, dict[str, str]] | None = None,
                    default_branch: str = "main") -> dict[str, Any]:
        with self.lock:
            existing = [p for p in self.projects.values() if p["path_with_namespace"] == path]
            if existing:
                project = existing[0]
            else:
                pid = len(self.projects) + 1
                project = {"id": pid, "path_with_namespace": path, "name": path.rsplit("/", 1)[-1],
                           "default_branch": default_branch,
                           "http_url_to_repo": f"{self.base_url}/{path}.git",
                           "web_url": f"{self.base_url}/{path}"}
                self.projects[pid] = project
            for ref, tree in (files or {}).items():
                for file_path, text in tree.items():
                    self.files[(project["id"], ref, file_path)] = text
            return project

    def state(self) -> dict[str, Any]:
        with self.lock:
            by_path = {p["id"]: p["path_with_namespace"] for p in self.projects.values()}
            return {
                "projects": list(self.projects.values()),
                "statuses": {f"{by_path[pid]}@{sha}": v for (pid, sha), v in self.statuses.items()},
                "comments": {f"{by_path[pid]}@{sha}": v for (pid, sha), v in self.comments.items()},
                "mr_notes": {f"{by_path[pid]}!{iid}": v for (pid, iid), v in self.mr_notes.items()},
            }

    def _project(self, ident: str) -> dict[str, Any] | None:
        ident = unquote(ident)
        if ident.isdigit():
            return self.projects.get(int(ident))
        for p in self.projects.values():
            if p["path_with_namespace"] == ident:
                return p
        return None

    def handle(self, method: str, path: str, query: dict[str, str], body: dict[str, Any],
               headers: Any) -> tuple[int, Any, str]:
        """(HTTP status, body, content type) for one `/api/v4` request."""
        token = headers.get("PRIVATE-TOKEN") or query.get("private_token")
        if token != self.token:
            return 401, {"message": "401 Unauthorized"}, "application/json"
        parts = [unquote(p) for p in path.split("/") if p][2:]  # drop api, v4
        if len(parts) < 2 or parts[0] != "projects":
            return 404, {"message": "404 Not Found"}, "application/json"
        with self.lock:
            project = self._project(parts[1])
            if project is None:
                return 404, {"message": "404 Project Not Found"}, "application/json"
            pid, rest = project["id"], parts[2:]
            if not rest and method == "GET":
                return 200, project, "application/json"
            if rest[:2] == ["repository", "files"] and len(rest) >= 4 and rest[-1] == "raw" and method == "GET":
                file_path = "/".join(rest[2:-1])
                ref = query.get("ref") or project["default_branch"]
                text = self.files.get((pid, ref, file_path))
                if text is None:
                    return 404, {"message": "404 File Not Found"}, "application/json"
                return 200, text.encode(), "text/plain; charset=utf-8"
            if len(rest) == 2 and rest[0] == "statuses" and method == "POST":
                return self._post_status(pid, rest[1], body)
            if len(rest) == 4 and rest[:2] == ["repository", "commits"] and rest[3] == "statuses" and method == "GET":
                return 200, list(self.statuses.get((pid, rest[2]), [])), "application/json"
            if len(rest) == 4 and rest[:2] == ["repository", "commits"] and rest[3] == "comments":
                notes = self.comments.setdefault((pid, rest[2]), [])
                if method == "POST":
                    if not body.get("note"):
                        return 400, {"message": "400 Bad request - note is missing"}, "application/json"
                    note = {"note": body["note"], "author": {"username": "ai-platform-bot"},
                            "created_at": _now()}
                    notes.append(note)
                    return 201, note, "application/json"
                return 200, list(notes), "application/json"
            if len(rest) == 3 and rest[0] == "merge_requests" and rest[2] == "notes" and rest[1].isdigit():
                notes = self.mr_notes.setdefault((pid, int(rest[1])), [])
                if method == "POST":
                    if not body.get("body"):
                        return 400, {"message": "400 Bad request - body is missing"}, "application/json"
                    self.seq += 1
                    note = {"id": self.seq, "body": body["body"], "author": {"username": "ai-platform-bot"},
                            "created_at": _now(), "noteable_type": "MergeRequest"}
                    notes.append(note)
                    return 201, note, "application/json"
                return 200, list(notes), "application/json"
        return 404, {"message": "404 Not Found"}, "application/json"

    def _post_status(self, pid: int, sha: str, body: dict[str, Any]) -> tuple[int, Any, str]:
        state = body.get("state")
        if state not in STATES:
            return 400, {"message": "state does not have a valid value"}, "application/json"
        name = body.get("name") or body.get("context") or "default"
        history = self.statuses.setdefault((pid, sha), [])
        latest = next((s for s in reversed(history) if s["name"] == name), None)
        if latest is not None and latest["status"] == state:
            return 400, {"message": f"Cannot transition status via :{state} from :{latest['status']}"}, \
                "application/json"
        self.seq += 1
        status = {"id": self.seq, "sha": sha, "ref": body.get("ref"), "status": state, "name": name,
                  "target_url": body.get("target_url"), "description": body.get("description"),
                  "created_at": _now(), "author": {"username": "ai-platform-bot"}}
        history.append(status)
        return 201, status, "application/json"


def make_handler(routes: CIRoutes):
    class Handler(JSONHandler):

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if not raw:
                return {}
            if "json" in (self.headers.get("Content-Type") or ""):
                return json.loads(raw)
            return {k: v[-1] for k, v in parse_qs(raw.decode()).items()}

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body = self._body() if method in ("POST", "PUT") else {}
            if url.path == "/control/health":
                return self._send(200, {"ok": True})
            if url.path == "/control/state":
                return self._send(200, routes.state())
            if url.path == "/control/reset" and method == "POST":
                with routes.lock:
                    routes.reset()
                return self._send(200, {"reset": True})
            if url.path == "/control/projects" and method == "POST":
                return self._send(200, routes.add_project(body["path"], body.get("files"),
                                                          body.get("default_branch", "main")))
            if url.path.startswith("/api/v4/"):
                return self._send(*routes.handle(method, url.path, query, body, self.headers))
            self._send(404, {"message": "404 Not Found"})

        def do_GET(self):  # noqa: N802
            self._route("GET")

        def do_POST(self):  # noqa: N802
            self._route("POST")

    return Handler


def serve(port: int, token: str) -> ThreadingHTTPServer:
    routes = CIRoutes(token, base_url=f"http://127.0.0.1:{port}")
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(routes))
    server.daemon_threads = True
    return server


def start_gitlab_ci_api(sb: SandboxLike) -> None:
    """Sandbox component: this stand-in, at ``sb.urls["gitlab_ci_api"]``.

    The platform config's `gitlab` section belongs to the backup lifecycle's stand-ins; it is
    filled here only when no component has filled it (then `gitlab.api_url` is this server).
    """
    sb.secret(TOKEN_ENV)
    port = free_port()
    proc = sb.spawn("gitlab-ci-api", [PYTHON, "-m", "sandbox.gitlab_ci_api", "--port", str(port),
                                      "--token-file", str(sb.secret_file(TOKEN_ENV))])
    sb.urls["gitlab_ci_api"] = f"http://127.0.0.1:{port}"
    wait_for(http_ok(f"{sb.urls['gitlab_ci_api']}/control/health"), "GitLab CI API stand-in", 30, proc,
             sb.log_of("gitlab-ci-api"))
    if "gitlab" not in sb.config:
        sb.config["gitlab"] = {"api_url": sb.urls["gitlab_ci_api"], "token": {"env": TOKEN_ENV},
                               "ssh": {"host": "127.0.0.1"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.gitlab_ci_api", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the accepted token")
    args = parser.parse_args(argv)
    serve(args.port, args.token_file.read_text().strip()).serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

