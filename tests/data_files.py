"""Data files for the bad-input tests (tests/unit/test_collect_bad_input.py, tests/reliability/test_bad_input.py).

In: rows or text; out: files in a test's temporary folder, and `GOOD`, 30 valid question/answer rows.
"""

from __future__ import annotations

import json
from pathlib import Path

GOOD = [{"question": f"What does function number {i} do?", "answer": f"It returns {i}."} for i in range(30)]


def jsonl(records) -> str:
    """JSON Lines text of `records`, one object per line."""
    return "".join(json.dumps(r) + "\n" for r in records)


def write(folder: Path, name: str, content: str | bytes) -> str:
    """Write `content` (bytes as they are, text as UTF-8) to `folder/name`, making its folders; returns the path."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)
