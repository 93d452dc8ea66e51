"""etcd-snapshot: snapshot, verify and off-site copy of a real etcd 3.4 holding SIZE MB.

The sandbox's real etcd (`sandbox.etcd.start_etcd`: 3 members, kubespray TLS, sshd on the etcd host) with a
quota large enough, loaded with SIZE MB through etcd's v3 JSON gateway in 512 KiB values. Then, per repeat:

- project (a child process, so its peak RSS is its own; target <= 150 MB): over SSH on the etcd host,
  `tasks.etcd.take_verified_snapshot`, what `etcd-backup` does per member: `etcdctl snapshot save` from a
  follower, streamed over SFTP into a local-directory `Store` while etcdctl writes it (SHA-256 on the way; the
  copy fsync'd, read back and compared before the rename), then `snapshot status` against the live revisions,
  the key count and 10 sampled keys at the snapshot's revision;
- baseline, the same run: `etcdctl snapshot save` from the same follower with the same certificates (run
  directly, no SSH), then `sha256sum` and `cp` to the off-site folder.

ratio = baseline_seconds / seconds (> 1: the project is faster); target: seconds <= 1.5 x baseline. The load
average at the start is recorded (`load_1m`): the machine is shared.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import emit, peak_rss_mb

VALUE = 512 * 1024


def child(state_json: str, snap: str, offsite: str) -> None:
    """The project side, in its own process: one snapshot, verified, copied off-site."""
    from blocks.connections import BackupStore
    from tasks.etcd import (
        EtcdClient,
        bulk_kwargs,
        key_count,
        remove_path,
        take_verified_snapshot,
    )
    from tasks.redact import Redactor
    from tasks.ssh import connect

    st = json.loads(Path(state_json).read_text())
    h = st["ssh"]
    store = BackupStore(kind="local", path=offsite, prefix="etcd/").get_store()
    client = EtcdClient(host="etcd1", cert_dir=f"{h['root']}/etc/ssl/etcd/ssl", command_timeout_s=60)
    r = Redactor.of([])

    async def go():
        kw = {"host": h["host"], "port": h["port"], "username": h["user"], "client_keys": [h["private_key_path"]],
              "known_hosts": h["known_hosts"]}
        t = time.perf_counter()

        def lap(name):
            nonlocal t
            steps[name] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
        async with connect(bulk_kwargs(kw)) as conn:
            lap("connect")
            _, before = await key_count(conn, client.argv([st["endpoint"]]), r)  # the flow reads it with the status
            lap("revision")
            taken = await take_verified_snapshot(conn, client, st["endpoint"], snap, store, "main/bench/snapshot.db",
                                                 r, revision_before=before, sample=10, timeout_s=600)
            assert taken["check"].ok, taken["check"].problems
            lap("save+verify+copy")
            await remove_path(conn, snap, r)
            return taken["copied"]

    steps: dict = {}

    start = time.perf_counter()
    copied = asyncio.run(go())
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "steps": steps, **copied}))


def _load(info: dict, member: str, size_mb: int) -> int:
    """SIZE MB in 512 KiB values, 4 writers at once (etcd batches concurrent proposals)."""
    from concurrent.futures import ThreadPoolExecutor

    from sandbox.etcd import put_keys

    count = size_mb * (1 << 20) // VALUE
    per = -(-count // 4)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: put_keys(info, member, min(per, count - i * per), prefix="/registry/bench/",
                                         value_size=VALUE, start=i * per), range(4)))
    return count


def run(size: int | None = None, repeat: int = 3) -> None:
    from sandbox.etcd import client_cert, start_etcd
    from sandbox.platform import Sandbox

    size = size or 256
    repeat = max(1, min(repeat, 5))
    load_1m = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="etcd-snapshot-") as tmp:
        tmp_path = Path(tmp)
        quota = max(2 * size, 64) * (1 << 20) + (256 << 20)
        sb = Sandbox(state_dir=tmp_path / "sb").up(components=[lambda s: start_etcd(s, quota_bytes=quota)])
        try:
            info = sb.extra["etcd"]
            t0 = time.perf_counter()
            keys = _load(info, "etcd1", size)
            load_s = time.perf_counter() - t0
            endpoint = f"https://127.0.0.1:{info['members']['etcd2']['client_port']}"
            ssh = info["ssh"]["etcd1"]
            state = tmp_path / "state.json"
            state.write_text(json.dumps({"ssh": ssh, "endpoint": endpoint}))
            ca, cert, key = client_cert(info)
            offsite = tmp_path / "offsite"
            offsite.mkdir()
            project, baseline, rss = [], [], []
            for i in range(repeat):
                snap = f"{ssh['root']}/var/backups/bench-{i}.db"
                r = subprocess.run([sys.executable, "-m", "benchmarks.etcd_snapshot", "--child", str(state), snap,
                                    str(offsite)], capture_output=True, text=True, check=True,
                                   cwd=Path(__file__).resolve().parent.parent)
                out = json.loads(r.stdout.strip().splitlines()[-1])
                project.append(out["seconds"])
                rss.append(out["peak_rss_mb"])
                print(json.dumps({"project_steps": out["steps"]}), file=sys.stderr)
                base_snap, base_dest = tmp_path / f"baseline-{i}.db", offsite / f"baseline-{i}.db"
                start = time.perf_counter()
                subprocess.run(["etcdctl", f"--endpoints={endpoint}", f"--cacert={ca}", f"--cert={cert}",
                                f"--key={key}", "snapshot", "save", str(base_snap)], check=True,
                               capture_output=True, env={**os.environ, "ETCDCTL_API": "3"})
                subprocess.run(["sha256sum", str(base_snap)], capture_output=True, check=True)
                subprocess.run(["cp", str(base_snap), str(base_dest)], check=True)
                baseline.append(time.perf_counter() - start)
                snap_size = base_snap.stat().st_size
                base_snap.unlink()
                base_dest.unlink()
        finally:
            sb.down()
    seconds, base_seconds = statistics.median(project), statistics.median(baseline)
    emit("etcd-snapshot", size, seconds=seconds, baseline_seconds=base_seconds, peak_rss_mb=max(rss),
         baseline="etcdctl snapshot save+sha256sum+cp", time_vs_baseline=round(seconds / base_seconds, 2),
         snapshot_mb=round(snap_size / (1 << 20), 1), keys=keys, load_seconds=round(load_s, 1), load_1m=load_1m,
         target_time_vs_baseline=1.5, target_peak_rss_mb=150,
         meets_targets=seconds / base_seconds <= 1.5 and max(rss) <= 150, repeats=repeat)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        run(int(sys.argv[1]) if len(sys.argv) > 1 else None)
