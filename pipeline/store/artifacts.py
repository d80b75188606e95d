"""Artifacts: hashing, manifests, Refs, and the store interface whose artifact level both backends share.

An artifact lives under `<stage>/<key>/` (its `uri`). `ArtifactStore.commit` uploads a staging folder and
then writes `manifest.json` last: the manifest is the commit marker, an artifact without one does not exist.
It lists every file's sha256 and size, the inputs' digests, the stage config, small summary figures and when
it was made. `fetch` hands back a local folder whose every file has been checked against the manifest;
anything that does not match raises `CorruptArtifact` and the manifest is deleted, so the producing stage
recomputes instead of a corrupt artifact ever being used.

An artifact's identity (the Ref's sha256) is `manifest_sha256`: the digest of its manifest without the
timing fields (`created_at`). Two independent computations of the same content therefore get the same
sha256, whenever they ran, while a change to any file, input, config or figure changes it.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from pipeline.refs import MANIFEST_NAME, Ref, canonical_json
from pipeline.store.errors import ArtifactNotFound, CorruptArtifact, StoreError
from pipeline.store.keys import prefix_path, validate_path

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1024 * 1024
"""Files are hashed in 1 MiB chunks so memory stays flat for multi-GB checkpoints."""

VERIFIED_MARKER = ".verified"
"""Name of the file in a downloaded artifact's cache folder holding the verified manifest sha256."""

TIMING_FIELDS = frozenset({"created_at"})
"""Manifest fields that say when, not what: kept in manifest.json for people, left out of the artifact's sha256."""


# --------------------------------------------------------------------------- hashes and manifests


def sha256_bytes(data: bytes) -> str:
    """In: bytes. Out: their sha256 as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """In: a local file. Out: its sha256 as 64 hex digits, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """In: a manifest. Out: the exact bytes it is stored as (sorted keys, 2-space indent, ASCII)."""
    return json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """In: a manifest. Out: the artifact's identity, the Ref's sha256: the sha256 of its stored form
    without TIMING_FIELDS, so the same content committed at another time has the same identity."""
    return sha256_bytes(manifest_bytes({key: value for key, value in manifest.items() if key not in TIMING_FIELDS}))


def parse_manifest(data: bytes) -> dict[str, Any] | None:
    """In: manifest bytes. Out: the manifest, or None when it is not a manifest at all."""
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def build_manifest(
    uri: str, files: dict[str, Path], *, kind: str, inputs: dict[str, str], config: Any, meta: dict
) -> dict[str, Any]:
    """In: the artifact's uri, its files ({relative path: local file}), the producing stage, its inputs'
    sha256, its config and summary figures. Out: the manifest (files hashed now; secrets dropped)."""
    return {
        "kind": kind,
        "uri": uri,
        "files": {rel: {"sha256": sha256_file(path), "size": path.stat().st_size} for rel, path in files.items()},
        "inputs": _plain_json(dict(inputs)),
        "config": _plain_json(config),
        "meta": _plain_json(dict(meta)),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def staged_files(staging_dir: Path) -> dict[str, Path]:
    """In: a staging folder. Out: {relative posix path: file} for every file under it, sorted."""
    files: dict[str, Path] = {}
    for path in sorted(staging_dir.rglob("*")):
        if path.is_file():
            files[validate_path(path.relative_to(staging_dir).as_posix())] = path
    return files


def _plain_json(value: Any) -> Any:
    """Turn pydantic models, Refs and containers into plain JSON values (secrets become null)."""
    return json.loads(canonical_json(value))


# --------------------------------------------------------------------------- the interface


class ArtifactStore(abc.ABC):
    """A root (folder or bucket prefix) holding files and committed artifacts.

    Subclasses implement the file level; the artifact level (commit, manifests, fetch
    with verification) is shared, so both stores behave the same.
    """

    uri: str
    """The root, for display: a folder path or s3://bucket/prefix."""

    # ---- file level (paths are relative to the root, checked by validate_path)

    @abc.abstractmethod
    def location(self, path: str) -> str:
        """In: a store path. Out: its full location (a local path or s3://bucket/key) for messages."""

    @abc.abstractmethod
    def put_bytes(self, path: str, data: bytes) -> None:
        """Store `data` at `path`, replacing what was there."""

    @abc.abstractmethod
    def get_bytes(self, path: str) -> bytes:
        """Out: the bytes stored at `path`. Raises ArtifactNotFound naming the location."""

    @abc.abstractmethod
    def put_file(self, path: str, local: Path) -> None:
        """Store the local file `local` at `path`, replacing what was there."""

    @abc.abstractmethod
    def get_file(self, path: str, local: Path) -> None:
        """Copy `path` to the local file `local` (atomically). Raises ArtifactNotFound."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Out: whether a file is stored at `path`."""

    @abc.abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete the file `prefix`, or every file under the folder `prefix`. Missing is fine."""

    @abc.abstractmethod
    def _sizes(self, prefix: str) -> dict[str, int]:
        """Out: {path: size} of the file `prefix` and every file under it ('' = the whole root)."""

    @abc.abstractmethod
    def _materialise(self, uri: str, manifest: dict[str, Any], manifest_sha: str) -> Path:
        """Out: a local folder with the artifact's files, each checked against the manifest."""

    def list(self, prefix: str = "") -> list[str]:
        """Out: sorted paths (relative to the root, not to `prefix`) of the file `prefix` and
        every file under it, recursively. '' lists the whole store."""
        return sorted(self._sizes(prefix_path(prefix) if prefix else ""))

    # ---- artifact level

    def commit(
        self,
        uri: str,
        staging_dir: Path,
        *,
        kind: str,
        inputs: dict[str, str],
        config: Any,
        meta: dict,
    ) -> Ref:
        """Store the folder `staging_dir` as the artifact `uri` ('<stage>/<key>').

        In: the files to store, the producing stage's name (`kind`), its inputs' sha256 by
        name, its config section (a model or plain values; secrets are dropped) and small
        summary figures (`meta`). Every file goes to '<uri>/<relpath>' first; the manifest
        goes last, so an interrupted commit leaves no artifact. Out: the Ref, whose sha256
        (`manifest_sha256`) depends on the content only, not on when it was committed.

        Faults: when the store refuses a write (StoreError: disk full, no permission, endpoint
        gone) the files of this attempt are removed again, best effort, and the error raised.
        When another run committed the same uri meanwhile (two runs of one config), its
        artifact is kept and its Ref returned: a committed artifact is never overwritten, so a
        Ref another run holds stays valid. Both stores serialise commits of one uri.
        """
        validate_path(uri)
        staging_dir = Path(staging_dir)
        if not staging_dir.is_dir():
            raise FileNotFoundError(f"staging folder {staging_dir} does not exist")
        files = staged_files(staging_dir)
        for reserved in (MANIFEST_NAME, VERIFIED_MARKER):  # the store writes these itself
            if reserved in files:
                raise ValueError(f"{staging_dir / reserved}: {reserved!r} is reserved by the artifact store")
        manifest = build_manifest(uri, files, kind=kind, inputs=inputs, config=config, meta=meta)
        with self._exclusive(uri):
            if self.has_artifact(uri):
                log.info("%s was committed by another run meanwhile; keeping it", self.location(uri))
                return self.open_ref(uri)
            self._discard(uri)  # leftovers of an earlier attempt (or a corrupt artifact) must not mix in
            try:
                for rel, path in files.items():
                    self.put_file(f"{uri}/{rel}", path)
                self.put_bytes(f"{uri}/{MANIFEST_NAME}", manifest_bytes(manifest))
            except StoreError:
                self._abandon(uri)
                raise
        return Ref(kind=kind, uri=uri, sha256=manifest_sha256(manifest), meta=manifest["meta"])

    def read_manifest(self, uri: str) -> dict | None:
        """In: an artifact uri. Out: its manifest, or None when it has none (it does not exist).

        An unreadable manifest also counts as none, so the stage simply recomputes.
        """
        data = self._read_manifest_bytes(uri)
        if data is None:
            return None
        manifest = parse_manifest(data)
        if manifest is None:
            log.warning("ignoring unreadable manifest %s", self.location(f"{uri}/{MANIFEST_NAME}"))
        return manifest

    def has_artifact(self, uri: str) -> bool:
        """Out: whether `uri` has a manifest and every file it lists is stored with the listed size.

        Cheap (one listing, no hashing); `fetch` does the full check.
        """
        manifest = self.read_manifest(uri)
        if manifest is None:
            return False
        sizes = self._sizes(uri)
        return all(
            isinstance(entry, dict) and sizes.get(f"{uri}/{rel}") == entry.get("size")
            for rel, entry in manifest["files"].items()
        )

    def fetch(self, ref: Ref) -> Path:
        """In: a Ref. Out: a local folder holding the artifact's files (and its manifest); read-only
        for the caller (for a local store it is the stored artifact itself).

        The manifest's identity (`manifest_sha256`) must be `ref.sha256` and every file must hash to
        its manifest entry. On any mismatch the manifest is deleted from the store (the artifact stops
        existing, so its stage recomputes next run) and CorruptArtifact is raised. ArtifactNotFound
        when there is no manifest.
        """
        uri = validate_path(ref.uri)
        data = self._read_manifest_bytes(uri)
        if data is None:
            raise ArtifactNotFound(
                f"artifact {self.location(uri)} does not exist (no {MANIFEST_NAME}): "
                "it was never committed, or was removed as corrupt"
            )
        manifest = parse_manifest(data)
        if manifest is None:
            self._reject(CorruptArtifact(ref.uri, MANIFEST_NAME, ref.sha256, "unparseable bytes", self.location(uri)))
        found = manifest_sha256(manifest)
        if found != ref.sha256:
            self._reject(CorruptArtifact(ref.uri, MANIFEST_NAME, ref.sha256, found, self.location(uri)))
        return self._materialise(uri, manifest, found)

    def open_ref(self, uri: str) -> Ref:
        """In: an artifact uri. Out: the Ref of its stored manifest (kind and meta from it).

        Raises ArtifactNotFound when the artifact has no (readable) manifest.
        """
        data = self._read_manifest_bytes(uri)
        manifest = parse_manifest(data) if data is not None else None
        if manifest is None:
            raise ArtifactNotFound(f"artifact {self.location(uri)} does not exist (no valid {MANIFEST_NAME})")
        return Ref(
            kind=str(manifest.get("kind", uri.split("/", 1)[0])),
            uri=uri,
            sha256=manifest_sha256(manifest),
            meta=manifest.get("meta") or {},
        )

    def is_intact(self, uri: str) -> bool:
        """Whether the committed artifact `uri` may be reused without recomputing it.

        Here: `has_artifact` (manifest present, every file at its listed size); `fetch` hashes
        every file that is used. LocalStore hashes every file now. A corrupt artifact is rejected
        (CorruptArtifact raised, its manifest removed), so its stage recomputes it.
        """
        return self.has_artifact(uri)

    # ---- shared helpers

    def _read_manifest_bytes(self, uri: str) -> bytes | None:
        """Out: the stored manifest bytes of `uri`, or None when there is none."""
        validate_path(uri)
        try:
            return self.get_bytes(f"{uri}/{MANIFEST_NAME}")
        except ArtifactNotFound:
            return None

    def _discard(self, uri: str) -> None:
        """Remove an artifact: its manifest first (so it stops existing at once), then its files."""
        self.delete(f"{uri}/{MANIFEST_NAME}")
        self.delete(uri)

    @contextmanager
    def _exclusive(self, uri: str) -> Iterator[None]:
        """Hold off other commits of `uri` while this one runs (each store has its own lock)."""
        yield

    def _abandon(self, uri: str) -> None:
        """After a failed commit: remove what this attempt wrote, unless a manifest is there. Never raises."""
        try:
            if self.read_manifest(uri) is None:
                self._discard(uri)
        except Exception as exc:  # the write failure is the news; e.g. the endpoint is still down
            log.warning("could not remove the partial upload %s: %s", self.location(uri), exc)

    def _reject(self, error: CorruptArtifact) -> NoReturn:
        """Delete the corrupt artifact's manifest so its stage recomputes it, then raise `error`.

        Recomputing the same content gives the same Ref again (the sha256 ignores when it was made),
        so the stages after it stay cached.
        """
        try:
            self.delete(f"{error.uri}/{MANIFEST_NAME}")
            log.warning("%s; removed its manifest so the producing stage recomputes it", error)
        except Exception as exc:  # the corruption is the news; a failed clean-up must not hide it
            log.warning("%s; could not remove its manifest: %s", error, exc)
        raise error

    def _check_file(self, uri: str, rel: str, entry: Any, local: Path) -> None:
        """Raise (through `_reject`) unless the local file `local` hashes to its manifest entry."""
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        found = sha256_file(local) if local.is_file() else "<missing>"
        if found != expected:
            self._reject(CorruptArtifact(uri, rel, str(expected), found, self.location(f"{uri}/{rel}")))
