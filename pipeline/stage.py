"""How a stage function becomes a content-addressed, cached Prefect task.

A stage task takes Refs and config sections (plus the `store` settings) and returns
a Ref. Its output lives at `<stage>/<key>` in the artifact store, where the key
hashes the stage name, its version string, its input Refs and its config
(`pipeline.refs.content_key`). Prefect's cache key is the same hash, and Prefect's
cache records are kept in the same store (`_prefect/`), so an unchanged rerun,
on this machine or any other pointed at the same store, shows every stage `Cached`.

    @stage_task("template", version="1")
    def template(collected: Ref, config: TemplateConfig, store: StoreConfig) -> Ref:
        stage = begin_stage(store)
        if stage.committed:
            return stage.ref
        ...write files into stage.dir...
        return stage.commit(meta={"rows": n})
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from prefect import task
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from pydantic import Field

from pipeline.refs import Ref, content_key
from pipeline.store import ArtifactNotFound, ArtifactStore, CorruptArtifact, StoreSettings, StoreUnavailable, open_store

RESULTS_PREFIX = "_prefect"
STORE_PARAMETER = "store"

F = TypeVar("F", bound=Callable[..., Any])


class ArtifactStoreResults(WritableFileSystem):
    """Prefect result storage inside the artifact store, under `_prefect/`.

    Prefect keeps its cache records in result storage; putting them next to the
    artifacts means whoever can read the artifacts can also reuse the cache.
    Credentials are not fields here: they come from the environment (or the store
    settings held in memory), so they are never written into a record.
    """

    _block_type_name = "Finetune Artifact Store Results"
    uri: str = Field(description="Store root (folder or s3://bucket/prefix).")
    endpoint_url: str | None = None
    region: str | None = None

    def _store(self) -> ArtifactStore:
        return open_store(StoreSettings(uri=self.uri, endpoint_url=self.endpoint_url, region=self.region))

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        """Bytes of a cache record; FileNotFoundError when there is none, UnsafeResultRecord when it is not safe JSON.

        Prefect decodes a record with whatever serializer the record itself names, so a
        record planted by anyone who can write to the bucket could make a cache lookup
        unpickle it. A refused record counts as no record: the stage runs and writes a fresh one.
        """
        content = self._store().get_bytes(f"{RESULTS_PREFIX}/{path}")
        try:
            return check_result_record(content, f"{RESULTS_PREFIX}/{path}")
        except UnsafeResultRecord as error:
            _run_logger().warning("%s", error)
            raise

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        """Store a cache record; returns its path."""
        self._store().put_bytes(f"{RESULTS_PREFIX}/{path}", content)
        return path

    async def aread_path(self, path: str) -> bytes:
        """Async form of read_path (Prefect calls whichever fits its context)."""
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """Async form of write_path."""
        return self.write_path(path, content)


RESULT_CLASSES = frozenset({"pipeline.refs.Ref"})
"""The only classes a stage's result record may name: stage tasks return Refs."""


class UnsafeResultRecord(ValueError):
    """A Prefect result record in the store that is not plain JSON naming only RESULT_CLASSES."""


def check_result_record(content: bytes, where: str) -> bytes:
    """`content` unchanged when Prefect may safely decode it as a result record; else UnsafeResultRecord.

    Safe: JSON, serializer 'json', and a result whose objects name no class but
    RESULT_CLASSES, and no exception type from a module that is not imported already
    (a failed task's record names its exception; Prefect imports whatever it names).
    `where` names the record in the message.
    """
    try:
        record = json.loads(content)
        serializer, result = record["metadata"]["serializer"]["type"], record["result"]
    except (ValueError, KeyError, TypeError):
        raise UnsafeResultRecord(f"{where}: expected a Prefect result record in JSON, found other bytes; ignored") from None
    if serializer != "json" or not isinstance(result, str):
        raise UnsafeResultRecord(f"{where}: expected a record with serializer 'json', found {str(serializer)[:40]!r}; "
                                 "ignored, so nothing in it is unpickled")
    named: list[str] = []

    def note_names(obj: dict) -> dict:
        if "__class__" in obj and obj["__class__"] not in RESULT_CLASSES:
            named.append(str(obj["__class__"]))
        if "__exc_type__" in obj and str(obj["__exc_type__"]).rpartition(".")[0] not in sys.modules:
            named.append(str(obj["__exc_type__"]))
        return obj

    try:
        json.loads(result, object_hook=note_names)
    except ValueError:
        raise UnsafeResultRecord(f"{where}: expected a JSON result inside the record, found other text; ignored") from None
    if named:
        raise UnsafeResultRecord(f"{where}: expected results of type {sorted(RESULT_CLASSES)}, found {named[:3]}; ignored")
    return content


def result_storage_for(settings: StoreSettings) -> ArtifactStoreResults:
    """The Prefect result storage that lives in the artifact store described by `settings`.

    Prefect only accepts result storage blocks saved on its server (so other
    processes can load them), so the block is saved under a name derived from the
    store's location; saving again overwrites it with the same content.

    Two runs starting at the same moment on a fresh Prefect server both register the
    block type: the slower one gets ObjectAlreadyExists (409), and saving again finds
    what the faster one registered.
    """
    from prefect.exceptions import ObjectAlreadyExists

    block = ArtifactStoreResults(uri=_absolute_uri(settings.uri), endpoint_url=settings.endpoint_url, region=settings.region)
    location = f"{block.uri}|{block.endpoint_url}|{block.region}"
    for attempt in range(3):
        try:
            block.save(f"artifact-store-{hashlib.sha256(location.encode()).hexdigest()[:12]}", overwrite=True)
            break
        except ObjectAlreadyExists:
            if attempt == 2:
                raise
    return block


def _absolute_uri(uri: str) -> str:
    """A local store's folder as an absolute path (a worker may run from another directory)."""
    return uri if "://" in uri else str(Path(uri).resolve())


def stage_inputs(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters that decide a stage's output: everything but the store settings."""
    return {name: value for name, value in parameters.items() if name != STORE_PARAMETER}


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Prefect cache key: the stage's content key.

    When the artifact behind a key is missing (deleted, interrupted before its
    manifest, or found corrupt: `ArtifactStore.is_intact` hashes a local store's
    files) the cache record is stale: drop it so the stage recomputes instead of
    handing out a Ref to nothing, or to bytes that changed after the fact.
    """
    stage, version = context.task.name, context.task.version or "0"
    key = content_key(stage, version, stage_inputs(parameters))
    cache_key = f"{stage}-{key}"
    store = open_store(parameters[STORE_PARAMETER])
    if not _reusable(store, f"{stage}/{key}"):
        store.delete(f"{RESULTS_PREFIX}/{cache_key}")
    return cache_key


def _reusable(store: ArtifactStore, uri: str) -> bool:
    """Whether the committed artifact `uri` is intact; a corrupt one is reported in the run's log and recomputed."""
    try:
        return store.is_intact(uri)
    except CorruptArtifact as error:
        _run_logger().warning("%s; the stage recomputes it", error)
        return False


def _run_logger() -> Any:
    """Prefect's run logger (the message shows in the UI), or this module's outside a run."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StoreUnavailable, ConnectionError, TimeoutError)
"""Failures a retry may cure: the store's endpoint unreachable or failing, a dropped connection."""


def retry_on_transient_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only when the failure (or an error behind it) is transient I/O.

    Bad input, a bug or running out of memory fails at once instead of after every retry delay.
    """
    error: BaseException | None = state.data if isinstance(state.data, BaseException) else None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        network = type(error).__module__.startswith(("botocore", "urllib3")) and "Connection" in type(error).__name__
        if isinstance(error, TRANSIENT_ERRORS) or network:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def stage_task(name: str, version: str, retries: int = 0) -> Callable[[F], F]:
    """Decorator: a Prefect task named after the stage, cached on its content key.

    `version` must be bumped when the stage's core changes in a way that changes its
    output: Prefect only sees the task function's own source. Only I/O-bound stages
    should pass `retries`: they are retried on transient I/O failures only (the store
    or a data source unreachable), after 2 s, 4 s, 8 s, ... (exponential backoff, +-25% jitter),
    on top of the store's own per-request retries (`store.retry_attempts`).
    """
    return task(  # type: ignore[return-value]
        name=name,
        version=version,
        cache_key_fn=_cache_key,
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=[2.0 * 2**attempt for attempt in range(retries)] if retries else 0,
        retry_jitter_factor=0.25 if retries else None,
        retry_condition_fn=retry_on_transient_errors if retries else None,
    )


@dataclass
class StageRun:
    """One stage run's output being built: a staging folder, committed to the store at the end."""

    store: ArtifactStore
    stage: str
    key: str
    inputs: dict[str, Any]
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="finetune-stage-")))

    @property
    def uri(self) -> str:
        """'<stage>/<key>' inside the store."""
        return f"{self.stage}/{self.key}"

    @property
    def committed(self) -> bool:
        """True when an earlier run already committed this exact output, intact (it is reused, not recomputed)."""
        return _reusable(self.store, self.uri)

    @property
    def ref(self) -> Ref:
        """The Ref of the already committed output."""
        return self.store.open_ref(self.uri)

    def fetch(self, ref: Ref) -> Path:
        """A local, hash-verified folder holding an input artifact's files."""
        return self.store.fetch(ref)

    def commit(self, meta: dict[str, Any] | None = None) -> Ref:
        """Upload the staging folder, manifest last, and return the new Ref."""
        refs = {name: value.sha256 for name, value in self.inputs.items() if isinstance(value, Ref)}
        config = {name: value for name, value in self.inputs.items() if not isinstance(value, Ref)}
        try:
            return self.store.commit(self.uri, self.dir, kind=self.stage, inputs=refs, config=_jsonable(config), meta=meta or {})
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    """Config sections as plain JSON for the manifest (secrets are dropped by canonical_json's rules)."""
    import json

    from pipeline.refs import canonical_json

    return json.loads(canonical_json(value))


def begin_stage(store_settings: StoreSettings) -> StageRun:
    """Start building the output of the stage task that is running now.

    In: the store settings the task received. Out: a StageRun whose key is
    computed from the task's own parameters, exactly as its cache key was.
    """
    context = TaskRunContext.get()
    if context is None:
        raise RuntimeError("begin_stage() must be called inside a stage task")
    stage, version = context.task.name, context.task.version or "0"
    inputs = stage_inputs(context.parameters)
    return StageRun(store=open_store(store_settings), stage=stage, key=content_key(stage, version, inputs), inputs=inputs)


__all__ = [
    "ArtifactNotFound",
    "ArtifactStoreResults",
    "StageRun",
    "UnsafeResultRecord",
    "begin_stage",
    "check_result_record",
    "result_storage_for",
    "stage_task",
]
