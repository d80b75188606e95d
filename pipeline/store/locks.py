"""Commit locks: two runs committing the same artifact uri take turns instead of mixing their files.

Without a lock, a second run committing the same uri could discard the first run's files while that
run writes its manifest. A local store locks a file with flock; an S3 store creates a lock object only
if absent (a conditional PUT) and breaks locks whose holder is gone. Locks live in the store's root under
`commit_lock_name(uri)`, a temp-file name that listings skip.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

try:  # POSIX: commits of the same artifact to a local store take turns
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from pipeline.store.artifacts import sha256_bytes
from pipeline.store.errors import ArtifactNotFound, StoreError
from pipeline.store.keys import TMP_PREFIX

log = logging.getLogger(__name__)

COMMIT_LOCK_PREFIX = f"{TMP_PREFIX}commit-"
"""Commit locks live in the store's root as '<prefix><hash of the uri>.lock' (commit_lock_name)."""

COMMIT_LOCK_STALE_S = 15 * 60.0
"""An S3 commit lock older than this lost its holder (a commit uploads one artifact; a model takes minutes)."""
COMMIT_LOCK_POLL_S = 1.0
"""How often a committer waiting for an S3 commit lock looks again."""

_HELD_LOCKS: set[str] = set()
# Tokens of the S3 commit locks this process holds now. A lock naming this process but not one of these
# is a leftover of an earlier attempt (its release failed while the server was down) and is broken.


def commit_lock_name(uri: str) -> str:
    """In: an artifact uri. Out: the store path of the lock its commits take turns on (in the store's root)."""
    return f"{COMMIT_LOCK_PREFIX}{sha256_bytes(uri.encode('utf-8'))[:32]}.lock"


# --------------------------------------------------------------------------- local folder


def lock_local_file(path: Path) -> int | None:
    """In: the lock file's path. Out: an open descriptor holding an exclusive flock on it (None on Windows).

    A waiter that locked a file the holder removed meanwhile opens the new one and tries again.
    OSError when the file cannot be created (the caller names the store and what to do).
    """
    if fcntl is None:  # pragma: no cover - Windows: no locking
        return None
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(handle), os.stat(path)):
                return handle
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(handle)
            raise
        os.close(handle)


def unlock_local_file(path: Path, handle: int | None) -> None:
    """Remove the lock file and release the lock taken by `lock_local_file`."""
    if handle is None:  # pragma: no cover - Windows
        return
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(handle)


# --------------------------------------------------------------------------- S3


class LockObjects(Protocol):
    """What an S3 commit lock needs from its store (S3Store implements it)."""

    def location(self, path: str) -> str:
        """s3://bucket/key of a store path, for messages."""

    def create_if_absent(self, path: str, data: bytes) -> bool:
        """Create the object unless it exists; True when created (or the server cannot lock)."""

    def read_with_time(self, path: str) -> tuple[bytes, float | None]:
        """The object's bytes and when it was written; ArtifactNotFound when absent."""

    def remove_object(self, path: str, action: str) -> None:
        """Delete one object; `action` names why, for messages."""


@contextmanager
def s3_commit_lock(store: LockObjects, uri: str) -> Iterator[None]:
    """Hold off other commits of `uri` while the body runs: a lock object created only if absent.

    A waiter polls until the lock is gone, then (in `commit`) finds the artifact committed. A lock
    whose holder is gone (a dead process on this host, an earlier attempt of this process, or older
    than COMMIT_LOCK_STALE_S) is broken. Failing to release it is logged, not raised: the commit's own
    outcome matters more, and the next commit breaks the left lock.
    """
    path = commit_lock_name(uri)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    waiting_logged = False
    _HELD_LOCKS.add(holder["token"])  # before the PUT: a thread that finds the lock must see it in hand
    try:
        while not _take_lock(store, path, holder):
            if not waiting_logged:
                log.info("waiting for another run to finish committing %s", store.location(uri))
                waiting_logged = True
            time.sleep(COMMIT_LOCK_POLL_S * random.uniform(0.8, 1.2))
    except BaseException:
        _HELD_LOCKS.discard(holder["token"])
        raise
    try:
        yield
    finally:
        _HELD_LOCKS.discard(holder["token"])
        try:
            store.remove_object(path, "releasing the commit lock")
        except StoreError as error:
            log.warning(
                "could not release the commit lock %s (the next commit breaks it): %s", store.location(path), error
            )


def _take_lock(store: LockObjects, path: str, holder: dict[str, Any]) -> bool:
    """Create the lock object `path` unless it exists; True when `holder` holds it now.

    When it exists and its holder is gone, it is deleted and False returned (the caller tries again).
    """
    if store.create_if_absent(path, json.dumps(holder).encode()):
        return True
    try:
        data, written_at = store.read_with_time(path)
        found, age = json.loads(data), time.time() - written_at if written_at is not None else 0.0
    except (ArtifactNotFound, ValueError):
        return False  # released (or being written) meanwhile: try again
    if lock_holder_is_gone(found, age):
        # Two waiters breaking the same dead lock at once could also remove the new lock one of them
        # just took; dead holders are rare (a crash or an outage), so that window is accepted.
        log.warning("breaking the stale commit lock %s held by %s", store.location(path), found)
        store.remove_object(path, "breaking the commit lock")
    return False


def lock_holder_is_gone(holder: Any, age_seconds: float) -> bool:
    """In: an S3 commit lock's holder {host, pid, token} and the lock's age. Out: whether it can no longer
    release the lock.

    True when the lock is older than COMMIT_LOCK_STALE_S, or its holder is on this host and is
    either a process that no longer runs or this process without the lock in hand.
    """
    if age_seconds > COMMIT_LOCK_STALE_S or not isinstance(holder, dict):
        return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if pid == os.getpid():
        return holder.get("token") not in _HELD_LOCKS
    try:
        os.kill(int(pid), 0)  # signal 0: does the process exist?
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError, OverflowError):
        return not isinstance(pid, int)
    return False
