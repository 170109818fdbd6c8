"""The ids a corpus stream has yielded so far, kept compactly: the one part of a build's memory that grows with N.

A dict of the id strings cost about 140 bytes per document: a build's peak RSS rose 109 MiB from 100k to 1M rows of
tools/bench_scale.py, and reading that corpus's 1,000,000 ids took 138 MiB more at its peak. Here each id is a 128-bit
BLAKE2b digest and the position where it first appeared, 24 bytes in sorted numpy arrays, plus a dict of recent ids
(at most N/16): the same 1,000,000 ids peak at 41 MiB. At 128 bits two different ids collide with probability about
N²/2¹²⁹ (10⁻²¹ at a billion).
"""

from __future__ import annotations

import hashlib

import numpy as np

MIN_PENDING = 1 << 16  # recent ids held in a dict before they are merged into the sorted arrays


def _digest(doc_id: str) -> bytes:
    return hashlib.blake2b(doc_id.encode("utf-8"), digest_size=16).digest()


class SeenIds:
    """A set of ids with the position at which each was added.

    Merges are amortised: the dict of recent ids grows to a sixteenth of the sorted part before a merge, so the dict
    never holds more than N/16 + 65,536 ids, and a merge copies one array at a time.

    Example:
        >>> seen = SeenIds()
        >>> seen.add("doc-1"); seen.add("doc-2")
        >>> "doc-2" in seen, seen.position("doc-2"), "doc-3" in seen, len(seen)
        (True, 1, False, 2)
    """

    def __init__(self) -> None:
        self._high = np.empty(0, np.uint64)  # (n,) sorted first halves of the digests
        self._low = np.empty(0, np.uint64)  # (n,) their second halves
        self._positions = np.empty(0, np.int64)  # (n,) where each id first appeared
        self._recent: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._high) + len(self._recent)

    def __contains__(self, doc_id: str) -> bool:
        return self.position(doc_id) is not None

    def position(self, doc_id: str) -> int | None:
        """The position at which `doc_id` was added, or None."""
        digest = _digest(doc_id)
        if digest in self._recent:
            return self._recent[digest]
        high, low = np.uint64(int.from_bytes(digest[:8], "little")), int.from_bytes(digest[8:], "little")
        first = int(np.searchsorted(self._high, high, "left"))
        for i in range(first, len(self._high)):
            if self._high[i] != high:
                break
            if int(self._low[i]) == low:
                return int(self._positions[i])
        return None

    def add(self, doc_id: str) -> None:
        """Add `doc_id` (not yet in the set) at the next position."""
        self._recent[_digest(doc_id)] = len(self)
        if len(self._recent) >= max(MIN_PENDING, len(self._high) // 16):
            self._merge()

    def _merge(self) -> None:
        """Insert the recent ids into the sorted arrays, one array at a time (so the peak is one array's copy)."""
        digests = np.frombuffer(b"".join(self._recent), dtype="<u8").reshape(-1, 2)  # (r, 2)
        positions = np.fromiter(self._recent.values(), np.int64, len(self._recent))  # (r,)
        order = np.argsort(digests[:, 0], kind="stable")
        where = np.searchsorted(self._high, digests[order, 0])  # (r,) insertion points, ascending
        self._recent = {}
        self._high = np.insert(self._high, where, digests[order, 0])
        self._low = np.insert(self._low, where, digests[order, 1])
        self._positions = np.insert(self._positions, where, positions[order])
