"""Real TLS listeners on loopback serving the sandbox's certificates, and hung ones.

    python -m sandbox.tls_listeners --spec listeners.json

One asyncio process serves every listener of the spec (a JSON list), each on 127.0.0.1:<port>:

- ``{"name", "port", "cert", "key", "chain": [...], "kind": "tls"}``: a TLS server presenting `cert`
  (then `chain`, the intermediates, as servers send them) to any client;
- ``"sni": {"host": {"cert", "key", "chain"}}``: per-SNI certificates, as an ingress controller serves its
  Ingress TLS secrets; a name it does not know gets `cert` (ingress-nginx's default, the self-signed
  "Kubernetes Ingress Controller Fake Certificate", `internal/net/ssl/ssl.go`);
- ``"http": true``: answers HTTP after the handshake: ``GET /readyz`` -> 200 ``ok`` as kube-apiserver does
  for anonymous clients (the `system:public-info-viewer` role; kubespray `kube_api_anonymous_auth: true`),
  500 while the file `fault` exists;
- ``"client_ca"``: asks for a client certificate signed by that CA, as etcd does with
  `--client-cert-auth=true` (a client without one still sees the served chain under TLS 1.3);
- ``"manifest"``: models a static pod: the listener is up only while that file exists (the kubelet stops
  the pod when its manifest leaves `/etc/kubernetes/manifests` and starts it again, reading its
  certificate files anew, when it comes back: kubeadm docs *Certificate Management with kubeadm*,
  "Manual certificate renewal");
- ``"kind": "hung"``: accepts connections and never answers (a wedged peer: the check must time out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
from pathlib import Path
from typing import Any

POLL_S = 0.2  # how often a static pod's manifest is looked at (the kubelet's fileCheckFrequency is 20 s)


def _context(spec: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # serve weak (RSA-1024, SHA-1) certificates too: they exist
    ctx.load_cert_chain(_bundle(spec), spec["key"])
    if spec.get("client_ca"):
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(spec["client_ca"])
    return ctx


def _bundle(spec: dict[str, Any]) -> str:
    """The certificate file followed by its chain, as one file (ssl wants them together)."""
    chain = spec.get("chain") or []
    if not chain:
        return spec["cert"]
    out = Path(spec["cert"] + ".served-bundle")
    out.write_bytes(b"".join(Path(p).read_bytes() for p in [spec["cert"], *chain]))
    return str(out)


class Listener:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.server: asyncio.AbstractServer | None = None

        self.pod: tuple[int, int] | None = None  # the manifest file the running "pod" was started from

    def manifest(self) -> tuple[int, int] | None:
        """(inode, mtime) of the static pod's manifest, None when it is not in the manifests folder."""
        try:
            st = Path(self.spec["manifest"]).stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    async def start(self) -> None:
        if self.spec.get("kind") == "hung":
            self.server = await asyncio.start_server(self._hang, "127.0.0.1", self.spec["port"], reuse_address=True)
            return
        ctx = _context(self.spec)
        if self.spec.get("sni"):
            named = {host: _context({**self.spec, **s, "client_ca": None}) for host, s in self.spec["sni"].items()}

            def pick(sslobj, server_name, _ctx):
                if server_name in named:
                    sslobj.context = named[server_name]

            ctx.sni_callback = pick
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.spec["port"], ssl=ctx,
                                                 reuse_address=True, ssl_handshake_timeout=10)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until the client gives up
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self.spec.get("http"):
                await asyncio.wait_for(reader.read(1), 30)
                return
            line = await asyncio.wait_for(reader.readline(), 30)
            while (await asyncio.wait_for(reader.readline(), 30)) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split()[1].decode() if len(line.split()) > 1 else "/"
            fault = self.spec.get("fault")
            if path.startswith(("/readyz", "/livez")):
                ok = not (fault and Path(fault).exists())
                status, body = ("200 OK", b"ok") if ok else ("500 Internal Server Error",
                                                             b"[-]etcd failed: reason withheld\nreadyz check failed")
            else:
                status, body = "404 Not Found", b"404 page not found\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ssl.SSLError, IndexError):
            pass
        finally:
            writer.close()


async def serve(specs: list[dict[str, Any]]) -> None:
    listeners = [Listener(s) for s in specs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for lst in listeners:
        if lst.spec.get("manifest") is None:
            await lst.start()
    print(f"tls listeners: {len(listeners)}", flush=True)
    while not stop.is_set():  # the kubelet's loop over static pod manifests
        for lst in listeners:
            if lst.spec.get("manifest") is None:
                continue
            pod = lst.manifest()
            if pod is None and lst.server is not None:  # manifest gone: the kubelet stops the pod
                await lst.stop()
            elif pod is not None and (lst.server is None or pod != lst.pod):  # (re)start, reading certs anew
                await lst.stop()
                try:
                    await lst.start()
                    lst.pod = pod
                except (OSError, ssl.SSLError) as exc:  # a broken certificate: the pod crash-loops
                    print(f"{lst.spec['name']}: cannot start: {exc}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), POLL_S)
        except TimeoutError:
            pass
    for lst in listeners:
        await lst.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.tls_listeners")
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args()
    asyncio.run(serve(json.loads(args.spec.read_text())))


if __name__ == "__main__":
    main()
