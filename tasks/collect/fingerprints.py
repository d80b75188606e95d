"""Fingerprints of the collect stage's sources: what makes an edited data file rerun collect.

The config names files, whose content may change under the same name; the flow passes these fingerprints to
`collect`, where they take part in the content key only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, DocsSource, HFSource
from pipeline.store import StoreSettings
from tasks.collect.sources import S3Data, local_files


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_fingerprint(package: str) -> str:
    """'<package>==<version of the distribution that installs it>', or the bare name when that is unknown.

    Most distributions are named like their top-level module (more_itertools from more-itertools), and
    `version` finds those at once; `packages_distributions` reads every installed distribution's file list
    (seconds with torch and transformers installed), so it is asked only when the name lookup fails.
    """
    from importlib.metadata import PackageNotFoundError, packages_distributions, version
    from importlib.util import find_spec

    top = package.split(".")[0]
    if find_spec(top) is None:  # not installed: collect reports it
        return package
    try:
        return f"{package}=={version(top)}"
    except PackageNotFoundError:
        pass
    dists = packages_distributions().get(top, [])
    try:
        return f"{package}=={version(dists[0])}" if dists else package
    except PackageNotFoundError:
        return package


def _fingerprint(source: Any, index: int, store: StoreSettings | None) -> str:
    """What identifies a source's current content (file hashes, object ETags, a saved dataset's fingerprint)."""
    if isinstance(source, DocsSource):
        return _package_fingerprint(source.package)
    if isinstance(source, HFSource):
        local = Path(source.dataset).expanduser()
        if local.is_dir():  # save_to_disk writes a content fingerprint into every state.json
            states = sorted(local.rglob("state.json"))
            return hashlib.sha256(b"".join(p.read_bytes() for p in states)).hexdigest()
        return f"hub:{source.dataset}@{source.revision or 'unpinned'}"
    parts = []
    for pattern in source.paths:
        if pattern.startswith("s3://"):
            s3 = S3Data(store)
            parts += [f"{uri}={s3.fingerprint(uri)}" for uri in s3.keys(pattern, index)]
        else:
            parts += [f"{path}={_sha256_file(path)}" for path in local_files(pattern, index)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def source_fingerprints(config: DataConfig, store: StoreSettings | None = None) -> dict[str, str]:
    """Per source (by index), a fingerprint of its current content, for the collect stage's key.

    The config names files; their content may change under the same name. Passing these
    to `collect` makes an edited file rerun collect (and what follows) instead of coming
    back Cached. Never raises: a source that cannot be read now gets 'unavailable: ...',
    and collect itself reports the problem.
    """
    prints = {}
    for index, source in enumerate(config.sources):
        try:
            prints[str(index)] = _fingerprint(source, index, store)
        except Exception as exc:  # collect raises the precise error; a key only needs to differ
            prints[str(index)] = f"unavailable: {type(exc).__name__}"
    return prints
