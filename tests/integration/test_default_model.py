"""The default model (SmolLM2-135M-Instruct) converted from its packaged GGUF really works.

Slow (about 45 s to convert), so marked `integration`. It is converted where the pipeline converts it, into the
machine's asset cache (FINETUNE_CACHE_DIR, else ~/.cache/finetune-pipeline), once: a fresh machine (CI) converts it
in whichever test of the suite asks for it first, and every later one (this module included) reads that folder.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import assets

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def converted() -> Iterator[tuple[Path, str]]:
    """(cache dir, model folder): the default model, converted into the asset cache if no test did so before."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield assets.default_cache_dir(), assets.resolve_model(assets.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def loaded(converted: tuple[Path, str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = converted
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(
        folder, **assets.model_load_kwargs()
    )


def test_folder_is_plain_hugging_face_layout(converted: tuple[Path, str]) -> None:
    cache_dir, folder = converted
    path = Path(folder)
    assert path.parent == cache_dir.resolve() / "models"
    assert re.fullmatch(r"smollm2-135m-instruct-[0-9a-f]{12}", path.name)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (path / name).is_file(), name
    assert "quantization_config" not in (path / "config.json").read_text()

    started = time.perf_counter()
    assert assets.resolve_model(assets.DEFAULT_MODEL, cache_dir) == folder
    assert time.perf_counter() - started < 2.0, "a cached model must not be converted again"


def test_parameter_count_and_special_tokens(loaded) -> None:
    tokenizer, model = loaded
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 1e6
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192


def test_greedy_answer_is_english(loaded) -> None:
    import torch

    tokenizer, model = loaded
    # An instruct model: asked through its chat template. (A bare prompt makes it emit
    # <|im_end|> at once.)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert text, "empty answer"
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 3 and sum(map(len, words)) >= 0.7 * len(text.replace(" ", "")), text
    assert "Paris" in text, text
