"""Fused MoE experts in Triton: a grouped GEMM over (token, expert) pairs sorted by expert.

`fused_moe(x, w13, w2, topk_weights, topk_ids, expert_offset)` computes what
`reference.fused_moe_ref` does (SwiGLU experts, weighted sum over the top-k) with two grouped
GEMM launches:
  1. pairs are sorted by local expert and each expert's run padded to BLOCK_M rows
     (`moe_align`: no host sync, so it can run inside a CUDA graph);
  2. act = silu(x[token] @ gate[e]^T) * (x[token] @ up[e]^T) for every pair (one program per
     BLOCK_M x BLOCK_N tile; a tile's rows all belong to one expert, whose weight tiles are read
     once for them; the activation is applied to the float32 accumulators);
  3. y = act @ w2[e]^T scaled by the pair's routing weight;
  4. out[token] = sum over its k pairs (pairs of experts on other EP ranks contribute 0).
Shapes are static for a given token count (the padded pair capacity is T*k + E*(BLOCK_M-1)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp_kernels.launch import pdl_args, pdl_wait, zeroed_counters


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K]: row of pair p is p // A_ROW_DIV
    b_ptr,  # [E, N, K] ([E, 2N, K] with SILU: gate rows, then up rows)
    c_ptr,  # [pairs, N]
    w_ptr,  # [pairs] routing weights (MUL_WEIGHT)
    sorted_ids_ptr,  # [capacity] pair ids grouped by expert; num_pairs marks padding
    block_expert_ptr,  # [capacity // BLOCK_M] expert of each row block, -1 if unused
    num_pairs,
    N,
    K,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    SILU: tl.constexpr,  # c = silu(a @ gate^T) * (a @ up^T): the SwiGLU input of the second GEMM
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    mask_m = ids < num_pairs
    rows = tl.where(mask_m, ids // A_ROW_DIV, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_base = b_ptr + e * stride_be + offs_n[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        mask_b = mask_n[None, :] & mask_k[:, None]
        b = tl.load(b_base + offs_k[:, None], mask=mask_b, other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if SILU:
            b_up = tl.load(b_base + N * stride_bn + offs_k[:, None], mask=mask_b, other=0.0)
            if IEEE:
                acc_up += tl.dot(a, b_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, b_up)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc *= tl.load(w_ptr + ids, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + ids[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _align_count_kernel(ids_ptr, n, E, offset, counts_ptr, rank_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    e = tl.load(ids_ptr + offs, mask=m, other=0) - offset
    valid = m & (e >= 0) & (e < E)
    rank = tl.atomic_add(counts_ptr + tl.where(valid, e, 0), 1, mask=valid)  # old count: rank in the run
    tl.store(rank_ptr + offs, rank, mask=valid)


@triton.jit
def _run_bounds(counts_ptr, E, BM: tl.constexpr, BLOCK_E: tl.constexpr):
    """(start, end) rows of each expert's run, runs padded to BM rows, in expert order."""
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0, cache_modifier=".cg")
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    return ends - padded, ends


@triton.jit
def _write_blocks(
    ends, E, block_expert_ptr, sorted_ptr, b0, num_blocks, n, BM: tl.constexpr, BLOCKS: tl.constexpr
):
    """Blocks b0 .. b0 + BLOCKS: their expert, and padding in all their rows of sorted_ids (the
    pairs are written over it afterwards)."""
    blocks = b0 + tl.arange(0, BLOCKS)
    # a block's expert = how many experts' runs end at or before its first row
    owner = tl.sum((ends[None, :] <= blocks[:, None] * BM).to(tl.int32), axis=1)
    tl.store(block_expert_ptr + blocks, tl.where(owner < E, owner, -1), mask=blocks < num_blocks)
    rows = b0 * BM + tl.arange(0, BLOCKS * BM)
    tl.store(sorted_ptr + rows, tl.zeros_like(rows).to(tl.int64) + n, mask=rows < num_blocks * BM)


@triton.jit
def _align_offsets_kernel(
    counts_ptr, E, starts_ptr, block_expert_ptr, sorted_ptr, num_blocks, n,
    BM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    starts, ends = _run_bounds(counts_ptr, E, BM, BLOCK_E)
    offs_e = tl.arange(0, BLOCK_E)
    if pid == 0:
        tl.store(starts_ptr + offs_e, starts, mask=offs_e < E)
    _write_blocks(ends, E, block_expert_ptr, sorted_ptr, pid * BLOCKS, num_blocks, n, BM, BLOCKS)


@triton.jit
def _align_scatter_kernel(
    ids_ptr, rank_ptr, starts_ptr, n, E, offset, sorted_ptr, counts_ptr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    e = tl.load(ids_ptr + offs, mask=m, other=0) - offset
    valid = m & (e >= 0) & (e < E)
    start = tl.load(starts_ptr + tl.where(valid, e, 0), mask=valid, other=0)
    rank = tl.load(rank_ptr + offs, mask=valid, other=0)
    tl.store(sorted_ptr + start + rank, offs.to(tl.int64), mask=valid)
    if tl.program_id(0) == 0:  # the counts were last read by the offsets launch: zero for the next call
        offs_e = tl.arange(0, 1024)
        for e0 in range(0, E, 1024):
            tl.store(counts_ptr + e0 + offs_e, 0, mask=e0 + offs_e < E)


@triton.jit
def _align_small_kernel(
    ids_ptr, n, E, offset, counts_ptr, starts_ptr, block_expert_ptr, sorted_ptr, num_blocks,
    BM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """All of moe_align in one program (decode sizes: n <= BLOCK): the three launches' steps,
    separated by CTA barriers (global writes before a barrier are visible to the CTA after it)."""
    pdl_wait(PDL)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    e = tl.load(ids_ptr + offs, mask=m, other=0) - offset
    valid = m & (e >= 0) & (e < E)
    rank = tl.atomic_add(counts_ptr + tl.where(valid, e, 0), 1, mask=valid)
    tl.debug_barrier()
    starts, ends = _run_bounds(counts_ptr, E, BM, BLOCK_E)
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(starts_ptr + offs_e, starts, mask=offs_e < E)
    for b0 in range(0, num_blocks, 64):
        _write_blocks(ends, E, block_expert_ptr, sorted_ptr, b0, num_blocks, n, BM, 64)
    tl.store(counts_ptr + offs_e, 0, mask=offs_e < E)  # zeroed for the next call (read above)
    tl.debug_barrier()
    start = tl.load(starts_ptr + tl.where(valid, e, 0), mask=valid, other=0, cache_modifier=".cg")
    tl.store(sorted_ptr + start + rank, offs.to(tl.int64), mask=valid)


SMALL_ALIGN = 1024  # up to this many pairs (decode batches), moe_align is one launch


def moe_align(
    ids: torch.Tensor, num_experts: int, block_m: int, offset: int = 0, max_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group pair ids (flattened [T, k]) by local expert (id - offset), each expert's run padded to
    block_m rows, in one launch up to SMALL_ALIGN ids, else three (reference.moe_align_ref is the
    torch version, ~15 launches).
    Ids whose local expert is outside [0, num_experts) are dropped. max_rows: the caller's bound on
    how many ids are local (sizes the result; default all). Returns (sorted_ids [capacity] with
    padding = num_pairs, block_expert [capacity // block_m] with -1 for unused blocks). No host
    sync. Order within an expert's run follows atomics, which changes no result: each pair's row
    is computed and stored independently."""
    flat = ids.reshape(-1).contiguous()
    n, dev = flat.numel(), flat.device
    rows = n if max_rows is None else min(n, max_rows)
    capacity = -(-(rows + num_experts * (block_m - 1)) // block_m) * block_m
    counts = zeroed_counters("moe_align", num_experts, dev)  # zeroed again by the last launch
    starts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(capacity, dtype=torch.int64, device=dev)
    num_blocks = capacity // block_m
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    if n <= SMALL_ALIGN:
        _align_small_kernel[(1,)](
            flat, n, num_experts, offset, counts, starts, block_expert, sorted_ids, num_blocks, BM=block_m,
            BLOCK=max(16, triton.next_power_of_2(n)), BLOCK_E=triton.next_power_of_2(num_experts),
            **pdl_args(flat),
        )  # fmt: skip
        return sorted_ids, block_expert
    rank = torch.empty(n, dtype=torch.int32, device=dev)  # each pair's row within its expert's run
    grid = (max(1, triton.cdiv(n, 256)),)
    _align_count_kernel[grid](flat, n, num_experts, offset, counts, rank, BLOCK=256)
    _align_offsets_kernel[(triton.cdiv(num_blocks, 64),)](
        counts, num_experts, starts, block_expert, sorted_ids, num_blocks, n, BM=block_m,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCKS=64,
    )  # fmt: skip
    _align_scatter_kernel[grid](flat, rank, starts, n, num_experts, offset, sorted_ids, counts, BLOCK=256)
    return sorted_ids, block_expert


@triton.jit
def _moe_sum_kernel(y_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(y_ptr + (t * K + j) * H + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_sum(y: torch.Tensor) -> torch.Tensor:
    """y [T, k, H] (contiguous) summed over k in float32: one launch (torch's reduction is ~3x slower
    at decode sizes)."""
    t, k, h = y.shape
    out = y.new_empty((t, h))
    if t:
        block = min(1024, triton.next_power_of_2(h))
        _moe_sum_kernel[(t, triton.cdiv(h, block))](y, out, h, K=k, BLOCK=block, **pdl_args(y))
    return out


# Launch configs by pairs per expert: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
CONFIGS: dict[int, tuple[int, int, int, int, int]] = {
    # tuned on H200 with the Qwen3-30B-A3B expert shape (benchmark/moe_kernel.py --sweep)
    16: (16, 64, 128, 4, 3),  # decode: few rows per expert, the weights dominate
    64: (32, 128, 64, 4, 4),
    1 << 30: (64, 128, 64, 4, 4),
}


def _block_sizes(num_pairs: int, num_experts: int) -> tuple[int, int, int, int, int]:
    per_expert = num_pairs / max(1, num_experts)
    return next(cfg for limit, cfg in CONFIGS.items() if per_expert <= limit)


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_pairs: int,
    a_row_div: int,
    block: tuple[int, int, int, int, int],
    weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """c[p] = a[p // a_row_div] @ b[expert(p)]^T (* weights[p]) for every pair p in sorted_ids;
    silu: b holds [gate; up] and c[p] = silu(a @ gate^T) * (a @ up^T). Rows of c of pairs not in
    sorted_ids are not written."""
    n_out, k = b.shape[1] // (2 if silu else 1), b.shape[2]
    c = out if out is not None else a.new_empty((num_pairs, n_out))
    bm, bn, bk, warps, stages = block
    if silu:  # two weight tiles per program: half the columns keeps its registers and bytes alike
        bn //= 2
    grid = (block_expert.numel(), triton.cdiv(n_out, bn))
    _grouped_gemm_kernel[grid](
        a,
        b,
        c,
        weights if weights is not None else c,
        sorted_ids,
        block_expert,
        num_pairs,
        n_out,
        k,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        A_ROW_DIV=a_row_div,
        MUL_WEIGHT=weights is not None,
        SILU=silu,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
        **pdl_args(a),
    )
    return c


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor | None,
    topk_ids: torch.Tensor,
    expert_offset: int = 0,
    all_local: bool = False,
    out: torch.Tensor | None = None,
    max_rows: int | None = None,
    fill_unrouted: bool = True,
) -> torch.Tensor:
    """Same contract as reference.fused_moe_ref; topk_weights None means weight 1 (and then
    topk_ids is [rows, 1]: one expert per row, reference.expert_ffn_ref's contract).
    all_local: the caller guarantees every id is a local expert (no expert parallelism), so
    every output row is written and none needs zeroing first.
    out: where to write the result (one expert per row only: [rows, hidden]); x may have any row
    stride (e.g. rows of a receive block), its last dim must be contiguous.
    max_rows: at most this many ids are local (fixed-capacity receive buffers: bounds the work
    grid by the real rows, not the buffer). fill_unrouted=False (one expert per row): rows whose
    id is not local are left as they were (the caller never reads them) instead of zeroed."""
    num_tokens, k = topk_ids.shape
    num_experts = w13.shape[0]
    num_pairs = num_tokens * k
    if num_pairs == 0:
        return torch.zeros_like(x)
    if out is not None and k != 1:
        raise ValueError("fused_moe: out= is for one expert per row (topk_ids [rows, 1])")
    rows = num_pairs if max_rows is None else min(num_pairs, max_rows)
    block = _block_sizes(rows, num_experts)
    sorted_ids, block_expert = moe_align(topk_ids, num_experts, block[0], expert_offset, max_rows)
    if x.stride(-1) != 1:
        x = x.contiguous()
    # rows of pairs outside sorted_ids stay unwritten here: the second GEMM never reads them
    act = grouped_gemm(x, w13, sorted_ids, block_expert, num_pairs, k, block, silu=True)
    w = topk_weights.reshape(-1).contiguous() if topk_weights is not None else None
    every_row = all_local or (k == 1 and not fill_unrouted)
    y = out if out is not None else x.new_empty((num_pairs, w2.shape[1]))
    if not every_row:
        y.zero_()  # rows of pairs on other ranks (or padding) read as 0
    y = grouped_gemm(act, w2, sorted_ids, block_expert, num_pairs, 1, block, weights=w, out=y)
    return y if k == 1 else moe_sum(y.view(num_tokens, k, -1))
