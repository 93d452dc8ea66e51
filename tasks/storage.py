"""The backup store (a local directory or an S3-compatible bucket) and streaming copies into it.

A copy is one pass over the source: each chunk updates a SHA-256, feeds a tar verifier when the
file is an archive, and goes to a sink. Nothing holds a whole file in memory (S3 parts are
`PART_SIZE` bytes, at most `PARTS_IN_FLIGHT` at a time). A sink only makes the copy visible
after it is verified:

- `LocalFileSink` writes `NAME.part`, fsyncs, re-reads it and compares the SHA-256, then renames;
- `S3Sink` uploads parts with Content-MD5 (multipart above one part), then compares the object's
  ETag (the MD5 of the part MD5s) and size with what was sent; a mismatch deletes the new object.

A failed copy leaves nothing behind and never touches an object that existed before.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, AsyncIterable, Awaitable, Callable, Iterable, Iterator

from prefect import task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES

CHUNK = 4 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 2


class VerificationError(RuntimeError):
    """A copy or an archive failed its check (checksum, size, tar structure). Never retried."""


class ChecksumMismatch(VerificationError):
    pass


# --- tar, streamed ------------------------------------------------------------------------------


class TarStreamVerifier:
    """Checks a tar archive fed chunk by chunk: header checksums, member sizes, the end marker.

    Keeps every member's (name, size) and captures the content of members named in `capture`
    (small files such as ``backup_information.yml``). `finish()` raises `VerificationError`
    when the stream ended inside a member or without the end-of-archive blocks.
    """

    def __init__(self, capture: Iterable[str] = (), capture_limit: int = 1 << 20):
        self.capture = set(capture)
        self.capture_limit = capture_limit
        self.members: list[tuple[str, int]] = []
        self.captured: dict[str, bytes] = {}
        self._hdr = bytearray()
        self._left = 0  # data bytes (with padding) of the current member still to come
        self._data_left = 0  # data bytes without padding
        self._sink: bytearray | None = None
        self._sink_name: str | None = None
        self._special: str | None = None  # 'L' (GNU long name) or 'x' (pax) header in progress
        self._next_name: str | None = None
        self._next_size: int | None = None
        self._zeros = 0
        self.ended = False
        self.offset = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        pos, n = 0, len(view)
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                if self._sink is not None and self._data_left > 0:
                    keep = min(take, self._data_left)
                    if len(self._sink) + keep <= self.capture_limit:
                        self._sink += view[pos:pos + keep]
                    self._data_left -= keep
                elif self._data_left > 0:
                    self._data_left -= min(take, self._data_left)
                self._left -= take
                pos += take
                self.offset += take
                if not self._left:
                    self._member_done()
                continue
            take = min(512 - len(self._hdr), n - pos)
            self._hdr += view[pos:pos + take]
            pos += take
            self.offset += take
            if len(self._hdr) == 512:
                block, self._hdr = bytes(self._hdr), bytearray()
                self._header(block)

    def _header(self, block: bytes) -> None:
        if self.ended:
            if block.strip(b"\0"):
                raise VerificationError(f"data after the end-of-archive marker at byte {self.offset - 512}")
            return
        if not block.strip(b"\0"):
            self._zeros += 1
            self.ended = self._zeros >= 2
            return
        if self._zeros:
            raise VerificationError(f"a lone zero block before byte {self.offset - 512}: archive is damaged")
        stored = block[148:156].split(b"\0", 1)[0].strip()
        try:
            expected = int(stored or b"x", 8)
        except ValueError:
            raise VerificationError(f"not a tar header at byte {self.offset - 512}") from None
        actual = sum(block[:148]) + 8 * 32 + sum(block[156:])
        if actual != expected:
            raise VerificationError(f"bad tar header checksum at byte {self.offset - 512}: the archive is corrupt")
        size = _tar_size(block[124:136])
        kind = chr(block[156]) if block[156] else "0"
        name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if block[257:262] == b"ustar" and block[345] and kind not in "LKx":
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix and block[257:263] == b"ustar\0":
                name = f"{prefix}/{name}"
        if kind in "LKxg":
            self._special = kind
            self._sink, self._sink_name = bytearray(), None
        else:
            if self._next_name:
                name = self._next_name
            if self._next_size is not None:
                size = self._next_size
            self._next_name, self._next_size = None, None
            if kind in "12346":  # links, devices, fifos carry no data
                size = 0
            self._special = None
            self.members.append((name, size))
            self._sink, self._sink_name = (bytearray(), name) if name in self.capture else (None, None)
        self._data_left = size
        self._left = -(-size // 512) * 512
        if not self._left:
            self._member_done()

    def _member_done(self) -> None:
        if self._special == "L" and self._sink is not None:
            self._next_name = bytes(self._sink).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif self._special == "x" and self._sink is not None:
            for key, value in _pax_records(bytes(self._sink)):
                if key == "path":
                    self._next_name = value
                elif key == "size":
                    self._next_size = int(value)
        elif self._sink is not None and self._sink_name is not None:
            self.captured[self._sink_name] = bytes(self._sink)
        self._special, self._sink, self._sink_name = None, None, None

    def finish(self) -> None:
        if self._left or self._hdr and not self.ended:
            where = self.members[-1][0] if self.members else "the first header"
            raise VerificationError(f"the archive is truncated: it ends inside {where} at byte {self.offset}")
        if not self.ended:
            raise VerificationError(f"the archive has no end-of-archive marker (ends at byte {self.offset}): "
                                    "it is truncated")
        if not self.members:
            raise VerificationError("the archive is empty")


def _tar_size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256
        value = field[0] & 0x3F
        for b in field[1:]:
            value = (value << 8) | b
        return value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise VerificationError(f"bad size field {text!r} in a tar header") from None


def _pax_records(data: bytes) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            return
        length = int(data[pos:space])
        record = data[space + 1:pos + length - 1].decode("utf-8", "replace")
        key, _, value = record.partition("=")
        yield key, value
        pos += length


# --- sinks -------------------------------------------------------------------------------------


@dataclass
class CopyResult:
    name: str
    size: int
    sha256: str
    location: str
    seconds: float = 0.0
    members: list[tuple[str, int]] = field(default_factory=list)
    captured: dict[str, bytes] = field(default_factory=dict)


class Sink:
    location = ""

    def write(self, chunk: bytes) -> None:
        raise NotImplementedError

    def commit(self, size: int, sha256: str) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass


class NullSink(Sink):
    """Reads and verifies without keeping a copy."""

    location = "(verified in place)"

    def write(self, chunk: bytes) -> None:
        pass

    def commit(self, size: int, sha256: str) -> None:
        pass


class LocalFileSink(Sink):
    def __init__(self, path: Path, mode: int = 0o600):
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.location = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        self._f = os.fdopen(fd, "wb", buffering=0)

    def write(self, chunk: bytes) -> None:
        self._f.write(chunk)

    def commit(self, size: int, sha256: str) -> None:
        os.fsync(self._f.fileno())
        self._f.close()
        got_size, got_sha = file_sha256(self.part)
        if (got_size, got_sha) != (size, sha256):
            self.abort()
            raise ChecksumMismatch(f"copy at {self.path} reads back as {got_size} bytes sha256 {got_sha[:12]}..., "
                                   f"sent {size} bytes sha256 {sha256[:12]}...; the copy was removed")
        os.replace(self.part, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.part.unlink(missing_ok=True)


class S3Sink(Sink):
    """Multipart upload (single PUT below one part), each part with Content-MD5; ETag checked at the end."""

    def __init__(self, client: Any, bucket: str, key: str, part_size: int = PART_SIZE, encrypt: bool = False):
        self.client, self.bucket, self.key, self.part_size = client, bucket, key, part_size
        # server-side encryption with S3-managed keys (SSE-S3, `x-amz-server-side-encryption: AES256`)
        self._sse = {"ServerSideEncryption": "AES256"} if encrypt else {}
        self.location = f"s3://{bucket}/{key}"
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future] = []
        self._md5s: list[bytes] = []
        self._pool: ThreadPoolExecutor | None = None

    def write(self, chunk: bytes) -> None:
        self._buf += chunk
        while len(self._buf) >= self.part_size:
            part = bytes(self._buf[:self.part_size])
            del self._buf[:self.part_size]
            self._queue_part(part)

    def _queue_part(self, data: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                                  **self._sse)["UploadId"]
            self._pool = ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="s3-part")
        while sum(not f.done() for f in self._parts) >= PARTS_IN_FLIGHT:
            next(f for f in self._parts if not f.done()).result()
        md5 = hashlib.md5(data).digest()
        self._md5s.append(md5)
        number = len(self._md5s)
        self._parts.append(self._pool.submit(self._send_part, number, data, md5))

    def _send_part(self, number: int, data: bytes, md5: bytes) -> dict:
        r = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number,
                                    Body=data, ContentMD5=base64.b64encode(md5).decode())
        return {"PartNumber": number, "ETag": r["ETag"]}

    def commit(self, size: int, sha256: str) -> None:
        try:
            if self._upload_id is None:
                data = bytes(self._buf)
                md5 = hashlib.md5(data).digest()
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                       ContentMD5=base64.b64encode(md5).decode(), Metadata={"sha256": sha256},
                                       **self._sse)
                expected_etag = md5.hex()
            else:
                if self._buf:
                    self._queue_part(bytes(self._buf))
                    self._buf = bytearray()
                parts = [f.result() for f in self._parts]
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                                                      MultipartUpload={"Parts": parts})
                self._upload_id = None
                expected_etag = f"{hashlib.md5(b''.join(self._md5s)).hexdigest()}-{len(self._md5s)}"
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except BaseException:
            self.abort()
            raise
        finally:
            if self._pool:
                self._pool.shutdown(wait=True)
        etag = head["ETag"].strip('"')
        if self._sse and head.get("ServerSideEncryption") != "AES256":
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
            raise VerificationError(f"{self.location} was stored without server-side encryption although it was "
                                    "asked for; the object was removed")
        if etag != expected_etag or head["ContentLength"] != size:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
            raise ChecksumMismatch(
                f"{self.location} holds {head['ContentLength']} bytes with ETag {etag}, sent {size} bytes with ETag "
                f"{expected_etag}: the upload was damaged and the object was removed")

    def abort(self) -> None:
        for f in self._parts:
            f.cancel()
        if self._pool:
            self._pool.shutdown(wait=True)
        if self._upload_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            except Exception:  # noqa: BLE001 - best effort: an unfinished upload is not an object
                pass
            self._upload_id = None


# --- the one-pass copy ---------------------------------------------------------------------------


class _Pass:
    def __init__(self, name: str, sink: Sink, verifier: TarStreamVerifier | None):
        self.name, self.sink, self.verifier = name, sink, verifier
        self.sha = hashlib.sha256()
        self.size = 0
        self.start = time.monotonic()

    def chunk(self, data: bytes) -> None:
        self.sha.update(data)
        if self.verifier is not None:
            self.verifier.feed(data)
        self.size += len(data)

    def done(self) -> CopyResult:
        digest = self.sha.hexdigest()
        if self.verifier is not None:
            self.verifier.finish()
        self.sink.commit(self.size, digest)
        v = self.verifier
        return CopyResult(self.name, self.size, digest, self.sink.location, time.monotonic() - self.start,
                          v.members if v else [], v.captured if v else {})


def copy_stream(name: str, chunks: Iterable[bytes], sink: Sink,
                verifier: TarStreamVerifier | None = None) -> CopyResult:
    """Hash, verify and write `chunks` to `sink` in one pass; the sink is aborted on any failure."""
    p = _Pass(name, sink, verifier)
    try:
        for data in chunks:
            p.chunk(data)
            sink.write(data)
        return p.done()
    except BaseException:
        sink.abort()
        raise


async def copy_stream_async(name: str, chunks: AsyncIterable[bytes], sink: Sink,
                            verifier: TarStreamVerifier | None = None,
                            on_progress: Callable[[int], Awaitable[None]] | None = None) -> CopyResult:
    """`copy_stream` for an async source (SFTP); hashing, verifying and the sink's write of a chunk run in a
    thread, one chunk at a time and in order, while the next chunk is received (hashlib releases the GIL on
    large buffers). `on_progress(bytes_so_far)` is awaited after each chunk (it throttles itself)."""
    p = _Pass(name, sink, verifier)
    pending = None

    def step(data: bytes) -> None:
        p.chunk(data)
        sink.write(data)
    try:
        async for data in chunks:
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(asyncio.to_thread(step, data))
            if on_progress is not None:
                await on_progress(p.size)
        if pending is not None:
            await pending
        return await asyncio.to_thread(p.done)
    except BaseException:
        if pending is not None and not pending.done():
            try:
                await pending
            except BaseException:  # noqa: BLE001
                pass
        await asyncio.to_thread(sink.abort)
        raise


def file_chunks(path: Path, chunk_size: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(chunk_size):
            yield chunk


def file_sha256(path: Path, chunk_size: int = CHUNK) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    for chunk in file_chunks(path, chunk_size):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


# --- the store -----------------------------------------------------------------------------------


class Store:
    """A `BackupStore` block's operations, keyed by paths relative to the store's prefix."""

    def __init__(self, block: Any, timeout_s: float = 60.0):
        self.block = block
        self.kind = block.kind
        self.prefix = block.prefix.strip("/") + "/" if block.prefix.strip("/") else ""
        self._client = block.get_s3_client(timeout_s) if self.kind == "s3" else None
        self._root = block.local_dir() if self.kind == "local" else None

    def _key(self, rel: str) -> str:
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"store key {rel!r} must be relative without '..'")
        return self.prefix + str(path)

    def describe(self, rel: str) -> str:
        return f"s3://{self.block.bucket}/{self._key(rel)}" if self.kind == "s3" else str(self._root / self._key(rel))

    def sink(self, rel: str, encrypt: bool = False) -> Sink:
        """A sink for `rel`; `encrypt` asks for server-side encryption where the store offers it (S3:
        SSE-S3); a local store keeps every copy 0600 either way."""
        if self.kind == "s3":
            return S3Sink(self._client, self.block.bucket, self._key(rel), encrypt=encrypt)
        return LocalFileSink(self._root / self._key(rel))

    def encryption(self, rel: str) -> str | None:
        """The server-side encryption an object is stored with (S3), or None."""
        if self.kind != "s3":
            return None
        return self._client.head_object(Bucket=self.block.bucket, Key=self._key(rel)).get("ServerSideEncryption")

    def chunks(self, rel: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        if self.kind == "s3":
            body = self._client.get_object(Bucket=self.block.bucket, Key=self._key(rel))["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()
        else:
            yield from file_chunks(self._root / self._key(rel), chunk_size)

    def size(self, rel: str) -> int | None:
        if self.kind == "s3":
            try:
                return self._client.head_object(Bucket=self.block.bucket, Key=self._key(rel))["ContentLength"]
            except self._client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        p = self._root / self._key(rel)
        return p.stat().st_size if p.exists() else None

    def read_json(self, rel: str) -> Any:
        return json.loads(b"".join(self.chunks(rel)))

    def write_json(self, rel: str, data: Any) -> str:
        body = json.dumps(data, indent=2, sort_keys=True).encode()
        copy_stream(rel, [body], self.sink(rel))
        return self.describe(rel)

    def list(self, rel_prefix: str) -> list[str]:
        """Every key under `rel_prefix`, relative to the store prefix."""
        if self.kind == "s3":
            out, token = [], None
            while True:
                kw = {"Bucket": self.block.bucket, "Prefix": self._key(rel_prefix)}
                if token:
                    kw["ContinuationToken"] = token
                page = self._client.list_objects_v2(**kw)
                out += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    return out
                token = page["NextContinuationToken"]
        base = self._root / self._key(rel_prefix)
        if not base.exists():
            return []
        root = self._root / self.prefix if self.prefix else self._root
        return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file()
                      and not p.name.endswith(".part"))

    def delete(self, rels: list[str]) -> None:
        if not rels:
            return
        if self.kind == "s3":
            for i in range(0, len(rels), 1000):
                batch = [{"Key": self._key(r)} for r in rels[i:i + 1000]]
                r = self._client.delete_objects(Bucket=self.block.bucket, Delete={"Objects": batch, "Quiet": True})
                if r.get("Errors"):
                    raise RuntimeError(f"the store refused to delete {len(r['Errors'])} objects: "
                                       f"{r['Errors'][0].get('Message')}")
            return
        for r in rels:
            (self._root / self._key(r)).unlink(missing_ok=True)


@task(name="list-offsite-manifests", cache_policy=NONE, timeout_seconds=300, **TRANSIENT_RETRIES)
async def list_offsite_manifests(store: Store, kind: str) -> list[dict]:
    """Every manifest stored off-site for backups of `kind` ('data' or 'config')."""
    return await asyncio.to_thread(_list_manifests, store, kind)


def _list_manifests(store: Store, kind: str) -> list[dict]:
    keys = [k for k in store.list(f"{kind}/") if k.endswith("/manifest.json")]
    return [store.read_json(k) for k in keys]


@task(name="delete-offsite-backups", cache_policy=NONE, timeout_seconds=600, **TRANSIENT_RETRIES)
async def delete_offsite_backups(store: Store, kind: str, backup_ids: list[str],
                                 apart: tuple[str, ...] = ()) -> list[str]:
    """Delete whole backups (every object under `<kind>/<id>/`, and under `<p>/<kind>/<id>/` for each prefix
    `p` in `apart`, where files kept apart from the data live), the manifest last."""
    return await asyncio.to_thread(_delete_backups, store, kind, backup_ids, apart)


def _delete_backups(store: Store, kind: str, backup_ids: list[str], apart: tuple[str, ...] = ()) -> list[str]:
    deleted = []
    for backup_id in backup_ids:
        keys = [k for p in apart for k in store.list(f"{p}/{kind}/{backup_id}/")] + store.list(f"{kind}/{backup_id}/")
        manifest = [k for k in keys if k.endswith("/manifest.json")]
        store.delete([k for k in keys if k not in manifest])
        store.delete(manifest)
        deleted += keys
    return deleted


@task(name="write-offsite-manifest", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def write_offsite_manifest(store: Store, kind: str, backup_id: str, manifest: dict) -> str:
    """The manifest goes last: its presence is what marks an off-site backup complete."""
    return await asyncio.to_thread(store.write_json, f"{kind}/{backup_id}/manifest.json", manifest)


@task(name="read-offsite-manifest", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def read_offsite_manifest(store: Store, kind: str, backup_id: str) -> dict | None:
    """The manifest of one off-site backup, or None when there is none (the backup is not complete there)."""
    rel = f"{kind}/{backup_id}/manifest.json"

    def read() -> dict | None:
        return store.read_json(rel) if store.size(rel) is not None else None

    return await asyncio.to_thread(read)
