"""Dynamic context parallelism, per request, on one instance: where a request's KV lives
(Placement), the pages an instance holds for other homes' requests (ForeignKV) and when a home
asks for more positions (growth_ask). Plain Python: the cluster simulator keeps the same books.

The whole DCP path, in five files:
  1. router/nanocp_router/planner.py: the router plans a request's segments (instance, start,
     end) over the instances' free KV; the tail segment is on its home, which runs its tokens.
  2. this module: the home adopts the plan (Placement: which positions it holds itself), holders
     reserve pages for theirs (ForeignKV), and a home near the end of its plan asks the router to
     place the next positions (growth_ask -> Grow; the answer, Grown, extends the Placement).
  3. python/nanocp/distributed/dcp.py: per step, the instances agree on a DCPPlan (which K/V rows
     and queries go to which holder, the foreign keys each received query sees) and run it
     through an executor: EagerDCP (all_to_all), or GraphDCP (distributed/dcp_graph.py: fixed
     buffers inside CUDA-graph decode).
  4. python/nanocp/layers/attention/layer.py: every layer attends its own tokens over the KV held
     here (the attention backend, which sees only the held ranges), then hands (o, lse) to the
     step's executor, which attends received queries over foreign KV and sends partials home;
  5. kernels/nanocp_kernels/merge.py: the home merges the partials by log-sum-exp (exact).

One name per concept: a *segment* is a placed (instance, start, end); the positions a request
holds on this instance are its *held ranges* ([start, end) pairs, Placement.held, which the
step passes to the attention backend as ForwardBatch.held_ranges); *foreign* KV is what an
instance holds for another home's request, named by its cp_key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nanocp.scheduler.admission import GROWTH_AHEAD_TOKENS
from nanocp_router.messages import Grow

Segment = tuple[int, int, int]  # (instance, start, end)


class Placement:
    """A request's segments in position order; adjacent segments on one instance are merged.
    held: the [start, end) ranges on the home (the rest is on holders)."""

    def __init__(self, segments: list[Segment], home: int) -> None:
        merged: list[Segment] = []
        for inst, s, e in segments:
            if merged and merged[-1][0] == inst and merged[-1][2] == s:
                merged[-1] = (inst, merged[-1][1], e)
            else:
                merged.append((inst, s, e))
        self.segments = merged
        self.home = home
        self.held = [(s, e) for inst, s, e in merged if inst == home]

    def grown(self, segment: Segment) -> Placement:
        """This placement with the router's next segment (it starts at `end`)."""
        return Placement([*self.segments, segment], self.home)

    @property
    def end(self) -> int:
        """Positions from here on are not placed yet (the request pauses until they are)."""
        return self.segments[-1][2]

    @property
    def remote(self) -> bool:
        """Some positions are held by other instances (the step routes for this request)."""
        return any(inst != self.home for inst, _, _ in self.segments)

    def holders(self) -> dict[int, list[tuple[int, int]]]:
        """Every other instance's held ranges of this request."""
        out: dict[int, list[tuple[int, int]]] = {}
        for inst, s, e in self.segments:
            if inst != self.home:
                out.setdefault(inst, []).append((s, e))
        return out

    def token_counts(self, total: int) -> list[list[int]]:
        """[instance, tokens] per segment of a request that reached `total` tokens (where its KV
        lived, for the finished record; a segment never reached counts nothing)."""
        segs = [[inst, min(end, total) - start] for inst, start, end in self.segments]
        return [seg for seg in segs if seg[1] > 0] or segs[:1]

    def __repr__(self) -> str:
        return f"Placement({self.segments}, home={self.home})"


def held_spans(held: list[tuple[int, int]] | None, start: int, end: int) -> list[tuple[int, int, int]]:
    """(first, last + 1, local index of first) of the positions in [start, end) held here (held
    None: all of them). Local indices number the held positions in order, so they fill the
    request's pages densely."""
    if held is None:
        return [(start, end, start)] if end > start else []
    out, base = [], 0
    for s, e in held:
        lo, hi = max(s, start), min(e, end)
        if lo < hi:
            out.append((lo, hi, base + lo - s))
        base += e - s
    return out


def held_tokens(held: list[tuple[int, int]] | None, upto: int) -> int:
    """How many positions below `upto` are held here."""
    return sum(e - s for s, e, _ in held_spans(held, 0, upto))


class GrowingReq(Protocol):
    """What growth_ask reads of a request (Req, and the simulator's)."""

    rid: Any
    cp_key: int | None
    placement: Placement | None
    growth_asked: bool
    kv_len: int

    @property
    def total_len(self) -> int: ...  # prompt + max_new_tokens: the most positions it may need


def growth_ask(req: GrowingReq) -> Grow | None:
    """The router's next tail quota for a request nearing the end of its plan, once per plan."""
    if req.placement is None or req.growth_asked:
        return None
    end = req.placement.end
    need = req.total_len - end
    if req.kv_len < end - GROWTH_AHEAD_TOKENS or need <= 0:
        return None
    req.growth_asked = True
    return Grow(req.rid, req.cp_key, end, need)


@dataclass
class ForeignSegment:
    start: int
    end: int
    pages: list[int]
    # the slot of each position, as a device tensor; made by the step's routing on first use
    slots: Any = field(default=None, repr=False)
    # prefix cache: the prompt tokens of [start, end) and the root they are cached under; the
    # positions from start whose pages are the tree's (reused in place), locked through `node`
    tokens: list[int] | None = field(default=None, repr=False)
    root: Any = None
    node: Any = field(default=None, repr=False)
    cached: int = 0


class PageSource(Protocol):
    page_size: int
    num_free_pages: int

    def alloc(self, n: int) -> list[int] | None: ...
    def free(self, pages: list[int]) -> None: ...


class ForeignKV:
    """Pages this instance holds for other homes' requests: per request (cp_key) one or more
    segments (the planned one, and later ones placed here when the request grew). With a prefix
    cache (kvcache.radix_cache.RadixCache), a segment's prompt KV is cached under its root when
    the request is released after its prefill, and a later request reusing the segment in
    place gets those pages back, locked while it runs."""

    def __init__(self, allocator: PageSource, cache: Any = None) -> None:
        self.allocator = allocator
        self.cache = cache
        self.segments: dict[int, list[ForeignSegment]] = {}

    def pages_for(self, start: int, end: int) -> int:
        return -(-(end - start) // self.allocator.page_size)

    def reserve(
        self,
        key: int,
        start: int,
        end: int,
        make_room: Callable[[int], None] | None = None,
        root: Any = None,
        tokens: list[int] | None = None,
        reuse: int = 0,
    ) -> bool:
        """Hold [start, end) of request `key` (again: a no-op). make_room(pages) may free own
        pages first (the scheduler retracts running requests); False: no room even then. With
        the cache: tokens, the segment's prompt tokens, cached under `root` at release; reuse:
        positions from start whose cached KV the router expects here (cached() says how many
        were found)."""
        segs = self.segments.get(key, [])
        if any(seg.start == start for seg in segs):
            return True
        found, node = [], None
        if self.cache is not None and tokens and reuse > 0:
            n = min(reuse, len(tokens)) // self.allocator.page_size * self.allocator.page_size
            found, node = self.cache.match_prefix(tokens[:n], root)
            if found:
                self.cache.lock(node)
        need = self.pages_for(start, end) - len(found)
        if make_room is not None:
            make_room(need)
        pages = self.allocator.alloc(need)
        if pages is None:
            if found:
                self.cache.unlock(node)
            return False
        cached = len(found) * self.allocator.page_size
        segs.append(
            ForeignSegment(start, end, found + pages, None, tokens, root, node if found else None, cached)
        )
        self.segments[key] = sorted(segs, key=lambda seg: seg.start)
        return True

    def cache_written(self, written: list[tuple[int, int]]) -> None:
        """After a step: (cp_key, last position + 1) of the foreign K/V rows it wrote here. The
        whole pages of prompt KV written so far enter the prefix cache (locked by the request),
        so requests arriving while the home still prefills find them, as on the home."""
        if self.cache is None:
            return
        for key, upto in written:
            for seg in self.segments.get(key, []):
                if seg.tokens and upto > seg.start:
                    self._cache_segment(seg, min(upto, seg.end) - seg.start)

    def _cache_segment(self, seg: ForeignSegment, upto: int) -> None:
        """Put the segment's whole pages of prompt KV below local position `upto` into the tree;
        it reads the tree's pages from now on (the tree's own where it had them), locked."""
        ps = self.allocator.page_size
        n = min(upto, len(seg.tokens)) // ps
        keep = seg.cached // ps
        if n <= keep:
            return
        pages = seg.pages[:n]
        node = self.cache.adopt(seg.tokens[: n * ps], pages, keep, seg.root)
        if pages != seg.pages[:n]:  # the tree had some already: read its pages
            seg.pages[:n] = pages
            seg.slots = None
        self.cache.lock(node)
        if seg.node is not None:
            self.cache.unlock(seg.node)
        seg.node, seg.cached = node, n * ps

    def cached(self, key: int, start: int) -> int:
        """Positions from `start` of the request's segment there found in the cache."""
        return next((seg.cached for seg in self.segments.get(key, []) if seg.start == start), 0)

    def release(self, key: int, cache: bool = False) -> None:
        """Free the request's segments; cache: their prompt KV is complete (the home prefilled
        it): keep it in the prefix cache."""
        for seg in self.segments.pop(key, []):
            if cache and self.cache is not None and seg.tokens:
                self._cache_segment(seg, len(seg.tokens))
            if seg.node is not None:
                self.cache.unlock(seg.node)
            self.allocator.free(seg.pages[seg.cached // self.allocator.page_size :])

    def held(self, key: int, positions: list[int]) -> list[ForeignSegment]:
        """The request's segments here, which must hold every one of `positions`."""
        segs = self.segments.get(key)
        if segs is None or any(not any(seg.start <= p < seg.end for seg in segs) for p in positions):
            raise RuntimeError(f"context-parallel request {key}: positions not reserved on this instance")
        return segs
