"""Per-request KV bookkeeping on top of the page allocator, the prefix cache and the req->token
table.

With the prefix cache (kvcache.radix_cache) a request's pages are, in order: the cached prefix
pages it matched (owned by the tree, locked by it through `cache_node`), then its private pages.
Its KV goes to the tree page by page, whole pages only, when a prefill chunk ends
(cache_unfinished) and when it leaves (release: finished, failed or retracted), so a request
arriving meanwhile finds the prefix, and a retracted one finds its own KV again.

A request's positions cached here are those of its first held range: from 0 when it holds all or
the first segment, else under that segment's own root (start, hash of the tokens before it), so
a context-parallel home's segment is found again by a request reusing the same segments in
place. Segments this instance holds for other homes are cached by ForeignKV (scheduler/dcp.py).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from nanocp.kvcache.pool import PageAllocator, ReqToTokenPool
from nanocp.kvcache.radix_cache import ROOT, CachedPages, RadixCache, RootKey, TreeNode
from nanocp.scheduler.dcp import held_spans, held_tokens
from nanocp.utils import get_logger
from nanocp_router.prefix_index import context_hash

logger = get_logger(__name__)


class KVOwner(Protocol):
    """What the manager needs to know of a request (nanocp.scheduler.request.Req)."""

    req_pool_idx: int | None
    kv_pages: list[int]
    kv_len: int
    # position ranges held here (None: all); the others live on other instances
    held_ranges: list[tuple[int, int]] | None
    fill_ids: list[int]  # prompt + outputs (the prefix cache's keys)
    # prefix cache: the node its cached prefix ends at (locked), how many of its positions are the
    # tree's pages, the most positions it computed before (retracted) and the prompt tokens it
    # found cached
    cache_node: TreeNode | None
    cached_len: int  # local positions (from the first held range's start) that are tree pages
    computed_len: int
    cached_tokens: int
    skipped_len: int  # positions match_prefix skipped (until the request is admitted)
    cached_prefix: int  # DCP reuse: positions [0, cached_prefix) cached on its holders
    cache_root: Any  # the root its first held range is cached under (when it starts past 0)


class KVManager:
    def __init__(
        self, allocator: PageAllocator, req_to_token_pool: ReqToTokenPool, prefix_cache: bool = False
    ) -> None:
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.page_size = allocator.page_size
        self.cache = RadixCache(allocator) if prefix_cache else None
        # where every page is allocated: with the cache, evictable cached pages count as free
        self.pages = CachedPages(allocator, self.cache) if self.cache is not None else allocator

    @property
    def num_free_pages(self) -> int:
        return self.pages.num_free_pages

    def pages_needed(self, req: KVOwner, new_len: int) -> int:
        """Extra pages a request needs to hold new_len tokens (only its local positions are held
        here: others of a context-parallel request live on other instances)."""
        return max(0, -(-held_tokens(req.held_ranges, new_len) // self.page_size) - len(req.kv_pages))

    # ---------------------------------------------------------- prefix cache
    def _span(self, req: KVOwner) -> tuple[RootKey | None, int, float] | None:
        """(root, start, end) of the positions of a request this instance can cache: its first
        held range (all of them when it holds all), under the root of that range's start (None
        while the request has fewer tokens than that start: the root names the tokens before)."""
        held = req.held_ranges
        if held is None:
            return ROOT, 0, math.inf
        if not held:
            return None
        s0, e0 = held[0]
        if s0 == 0:
            return ROOT, 0, e0
        if req.cache_root is None and len(req.fill_ids) >= s0:
            req.cache_root = (s0, context_hash(req.fill_ids, s0))
        return req.cache_root, s0, e0

    def _cacheable(self, req: KVOwner, upto: int) -> int:
        """Local positions (from the span's start) below `upto` that can be cached: whole pages."""
        span = self._span(req)
        if span is None or span[0] is None:
            return 0
        _, s0, e0 = span
        return max(0, int(min(upto, e0)) - s0) // self.page_size * self.page_size

    def match_prefix(self, req: KVOwner) -> int:
        """Admission of a request that holds nothing yet: skip the positions whose KV is cached,
        here (the tree) or, for a context-parallel request reusing cached segments in place, on
        its holders (req.cached_prefix, confirmed by them). At least the last token is left to
        compute (its logits are sampled). Returns the positions skipped."""
        if self.cache is None or req.kv_len or req.kv_pages or req.req_pool_idx is not None:
            return 0
        try:
            return self._match_prefix(req)
        except Exception:  # a cache fault costs this request its reuse, never the instance
            logger.exception("prefix cache: matching a request failed; it is computed in full")
            return 0

    def _match_prefix(self, req: KVOwner) -> int:
        span = self._span(req)
        if span is None:
            return 0
        root, s0, e0 = span
        last = len(req.fill_ids) - 1
        held_elsewhere = req.cached_prefix  # positions [0, cached_prefix) cached on the holders
        pages, node = [], None
        if s0 > held_elsewhere:
            skip = min(held_elsewhere, last)
        else:
            end = int(min(e0, last))
            n = (end - s0) // self.page_size * self.page_size
            if n > 0 and root is not None:
                pages, node = self.cache.match_prefix(req.fill_ids[s0 : s0 + n], root)
            skip = s0 + len(pages) * self.page_size
            if skip >= e0:  # the whole first range: on to the holders' cached positions after it
                held = req.held_ranges or []
                after = held[1][0] if len(held) > 1 else math.inf
                skip = max(skip, int(min(held_elsewhere, after, last)))
        if skip <= 0:
            return 0
        row = self.req_to_token_pool.alloc()
        if row is None:
            return 0
        if pages:
            self.cache.lock(node)
        req.req_pool_idx, req.kv_pages, req.kv_len = row, list(pages), skip
        req.cache_node, req.cached_len, req.skipped_len = (
            node if pages else None,
            len(pages) * self.page_size,
            skip,
        )
        self._write_slots(req, 0, skip)
        return skip

    def unmatch(self, req: KVOwner) -> None:
        """Undo match_prefix of a request that was not admitted after all."""
        if req.skipped_len and req.kv_len == req.skipped_len:
            if req.cache_node is not None:
                self.cache.unlock(req.cache_node)
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx, req.kv_pages, req.kv_len = None, [], 0
            req.cache_node, req.cached_len, req.skipped_len = None, 0, 0

    def count_admitted(self, req: KVOwner) -> None:
        """A request starts (after match_prefix): its prompt tokens found cached that it did not
        compute before (a retracted request's own KV is not a hit), for usage and /metrics."""
        if self.cache is None:
            return
        hit = max(0, req.skipped_len - req.computed_len)
        req.cached_tokens += hit
        self.cache.hit_tokens += hit
        self.cache.query_tokens += max(0, len(req.fill_ids) - req.computed_len)
        req.skipped_len = 0

    def cache_unfinished(self, req: KVOwner) -> None:
        """Put a running request's computed whole pages into the tree (after a prefill chunk):
        where the tree has them already, the request reads the tree's pages and frees its copies."""
        if self.cache is None:
            return
        n = self._cacheable(req, req.kv_len)
        if n <= req.cached_len:
            return
        node = self._insert(req, n)
        self.cache.lock(node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node, req.cached_len = node, n

    def _insert(self, req: KVOwner, n: int) -> TreeNode:
        """Insert the request's first n local positions of its span; its pages of them become
        the tree's."""
        root, s0, _ = self._span(req)
        ps = self.page_size
        k, first_own = n // ps, req.cached_len // ps
        pages = req.kv_pages[:k]
        node = self.cache.adopt(req.fill_ids[s0 : s0 + n], pages, first_own, root)
        if pages != req.kv_pages[:k]:  # cached meanwhile by another request: read the tree's pages
            req.kv_pages[:k] = pages
            self._write_slots(req, s0 + first_own * ps, s0 + n)
        return node

    # ------------------------------------------------------------------ pages
    def _write_slots(self, req: KVOwner, start: int, end: int) -> torch.Tensor:
        """Point the request's table row at its pages for positions [start, end); returns the
        slots (-1 for positions held by other instances)."""
        table = self.req_to_token_pool.req_to_token
        slots = torch.full((end - start,), -1, dtype=torch.int64, device=table.device)
        page_ids = torch.tensor(req.kv_pages or [0], dtype=torch.int64, device=table.device)
        for lo, hi, idx0 in held_spans(req.held_ranges, start, end):
            idx = torch.arange(idx0, idx0 + hi - lo, device=table.device)
            slots[lo - start : hi - start] = (
                page_ids[idx // self.page_size] * self.page_size + idx % self.page_size
            )
        table[req.req_pool_idx, start:end] = slots
        return slots

    def extend(self, req: KVOwner, num_tokens: int) -> torch.Tensor | None:
        """Reserve slots for the request's next num_tokens tokens; returns their slot ids
        (-1 for positions held by other instances).

        Returns None (and changes nothing) when the pool cannot hold them.
        """
        if req.req_pool_idx is None:
            row = self.req_to_token_pool.alloc()
            if row is None:
                return None
            req.req_pool_idx = row
        start, end = req.kv_len, req.kv_len + num_tokens
        pages = self.pages.alloc(self.pages_needed(req, end))
        if pages is None:
            if req.kv_len == 0 and not req.kv_pages:
                self.req_to_token_pool.free(req.req_pool_idx)
                req.req_pool_idx = None
            return None
        req.kv_pages.extend(pages)
        slots = self._write_slots(req, start, end)
        req.kv_len = end
        return slots

    def release(self, req: KVOwner, cache: bool = True) -> None:
        """Free the request's pages and its table row. With the prefix cache, its computed whole
        pages held from 0 stay in the tree, reachable by their tokens (cache=False: only those
        the tree had already, e.g. after a failed step whose KV is not trusted)."""
        pages = req.kv_pages
        if self.cache is not None and req.req_pool_idx is not None:
            n = self._cacheable(req, req.kv_len) if cache else 0
            if n > req.cached_len:
                self._insert(req, n)
            else:
                n = req.cached_len
            pages = req.kv_pages[n // self.page_size :]
            if req.cache_node is not None:
                self.cache.unlock(req.cache_node)
            req.cache_node, req.cached_len, req.skipped_len = None, 0, 0
            req.computed_len = max(req.computed_len, req.kv_len)
        if pages:
            self.allocator.free(pages)
        req.kv_pages = []
        req.kv_len = 0
        if req.req_pool_idx is not None:
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx = None
