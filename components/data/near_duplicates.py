"""Near-duplicate images: perceptual hashes within a Hamming distance, grouped.

A resized, recompressed or lightly edited copy of a picture has different bytes (so a new
sha1) but almost the same 256-bit pHash (`components.data.images.perceptual_hash`): a few
bits differ, while unrelated pictures differ in about half of them. Two files are near
duplicates when their hashes are at most `max_distance` bits apart; a group is a connected
component of that relation (a chain a~b~c is one group even when a and c are further apart).

Finding the close pairs does not compare every pair. Pigeonhole (multi-index hashing): split
the 256 bits into max_distance + 1 chunks; two hashes within max_distance bits differ in at
most max_distance chunks, so they agree exactly on at least one. Hashes are bucketed by each
chunk's value, only hashes sharing a bucket are compared (`np.bitwise_count` over the XOR),
and the work stays near linear in the number of files for small thresholds.

Files with the same bytes have the same hash; a group that holds only copies of one file is
an exact duplicate, not a near duplicate (`groups` keeps only groups with two or more sha1s).

No torch, no MLflow: eda and preprocess both call this on the hashes their scan computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HASH_BITS = 256
HASH_WORDS = HASH_BITS // 64
_FULL_PAIRWISE_UP_TO = 512  # groups with more distinct hashes: max distance over matched pairs


@dataclass(frozen=True)
class NearDuplicateGroup:
    """Files (indices into the caller's lists) whose pictures are near-identical."""

    members: tuple[int, ...]  # ascending
    max_distance: int  # largest Hamming distance between two members (bits of 256)


def hash_matrix(hashes: Sequence[str]) -> np.ndarray:
    """Hex hashes (64 hex digits each) as an (N, 4) uint64 array; a row of zeros for ''."""
    out = np.zeros((len(hashes), HASH_WORDS), dtype=np.uint64)
    filled = [i for i, text in enumerate(hashes) if text]
    if filled:
        raw = bytes.fromhex("".join(hashes[i] for i in filled))
        out[filled] = np.frombuffer(raw, dtype=">u8").reshape(len(filled), HASH_WORDS)
    return out


def hamming(a: str, b: str) -> int:
    """Bits in which two hex hashes differ."""
    return int(np.bitwise_count(hash_matrix([a]) ^ hash_matrix([b])).sum())


def distances(bits: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Hamming distances between rows i[k] and j[k] of an (N, 4) uint64 hash matrix."""
    return np.bitwise_count(bits[i] ^ bits[j]).sum(axis=1, dtype=np.int64)


def close_pairs(bits: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """Every pair of rows at most `max_distance` bits apart: (i, j, distance), i < j, sorted.

    `bits` holds distinct hashes (identical rows are the caller's exact matches); candidates
    come from the pigeonhole buckets, each pair is verified once.
    """
    n = len(bits)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2 or max_distance < 0:
        return empty, empty, empty
    chunks = min(max_distance + 1, HASH_BITS)
    unpacked = np.unpackbits(bits.astype(">u8").view(np.uint8), axis=1)  # (N, 256) 0/1
    edges = np.linspace(0, HASH_BITS, chunks + 1).astype(int)
    found: list[np.ndarray] = []
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        keys = np.packbits(unpacked[:, start:stop], axis=1)
        keys = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
        _, bucket = np.unique(keys, return_inverse=True)
        i, j = _pairs_within(bucket.ravel())
        if not len(i):
            continue
        keep = distances(bits, i, j) <= max_distance
        found.append(i[keep] * n + j[keep])
    if not found:
        return empty, empty, empty
    codes = np.unique(np.concatenate(found))
    i, j = codes // n, codes % n
    return i, j, distances(bits, i, j)


def _pairs_within(bucket: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows with the same bucket id, without a Python loop."""
    order = np.argsort(bucket, kind="stable")  # within a bucket, rows ascending
    ids = bucket[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    position = np.arange(len(ids))
    partners = np.repeat(ends, ends - starts) - position - 1  # later rows in the same bucket
    total = int(partners.sum())
    left = np.repeat(position, partners)
    step = np.arange(total) - np.repeat(np.cumsum(partners) - partners, partners) + 1
    return order[left], order[left + step]


def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:  # path compression
        parent[x], x = root, parent[x]
    return root


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find over n nodes joined by edges (i, j): each node's component root."""
    parent = np.arange(n)
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([_find(parent, x) for x in range(n)], dtype=np.int64)


def groups(hashes: Sequence[str], sha1s: Sequence[str], max_distance: int
           ) -> list[NearDuplicateGroup]:
    """Groups of files within `max_distance` bits that hold at least two distinct sha1s.

    Files with an empty hash (unreadable, or not hashed) take part in no group. Groups come
    in the order of their first member; max_distance <= 0 means detection is off: no groups.
    """
    if max_distance <= 0:
        return []
    index = [k for k, h in enumerate(hashes) if h]
    if len(index) < 2:
        return []
    bits = hash_matrix([hashes[k] for k in index])
    distinct, of_file = np.unique(bits, axis=0, return_inverse=True)
    of_file = of_file.ravel()
    i, j, dist = close_pairs(distinct, max_distance)
    root = components(len(distinct), i, j)
    members: dict[int, list[int]] = {}  # component root -> positions in `index`
    for pos in range(len(index)):
        members.setdefault(int(root[of_file[pos]]), []).append(pos)
    out = []
    for positions in members.values():
        files = [index[pos] for pos in positions]
        if len({sha1s[k] for k in files}) < 2:
            continue  # one file, or copies of one file: an exact duplicate at most
        rows = np.unique(of_file[positions])
        out.append(NearDuplicateGroup(tuple(sorted(files)),
                                      _max_distance(distinct, rows, i, j, dist)))
    return sorted(out, key=lambda g: g.members)


def _max_distance(distinct: np.ndarray, rows: np.ndarray, i: np.ndarray, j: np.ndarray,
                  dist: np.ndarray) -> int:
    """Largest distance between two of a group's distinct hashes (`rows` of `distinct`)."""
    if len(rows) < 2:
        return 0
    if len(rows) <= _FULL_PAIRWISE_UP_TO:
        a, b = np.triu_indices(len(rows), 1)
        return int(distances(distinct, rows[a], rows[b]).max())
    inside = np.isin(i, rows)  # a huge group: the largest distance of a matched pair
    return int(dist[inside].max()) if inside.any() else 0


def nearest(hashes: Sequence[str], one: int, others: Sequence[int]) -> int:
    """Smallest Hamming distance from file `one` to any of `others` (-1 when none)."""
    others = [k for k in others if hashes[k]]
    if not hashes[one] or not others:
        return -1
    bits = hash_matrix([hashes[one], *(hashes[k] for k in others)])
    return int(np.bitwise_count(bits[1:] ^ bits[0]).sum(axis=1).min())
