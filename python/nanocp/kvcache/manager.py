"""Per-request KV bookkeeping on top of the page allocator, the prefix cache and the req->token
table.

With the prefix cache (kvcache.radix_cache) a request's pages are, in order: the cached prefix
pages it matched (owned by the tree, locked by it through `cache_node`), then its private pages.
Its KV goes to the tree page by page, whole pages only, when a prefill chunk ends
(cache_unfinished) and when it leaves (release: finished, failed or retracted), so a request
arriving meanwhile finds the prefix, and a retracted one finds its own KV again.

Only the positions a request holds from 0 on are cached: those of a context-parallel request
held by other instances are not here, and a home holding a later segment has no prefix.
"""

from __future__ import annotations

from typing import Protocol

import torch

from nanocp.kvcache.pool import PageAllocator, ReqToTokenPool
from nanocp.kvcache.radix_cache import CachedPages, RadixCache, TreeNode
from nanocp.scheduler.dcp import held_spans, held_tokens


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
    cached_len: int
    computed_len: int
    cached_tokens: int


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
    def _prefix_limit(self, req: KVOwner, upto: int) -> int:
        """Positions below `upto` held here contiguously from 0, whole pages (what can be cached)."""
        held = req.held_ranges
        end = upto if held is None else (min(upto, held[0][1]) if held and held[0][0] == 0 else 0)
        return end // self.page_size * self.page_size

    def match_prefix(self, req: KVOwner) -> int:
        """Adopt the cached prefix of a request that holds nothing yet (admission); at least its
        last token is left to compute (its logits are sampled). Returns the cached positions."""
        if self.cache is None or req.kv_len or req.kv_pages or req.req_pool_idx is not None:
            return 0
        ids = req.fill_ids
        limit = self._prefix_limit(req, len(ids) - 1)
        if limit <= 0:
            return 0
        pages, node = self.cache.match_prefix(ids[:limit])
        if not pages:
            return 0
        row = self.req_to_token_pool.alloc()
        if row is None:
            return 0
        self.cache.lock(node)
        n = len(pages) * self.page_size
        req.req_pool_idx, req.kv_pages, req.kv_len = row, list(pages), n
        req.cache_node, req.cached_len = node, n
        self._write_slots(req, 0, n)
        return n

    def unmatch(self, req: KVOwner) -> None:
        """Undo match_prefix of a request that was not admitted after all."""
        if req.cache_node is not None and req.kv_len == req.cached_len:
            self.cache.unlock(req.cache_node)
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx, req.kv_pages, req.kv_len = None, [], 0
            req.cache_node, req.cached_len = None, 0

    def count_admitted(self, req: KVOwner) -> None:
        """A request starts (after match_prefix): its prompt tokens found cached that it did not
        compute before (a retracted request's own KV is not a hit), for usage and /metrics."""
        if self.cache is None:
            return
        hit = max(0, req.cached_len - req.computed_len)
        req.cached_tokens += hit
        self.cache.hit_tokens += hit
        self.cache.query_tokens += max(0, len(req.fill_ids) - req.computed_len)

    def cache_unfinished(self, req: KVOwner) -> None:
        """Put a running request's computed whole pages into the tree (after a prefill chunk):
        where the tree has them already, the request reads the tree's pages and frees its copies."""
        if self.cache is None:
            return
        limit = self._prefix_limit(req, req.kv_len)
        if limit <= req.cached_len:
            return
        node = self._insert(req, limit)
        self.cache.lock(node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node, req.cached_len = node, limit

    def _insert(self, req: KVOwner, limit: int) -> TreeNode:
        """Insert the request's first `limit` positions; its pages of them become the tree's."""
        n = limit // self.page_size
        present, node = self.cache.insert(req.fill_ids[:limit], req.kv_pages[:n])
        first_own = req.cached_len // self.page_size
        if present > first_own:  # cached meanwhile by another request: use the tree's pages
            tree_pages, _ = self.cache.match_prefix(req.fill_ids[: present * self.page_size])
            self.allocator.free(req.kv_pages[first_own:present])
            req.kv_pages[first_own:present] = tree_pages[first_own:present]
            self._write_slots(req, first_own * self.page_size, present * self.page_size)
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
            limit = self._prefix_limit(req, req.kv_len) if cache else 0
            if limit > req.cached_len:
                self._insert(req, limit)
            else:
                limit = req.cached_len
            pages = req.kv_pages[limit // self.page_size :]
            if req.cache_node is not None:
                self.cache.unlock(req.cache_node)
            req.cache_node, req.cached_len = None, 0
            req.computed_len = max(req.computed_len, req.kv_len)
        if pages:
            self.allocator.free(pages)
        req.kv_pages = []
        req.kv_len = 0
        if req.req_pool_idx is not None:
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx = None
