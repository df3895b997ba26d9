"""The artifact store in an object store (`s3://`, `gs://`): teachers trained once by nodes that share
no disk.

Objects are read and written through `pyarrow.fs` (the layer Ray Tune's own storage uses). A node
keeps a verified local copy of what it reads (`Fetched.path` is always a local file), in a mirror
under the node's temp folder, so a memory-mapped image array or `torch.load` works as on a disk.

Publishing is atomic without a rename: the artifact object is written first, then its SHA-256
sidecar; an artifact counts as published only once its sidecar exists, and a reader verifies the
bytes against it.

Exactly-once without `flock`: before building, a node takes a **lease**, an object created with a
conditional put (`If-None-Match: *`), which the store lets exactly one writer create. Leases come
in generations (`leases/<name>/<n>`): a holder renews its lease by rewriting it while it works and
marks it released when done; a lease not renewed for `lease_ttl` seconds (its holder died) is
taken over by creating generation n + 1, which again only one contender can create. So a dead
node blocks the others for at most `lease_ttl` seconds, and no two live nodes build at once. The
conditional create needs the S3 API (boto3); on `gs://` the lease is create-if-absent checked by
reading it back, which narrows but does not close the race (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from sall.errors import SallError
from sall.store import Fetched, sha256_file

SCHEMES = ("s3", "gs")
LEASE_TTL_S = float(os.environ.get("SALL_LEASE_TTL_S", "30"))  # a dead holder blocks others this long
_POLL_S = 1.0


def is_object_uri(location: str) -> bool:
    """An object-store URI (`s3://`, `gs://`) rather than a local folder."""
    return urllib.parse.urlsplit(str(location)).scheme in SCHEMES


def _endpoint(query: dict[str, list[str]]) -> str | None:
    """The S3 endpoint: the URI's `endpoint_override` (with its `scheme`), else AWS_ENDPOINT_URL."""
    if "endpoint_override" in query:
        ep = query["endpoint_override"][0]
        if "://" not in ep:
            ep = f"{query.get('scheme', ['https'])[0]}://{ep}"
        return ep
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class ObjectStore:
    """Content-addressed artifacts under an object-store prefix: `<uri>/<kind>/<key><suffix>`."""

    def __init__(self, uri: str, lease_ttl: float | None = None) -> None:
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        parts = urllib.parse.urlsplit(self.uri)
        self.scheme = parts.scheme
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        query = urllib.parse.parse_qs(parts.query)
        self.endpoint = _endpoint(query)
        self.lease_ttl = LEASE_TTL_S if lease_ttl is None else lease_ttl
        try:
            if self.scheme == "s3":
                self.fs = pafs.S3FileSystem(
                    endpoint_override=self.endpoint,
                    region=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
                    connect_timeout=5,
                    request_timeout=60,
                    retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
                )
            else:
                self.fs, _ = pafs.FileSystem.from_uri(self.uri)
        except Exception as e:  # an unsupported build of pyarrow, a malformed URI
            raise SallError(f"cache '{uri}' cannot be opened ({_first_line(e)}); expected s3://bucket/prefix") from None
        self.base = "/".join(x for x in (self.bucket, self.prefix) if x)
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        self.mirror = Path(tempfile.gettempdir()) / "sall-store-mirror" / digest
        self._s3 = None

    def __repr__(self) -> str:
        return f"ObjectStore({self.uri!r})"

    # ------------------------------------------------------------------------------ objects
    def _key(self, kind: str, key: str, suffix: str) -> str:
        return f"{self.base}/{kind}/{key}{suffix}"

    def _info(self, path: str):
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(path)
        return info if info.type == pafs.FileType.File else None

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _download(self, path: str, dest: Path) -> None:
        with self.fs.open_input_stream(path) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)

    def _upload(self, src: Path, path: str) -> None:
        with open(src, "rb") as f, self.fs.open_output_stream(path) as out:
            while chunk := f.read(1 << 22):
                out.write(chunk)

    def exists(self, kind: str, key: str, suffix: str) -> bool:
        """Published: the sidecar, written last, exists."""
        return self._info(self._key(kind, key, suffix) + ".sha256") is not None

    def remove(self, kind: str, key: str, suffix: str) -> None:
        obj = self._key(kind, key, suffix)
        for p in (obj + ".sha256", obj):  # unpublish first
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.delete_file(p)
        (self.mirror / kind / f"{key}{suffix}").unlink(missing_ok=True)

    def check(self) -> None:
        """Write, read back and delete a probe object: one line on an unreachable endpoint, a missing
        bucket or refused credentials, before any work starts."""
        probe = f"{self.base}/.write-test-{uuid.uuid4().hex}"
        try:
            if self.scheme == "s3":
                self._s3_client().head_bucket(Bucket=self.bucket)
            self._write(probe, b"ok")
            ok = self._read(probe) == b"ok"
            self.fs.delete_file(probe)
        except Exception as e:
            raise SallError(f"cache '{self.uri}' {_s3_problem(e, self.endpoint)}") from None
        if not ok:
            raise SallError(f"cache '{self.uri}' returned other bytes than were written to it")

    # ------------------------------------------------------------------------------ artifacts
    def _local(self, kind: str, key: str, suffix: str) -> Path:
        return self.mirror / kind / f"{key}{suffix}"

    def _fetch(self, kind: str, key: str, suffix: str) -> Fetched | None:
        """The published artifact as a verified local copy; None if it is not published (or its
        bytes do not match its sidecar, which is then removed so the artifact is built again)."""
        obj = self._key(kind, key, suffix)
        side = self._info(obj + ".sha256")
        if side is None:
            return None
        expected = self._read(obj + ".sha256").decode().strip()
        local = self._local(kind, key, suffix)
        if local.exists() and _sidecar(local) == expected:
            return Fetched(local, built=False, mtime=side.mtime.timestamp(), sha256=expected)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        try:
            self._download(obj, tmp)
            if sha256_file(tmp) != expected:
                print(f"warning: cache entry {obj} is corrupt (checksum mismatch); rebuilding it", file=sys.stderr)
                self.remove(kind, key, suffix)
                return None
            local.with_name(local.name + ".sha256").write_text(expected + "\n")
            os.replace(tmp, local)
        except FileNotFoundError:  # removed meanwhile (a corrupt entry another node found)
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return Fetched(local, built=False, mtime=side.mtime.timestamp(), sha256=expected)

    def _publish(self, kind: str, key: str, suffix: str, built: Path) -> Fetched:
        """Object first, then its checksum: a reader never sees a half-written artifact."""
        digest = sha256_file(built)
        obj = self._key(kind, key, suffix)
        self._upload(built, obj)
        self._write(obj + ".sha256", (digest + "\n").encode())
        local = self._local(kind, key, suffix)
        local.with_name(local.name + ".sha256").write_text(digest + "\n")
        os.replace(built, local)
        return Fetched(local, built=True, mtime=time.time(), sha256=digest)

    def get_or_build(self, kind: str, key: str, suffix: str, build: Callable[[Path], None]) -> Fetched:
        """The artifact, built once across every node that uses this store (under a lease)."""
        if got := self._fetch(kind, key, suffix):
            return got
        with self.exclusive(f"{kind}-{key}"):
            if got := self._fetch(kind, key, suffix):  # built by the holder we waited for
                return got
            t0 = time.time()
            local = self._local(kind, key, suffix)
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
            try:
                build(tmp)
                got = self._publish(kind, key, suffix, tmp)
            finally:
                tmp.unlink(missing_ok=True)
            got.seconds = time.time() - t0
            return got

    def fetch(self, kind: str, key: str, suffix: str) -> Fetched | None:
        """The published, verified artifact (as a local copy), or None."""
        return self._fetch(kind, key, suffix)

    def put(self, kind: str, key: str, suffix: str, write: Callable[[Path], None]) -> Fetched:
        """Publish or replace an artifact, without a lease: for data one writer owns (a checkpoint)."""
        local = self._local(kind, key, suffix)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        try:
            write(tmp)
            self.remove(kind, key, suffix)  # unpublished while it is replaced
            return self._publish(kind, key, suffix, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ leases
    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold the lease `name` for the body: at most one live holder across every node."""
        lease = Lease(self, name)
        lease.acquire()
        try:
            yield
        finally:
            lease.release()

    def _s3_client(self):
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            self._s3 = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                config=Config(
                    connect_timeout=5,
                    read_timeout=30,
                    retries={"max_attempts": 3},
                    # checksums only where the API requires them: S3-compatible stores such as Ceph 16
                    # reject the CRC trailers boto3 sends by default
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        return self._s3

    def create_once(self, path: str, data: bytes) -> bool:
        """Create the object only if it does not exist; True if this call created it."""
        if self.scheme == "s3":
            from botocore.exceptions import ClientError

            bucket, _, key = path.partition("/")
            try:
                self._s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        if self._info(path) is not None:  # gs://: create if absent, then read back who won
            return False
        self._write(path, data)
        return self._read(path) == data

    def list_names(self, directory: str) -> list[str]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(directory, allow_not_found=True)
        return [i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]


class Lease:
    """One holder at a time for a name, across nodes, that expires when its holder stops renewing."""

    def __init__(self, store: ObjectStore, name: str) -> None:
        self.store, self.name = store, name
        self.dir = f"{store.base}/leases/{name}"
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.path: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self, ttl: float) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + ttl}).encode()

    def _current(self) -> tuple[int, dict | None]:
        """(generation, record) of the newest lease; (0, None) when there is none."""
        gens = [int(n) for n in self.store.list_names(self.dir) if n.isdigit()]
        if not gens:
            return 0, None
        g = max(gens)
        try:
            return g, json.loads(self.store._read(f"{self.dir}/{g:08d}"))
        except (FileNotFoundError, ValueError):
            return g, {"expires": time.time() + 1}  # being written: read it again shortly

    def acquire(self) -> None:
        """Take the lease: create the next generation once the current one is released or expired."""
        waited_for = None
        while True:
            g, rec = self._current()
            if rec is None or rec["expires"] < time.time():
                path = f"{self.dir}/{g + 1:08d}"
                if self.store.create_once(path, self._record(self.store.lease_ttl)):
                    self.path = path
                    self._start_renewing()
                    return
                continue
            if waited_for != rec.get("holder"):
                waited_for = rec.get("holder")
                print(f"[store] waiting for {self.name}, held by {waited_for}", file=sys.stderr, flush=True)
            time.sleep(_POLL_S)

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.store.lease_ttl / 3):
                with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                    self.store._write(self.path, self._record(self.store.lease_ttl))

        self._renewer = threading.Thread(target=renew, name=f"lease-{self.name}", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Stop renewing and mark the lease expired, so the next contender need not wait."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with contextlib.suppress(Exception):
            self.store._write(self.path, self._record(-1))


def _sidecar(local: Path) -> str:
    side = local.with_name(local.name + ".sha256")
    return side.read_text().strip() if side.exists() else ""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _s3_problem(e: BaseException, endpoint: str | None) -> str:
    """What is wrong with an object store, in words, from the client's exception."""
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""
    text = f"{code} {e}"
    where = endpoint or "the default AWS endpoint"
    if any(s in text for s in ("Could not connect", "Couldn't connect", "NETWORK_CONNECTION", "connect timeout")):
        return f"cannot be reached at {where} ({_first_line(e)}); expected a running S3 endpoint (AWS_ENDPOINT_URL)"
    if code in ("NoSuchBucket", "404") or "NoSuchBucket" in text:
        return f"names a bucket that does not exist at {where}; expected an existing bucket"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or "ACCESS_DENIED" in text:
        return (
            f"refused the credentials ({code or _first_line(e)}) at {where}; expected valid "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY with write access"
        )
    return f"cannot be written ({_first_line(e)}); expected a writable object-store prefix"
