"""The stage decorator: a plain body of folders becomes a task of Refs that commits once and reuses after.

The task's function (`task.fn`) is called directly, without a Prefect run: the shell (key, cache
check, fetch, commit, hooks) is the decorator's, not Prefect's.
"""

from __future__ import annotations

import inspect
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import StoreConfig
from pipeline.refs import Ref
from pipeline.stage import Artifact, StageRun, stage_task
from pipeline.store import StoreUnavailable, open_store

CALLS: list[str] = []


def _noted(name: str):
    def hook(ref: Ref, stage: StageRun) -> None:
        CALLS.append(f"{name} {ref.uri == stage.uri}")

    return hook


@stage_task("concat", on_cached=_noted("cached"), on_commit=_noted("committed"))
def concat(first: Path, rest: list[Path], tagged: Artifact | None, sep: str, out: Path, upper: bool = False) -> dict:
    """Join the `text.txt` of every input into `out/text.txt`; the figures: length and the tagged input's uri."""
    CALLS.append("body")
    texts = [(folder / "text.txt").read_text() for folder in [first, *rest]]
    joined = sep.join(texts).upper() if upper else sep.join(texts)
    (out / "text.txt").write_text(joined)
    return {"length": len(joined), "tagged": tagged.ref.uri if tagged else None}


@stage_task("broken")
def broken(first: Path, out: Path) -> dict:
    """Writes, then fails."""
    (out / "half.txt").write_text("half")
    raise ValueError("bad input")


def _source(store_config: StoreConfig, name: str, text: str, tmp_path: Path) -> Ref:
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    (folder / "text.txt").write_text(text)
    return open_store(store_config).commit(f"source/{name}", folder, kind="source", inputs={}, config={}, meta={})


def test_the_task_takes_refs_and_the_store_where_the_body_takes_folders():
    parameters = inspect.signature(concat.fn).parameters
    assert list(parameters) == ["first", "rest", "tagged", "sep", "store", "upper"]
    assert parameters["first"].annotation is Ref and parameters["rest"].annotation == list[Ref]
    assert parameters["tagged"].annotation == Ref | None and parameters["store"].annotation is StoreConfig
    assert concat.name == "concat" and len(concat.version) == 16


def test_the_body_is_a_plain_function(tmp_path: Path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "text.txt").write_text(name)
    (tmp_path / "out").mkdir()
    figures = concat.body(tmp_path / "a", [tmp_path / "b"], None, "+", tmp_path / "out")
    assert figures == {"length": 3, "tagged": None} and (tmp_path / "out" / "text.txt").read_text() == "a+b"


def test_a_stage_commits_once_then_returns_the_committed_ref(tmp_path: Path):
    store = StoreConfig(uri=str(tmp_path / "store"))
    a, b = _source(store, "a", "x", tmp_path), _source(store, "b", "yz", tmp_path)
    CALLS.clear()
    ref = concat.fn(first=a, rest=[b, a], tagged=b, sep="-", store=store)
    assert CALLS == ["body", "committed True"]
    assert ref.kind == "concat" and ref.meta == {"length": 6, "tagged": "source/b"}
    assert (open_store(store).fetch(ref) / "text.txt").read_text() == "x-yz-x"
    again = concat.fn(first=a, rest=[b, a], tagged=b, sep="-", store=store)
    assert again == ref and CALLS == ["body", "committed True", "cached True"]
    other = concat.fn(first=a, rest=[b, a], tagged=None, sep="-", store=store, upper=True)
    assert other.uri != ref.uri and (open_store(store).fetch(other) / "text.txt").read_text() == "X-YZ-X"


def test_a_failing_body_commits_nothing_and_leaves_no_staging_folder(tmp_path: Path, monkeypatch):
    store = StoreConfig(uri=str(tmp_path / "store"))
    a = _source(store, "a", "x", tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # where the staging folder is made
    with pytest.raises(ValueError, match="bad input"):
        broken.fn(first=a, store=store)
    assert list(staging.iterdir()) == []
    assert open_store(store).list("broken") == []


def test_a_stage_that_never_runs_its_body_makes_no_staging_folder(tmp_path: Path, monkeypatch):
    """Found committed, or its store unreachable: no staging folder is made, none is left in the temp dir."""
    store = StoreConfig(uri=str(tmp_path / "store"))
    a = _source(store, "a", "x", tmp_path)
    concat.fn(first=a, rest=[], tagged=None, sep="-", store=store)
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # where a staging folder would be made
    assert concat.fn(first=a, rest=[], tagged=None, sep="-", store=store).kind == "concat"  # cached
    with socket.socket() as probe:  # a port nothing listens on: the store cannot be reached
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = StoreConfig(uri="s3://bucket/runs", endpoint_url=f"http://127.0.0.1:{port}", retry_attempts=1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with pytest.raises(StoreUnavailable):
        concat.fn(first=a, rest=[], tagged=None, sep="-", store=unreachable)
    assert [path.name for path in staging.iterdir() if path.name.startswith("finetune-stage-")] == []


def test_a_body_without_an_output_folder_is_refused():
    def no_out(first: Path) -> dict[str, Any]:
        return {}

    with pytest.raises(TypeError, match="expected an output folder parameter 'out'"):
        stage_task("no-out")(no_out)
