"""The asset cache and how things are built into it: once, atomically, under a file lock.

`default_cache_dir` is where built assets live. A cached folder's name carries `_content_key`, a hash of its
source files and a build version string; `_build_once` writes into a temporary sibling folder and renames it into
place under a file lock, so a folder that exists is complete and two processes never build the same thing;
`_write_provenance` records in it what it was made from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)


# Written into every built folder, so a person can see where it came from.
_PROVENANCE_FILE = "finetune_asset.json"


def default_cache_dir() -> Path:
    """Where built assets are cached.

    In: nothing (reads env `FINETUNE_CACHE_DIR`).
    Out: that folder if set, else `~/.cache/finetune-pipeline`. Not created here.
    """
    configured = os.environ.get("FINETUNE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "finetune-pipeline"


def _cache_root(cache_dir: Path | str | None) -> Path:
    """The cache folder to use: the argument if given, else `default_cache_dir()`."""
    return Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()


# Hashing the 98 MB GGUF takes 0.3 s; resolve_model is called by several tasks in one
# process, so remember digests for files whose size and mtime have not changed.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes (memoised per path, size and mtime)."""
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[memo_key] = digest.hexdigest()
    return _DIGESTS[memo_key]


def _content_key(sources: Iterable[Path], build_version: str) -> str:
    """First 12 hex of a sha256 over the build version and every source file's sha256."""
    digest = hashlib.sha256(build_version.encode())
    for source in sources:
        digest.update(b"\n" + _sha256_file(source).encode())
    return digest.hexdigest()[:12]


def _build_once(final: Path, build: Callable[[Path], None], what: str) -> Path:
    """Make `final` by calling `build(tmp_folder)` unless it already exists; return `final`.

    The build writes into a temporary sibling folder that is renamed to `final` only
    when `build` returns, so a crash never leaves a half-built `final` behind. A file
    lock next to it makes a second process wait for the first one instead of building
    the same thing again (and then finds it done).
    """
    if final.is_dir():
        return final
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with FileLock(str(lock_path)):
        if final.is_dir():  # another process finished it while we waited
            return final
        # Left-overs of a crashed build of the same thing: only a lock holder builds,
        # so nothing else is writing to them now.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        started = time.perf_counter()
        log.info("Building %s into %s (once; cached afterwards)", what, final)
        try:
            build(tmp)
            # mkdtemp makes the folder private (0700); a cache is read by other users and
            # containers too, and the files inside were written with normal permissions.
            tmp.chmod(0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("Built %s in %.1f s", what, time.perf_counter() - started)
    return final


def _write_provenance(folder: Path, alias: str, sources: list[Path], build_version: str) -> None:
    """Record what a built folder was made from (source files and digests, build version, library versions)."""
    import torch
    import transformers

    record = {
        "asset": alias,
        "build_version": build_version,
        "sources": [{"path": str(source), "sha256": _sha256_file(source)} for source in sources],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (folder / _PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
