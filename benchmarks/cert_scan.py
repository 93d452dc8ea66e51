"""cert-scan: parse and analyse SIZE certificates from PEM files and TLS secrets; probe N TLS listeners.

    python -m benchmarks cert-scan --size 10000 [--baseline-sample 300]
    python -m benchmarks cert-scan --endpoints 200 [--hung 10] [--timeout 2]

- project (`--size`): half the certificates as PEM files (read, `tasks.tls_model.parse_pem`), half as
  `kubernetes.io/tls` secrets as the API lists them (`secret_tls_fields`, base64, parse), then
  `tasks.tls_analysis.analyse` over all of them (expiry, CA/leaf, chain verification against the CAs,
  weak crypto, deduplication). Target: <= 2 s at 10,000.
- baseline: one `openssl x509 -noout -enddate -in FILE` process per certificate, in the same run; timed on
  `--baseline-sample` files and scaled to SIZE (the whole run would take minutes). Each sampled expiry is
  checked against the project's. Target: ratio >= 50.
- `--endpoints N`: N real TLS listeners on loopback (`sandbox/tls_listeners.py`), `--hung` of them
  accepting and never answering; `tasks.tls.probe_endpoints` with `--timeout`. Target: all N within
  2 x timeout, the hung ones reported as timeouts, the others' chains read.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._harness import emit, peak_rss_mb, timed


def make_certificates(folder: Path, size: int, seed: int = 7) -> tuple[list[Path], list[dict]]:
    """SIZE certificates from 4 CAs, expiring across two years: half PEM files, half TLS secrets."""
    from sandbox import pki

    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    cas = [pki.issue(f"bench-ca-{i}", is_ca=True) for i in range(4)]
    key = pki.new_key()  # one leaf key: signing is what costs here, not key generation
    files, secrets = [], []
    for i, ca in enumerate(cas):
        path = folder / f"ca-{i}.crt"
        path.write_bytes(ca.cert_pem)
        files.append(path)
    for n in range(size - len(cas)):
        ca = cas[n % len(cas)]
        issued = pki.issue(f"svc-{n}.bench.internal", issuer=ca, key=key, dns=(f"svc-{n}.bench.internal",),
                           not_before=now - dt.timedelta(days=30),
                           not_after=now + dt.timedelta(days=rng.uniform(-10, 700)), usages=("server",))
        if n % 2:
            path = folder / f"svc-{n}.crt"
            path.write_bytes(issued.cert_pem)
            files.append(path)
        else:
            secrets.append({"metadata": {"namespace": f"ns-{n % 50}", "name": f"svc-{n}-tls"},
                            "type": "kubernetes.io/tls",
                            "data": {"tls.crt": base64.b64encode(issued.cert_pem + ca.cert_pem).decode(),
                                     "tls.key": "c2VjcmV0"}})
    return files, secrets


def project(files: list[Path], secrets: list[dict]):
    from tasks.tls_analysis import analyse
    from tasks.tls_model import (
        HOST,
        SECRET,
        decode_b64_pem,
        parse_pem,
        secret_tls_fields,
        sightings,
    )

    found = []
    for path in files:
        certs, _ = parse_pem(path.read_bytes())
        found += sightings(certs, HOST, f"bench:{path}")
    for obj in secrets:
        s = secret_tls_fields(obj)
        name = f"secret {s['namespace']}/{s['name']}"
        certs, _ = parse_pem(decode_b64_pem(s["tls.crt"]))
        found += sightings(certs, SECRET, name)
    return analyse(found, now=dt.datetime.now(dt.UTC))


def baseline(files: list[Path]) -> dict[Path, str]:
    out = {}
    for path in files:
        r = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(path)], capture_output=True,
                           text=True, check=True)
        out[path] = r.stdout.strip().split("=", 1)[1]
    return out


def run_scan(size: int, repeat: int, sample: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cert-scan-") as d:
        start = time.perf_counter()
        files, secrets = make_certificates(Path(d), size)
        made = time.perf_counter() - start
        seconds, report = timed(lambda: project(files, secrets), repeat=repeat)
        leaves = len(report.leaves)
        assert len(report.entries) == size, (len(report.entries), size)
        assert all(e.chain == "verified" for e in report.leaves)
        picked = random.Random(1).sample(files, min(sample, len(files)))
        start = time.perf_counter()
        ends = baseline(picked)
        per_cert = (time.perf_counter() - start) / len(picked)
        by_place = {p.split(":", 1)[1]: e for e in report.entries for p in e.places if p.startswith("bench:")}
        for path, end in ends.items():
            want = dt.datetime.strptime(end.replace("  ", " "), "%b %d %H:%M:%S %Y GMT").replace(tzinfo=dt.UTC)
            assert by_place[str(path)].cert.not_after == want, path
        emit("cert-scan", size, seconds=seconds, baseline_seconds=per_cert * size, baseline_sample=len(picked),
             certificates=len(report.entries), leaves=leaves, findings=len(report.findings), files=len(files),
             secrets=len(secrets), generate_seconds=round(made, 1), peak_rss_mb=peak_rss_mb())


def run_endpoints(count: int, hung: int, timeout_s: float) -> None:
    from sandbox import pki
    from sandbox._common import free_port
    from tasks.tls import EndpointTarget, probe_endpoints

    with tempfile.TemporaryDirectory(prefix="cert-endpoints-") as d:
        folder = Path(d)
        ca = pki.issue("bench-ca", is_ca=True)
        leaf = pki.issue("bench.internal", issuer=ca, dns=("bench.internal",), usages=("server",))
        pki.write_pair(leaf, folder / "leaf.crt", folder / "leaf.key")
        specs, ports = [], set()
        while len(ports) < count:  # free_port() may hand out a port twice in a row
            ports.add(free_port())
        for n, port in enumerate(sorted(ports)):
            if n < hung:
                specs.append({"name": f"hung-{n}", "port": port, "kind": "hung"})
            else:
                specs.append({"name": f"tls-{n}", "port": port, "cert": str(folder / "leaf.crt"),
                              "key": str(folder / "leaf.key")})
        (folder / "spec.json").write_text(json.dumps(specs))
        proc = subprocess.Popen([sys.executable, "-m", "sandbox.tls_listeners", "--spec", str(folder / "spec.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            first = proc.stdout.readline()
            assert "tls listeners" in first, first + proc.stdout.read()[-2000:]
            targets = [EndpointTarget(s["name"], "127.0.0.1", s["port"], "bench.internal") for s in specs]
            start = time.perf_counter()
            result = asyncio.run(probe_endpoints(targets, timeout_s=timeout_s))
            seconds = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(10)
        timeouts = [p for p in result.problems if p.kind == "timeout"]
        served = {s.where for s in result.sightings}
        assert len(timeouts) == hung and len(served) == count - hung, (len(timeouts), len(served), result.problems[:3])
        emit("cert-scan-endpoints", count, seconds=seconds, timeout_s=timeout_s, hung=hung,
             limit_seconds=2 * timeout_s, within_limit=seconds <= 2 * timeout_s, chains_read=len(served))


def run(size: int | None = None, repeat: int = 5, extra: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cert-scan")
    parser.add_argument("--baseline-sample", type=int, default=300)
    parser.add_argument("--endpoints", type=int, default=None)
    parser.add_argument("--hung", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(extra or [])
    if args.endpoints:
        run_endpoints(args.endpoints, args.hung, args.timeout)
        if size is None:
            return
    run_scan(size or 10_000, max(1, repeat), args.baseline_sample)
