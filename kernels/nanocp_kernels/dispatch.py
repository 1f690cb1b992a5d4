"""MoE dispatch packing for fixed-capacity exchange blocks, in one Triton launch.

`pack_pairs` writes every (token, expert) pair into its expert rank's block of a send buffer
[ranks, cap, words + 1] (int32 words): the token's hidden row, then the expert's local id in the
last word. A pair's row within its block comes from an atomic counter per rank, so rows are in
no particular order; nothing depends on it (each row is computed independently and its result
comes back to the same block position). Returns each pair's flat block position
(rank * cap + row), where the combine reads its result. No host sync: capturable in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _pack_kernel(
    x_ptr, ids_ptr, send_ptr, counts_ptr, pos_ptr, K, E_LOCAL, CAP, WORDS, stride_x, BLOCK: tl.constexpr
):
    p = tl.program_id(0)
    t = p // K
    e = tl.load(ids_ptr + p)
    dest = e // E_LOCAL
    row = tl.atomic_add(counts_ptr + dest, tl.full([], 1, tl.int64))  # counts are int64
    flat = dest * CAP + row
    tl.store(pos_ptr + p, flat)
    base = send_ptr + flat * (WORDS + 1)
    for w0 in range(0, WORDS, BLOCK):
        offs = w0 + tl.arange(0, BLOCK)
        m = offs < WORDS
        tl.store(base + offs, tl.load(x_ptr + t * stride_x + offs, mask=m), mask=m)
    tl.store(base + WORDS, (e - dest * E_LOCAL).to(tl.int32))


def pack_pairs(
    x_words: torch.Tensor,
    topk_ids: torch.Tensor,
    experts_per_rank: int,
    send: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """x_words: [T, words] int32 (token rows as words); topk_ids: [T, k] global expert ids;
    send: [ranks, cap, words + 1] int32; counts: int64 [ranks], zero on entry, pairs per rank on
    return. Returns int64 [T * k]: each pair's flat position in send's blocks."""
    t, k = topk_ids.shape
    words = x_words.shape[1]
    if x_words.stride(1) != 1 or send.shape[2] != words + 1:
        raise ValueError("pack_pairs: x_words rows must be contiguous and send rows words + 1 long")
    ids = topk_ids.reshape(-1).contiguous()
    pos = torch.empty(t * k, dtype=torch.int64, device=x_words.device)
    if t * k:
        _pack_kernel[(t * k,)](
            x_words, ids, send, counts, pos, k, experts_per_rank, send.shape[1], words, x_words.stride(0),
            BLOCK=min(1024, triton.next_power_of_2(words)),
        )  # fmt: skip
    return pos


@triton.jit
def _combine_kernel(
    src_ptr, rows_ptr, w_ptr, ids_ptr, out_ptr, H, stride_src, K: tl.constexpr, KP: tl.constexpr,
    HAS_ROWS: tl.constexpr, NO_FMA: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    ks = tl.arange(0, KP)  # K padded to a power of 2; padding lanes rank K or more, never used
    mk = ks < K
    ids = tl.load(ids_ptr + t * K + ks, mask=mk, other=2**62)
    w = tl.load(w_ptr + t * K + ks, mask=mk, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + t * K + ks, mask=mk, other=0)
    else:
        rows = (t * K + ks).to(tl.int64)
    order = tl.sum((ids[None, :] < ids[:, None]).to(tl.int32), axis=1)  # rank of each expert id
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in tl.static_range(K):
        sel = order == r
        row = tl.sum(tl.where(sel, rows, 0), axis=0)  # exactly one pair has rank r
        wr = tl.sum(tl.where(sel, w, 0.0), axis=0)
        p = tl.load(src_ptr + row * stride_src + offs, mask=mask, other=0.0).to(tl.float32)
        if NO_FMA:  # mul.rn: the compiler may not contract it with the add below into an FMA
            term = libdevice.mul_rn(p, wr)
        else:  # the CPU interpreter (no FMA contraction there; it has no libdevice)
            term = p * wr
        term = term.to(out_ptr.dtype.element_ty).to(tl.float32)  # each product rounded
        if r == 0:
            acc = term
        else:
            acc = (acc + term).to(out_ptr.dtype.element_ty).to(tl.float32)  # each sum rounded
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_rows(
    src: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * src[rows[t, j]] (rows default: t * k + j), added in increasing
    expert id order with every product and every partial sum rounded to src's dtype: the order
    and roundings of HF transformers' MoE (exact parity in float32), in one launch. Expert ids of
    a token must be distinct (top-k). src [*, H] with contiguous rows."""
    t, k = topk_ids.shape
    h = src.shape[1]
    out = src.new_empty((t, h))
    if t:
        block = min(1024, triton.next_power_of_2(h))
        _combine_kernel[(t, triton.cdiv(h, block))](
            src, rows if rows is not None else topk_ids, topk_weights.contiguous(), topk_ids.contiguous(), out,
            h, src.stride(0), K=k, KP=triton.next_power_of_2(k), HAS_ROWS=rows is not None,
            NO_FMA=src.is_cuda, BLOCK=block,
        )  # fmt: skip
    return out


@triton.jit
def _dequant_fp8_kernel(
    q_ptr,
    s_ptr,
    count_ptr,
    out_ptr,
    CAP,
    s_e,
    s_r,
    s_g,
    GROUPS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    e = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    n = tl.load(count_ptr + e)
    if r0 < n:  # programs past the expert's received rows do nothing
        rows = r0 + tl.arange(0, BLOCK_R)
        m = rows < n
        cols = tl.arange(0, GROUP)
        base = (e * CAP + rows)[:, None] * (GROUPS * GROUP) + cols[None, :]
        for g in range(GROUPS):
            scale = tl.load(s_ptr + e * s_e + rows * s_r + g * s_g, mask=m, other=0.0)
            q = tl.load(q_ptr + base + g * GROUP, mask=m[:, None], other=0.0).to(tl.float32)
            tl.store(
                out_ptr + base + g * GROUP, (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=m[:, None]
            )


def dequant_packed_fp8(
    xq: torch.Tensor, scales: torch.Tensor, recv_count: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """DeepEP's FP8 low-latency receive layout back to `out`'s dtype: xq [experts, cap, hidden]
    float8_e4m3fn with one float scale per 128 channels, scales [experts, cap, hidden // 128]
    (any strides; DeepEP's are column-major in the last two dims). Only rows below each expert's
    recv_count are written, so the cost follows the tokens received, not the buffer's capacity.
    No host sync: capturable in CUDA graphs."""
    num_local, cap, hidden = xq.shape
    group = hidden // scales.shape[2]
    assert (
        group * scales.shape[2] == hidden
        and out.shape == xq.shape
        and xq.is_contiguous()
        and out.is_contiguous()
    )
    block_r = 16
    _dequant_fp8_kernel[(num_local, triton.cdiv(cap, block_r))](
        xq,
        scales,
        recv_count,
        out,
        cap,
        *scales.stride(),
        GROUPS=hidden // group,
        GROUP=group,
        BLOCK_R=block_r,
    )
    return out
