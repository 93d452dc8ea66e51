"""backup-stream: verify + SHA-256 + off-site copy of a GitLab backup archive of SIZE MB.

- project:  `tasks.storage.copy_stream` with a `TarStreamVerifier` into a `LocalFileSink` (one pass that
  hashes, checks the tar and writes `NAME.part`; then the copy is read back and its SHA-256 compared
  before the rename), plus `tasks.gitlab_rules.check_archive` on what the pass captured. It runs in a child
  process so its peak RSS is its own (target: <= 150 MB whatever the size: nothing is held in memory).
- baseline: `sha256sum ARCHIVE` followed by `cp ARCHIVE DEST`, the same run, the same file.

ratio = baseline_seconds / seconds (> 1: the project is faster); target: seconds <= 1.5 x baseline,
i.e. ratio >= 0.67. The archive is written once (stand-in omnibus layout) and read from page cache by both.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks._harness import emit, peak_rss_mb

VERSION = "17.0.1-ee"


def make_archive(directory: Path, size_mb: int) -> Path:
    """A GitLab-shaped backup archive of about `size_mb` MB (random bytes, written in 1 MiB blocks)."""
    epoch = int(time.time())
    path = directory / f"{epoch}_{time.strftime('%Y_%m_%d', time.gmtime(epoch))}_{VERSION}_gitlab_backup.tar"
    info = (f"---\n:db_version: 20240508085441\n:gitlab_version: {VERSION}\n:installation_type: omnibus-gitlab\n"
            ":skipped: registry\n").encode()
    block = os.urandom(1 << 20)

    class Filler(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left, len(block))
            b[:n] = block[:n]
            self.left -= n
            return n

    def add(tar, name, data=None, size=0):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = (len(data) if data is not None else size), epoch, 0o600
        tar.addfile(ti, io.BytesIO(data) if data is not None else io.BufferedReader(Filler(size), 1 << 20))

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "backup_information.yml", info)
        add(tar, "db/database.sql.gz", os.urandom(64 * 1024))
        add(tar, "repositories/@hashed/6b/86/6b86b273.bundle", size=max(0, size_mb * (1 << 20) - (1 << 20)))
        for comp in ("uploads", "builds", "artifacts", "pages", "lfs", "terraform_state", "packages",
                     "ci_secure_files"):
            add(tar, f"{comp}.tar.gz", os.urandom(1024))
    return path


def child(archive: str, dest: str) -> None:
    """The project side, in its own process: one verified copy; prints seconds and peak RSS."""
    from tasks.gitlab_rules import check_archive
    from tasks.storage import LocalFileSink, TarStreamVerifier, copy_stream, file_chunks

    start = time.perf_counter()
    verifier = TarStreamVerifier(capture={"backup_information.yml"})
    result = copy_stream(Path(archive).name, file_chunks(Path(archive)), LocalFileSink(Path(dest)), verifier)
    check = check_archive(result.members, result.captured["backup_information.yml"].decode(), VERSION)
    seconds = time.perf_counter() - start
    assert check.ok, check.problems
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "sha256": result.sha256,
                      "size": result.size}))


def run(size: int | None = None, repeat: int = 5) -> None:
    size = size or 1024
    repeat = max(1, min(repeat, 5))
    with tempfile.TemporaryDirectory(prefix="backup-stream-") as tmp:
        tmp_path = Path(tmp)
        archive = make_archive(tmp_path, size)
        offsite = tmp_path / "offsite"
        offsite.mkdir()
        # warm the page cache once for both sides
        subprocess.run(["cat", str(archive)], stdout=subprocess.DEVNULL, check=True)
        project, baseline, rss, sha = [], [], [], None
        for i in range(repeat):
            dest = offsite / f"project-{i}.tar"
            r = subprocess.run([sys.executable, "-m", "benchmarks.backup_stream", "--child", str(archive), str(dest)],
                               capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
            out = json.loads(r.stdout.strip().splitlines()[-1])
            project.append(out["seconds"])
            rss.append(out["peak_rss_mb"])
            sha = out["sha256"]
            dest.unlink()
            base_dest = offsite / f"baseline-{i}.tar"
            start = time.perf_counter()
            digest = subprocess.run(["sha256sum", str(archive)], capture_output=True, text=True, check=True)
            subprocess.run(["cp", str(archive), str(base_dest)], check=True)
            baseline.append(time.perf_counter() - start)
            base_dest.unlink()
            assert digest.stdout.split()[0] == sha, "project and sha256sum disagree"
        import statistics

        seconds, base_seconds = statistics.median(project), statistics.median(baseline)
        emit("backup-stream", size, seconds=seconds, baseline_seconds=base_seconds, peak_rss_mb=max(rss),
             baseline="sha256sum+cp", time_vs_baseline=round(seconds / base_seconds, 2),
             target_time_vs_baseline=1.5, target_peak_rss_mb=150,
             meets_targets=seconds / base_seconds <= 1.5 and max(rss) <= 150, repeats=repeat)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        run(int(sys.argv[1]) if len(sys.argv) > 1 else None)
