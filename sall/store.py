"""The artifact store: cached teachers, logits and image arrays, shared by every trial and node.

Artifacts are named by a hash of what they depend on. `get_or_build` takes a lock file next to
the artifact (on the shared `--cache-dir`, so it holds across processes and nodes), so two trials
that need the same artifact at once build it once. Writes go to a temporary file that is renamed
into place, with a SHA-256 sidecar written first: a half-written artifact is never read, and a
corrupt one is detected, reported and rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from filelock import FileLock

from sall.errors import SallError

# A full disk, a quota, a file-size limit: one clear error instead of a traceback.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

# (path, inode, size, mtime) of artifacts whose checksum this process has verified
_VERIFIED: set[tuple[str, int, int, int]] = set()

# Tests only: called between writing the temporary file and renaming it into place.
_BEFORE_RENAME: Callable[[Path], None] | None = None


def _mkdir(path: Path) -> None:
    """mkdir -p that survives another process's store check removing the (then empty) root meanwhile."""
    for attempt in range(3):
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Fetched:
    path: Path  # always a local file (an object store keeps a verified local copy)
    built: bool  # True when this call built it, False when it was reused
    seconds: float = 0.0
    mtime: float = 0.0  # when the artifact was published (seconds since the epoch)
    sha256: str = ""  # its checksum, as published


class Store(Protocol):
    """What the chain needs of a store, local folder or object store alike."""

    uri: str

    def get_or_build(self, kind: str, key: str, suffix: str, build: Callable[[Path], None]) -> Fetched: ...
    def exists(self, kind: str, key: str, suffix: str) -> bool: ...
    def remove(self, kind: str, key: str, suffix: str) -> None: ...
    def exclusive(self, name: str) -> contextlib.AbstractContextManager: ...
    def check(self) -> None: ...
    def fetch(self, kind: str, key: str, suffix: str) -> Fetched | None: ...
    def put(self, kind: str, key: str, suffix: str, write: Callable[[Path], None]) -> Fetched: ...


def open_store(location: str | os.PathLike) -> Store:
    """The artifact store at `location`: a local or shared folder (`ArtifactStore`), or an
    object-store URI such as `s3://bucket/prefix` (`sall.object_store.ObjectStore`). An unknown
    scheme is one error naming it."""
    text = str(location)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme in ("", "file"):
        return ArtifactStore(text[len("file://") :] if scheme == "file" else text)
    from sall.object_store import SCHEMES, ObjectStore

    if scheme not in SCHEMES:
        raise SallError(
            f"cache '{text}' has an unsupported scheme '{scheme}://'; expected a folder path, "
            f"file://, {', '.join(s + '://' for s in SCHEMES)}"
        )
    return ObjectStore(text)


class ArtifactStore:
    """A folder of content-addressed artifacts: `<root>/<kind>/<key><suffix>`."""

    def __init__(self, root: str | os.PathLike) -> None:
        """Check that `root` can be written (by writing a probe). Folders this check had to make are
        removed again and made by the first write, so a run that fails its checks leaves nothing."""
        try:
            self.root = Path(root).expanduser().resolve()
        except RuntimeError as e:  # "~nosuchuser/cache": Could not determine home directory
            raise SallError(
                f"cache dir '{root}' cannot be resolved ({e}); expected a writable folder (--cache-dir)"
            ) from None
        created = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            for attempt in range(3):  # another process's check may remove the folder under this one's
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    probe = self.root / f".write-test-{uuid.uuid4().hex}"
                    probe.write_bytes(b"ok")
                    probe.unlink()
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
        except OSError as e:
            raise SallError(
                f"cache dir '{self.root}' cannot be written ({e.strerror or e}); "
                "expected a writable folder (--cache-dir), shared by all nodes on a cluster"
            ) from None
        finally:  # the folders are made again by the first write
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()

    def path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    @property
    def uri(self) -> str:
        return str(self.root)

    def check(self) -> None:
        """Writable: checked when the store is opened."""

    def exclusive(self, name: str) -> FileLock:
        """At most one holder across processes (and nodes on a shared folder with working flock)."""
        return self.lock(name)

    def remove(self, kind: str, key: str, suffix: str) -> None:
        p = self.path(kind, key, suffix)
        p.with_name(p.name + ".sha256").unlink(missing_ok=True)
        p.unlink(missing_ok=True)

    def lock(self, name: str) -> FileLock:
        """A lock file in the store: holds across processes, and across nodes on a shared FS."""
        p = self.root / "locks" / f"{name}.lock"
        _mkdir(p.parent)
        return FileLock(str(p))

    def is_valid(self, path: Path) -> bool:
        """The artifact exists and matches its checksum; a corrupt one is removed with a warning.

        A file this process has verified is not hashed again while its inode, size and mtime are
        unchanged: a sweep's worker runs many trials on the same image arrays (hundreds of MB)."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        identity = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if identity in _VERIFIED:
            return True
        side = path.with_name(path.name + ".sha256")
        expected = side.read_text().strip() if side.exists() else ""
        if expected and sha256_file(path) == expected:
            _VERIFIED.add(identity)
            return True
        print(f"warning: cache entry {path} is corrupt (checksum mismatch); rebuilding it", file=sys.stderr)
        path.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        return False

    def exists(self, kind: str, key: str, suffix: str) -> bool:
        p = self.path(kind, key, suffix)
        return p.exists() and p.with_name(p.name + ".sha256").exists()

    @staticmethod
    def _fetched(final: Path, built: bool, seconds: float = 0.0) -> Fetched:
        digest = final.with_name(final.name + ".sha256").read_text().strip()
        return Fetched(final, built=built, seconds=seconds, mtime=final.stat().st_mtime, sha256=digest)

    def get_or_build(self, kind: str, key: str, suffix: str, build: Callable[[Path], None]) -> Fetched:
        """Return the artifact, building it (once, under a lock) if it is absent or corrupt.

        `build(tmp_path)` writes the artifact to `tmp_path`; it is published atomically.
        """
        final = self.path(kind, key, suffix)
        if self.is_valid(final):
            return self._fetched(final, built=False)
        with self._disk_errors(kind, key, suffix):
            _mkdir(final.parent)
            with self.lock(f"{kind}-{key}"):
                if self.is_valid(final):  # another process built it while we waited
                    return self._fetched(final, built=False)
                t0 = time.time()
                self._write_atomic(final, build)
                return self._fetched(final, built=True, seconds=time.time() - t0)

    def fetch(self, kind: str, key: str, suffix: str) -> Fetched | None:
        """The published, verified artifact, or None."""
        final = self.path(kind, key, suffix)
        return self._fetched(final, built=False) if self.is_valid(final) else None

    def put(self, kind: str, key: str, suffix: str, write: Callable[[Path], None]) -> Fetched:
        """Publish or replace an artifact atomically, without a lock: for data one writer owns (a
        training's checkpoint)."""
        final = self.path(kind, key, suffix)
        with self._disk_errors(kind, key, suffix):
            _mkdir(final.parent)
            self._write_atomic(final, write)
        return self._fetched(final, built=True)

    @staticmethod
    def _write_atomic(final: Path, build: Callable[[Path], None]) -> None:
        """`build` into a temporary file, its checksum beside, both renamed into place."""
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        side = final.with_name(final.name + ".sha256")
        side_tmp = side.with_name(f".{side.name}.{uuid.uuid4().hex}.tmp")
        try:
            build(tmp)
            side_tmp.write_text(sha256_file(tmp) + "\n")
            if _BEFORE_RENAME is not None:
                _BEFORE_RENAME(tmp)
            os.replace(side_tmp, side)
            os.replace(tmp, final)
        except BaseException:
            side.unlink(missing_ok=True)  # never a sidecar without its artifact
            raise
        finally:  # a kill -9 can still leave these; they are never read, only the final name is
            tmp.unlink(missing_ok=True)
            side_tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _disk_errors(self, kind: str, key: str, suffix: str):
        """A full disk, a quota or a file-size limit: one clear error instead of a traceback."""
        try:
            yield
        except OSError as e:
            if e.errno not in _FULL:
                raise
            raise SallError(
                f"cache dir '{self.root}' is full ({os.strerror(e.errno)}) while writing "
                f"{kind}/{key}{suffix}; nothing of it was kept; expected free space in "
                "--cache-dir (or another --cache-dir)"
            ) from None
