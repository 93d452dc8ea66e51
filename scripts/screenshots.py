"""Screenshots of the Prefect UI as an operator sees it, taken with headless Chromium (Debian `chromium`).

    python -m scripts.screenshots [--ui-url http://127.0.0.1:4200] [--out docs]

Takes the deployments page (docs/deployments.png) and the newest GPU sweep report artifact
(docs/gpu-sweep-report.png) from a running server with the project deployed and a sweep run: the
demo's (`make demo`, default URL) or any other. The UI is a single-page app that loads its data from
the API after the page loads, so Chromium runs with a virtual-time budget that lets it finish.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ScreenshotError(Exception):
    """Chromium is missing, failed, or the server has nothing to show."""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError("chromium is not installed (Debian package 'chromium'; scripts/install.sh installs it)")


def screenshot(url: str, out: Path, width: int = 1600, height: int = 1000, budget_ms: int = 15000,
               timeout_s: float = 120) -> Path:
    """A PNG of `url` as headless Chromium renders it, written to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        argv = [chromium(), "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not out.exists() or not out.read_bytes().startswith(PNG_MAGIC):
        raise ScreenshotError(f"chromium could not capture {url} (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return out


def newest_artifact_id(api_url: str, key_prefix: str) -> str:
    """The id of the newest artifact whose key starts with `key_prefix` (the report's UI page is by id)."""
    body = {"artifacts": {"key": {"like_": key_prefix}}, "sort": "CREATED_DESC", "limit": 20}
    r = httpx.post(f"{api_url}/artifacts/filter", json=body, timeout=30)
    r.raise_for_status()
    found = [a for a in r.json() if (a.get("key") or "").startswith(key_prefix)]
    if not found:
        raise ScreenshotError(f"no artifact with a key starting {key_prefix!r} on {api_url}: run a GPU sweep first")
    return found[0]["id"]


def take_all(ui_url: str, out_dir: Path) -> list[Path]:
    """docs/deployments.png and docs/gpu-sweep-report.png from the server at `ui_url`."""
    ui_url = ui_url.rstrip("/")
    api_url = f"{ui_url}/api"
    sweep = newest_artifact_id(api_url, "gpu-sweep-")
    return [screenshot(f"{ui_url}/deployments", out_dir / "deployments.png"),
            screenshot(f"{ui_url}/artifacts/artifact/{sweep}", out_dir / "gpu-sweep-report.png", height=1400)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("--ui-url", default="http://127.0.0.1:4200", help="the Prefect UI (the demo's by default)")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    try:
        for path in take_all(args.ui_url, args.out):
            print(f"{path} ({path.stat().st_size // 1024} KiB)")
    except (ScreenshotError, httpx.HTTPError) as exc:
        print(f"screenshots: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
