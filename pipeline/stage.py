"""How a stage body becomes a content-addressed, cached Prefect task.

A stage body is a plain function of its inputs' folders, its config and an output folder,
returning its figures (Kedro's node idea): testable without Prefect or a store.

    @stage_task("split")
    def split(tokenized: Path, config: SplitConfig, out: Path) -> dict[str, Any]:
        train, test, figures = split_rows(pq.read_table(tokenized / "tokens.parquet"), config)
        pq.write_table(train, out / "train.parquet")
        pq.write_table(test, out / "test.parquet")
        return figures

    split(tokenized=ref, config=cfg.split, store=cfg.store)  # the task: returns a Ref
    split.body(tokens_dir, SplitConfig(), tmp_path)           # the plain function

The task's parameters are the body's, except that

* a parameter annotated `Path` (or `Artifact`: folder and Ref, for provenance), `list[Path]` or either
  `| None` is an input artifact: the task takes a `Ref` (`list[Ref]`, `| None`) under that name and the
  body gets the hash-verified local folder(s);
* `out` is the output folder the body writes into; the task takes `store: StoreConfig` in its place
  (a body that needs the store settings itself, collect's s3:// data, declares `store` too);
* `stage: StageRun` (optional) hands over the running stage's key and store, for a stage that keeps
  state outside its artifact (train's checkpoints); it is not a task parameter.

The decorator does the rest: it opens the stage, returns the committed Ref when the artifact exists
(calling `on_cached(ref, stage)`, e.g. the gate re-publishes its UI artifacts), fetches the input
Refs, calls the body, commits what it wrote with its return value as the Ref's meta (manifest last)
and calls `on_commit(ref, stage)`.

Keys. A stage's output lives at `<stage>/<key>` in the artifact store, where the key hashes the
stage name, its code version, its input Refs (their sha256) and its config (`pipeline.refs.content_key`;
the store settings take no part). The code version (`pipeline.code_version`) hashes the stage's
module and every `pipeline.*`/`tasks.*` module it imports, transitively, read statically with `ast`:
editing a stage's code reruns that stage and, since its output's uri (and so its Ref) changes, every
stage after it; editing a module no stage imports (`pipeline/planner/`, `flows/`) reuses everything.
Prefect's cache key is the same hash, and Prefect's cache records are kept in the same store
(`_prefect/`), so an unchanged rerun, on this machine or any other pointed at the same store, shows
every stage `Cached`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

from prefect import task
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from pydantic import Field

from pipeline.code_version import code_version
from pipeline.config import StoreConfig
from pipeline.refs import Ref, content_key
from pipeline.store import ArtifactNotFound, ArtifactStore, CorruptArtifact, StoreSettings, StoreUnavailable, open_store

RESULTS_PREFIX = "_prefect"
STORE_PARAMETER = "store"


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
        raise UnsafeResultRecord(
            f"{where}: expected a Prefect result record in JSON, found other bytes; ignored"
        ) from None
    if serializer != "json" or not isinstance(result, str):
        raise UnsafeResultRecord(
            f"{where}: expected a record with serializer 'json', found {str(serializer)[:40]!r}; "
            "ignored, so nothing in it is unpickled"
        )
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
        raise UnsafeResultRecord(
            f"{where}: expected a JSON result inside the record, found other text; ignored"
        ) from None
    if named:
        raise UnsafeResultRecord(
            f"{where}: expected results of type {sorted(RESULT_CLASSES)}, found {named[:3]}; ignored"
        )
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

    block = ArtifactStoreResults(
        uri=_absolute_uri(settings.uri), endpoint_url=settings.endpoint_url, region=settings.region
    )
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


class Artifact(NamedTuple):
    """An input artifact as a stage body receives it: its local folder and its Ref (for provenance)."""

    path: Path
    ref: Ref


@dataclass
class StageRun:
    """One stage run's output being built: a staging folder, committed to the store at the end."""

    store: ArtifactStore
    stage: str
    key: str
    inputs: dict[str, Any]

    @functools.cached_property
    def dir(self) -> Path:
        """The staging folder the body writes into, made on first use: a stage found committed, or one whose
        store cannot be reached, leaves no empty folder behind in the temporary directory."""
        return Path(tempfile.mkdtemp(prefix="finetune-stage-"))

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
            return self.store.commit(
                self.uri, self.dir, kind=self.stage, inputs=refs, config=_jsonable(config), meta=meta or {}
            )
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the staging folder if it was made (after a commit, or when the body failed: a half-written model
        is large)."""
        made = self.__dict__.pop("dir", None)  # functools.cached_property keeps it in the instance's __dict__
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    """Config sections as plain JSON for the manifest (secrets are dropped by canonical_json's rules)."""
    from pipeline.refs import canonical_json

    return json.loads(canonical_json(value))


def open_stage(stage: str, version: str, parameters: dict[str, Any]) -> StageRun:
    """The output of stage `stage` (code version `version`) for a task's `parameters`, about to be built.

    Its key is computed from the parameters exactly as the task's cache key is (`_cache_key`).
    """
    inputs = stage_inputs(parameters)
    return StageRun(
        store=open_store(parameters[STORE_PARAMETER]),
        stage=stage,
        key=content_key(stage, version, inputs),
        inputs=inputs,
    )


# --------------------------------------------------------------------------- the decorator

OUT_PARAMETER = "out"
"""The body parameter that receives the (empty) output folder; the task takes `store` in its place."""
STAGE_PARAMETER = "stage"
"""An optional body parameter that receives the StageRun (key, store), for a stage that keeps state
outside its artifact (train's checkpoints); not a task parameter."""

Hook = Callable[[Ref, StageRun], None]
"""`hook(ref, stage)`: called with the stage's Ref once it exists (committed now, or found committed)."""


@dataclass(frozen=True)
class InputKind:
    """How one body parameter is filled from the task's parameter of the same name."""

    artifact: bool  # Artifact (folder and Ref) rather than a bare Path
    many: bool  # a list of them
    optional: bool  # None passes through


def _input_kind(hint: Any) -> InputKind | None:
    """The InputKind of a body parameter annotated `hint`; None when it is no input artifact (a config, a value).

    Path / Artifact, list[Path] / list[Artifact], each optionally `| None`.
    """
    args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
    optional = len(args) == 1 and hint is not args[0]
    if len(args) != 1:
        return None
    core = args[0]
    many = get_origin(core) is list
    item = get_args(core)[0] if many and get_args(core) else core
    if item in (Path, Artifact):
        return InputKind(artifact=item is Artifact, many=many, optional=optional)
    return None


def _ref_type(kind: InputKind) -> Any:
    """The task parameter's type for an input of `kind`: Ref, list[Ref], optionally `| None`."""
    base: Any = list[Ref] if kind.many else Ref
    return base | None if kind.optional else base


@dataclass(frozen=True)
class StageShape:
    """A stage body's parameters sorted out: which are inputs to fetch, and the task's own signature."""

    parameters: tuple[str, ...]  # the body's, in order
    inputs: dict[str, InputKind]  # the body's input artifacts, by parameter name
    signature: inspect.Signature  # the task's

    @classmethod
    def of(cls, body: Callable[..., Any]) -> StageShape:
        """The shape of `body`; TypeError when it has no `out` parameter."""
        hints = get_type_hints(body)
        params = inspect.signature(body).parameters
        if OUT_PARAMETER not in params:
            raise TypeError(f"stage body {body.__qualname__}: expected an output folder parameter {OUT_PARAMETER!r}")
        inputs: dict[str, InputKind] = {}
        task_params: list[inspect.Parameter] = []
        for name, param in params.items():
            if name == STAGE_PARAMETER:
                continue
            if name == OUT_PARAMETER:
                if STORE_PARAMETER not in params:
                    task_params.append(param.replace(name=STORE_PARAMETER, annotation=StoreConfig))
                continue
            kind = _input_kind(hints.get(name))
            if kind is not None:
                inputs[name] = kind
            task_params.append(param.replace(annotation=_ref_type(kind) if kind else hints.get(name, param.annotation)))
        return cls(tuple(params), inputs, inspect.Signature(task_params, return_annotation=Ref))

    def arguments(self, parameters: dict[str, Any], stage: StageRun) -> dict[str, Any]:
        """The body's keyword arguments from the task's `parameters`: input Refs fetched to folders, the output
        folder, the running stage, the rest as given."""
        arguments: dict[str, Any] = {}
        for name in self.parameters:
            if name == OUT_PARAMETER:
                arguments[name] = stage.dir
            elif name == STAGE_PARAMETER:
                arguments[name] = stage
            elif name in self.inputs:
                arguments[name] = _fetched(parameters[name], self.inputs[name], stage)
            else:
                arguments[name] = parameters[name]
        return arguments


def _fetched(value: Ref | list[Ref] | None, kind: InputKind, stage: StageRun) -> Any:
    """An input parameter's Ref(s) as local folders (Path or Artifact, as the body asks); None stays None."""
    if value is None:
        if not kind.optional:
            raise TypeError("stage input: expected a Ref, found None")
        return None

    def one(ref: Ref) -> Path | Artifact:
        folder = stage.fetch(ref)
        return Artifact(folder, ref) if kind.artifact else folder

    return [one(ref) for ref in value] if kind.many else one(value)  # type: ignore[union-attr,arg-type]


def stage_task(
    name: str, retries: int = 0, *, on_cached: Hook | None = None, on_commit: Hook | None = None
) -> Callable[[Callable[..., dict[str, Any]]], Any]:
    """Decorator: a stage body becomes a Prefect task named `name`, cached on its content key, returning a Ref.

    The body is a plain function of its inputs' folders, its config and an output folder `out`, returning
    its figures (the Ref's meta); see the module docstring for how its parameters map to the task's. The
    task: opens the stage (key from the parameters and the code version), returns the committed Ref when
    the artifact exists (after `on_cached(ref, stage)`), else fetches the input Refs, calls the body,
    commits what it wrote to `out` (the staging folder is removed when the body fails) and calls
    `on_commit(ref, stage)`. The code version (`pipeline.code_version`) is the task's `version`.

    Only I/O-bound stages should pass `retries`: they are retried on transient I/O failures only (the store
    or a data source unreachable), after 2 s, 4 s, 8 s, ... (exponential backoff, +-25% jitter), on top of
    the store's own per-request retries (`store.retry_attempts`).
    """

    def decorate(body: Callable[..., dict[str, Any]]) -> Any:
        shape = StageShape.of(body)
        version = code_version(Path(inspect.getsourcefile(body) or ""))

        def run(*args: Any, **kwargs: Any) -> Ref:
            bound = shape.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            parameters = dict(bound.arguments)
            stage = open_stage(name, version, parameters)
            if stage.committed:
                ref = stage.ref
                if on_cached is not None:
                    on_cached(ref, stage)
                return ref
            try:
                meta = body(**shape.arguments(parameters, stage))
            except BaseException:
                stage.discard()
                raise
            ref = stage.commit(meta=meta)
            if on_commit is not None:
                on_commit(ref, stage)
            return ref

        # Prefect reads the task's parameters from this signature: Refs where the body takes folders.
        run.__signature__ = shape.signature  # type: ignore[attr-defined]
        run.__name__, run.__qualname__, run.__module__ = body.__name__, body.__qualname__, body.__module__
        run.__doc__ = body.__doc__
        run.body = body  # type: ignore[attr-defined]  # the plain function, for tests and reuse (task.body)
        return task(
            name=name,
            version=version,
            cache_key_fn=_cache_key,
            persist_result=True,
            result_serializer="json",
            retries=retries,
            retry_delay_seconds=[2.0 * 2**attempt for attempt in range(retries)] if retries else 0,
            retry_jitter_factor=0.25 if retries else None,
            retry_condition_fn=retry_on_transient_errors if retries else None,
        )(run)

    return decorate


def run_logger() -> Any:
    """Prefect's run logger (its lines show in the UI) inside a run; this module's logger outside one."""
    return _run_logger()


__all__ = [
    "Artifact",
    "ArtifactNotFound",
    "ArtifactStoreResults",
    "StageRun",
    "UnsafeResultRecord",
    "check_result_record",
    "open_stage",
    "result_storage_for",
    "run_logger",
    "stage_task",
]
