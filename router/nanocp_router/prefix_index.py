"""The router's approximate record of what each instance's prefix cache holds (cache-aware
routing; sgl-router keeps a similar approximate tree per worker).

A prompt is cut into blocks of BLOCK_TOKENS tokens, each named by a hash chained over every
block before it, so equal hashes mean equal prefixes (up to hash collisions, which only mislead
the estimate: the instances match the real tokens). The router records which instance holds
which blocks and where the segment holding them starts there (an instance caches a request's
positions [s, e) under s and the hash of the tokens before s: kvcache/radix_cache.py roots), in
least-recently-used order bounded by the instance's KV capacity: an estimate of the instance's
own LRU cache.

    match(hashes)     instance -> tokens of the prompt's prefix it caches from position 0
    segments(hashes)  the prompt's prefix as cached segments [(instance, start, end)], possibly
                      on several instances (a long prompt sharded by DCP): reusable in place
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


def context_hash(
    ids: list[int], start: int, block: int = BLOCK_TOKENS, hashes: list[int] | None = None
) -> int:
    """The hash naming tokens ids[:start] (0 for none): the root an instance caches positions
    from `start` under. Every process computes it from the same tokens alike; hashes: ids' block
    hashes when known (saves rehashing the whole blocks)."""
    whole = start // block
    if hashes is None or len(hashes) < whole:
        hashes = block_hashes(ids[: whole * block], block)
    h = hashes[whole - 1] if whole else 0
    if start > whole * block:
        h = hash((h, *ids[whole * block : start]))
    return h


class PrefixIndex:
    def __init__(self, num_instances: int, block: int = BLOCK_TOKENS) -> None:
        self.block = block
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_instances)]
        # block hash -> {instance: start of the segment holding it there}
        self.where: dict[int, dict[int, int]] = {}

    def match(self, hashes: list[int]) -> dict[int, int]:
        """Instance -> tokens of the longest recorded prefix it holds from position 0 (instances
        with none left out). Costs O(matched blocks x instances still matching)."""
        alive = {i for i, s in self.where.get(hashes[0], {}).items() if s == 0} if hashes else set()
        out: dict[int, int] = {}
        for n, h in enumerate(hashes[1:], 1):
            if not alive:
                break
            here = self.where.get(h, {})
            for inst in [i for i in alive if here.get(i) != 0]:
                out[inst] = n * self.block
                alive.discard(inst)
        for inst in alive:
            out[inst] = len(hashes) * self.block
        return out

    def segments(self, hashes: list[int]) -> list[tuple[int, int, int]]:
        """The longest recorded prefix as (instance, start, end) segments in position order: a
        segment goes on while its instance holds the next block in the same segment; the next
        one starts where an instance's recorded segment starts. Instances are not repeated."""
        out: list[tuple[int, int, int]] = []
        cur: int | None = None
        for j, h in enumerate(hashes):
            here = self.where.get(h, {})
            pos = j * self.block
            if cur is not None and here.get(cur) == out[-1][1]:
                out[-1] = (cur, out[-1][1], pos + self.block)
                continue
            used = {seg[0] for seg in out}
            nxt = next((i for i, s in sorted(here.items()) if s == pos and i not in used), None)
            if nxt is None:
                break
            cur = nxt
            out.append((cur, pos, pos + self.block))
        return out

    def record(self, instance: int, hashes: list[int], capacity_tokens: int, start: int = 0) -> None:
        """The instance holds these blocks of a segment starting at position `start` (used now);
        the least recently used go beyond its capacity."""
        lru = self.lru[instance]
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
            self.where.setdefault(h, {})[instance] = start
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
            holders.pop(instance, None)
            if not holders:
                del self.where[h]
