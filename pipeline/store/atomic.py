"""Atomic writes of local files: a temp file in the same folder, renamed into place.

Used by the local store (its files) and the S3 store (its verified download cache). In: a target path and
bytes, a file to copy, or a function that writes a given temp path. Out: the target holding the complete new
content; a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.store.keys import TMP_PREFIX


def atomic_write(target: Path, write: Callable[[Path], None], *, durable: bool) -> None:
    """Write `target` by calling `write(temp path)` and then os.replace-ing the temp file into place.

    `durable` fsyncs before the rename, so a crash cannot leave a renamed but empty file
    (which matters most for the manifest, the commit marker). The temp file is removed on failure.
    """
    tmp = target.parent / f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:12]}"
    try:
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                write(tmp)
                break
            except FileNotFoundError:
                # Another process pruned the folder while it was empty (LocalStore.delete): make it again.
                if attempt == 2 or target.parent.is_dir():
                    raise
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(target: Path, data: bytes, *, durable: bool = True) -> None:
    """Atomically write `data` to the local file `target`."""
    atomic_write(target, lambda tmp: tmp.write_bytes(data), durable=durable)


def copy_atomic(source: Path, target: Path, *, durable: bool = True) -> None:
    """Atomically copy the local file `source` to `target`."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), durable=durable)


def require_local_file(local: Path) -> Path:
    """In: a path. Out: it as a Path; FileNotFoundError naming it unless it is an existing file."""
    local = Path(local)
    if not local.is_file():
        raise FileNotFoundError(f"local file {local} does not exist")
    return local


def gone_is_fine(function: Any, path: str, exc_info: Any) -> None:
    """shutil.rmtree error handler: a file another process removed first is fine, anything else is raised."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
