"""Per-request KV bookkeeping on top of the page allocator and the req->token table."""

from __future__ import annotations

from typing import Protocol

import torch

from nanocp.kvcache.pool import PageAllocator, ReqToTokenPool
from nanocp.scheduler.dcp import held_spans, held_tokens


class KVOwner(Protocol):
    """What the manager needs to know of a request (nanocp.scheduler.request.Req)."""

    req_pool_idx: int | None
    kv_pages: list[int]
    kv_len: int
    # position ranges held here (None: all); the others live on other instances
    held_ranges: list[tuple[int, int]] | None


class KVManager:
    def __init__(self, allocator: PageAllocator, req_to_token_pool: ReqToTokenPool) -> None:
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.page_size = allocator.page_size

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free_pages

    def pages_needed(self, req: KVOwner, new_len: int) -> int:
        """Extra pages a request needs to hold new_len tokens (only its local positions are held
        here: others of a context-parallel request live on other instances)."""
        return max(0, -(-held_tokens(req.held_ranges, new_len) // self.page_size) - len(req.kv_pages))

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
        pages = self.allocator.alloc(self.pages_needed(req, end))
        if pages is None:
            if req.kv_len == 0 and not req.kv_pages:
                self.req_to_token_pool.free(req.req_pool_idx)
                req.req_pool_idx = None
            return None
        req.kv_pages.extend(pages)
        table = self.req_to_token_pool.req_to_token
        slots = torch.full((num_tokens,), -1, dtype=torch.int64, device=table.device)
        page_ids = torch.tensor(req.kv_pages or [0], dtype=torch.int64, device=table.device)
        for lo, hi, idx0 in held_spans(req.held_ranges, start, end):
            idx = torch.arange(idx0, idx0 + hi - lo, device=table.device)
            slots[lo - start : hi - start] = (
                page_ids[idx // self.page_size] * self.page_size + idx % self.page_size
            )
        table[req.req_pool_idx, start:end] = slots
        req.kv_len = end
        return slots

    def release(self, req: KVOwner) -> None:
        """Free every page of the request and its table row."""
        if req.kv_pages:
            self.allocator.free(req.kv_pages)
        req.kv_pages = []
        req.kv_len = 0
        if req.req_pool_idx is not None:
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx = None
