"""A webhook receiver on loopback that records every POST, for failure notifications.

Sets `notifications.webhook_url` (as an env reference, SANDBOX_WEBHOOK_URL) unless another
component already did. Received bodies are appended to `<state>/webhook/received.jsonl`.

    python -m sandbox.webhook --port P --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

URL_ENV = "SANDBOX_WEBHOOK_URL"


def start_webhook(sb) -> None:
    from sandbox.gitlab_host import _token
    from sandbox.platform import free_port, http_ok, wait_for

    if sb.config.get("notifications", {}).get("webhook_url"):
        return
    port = free_port()
    out = sb.path("webhook", "received.jsonl")
    proc = sb.spawn("webhook", [sys.executable, "-m", "sandbox.webhook", "--port", str(port), "--out", str(out)],
                    cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}/hook"
    wait_for(http_ok(url), "webhook receiver", 20, proc, sb.log_of("webhook"))
    sb.urls["webhook"] = url
    sb.extra["webhook_log"] = str(out)
    import os

    os.environ[URL_ENV] = url
    _token(sb, URL_ENV)
    sb.config["notifications"] = {"webhook_url": {"env": URL_ENV}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with open(args.out, "a") as f:
                f.write(json.dumps({"path": self.path, "body": body.decode(errors="replace")}) + "\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
