"""GitLab API stand-in: the `/api/v4` endpoints the flows use, answered from a GitLab host root.

    python -m sandbox.gitlab_api --port P --root HOST_ROOT --token-file SECRETS/SANDBOX_GITLAB_TOKEN

Reads `var/opt/gitlab/state/projects.json` and `services.json` and `opt/gitlab/version-manifest.txt`
under the host root on every request, so a `gitlab-backup restore` on the host (which rewrites
projects.json) changes what the API returns. Endpoints, as GitLab documents them:
`GET /-/readiness`, `GET /api/v4/version`, `GET /api/v4/projects` (offset pagination with
X-Total, X-Total-Pages, X-Page, X-Per-Page, X-Next-Page and Link headers),
`GET /api/v4/projects/:id`, `GET /api/v4/projects/:id/repository/commits`.
A wrong or missing `PRIVATE-TOKEN` gets 401 like GitLab.
"""

from __future__ import annotations

import argparse
import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse


def make_handler(root: Path, token: str):
    state = root / "var" / "opt" / "gitlab" / "state"

    def version() -> dict:
        name, ver = (root / "opt" / "gitlab" / "version-manifest.txt").read_text().split()[:2]
        ee = name.endswith("-ee")
        return {"version": f"{ver}-ee" if ee else ver, "revision": "6f3a0b1c2d4", "kas": {"enabled": False},
                "enterprise": ee}

    def services() -> dict:
        return json.loads((state / "services.json").read_text())

    def projects() -> list[dict]:
        return json.loads((state / "projects.json").read_text())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet
            pass

        def _send(self, code: int, body, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            path = url.path
            if path == "/-/readiness":
                svc = services()
                ok = all(svc.get(s) == "run" for s in ("puma", "postgresql", "redis", "gitaly"))
                checks = {"status": "ok" if ok else "failed"}
                return self._send(200 if ok else 503, {"status": checks["status"], "master_check": [checks]})
            if not path.startswith("/api/v4/"):
                return self._send(404, {"message": "404 Not Found"})
            given = self.headers.get("PRIVATE-TOKEN") or query.get("private_token")
            if given != token:
                return self._send(401, {"message": "401 Unauthorized"})
            if services().get("puma") != "run":
                return self._send(502, {"message": "502 Bad Gateway: GitLab is not responding"})
            rest = path[len("/api/v4"):]
            if rest == "/version":
                return self._send(200, version())
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
                return self._send(200, [_project(p) for p in chunk], headers)
            m = re.fullmatch(r"/projects/(\d+)(/repository/commits)?", rest)
            if m:
                found = [p for p in projects() if p["id"] == int(m.group(1))]
                if not found:
                    return self._send(404, {"message": "404 Project Not Found"})
                p = found[0]
                if m.group(2):
                    return self._send(200, [{"id": p["last_commit"], "short_id": p["last_commit"][:8],
                                             "title": "train: update config", "committed_date":
                                             p["last_activity_at"]}][: int(query.get("per_page", 20))],
                                      {"X-Page": "1", "X-Per-Page": query.get("per_page", "20")})
                return self._send(200, _project(p))
            return self._send(404, {"message": "404 Not Found"})

    return Handler


def _project(p: dict) -> dict:
    return {"id": p["id"], "name": p["name"], "path_with_namespace": p["path_with_namespace"],
            "default_branch": p.get("default_branch", "main"), "last_activity_at": p["last_activity_at"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the accepted token")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.root, args.token_file.read_text().strip()))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
