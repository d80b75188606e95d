"""Exact "seen before?" and "how often?" over more rows than memory holds: 16-byte digests spilled to disk.

Data preparation asks two questions of every row in order: is this row's key (its content, its normalised
question, its answer) the same as an earlier row's, and which keys repeat most. A Python set of 16-byte digests
answers the first in memory but costs about 80 bytes a row (330 MB for 2 million rows with two keys each), which
is what made the flow's memory grow with the data. `DigestLog` instead appends (digest, sequence number) pairs
to 256 partition files on disk, chosen by the digest's first byte, and answers both questions one partition at
a time with numpy: memory is one partition (24 bytes a row / 256) plus one byte a row for the answer. Exact:
two keys are the same when their 16-byte BLAKE2b digests are (a collision among 10^9 rows has odds of about
10^-21).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PARTITIONS = 256
"""Partition files, by the digest's first byte: each holds about 1/256 of the rows."""
RECORD = np.dtype([("digest", "S16"), ("seq", "<u8")])
"""One entry on disk: the digest and the position of its row (0, 1, ...)."""


class DigestLog:
    """16-byte digests in arrival order, spilled to partition files in `folder`; out: repeats and counts, exactly.

    `add` each row's digest in order; then `repeats()` says, per row, whether an earlier row had the same digest
    (what de-duplication drops), and `most_common(n)` gives the n most repeated digests with their first row.
    """

    def __init__(self, folder: Path, buffer_rows: int = 1 << 16) -> None:
        """In: an empty folder for the partition files (created), and how many digests to buffer between writes."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.buffer_rows = max(1, buffer_rows)
        self._buffer: list[bytes] = []
        self._flushed = 0

    def __len__(self) -> int:
        return self._flushed + len(self._buffer)

    def add(self, digest: bytes) -> None:
        """Record the next row's 16-byte digest."""
        if len(digest) != 16:
            raise ValueError(f"expected a 16-byte digest, found {len(digest)} bytes")
        self._buffer.append(digest)
        if len(self._buffer) >= self.buffer_rows:
            self._flush()

    def _flush(self) -> None:
        """Append the buffered digests, with their positions, to their partition files."""
        if not self._buffer:
            return
        entries = np.empty(len(self._buffer), RECORD)
        entries["digest"] = np.frombuffer(b"".join(self._buffer), dtype="S16")
        entries["seq"] = np.arange(self._flushed, self._flushed + len(self._buffer), dtype=np.uint64)
        first = np.frombuffer(entries["digest"].tobytes(), dtype=np.uint8)[::16].astype(np.intp)  # its partition
        order = np.argsort(first, kind="stable")
        bounds = np.searchsorted(first[order], np.arange(PARTITIONS + 1))
        for part in range(PARTITIONS):
            if bounds[part] < bounds[part + 1]:
                with (self.folder / f"{part:03d}.bin").open("ab") as handle:
                    handle.write(entries[order[bounds[part] : bounds[part + 1]]].tobytes())
        self._flushed += len(self._buffer)
        self._buffer = []

    def _partitions(self):
        """Each partition's entries sorted by (digest, position)."""
        self._flush()
        for path in sorted(self.folder.glob("*.bin")):
            entries = np.fromfile(path, dtype=RECORD)
            entries.sort(order=("digest", "seq"))
            yield entries

    def repeats(self) -> np.ndarray:
        """Per row in order, True when an earlier row had the same digest (a bool array of len(self))."""
        repeated = np.zeros(len(self), dtype=bool)
        for entries in self._partitions():
            same = entries["digest"][1:] == entries["digest"][:-1]
            repeated[entries["seq"][1:][same]] = True
        return repeated

    def most_common(self, n: int) -> list[tuple[int, int]]:
        """(count, first row) of the `n` most repeated digests seen more than once; ties go to the earlier row."""
        found: list[tuple[int, int]] = []
        for entries in self._partitions():
            if not len(entries):
                continue
            digests = entries["digest"]
            starts = np.flatnonzero(np.r_[True, digests[1:] != digests[:-1]])
            counts = np.diff(np.r_[starts, len(entries)])
            firsts = entries["seq"][starts]
            best = np.lexsort((firsts, -counts))[:n]
            found += [(int(counts[i]), int(firsts[i])) for i in best if counts[i] > 1]
        return sorted(found, key=lambda item: (-item[0], item[1]))[:n]
