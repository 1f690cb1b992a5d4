"""The router's approximate record of what each instance's prefix cache holds (cache-aware
routing; sgl-router keeps a similar approximate tree per worker).

A prompt is cut into blocks of BLOCK_TOKENS tokens, each named by a hash chained over the blocks
before it, so equal hashes mean equal prefixes (up to hash collisions, which only mislead the
estimate). The router records the blocks of every prompt whose KV an instance holds from
position 0 (what that instance caches when the request ends), in least-recently-used order,
bounded by the instance's KV capacity: an estimate of the instance's own LRU cache, never
consulted for correctness (the instance matches the real tokens).
"""

from __future__ import annotations

from collections import OrderedDict

BLOCK_TOKENS = 16


def block_hashes(ids: list[int], block: int = BLOCK_TOKENS) -> list[int]:
    """The chained hash of each whole block of `ids`."""
    out, h = [], 0
    for i in range(0, len(ids) - block + 1, block):
        h = hash((h, *ids[i : i + block]))
        out.append(h)
    return out


class PrefixIndex:
    def __init__(self, num_instances: int, block: int = BLOCK_TOKENS) -> None:
        self.block = block
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_instances)]
        self.where: dict[int, set[int]] = {}  # block hash -> instances recorded to hold it

    def match(self, hashes: list[int]) -> dict[int, int]:
        """Instance -> tokens of the longest recorded prefix (instances with none left out).
        Costs O(matched blocks x instances still matching)."""
        alive = set(self.where.get(hashes[0], ())) if hashes else set()
        out: dict[int, int] = {}
        for n, h in enumerate(hashes[1:], 1):
            if not alive:
                break
            here = self.where.get(h, set())
            for inst in alive - here:
                out[inst] = n * self.block
            alive &= here
        for inst in alive:
            out[inst] = len(hashes) * self.block
        return out

    def record(self, instance: int, hashes: list[int], capacity_tokens: int) -> None:
        """The instance holds these blocks (used now); the least recently used go beyond its
        capacity."""
        lru = self.lru[instance]
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self.where.setdefault(h, set()).add(instance)
        limit = max(1, capacity_tokens // self.block)
        while len(lru) > limit:
            self._drop(instance, lru.popitem(last=False)[0])

    def clear(self, instance: int | None = None) -> None:
        """Forget what an instance (None: every instance) holds: its cache was flushed."""
        for inst in range(len(self.lru)) if instance is None else [instance]:
            for h in self.lru[inst]:
                self._drop(inst, h)
            self.lru[inst].clear()

    def _drop(self, instance: int, h: int) -> None:
        holders = self.where.get(h)
        if holders is not None:
            holders.discard(instance)
            if not holders:
                del self.where[h]
