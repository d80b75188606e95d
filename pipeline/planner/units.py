"""Memory sizes for people and from them: '16GB', '16GiB', '24G' parsed to bytes, bytes shown as '3.52 GiB'."""

from __future__ import annotations

import re

from pipeline.planner.errors import PlannerError

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_memory(text: str | int | float) -> int:
    """Bytes in a memory size: '16GB' (10^9), '16GiB' (2^30), '24G' (a bare letter is binary, as in `free -g`),
    '512MiB', 2048.

    Raises PlannerError naming the text and the accepted forms.
    """
    if isinstance(text, (int, float)):
        return int(text)
    match = _MEMORY.match(text)
    if not match:
        raise PlannerError(
            f"memory size: expected a number with an optional unit like 16GB, 16GiB, 24G or 512MiB, found {text!r}"
        )
    number, prefix, binary, byte = match.groups()
    prefix = prefix.lower()
    # 'GiB' and a bare 'G' are powers of two; 'GB' is SI (a "16 GB" V100 holds 16 GiB: say 16GiB for it).
    if binary or (prefix and not byte):
        return int(float(number) * 1024 ** " kmgt".index(prefix))
    return int(float(number) * _UNITS[prefix])


def format_bytes(count: float) -> str:
    """'3.52 GiB' style (binary units), for people."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"
