"""The artifact store in a local folder: files written through a temp file and os.replace.

In: a root folder. Out: an ArtifactStore whose paths are files under the root, whose commits of one uri
take turns on a flock, and whose write failures (disk full, no permission, read-only) are StoreErrors
naming the file and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.store.artifacts import ArtifactStore
from pipeline.store.atomic import copy_atomic, gone_is_fine, require_local_file, write_bytes_atomic
from pipeline.store.errors import ArtifactNotFound, StoreError
from pipeline.store.keys import TMP_PREFIX, prefix_path, validate_path
from pipeline.store.locks import commit_lock_name, lock_local_file, unlock_local_file


class LocalStore(ArtifactStore):
    """An artifact store in a local folder. Writes go through a temp file and os.replace."""

    def __init__(self, root: Path | str) -> None:
        """In: the root folder (created if missing; relative paths resolve against the cwd)."""
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        with self._writing("creating", self.root):
            self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _writing(self, action: str, target: Path) -> Iterator[None]:
        """Turn an OSError of a write into a StoreError naming the file, the store and what to do.

        The temp file of a failed write is already gone (`atomic_write`); `commit` removes the
        files of a failed attempt.
        """
        try:
            yield
        except StoreError:
            raise
        except OSError as exc:
            code = exc.errno
            if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                what = (
                    "no space left on the device (disk or quota full): free space there or point store.uri "
                    "at a folder on a larger disk"
                )
            elif code in (errno.EACCES, errno.EPERM):
                what = (
                    f"permission denied: the pipeline (user id {os.getuid() if hasattr(os, 'getuid') else '?'}) "
                    "may not write there; fix the folder's owner or mode, or choose another store.uri"
                )
            elif code == errno.EROFS:
                what = "the file system is read-only: choose a writable store.uri"
            else:
                what = f"{exc.strerror or exc} (errno {errno.errorcode.get(code, code)})"
            raise StoreError(
                f"cannot write to the local store {self.root} ({action} {target}): {what}. "
                "Nothing of this write was kept."
            ) from exc

    @contextmanager
    def _exclusive(self, uri: str) -> Iterator[None]:
        """Take an exclusive lock for committing `uri`: a second committer waits, then finds it committed."""
        path = self.root / commit_lock_name(uri)
        with self._writing("taking the commit lock", path):
            handle = lock_local_file(path)
        try:
            yield
        finally:
            unlock_local_file(path, handle)

    def _abs(self, path: str) -> Path:
        """The local path of a store path; ValueError when a symbolic link inside the store leads out of its root."""
        target = self.root / validate_path(path)
        real = target.resolve()
        if real != self.root and self.root not in real.parents:
            raise ValueError(f"invalid store path {path!r}: a symbolic link leads it out of the store root {self.root}")
        return target

    def location(self, path: str) -> str:
        """In: a store path. Out: its absolute local path."""
        return str(self._abs(path))

    def put_bytes(self, path: str, data: bytes) -> None:
        """Write `data` to `path` atomically (temp file + os.replace, fsynced). StoreError when the disk refuses."""
        target = self._abs(path)
        with self._writing("writing", target):
            write_bytes_atomic(target, data)

    def get_bytes(self, path: str) -> bytes:
        """Out: the bytes at `path`. Raises ArtifactNotFound naming the local path."""
        target = self._abs(path)
        if not target.is_file():
            raise ArtifactNotFound(f"{target} does not exist")
        return target.read_bytes()

    def put_file(self, path: str, local: Path) -> None:
        """Copy the local file `local` to `path` atomically. StoreError when the disk refuses."""
        source, target = require_local_file(local), self._abs(path)
        with self._writing("writing", target):
            copy_atomic(source, target)

    def get_file(self, path: str, local: Path) -> None:
        """Copy `path` to `local` atomically. Raises ArtifactNotFound naming the local path."""
        source = self._abs(path)
        if not source.is_file():
            raise ArtifactNotFound(f"{source} does not exist")
        copy_atomic(source, Path(local), durable=False)

    def exists(self, path: str) -> bool:
        """Out: whether a file is stored at `path`."""
        return self._abs(path).is_file()

    def delete(self, prefix: str) -> None:
        """Delete the file or folder `prefix` (missing is fine) and the empty folders left above it."""
        target = self._abs(prefix_path(prefix))
        with self._writing("deleting", target):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, onerror=gone_is_fine)
            else:
                target.unlink(missing_ok=True)
        self._prune_empty_parents(target.parent)

    def _prune_empty_parents(self, folder: Path) -> None:
        """Remove empty folders from `folder` up to (not including) the root: no clutter of empty stage dirs."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): stop climbing
                return
            folder = folder.parent

    def _sizes(self, prefix: str) -> dict[str, int]:
        """Out: {path: size} of the file `prefix` or the files under it, skipping temp files."""
        base = self._abs(prefix) if prefix else self.root
        if base.is_file():
            return {prefix: base.stat().st_size}
        if not base.is_dir():
            return {}
        sizes: dict[str, int] = {}
        for folder, _, names in os.walk(base):  # another process may delete files meanwhile: skip those
            for name in names:
                if name.startswith(TMP_PREFIX):
                    continue
                path = Path(folder) / name
                try:
                    if path.is_file():
                        sizes[path.relative_to(self.root).as_posix()] = path.stat().st_size
                except FileNotFoundError:
                    continue
        return sizes

    def _materialise(self, uri: str, manifest: dict[str, Any], manifest_sha: str) -> Path:
        """Verify every file in place; out: the artifact's own folder."""
        folder = self._abs(uri)
        for rel, entry in sorted(manifest["files"].items()):
            self._check_file(uri, rel, entry, folder / validate_path(rel))
        return folder

    def is_intact(self, uri: str) -> bool:
        """Whether `uri` is committed with every file hashing to its manifest entry (local files hash fast).

        False when there is no manifest or a file is missing or resized; CorruptArtifact (after
        rejecting the artifact) when a file's bytes changed.
        """
        if not self.has_artifact(uri):
            return False
        self.fetch(self.open_ref(uri))
        return True
