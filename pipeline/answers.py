"""How answers are compared and categorised, shared by the stage that scores them and the stage that gates on them.

`normalise_answer` is the form exact match and token F1 compare (tasks/evaluate/scoring.py) and the form the
ranking pairs two versions' questions on (tasks/gate/ranking.py); `CATEGORIES` are the error categories an
evaluated answer falls into, in priority order, which the gate turns into `<category>_rate` metrics.
"""

from __future__ import annotations

import re
import string

CATEGORIES = ("not_declined", "too_short", "repetitive", "off_topic", "too_long", "ok")
"""Error categories in priority order: an answer gets the first that applies."""


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: the form exact match and token F1 compare."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()
