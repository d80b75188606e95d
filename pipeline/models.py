"""Loading models and tokenizers the same way in every stage, and finding trained ones again.

In: a model spec (alias, hub id, local folder), a trained-model Ref, a readable alias
(`more_itertools_60_steps_20261122T074641Z`) or a Ref uri (`train/<key>`). Out: a
tokenizer with a pad token and left/right padding as asked, a model on the best device
(CUDA, then MPS, then CPU). Safetensors only; `trust_remote_code` only when the config
turns it on.

A train artifact holds `model/` (a full Hugging Face folder; with LoRA the adapter merged
into the base weights) and, with LoRA, `adapter/` (the adapter alone, whose
`adapter_config.json` names the base model spec). `load_model` loads either: an adapter
folder is loaded onto its base model through peft and merged for inference.

torch and transformers are imported inside the functions that use them: the flow, the CLI and the stages
import this module for its folders, aliases and checks, and a process whose stages all come back Cached (or a
`finetune validate`) should not spend seconds of CPU importing them.
"""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pipeline.assets import UnknownModelError, resolve_model
from pipeline.config import ModelConfig, TrainConfig
from pipeline.config.training import WeightDtype
from pipeline.refs import Ref
from pipeline.store import ArtifactNotFound, ArtifactStore

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_SUBDIR = "model"
ADAPTER_SUBDIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ALIASES_PREFIX = "aliases"
LATEST_PASSING = "pointers/latest-passing.json"
"""Store key of the pointer the flow moves to each model that passes every gate."""
LATEST_PASSING_NAME = "latest-passing"
IGNORE_INDEX = -100
"""The label of a position the loss leaves out (Hugging Face's convention): prompt tokens when only the
completion trains, and padding (tokenize writes it, train pads with it)."""

Precision = str  # one of "fp32", "bf16", "fp16"

_REF_URI = re.compile(r"^train/[0-9a-f]{32}(/(model|adapter))?/?$")
_ALIAS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnsupportedPrecision(ValueError):
    """The requested training dtype does not run on the chosen device."""


class ModelFolderError(UnknownModelError):
    """A local model folder that cannot be loaded safely: no config.json, or weights only in a pickle format."""


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
SAFE_ADAPTER_WEIGHTS = ("adapter_model.safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
"""Weight files in these formats are pickles, which run code when loaded: never loaded here."""


def check_model_folder(folder: str | Path) -> None:
    """Raise ModelFolderError unless `folder` is a Hugging Face model (or peft adapter) folder with safetensors weights.

    In: a local folder. The message names the folder, what was expected and what was
    found, so a pickle-only checkpoint (`pytorch_model.bin`) is refused before anything
    reads it; such a folder must be converted once where its author is trusted.
    """
    folder = Path(folder)
    found = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
    pickles = [name for name in found if name.endswith(PICKLE_SUFFIXES)]
    convert = (
        "; convert it once where you trust its author: AutoModelForCausalLM.from_pretrained(folder, "
        "use_safetensors=False).save_pretrained(new_folder) writes model.safetensors"
    )
    if is_adapter_folder(folder):
        if not any((folder / name).is_file() for name in SAFE_ADAPTER_WEIGHTS):
            raise ModelFolderError(
                f"adapter folder {folder}: expected adapter_model.safetensors (pickled weights are "
                f"never loaded), found {found}"
                + (
                    "; convert it once where you trust its author: "
                    "PeftModel.from_pretrained(base, folder).save_pretrained(new_folder) writes "
                    "adapter_model.safetensors"
                    if pickles
                    else ""
                )
            )
        return
    if not (folder / "config.json").is_file():
        raise ModelFolderError(
            f"model folder {folder}: expected config.json (a Hugging Face model folder as "
            f"save_pretrained writes it), found {found or 'an empty folder'}"
        )
    if not any((folder / name).is_file() for name in SAFE_WEIGHTS):
        raise ModelFolderError(
            f"model folder {folder}: expected model.safetensors (pickled weights are never loaded: "
            f"they can run code), found {pickles or found}" + (convert if pickles else "")
        )


def check_model_spec(spec: str) -> None:
    """Fail fast, without building or downloading anything, when a base-model spec cannot be used here.

    In: `model.name` (alias, local folder or hub id). Raises UnknownModelError for a folder that
    does not exist or a hub id that cannot be reached (offline), ModelFolderError for a folder
    without config.json or without safetensors weights.
    """
    from pipeline.assets import MODEL_ALIASES

    if spec in MODEL_ALIASES:
        return
    local = Path(spec).expanduser()
    if local.is_dir():
        check_model_folder(local)
        return
    resolve_model(spec)  # raises for a missing folder, an invalid hub id, or an uncached hub id offline


# --------------------------------------------------------------------------- devices and dtypes


def pick_device() -> str:
    """'cuda' when a GPU is there, else 'mps' on Apple silicon, else 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def bf16_supported(device: str) -> bool:
    """Whether bfloat16 autocast is worth using on `device` (CUDA with bf16 support; CPU and MPS run it too)."""
    if device == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return device in ("cpu", "mps")


def training_precision(requested: str, device: str, weights: str = "float32") -> Precision:
    """The autocast (mixed-precision) mode for training.

    In: the config's train.dtype ('auto', 'float32', 'bfloat16', 'float16'), the device and model.dtype, the
    dtype the weights are in. Out: 'fp32' (no autocast), 'bf16' or 'fp16'. 'auto' follows 16-bit weights
    (their own dtype, so adapters kept in float32 over them compute in 16-bit too); over float32 weights it is
    bf16 on a CUDA GPU that supports it and fp32 elsewhere (bf16 on a CPU without AMX is slower than fp32).
    Raises UnsupportedPrecision for float16 off CUDA, or bfloat16 on a GPU without it.
    """
    key = "train.dtype"
    if requested == "auto" and weights in ("bfloat16", "float16"):
        requested, key = weights, "model.dtype"
    if requested == "auto":
        return "bf16" if device == "cuda" and bf16_supported(device) else "fp32"
    if requested == "float32":
        return "fp32"
    if requested == "float16":
        if device != "cuda":
            raise UnsupportedPrecision(
                f"{key}: float16 needs a CUDA GPU, found device {device!r} (CPUs lack float16 kernels and loss "
                "scaling for it); use bfloat16 or float32"
            )
        return "fp16"
    if not bf16_supported(device):
        raise UnsupportedPrecision(f"{key}: this {device} device has no bfloat16 support; use float16 or float32")
    return "bf16"


WEIGHT_DTYPES: tuple[str, ...] = get_args(WeightDtype)
"""model.dtype's names: each is the name of the torch dtype the weights load in (`weight_dtype`)."""


def weight_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of WEIGHT_DTYPES' names ('bfloat16' -> torch.bfloat16)."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"model.dtype: expected one of {', '.join(WEIGHT_DTYPES)}, found {name!r}")
    import torch

    return getattr(torch, name)


QLORA_PACKAGE = "bitsandbytes"
"""The package behind train.method=qlora's 4-bit weights: optional (the `qlora` extra), CUDA only."""


class MissingRequirement(UnsupportedPrecision):
    """The config asks for something this machine lacks (a CUDA GPU, the bitsandbytes package); says which."""


def check_training_device(model: ModelConfig, train: TrainConfig, device: str | None = None) -> None:
    """Fail before any work when this machine cannot train as configured; every problem in one message.

    In: the model and train sections and the device training would use; None picks it (`pick_device()`, which
    imports torch) only when the config asks for something a device may lack, so `finetune run` on float32
    weights checks without loading torch before a run whose stages may all come back Cached. Raises
    MissingRequirement for train.method=qlora without a CUDA GPU or without bitsandbytes installed,
    UnsupportedPrecision for a dtype the device lacks (model.dtype or train.dtype float16 off CUDA, bfloat16
    on a GPU without it).
    """
    if train.method != "qlora" and model.dtype == "float32" and train.dtype in ("auto", "float32"):
        return  # float32 weights at float32 or automatic precision: every device trains them
    device = device or pick_device()
    missing = []
    if train.method == "qlora":
        if device != "cuda":
            missing.append(
                f"train.method: qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels), found device {device!r}; "
                "on this machine use train.method=lora with model.dtype=bfloat16"
            )
        if importlib.util.find_spec(QLORA_PACKAGE) is None:
            missing.append(
                f"train.method: qlora needs the {QLORA_PACKAGE} package, found it not installed; "
                "pip install -e '.[qlora]' (bitsandbytes>=0.46.1) on a CUDA machine"
            )
    unsupported = []
    if model.dtype == "float16" and device != "cuda":
        # Measured on this project's 2-core CPU: a 512x512 float16 matmul took 267 ms, bfloat16 1.6 ms, float32 9 ms.
        unsupported.append(
            f"model.dtype: float16 needs a CUDA GPU, found device {device!r}: CPUs have no fast float16 matmuls "
            "(about 100x slower than bfloat16 here) and float16 training needs loss scaling; use bfloat16, which "
            "has float32's range and needs none"
        )
    else:
        try:
            training_precision(train.dtype, device, model.dtype)
        except UnsupportedPrecision as exc:
            unsupported.append(str(exc))
    if missing or unsupported:
        raise (MissingRequirement if missing else UnsupportedPrecision)("\n".join(missing + unsupported))


def four_bit_config(compute: str) -> Any:
    """The bitsandbytes settings of train.method=qlora: NF4 weights, double quantisation, `compute` (model.dtype)
    for the matmuls; QLoRA's recipe (Dettmers et al. 2023). Only called where check_training_device passed."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=weight_dtype(compute),
    )


def inference_dtype(device: str) -> torch.dtype:
    """The dtype to run a model in for inference: bfloat16 on CUDA when supported, else float32."""
    import torch

    return torch.bfloat16 if device == "cuda" and bf16_supported(device) else torch.float32


# --------------------------------------------------------------------------- folders and loading


def model_folder(model: ModelConfig | Ref, store: ArtifactStore) -> str:
    """A local folder (or hub id) for a base-model spec or a trained-model Ref.

    For a Ref: its `model/` folder, or its `adapter/` folder when only the adapter was kept
    (`train.lora.merge: false`); `load_model` and `load_tokenizer` accept both.
    """
    if isinstance(model, Ref):
        return trained_model_folder(store.fetch(model))
    return resolve_model(model.name)


def trained_model_folder(artifact: Path) -> str:
    """The loadable folder inside a fetched train artifact: `model/`, or `adapter/` when only the adapter was kept."""
    merged = artifact / MODEL_SUBDIR
    return str(merged if merged.is_dir() or not (artifact / ADAPTER_SUBDIR).is_dir() else artifact / ADAPTER_SUBDIR)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""Any one of these in a model folder means a tokenizer was saved with it."""


class MissingTokenizerFiles(FileNotFoundError):
    """A local model folder holds no tokenizer files; the message names the folder."""


def check_tokenizer_files(folder: str) -> None:
    """Raise MissingTokenizerFiles when the local model folder `folder` has no tokenizer file (hub ids pass)."""
    path = Path(folder)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        found = sorted(p.name for p in path.iterdir())
        raise MissingTokenizerFiles(
            f"model folder {path} has no tokenizer files: expected one of {', '.join(TOKENIZER_FILES)}, "
            f"found {found or 'an empty folder'}; save the tokenizer next to the weights with "
            "tokenizer.save_pretrained(folder)"
        )


def is_adapter_folder(folder: str | Path) -> bool:
    """True when `folder` holds a peft adapter (adapter_config.json) rather than full weights."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base_spec(folder: str | Path) -> str:
    """The base model spec an adapter folder was trained on (an alias, hub id or folder)."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return str(config["base_model_name_or_path"])


def load_tokenizer(
    folder: str, *, padding_side: str = "right", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The model's own tokenizer; pad token = EOS when the tokenizer has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None:
        raise ValueError(f"model {folder}: its tokenizer has no EOS token; set one in tokenizer_config.json")
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(folder: str, *, device: str | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM in float32 (bfloat16 on CUDA when supported) on `device` or the best one.

    In: a full model folder (or hub id), or an adapter folder, whose base model is
    resolved from the spec in its adapter_config.json and the adapter merged in.
    """
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    dtype = inference_dtype(device)
    if Path(folder).is_dir():
        check_model_folder(folder)  # safetensors only: a pickle-only folder is refused before anything reads it
    if is_adapter_folder(folder):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            resolve_model(adapter_base_spec(folder)),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
        # Merged once here, so generation runs at the speed of a plain model.
        model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never unpickle weights
        )
    return model.to(device)


# --------------------------------------------------------------------------- readable aliases


def alias_name(dataset: str, steps: int, when: datetime) -> str:
    """The readable name of a trained model: '<dataset>_<steps>_steps_<UTC timestamp>'.

    In: a dataset label (characters outside [A-Za-z0-9._-] become '-'), the optimizer
    steps run and the time of training. Out: e.g. 'more_itertools_60_steps_20261122T074641Z'.
    """
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-._") or "data"
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{label}_{steps}_steps_{stamp}"


def write_alias(store: ArtifactStore, alias: str, ref: Ref) -> str:
    """Record `alias` -> `ref` as `aliases/<alias>.json` in the store; out: that path.

    The alias lives beside the content-addressed artifact, never in its key, so naming a
    model again does not retrain it.
    """
    path = f"{ALIASES_PREFIX}/{alias}.json"
    record = {
        "alias": alias,
        "ref": ref.model_dump(mode="json"),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    store.put_bytes(path, json.dumps(record, indent=2).encode("utf-8"))
    return path


def read_alias(store: ArtifactStore, alias: str) -> Ref:
    """The Ref an alias points at. Raises ArtifactNotFound when the store has no such alias."""
    if not _ALIAS_NAME.match(alias):
        raise ArtifactNotFound(f"{alias!r} is not an alias name")
    record = json.loads(store.get_bytes(f"{ALIASES_PREFIX}/{alias}.json"))
    return Ref.model_validate(record["ref"])


def list_aliases(store: ArtifactStore) -> list[str]:
    """Every alias recorded in the store, sorted (oldest timestamp first within a dataset)."""
    names = [path.rsplit("/", 1)[-1] for path in store.list(ALIASES_PREFIX)]
    return sorted(name.removesuffix(".json") for name in names if name.endswith(".json"))


def stored_model_ref(spec: str, store: ArtifactStore) -> Ref | None:
    """The train artifact's Ref when `spec` names a model in the store, as `find_model` reads it; else None.

    In: what a person typed: a Ref uri ('train/<key>', '.../model', '.../adapter'), 'latest-passing' or a
    readable alias. A local folder or a base-model spec is not in the store: None.
    """
    if Path(spec).expanduser().is_dir():
        return None
    if _REF_URI.match(spec):
        return store.open_ref("/".join(spec.strip("/").split("/")[:2]))
    if spec == LATEST_PASSING_NAME and store.exists(LATEST_PASSING):
        return store.open_ref(json.loads(store.get_bytes(LATEST_PASSING))["train_uri"])
    if _ALIAS_NAME.match(spec) and store.exists(f"{ALIASES_PREFIX}/{spec}.json"):
        return read_alias(store, spec)
    return None


def find_model(spec: str, store: ArtifactStore) -> str:
    """A loadable folder for whatever a person typed to name a model.

    In: a local folder (a model folder, an adapter folder or a whole train artifact), a
    Ref uri ('train/<key>', 'train/<key>/model', 'train/<key>/adapter'), a readable alias recorded in the
    store, 'latest-passing' (the last model that passed every gate), or a base-model spec (alias or hub id).
    Out: the folder (fetched and verified when it comes from the store). Raises UnknownModelError listing
    the store's aliases and the built-in model aliases when nothing matches.
    """
    local = Path(spec).expanduser()
    if local.is_dir():
        for sub in (MODEL_SUBDIR, ADAPTER_SUBDIR):
            if (local / sub).is_dir():
                return str((local / sub).resolve())
        return str(local.resolve())
    if _REF_URI.match(spec):
        parts = spec.strip("/").split("/")
        ref = store.open_ref("/".join(parts[:2]))
        if parts[-1] == ADAPTER_SUBDIR:  # asked for the adapter itself, not the merged model
            return str(store.fetch(ref) / ADAPTER_SUBDIR)
        return model_folder(ref, store)
    if spec == LATEST_PASSING_NAME and store.exists(LATEST_PASSING):
        pointer = json.loads(store.get_bytes(LATEST_PASSING))
        return model_folder(store.open_ref(pointer["train_uri"]), store)
    if _ALIAS_NAME.match(spec) and store.exists(f"{ALIASES_PREFIX}/{spec}.json"):
        return model_folder(read_alias(store, spec), store)
    try:
        return resolve_model(spec)
    except UnknownModelError as exc:
        known = list_aliases(store)
        shown = "\n".join(f"  {name}" for name in known[-20:]) or "  (none yet)"
        raise UnknownModelError(
            f"{exc}\nTrained models in the store {store.uri} (aliases):\n{shown}\n"
            "A train artifact's uri (train/<key>) or a local model folder works too."
        ) from None
