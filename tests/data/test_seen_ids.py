"""SeenIds answers as the dict of ids it replaces did, across the merges of its recent ids into sorted arrays."""

from __future__ import annotations

import random

import attribindex.data._seen_ids as seen_ids
from attribindex.data._seen_ids import SeenIds


def test_positions_and_membership_match_a_dict_across_merges(monkeypatch):
    monkeypatch.setattr(seen_ids, "MIN_PENDING", 7)  # merge every few ids, so lookups cross many merged runs
    rng = random.Random(0)
    ids = list(dict.fromkeys(f"doc-{rng.getrandbits(40)}" for _ in range(3000)))
    seen, reference = SeenIds(), {}
    for doc_id in ids:
        assert doc_id not in seen
        seen.add(doc_id)
        reference[doc_id] = len(reference)
    assert len(seen) == len(reference) and len(seen._recent) < len(ids) // 10  # most ids are in the sorted arrays
    assert all(seen.position(doc_id) == position for doc_id, position in reference.items())
    assert not any(f"other-{i}" in seen for i in range(3000))


def test_ids_sharing_the_first_half_of_their_digest_stay_apart(monkeypatch):
    monkeypatch.setattr(seen_ids, "MIN_PENDING", 2)
    digests = {"a": bytes(8) + b"\x01" * 8, "b": bytes(8) + b"\x02" * 8, "c": bytes(8) + b"\x03" * 8}
    monkeypatch.setattr(seen_ids, "_digest", lambda doc_id: digests.get(doc_id, doc_id.encode().ljust(16, b"_")))
    seen = SeenIds()
    for doc_id in ("a", "x", "b", "y"):
        seen.add(doc_id)
    assert [seen.position(i) for i in ("a", "b", "x", "y")] == [0, 2, 1, 3] and "c" not in seen
