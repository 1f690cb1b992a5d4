"""Paged KV cache: the KV tensors, a free-page allocator and the request -> token-slot table.

Slot s of the KV buffers lives in page s // page_size. A request's token at position p is stored
at slot ``req_to_token[row, p]``; positions are filled page by page, so a request with n tokens
holds exactly ceil(n / page_size) pages.
"""

from __future__ import annotations

import torch


class KVCachePool:
    """Per-layer K and V buffers of shape [num_slots, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pad_slot: int | None = None,
    ) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.num_slots = num_slots
        self.pad_slot = pad_slot  # a slot no request reads: writes with nowhere to go land there
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def set_kv(
        self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: bool = False
    ) -> None:
        """Write K/V rows at their slots. masked: rows with loc < 0 are held by another instance
        (context parallelism) and are skipped."""
        kb, vb = self.k_buffer[layer_id], self.v_buffer[layer_id]
        if loc.is_cuda and self.pad_slot is not None:  # one launch, capturable in CUDA graphs
            from nanocp_kernels.elementwise import store_kv

            store_kv(k, v, loc, kb, vb, self.pad_slot)  # loc >= 0 unless masked
            return
        if masked and self.pad_slot is not None:  # no host sync: capturable in CUDA graphs
            loc = torch.where(loc >= 0, loc, self.pad_slot)
        elif masked:
            keep = loc >= 0
            loc, k, v = loc[keep], k[keep], v[keep]
        kb[loc] = k.to(kb.dtype)
        vb[loc] = v.to(vb.dtype)


class PageAllocator:
    """Free list of KV pages. Allocation is all-or-nothing."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError("the KV cache must hold at least one page")
        self.num_pages = num_pages
        self.page_size = page_size
        # Pop from the end: low page ids are handed out first (easier to read in traces).
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)
        if len(self._free) > self.num_pages:
            raise RuntimeError("KV page double free")


class ReqToTokenPool:
    """Rows of token slots, one row per running request, plus one never-allocated padding row
    (CUDA-graph padding requests read it)."""

    def __init__(self, max_reqs: int, max_context_len: int, device: torch.device | str) -> None:
        self.req_to_token = torch.zeros((max_reqs + 1, max_context_len), dtype=torch.int64, device=device)
        self._free = list(range(max_reqs - 1, -1, -1))
        self.max_reqs = max_reqs
        self.pad_row = max_reqs

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        self._free.append(row)
