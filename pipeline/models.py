"""Loading models and tokenizers the same way in every stage.

In: a model spec (alias, hub id, local folder) or a trained-model Ref already
fetched to a folder. Out: a tokenizer with a pad token and left/right padding as
asked, a model on the best device (CUDA, then MPS, then CPU). Safetensors only;
`trust_remote_code` only when the config turns it on.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.assets import resolve_model
from pipeline.config import ModelConfig
from pipeline.refs import Ref
from pipeline.store import ArtifactStore

MODEL_SUBDIR = "model"


def pick_device() -> str:
    """'cuda' when a GPU is there, else 'mps' on Apple silicon, else 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def model_folder(model: ModelConfig | Ref, store: ArtifactStore) -> str:
    """A local folder (or hub id) for a base-model spec or a trained-model Ref."""
    if isinstance(model, Ref):
        return str(store.fetch(model) / MODEL_SUBDIR)
    return resolve_model(model.name)


def load_tokenizer(folder: str, *, padding_side: str = "right", trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's own tokenizer; pad token = EOS when the tokenizer has none."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None:
        raise ValueError(f"model {folder}: its tokenizer has no EOS token; set one in tokenizer_config.json")
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(folder: str, *, device: str | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM in float32 (bfloat16 on CUDA when supported) on `device` or the best one."""
    device = device or pick_device()
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True  # never unpickle weights
    )
    return model.to(device)
