"""A webhook receiver on loopback that records every POST, for failure notifications.

Sets `notifications.webhook_url` (as an env reference, SANDBOX_WEBHOOK_URL) unless another
component already did. As with a real incoming webhook (Slack, Teams), the URL is the secret: its
path ends in a stand-in secret token, and only POSTs to that path are recorded (others get 404).
Received bodies are appended to `<state>/webhook/received.jsonl` (without the token).

    python -m sandbox.webhook --port P --out FILE --token-file SECRETS/SANDBOX_WEBHOOK_TOKEN
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sandbox._common import (
    SandboxLike,
    free_port,
    http_ok,
    secrets_dir,
    wait_for,
    write_secret_file,
)

URL_ENV = "SANDBOX_WEBHOOK_URL"
TOKEN = "SANDBOX_WEBHOOK_TOKEN"  # the secret part of the URL, the file the receiver checks against
PATH = "/hook"


def start_webhook(sb: SandboxLike) -> None:
    if sb.config.get("notifications", {}).get("webhook_url"):
        return
    port = free_port()
    out = sb.path("webhook", "received.jsonl")
    proc = sb.spawn("webhook", [sys.executable, "-m", "sandbox.webhook", "--port", str(port), "--out", str(out),
                                "--token-file", str(sb.secret_file(TOKEN))],
                    cwd=Path(__file__).resolve().parent.parent)
    base = f"http://127.0.0.1:{port}"
    wait_for(http_ok(base), "webhook receiver", 20, proc, sb.log_of("webhook"))
    sb.urls["webhook"] = base
    sb.extra["webhook_log"] = str(out)
    # the whole URL is then a secret too, kept as one (blocks.load reads it from SANDBOX_WEBHOOK_URL)
    write_secret_file(secrets_dir(sb.state_dir) / URL_ENV, f"{base}{PATH}/{sb.secret(TOKEN, env=False)}".encode())
    sb.secret(URL_ENV)
    sb.config["notifications"] = {"webhook_url": {"env": URL_ENV}}


def received(sb: SandboxLike) -> list[dict]:
    """Every POST the receiver recorded, oldest first: {"path", "body"} (the body as sent, a string)."""
    out = Path(sb.extra["webhook_log"])
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the URL's secret token")
    args = parser.parse_args()
    hook = f"{PATH}/{args.token_file.read_text().strip()}"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path, _, query = self.path.partition("?")
            if path != hook:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with open(args.out, "a") as f:
                f.write(json.dumps({"path": PATH + (f"?{query}" if query else ""),
                                    "body": body.decode(errors="replace")}) + "\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
