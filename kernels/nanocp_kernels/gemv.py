"""Skinny matmul for decode batches: y = x @ w^T (+ bias) for a few rows of x.

At batch 1-4 a projection is a pure weight stream. cuBLAS picks 64-row tiles and split-K with a
reduce launch there (Qwen3-30B-A3B on H100: o_proj 10.8 us for 5.5 us of bytes). Here each
program loads BLOCK_N whole weight rows (BLOCK_K = the row length, so all of a program's bytes
are requested at once; many small programs keep every SM's loads in flight) and reduces them
against each row of x on CUDA cores in float32 (exact products). Tensor-core tiles with a
pipelined K loop measured slower at these sizes. One launch, no split-K.

`router_topk` is the MoE router for the same batches: the gate projection, then, in the last
program to finish (an atomic ticket), the softmax + top-k of `elementwise.softmax_topk`: one
launch instead of a GEMM and a top-k launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp_kernels.elementwise import softmax_topk
from nanocp_kernels.launch import pdl_args, pdl_wait, zeroed_counters

MAX_ROWS = 4  # rows of x these kernels take
# rows up to which they beat cuBLAS (H100: at 4 rows its tiles win), and cuBLAS + the top-k launch
WINS_UP_TO, ROUTER_WINS_UP_TO = 2, 1


@triton.jit
def _skinny_tile(
    x_ptr, w_ptr, num_rows, N, K, stride_xm, stride_wn, pid_n,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc [M, BLOCK_N] = x[:M] @ w[pid_n * BLOCK_N : +BLOCK_N]^T in float32 (rows >= num_rows: 0)."""
    rows = tl.arange(0, M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
            mask=(offs_n < N)[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        for m in tl.static_range(M):  # each row of x against the same weight tile
            xm = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k & (m < num_rows), other=0.0)
            part = tl.sum(w * xm.to(tl.float32)[None, :], axis=1)
            acc += tl.where(rows[:, None] == m, part[None, :], 0.0)
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, num_rows, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(PDL)
    pid_n = tl.program_id(0)
    acc = _skinny_tile(x_ptr, w_ptr, num_rows, N, K, stride_xm, stride_wn, pid_n, M, BLOCK_N, BLOCK_K)
    rows = tl.arange(0, M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (rows < num_rows)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _router_topk_kernel(
    x_ptr, w_ptr, logits_ptr, tickets_ptr, wts_ptr, ids_ptr, num_rows, E, K, stride_xm,
    TOPK: tl.constexpr, RENORM: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait(PDL)
    pid_n = tl.program_id(0)
    acc = _skinny_tile(x_ptr, w_ptr, num_rows, E, K, stride_xm, K, pid_n, M, BLOCK_N, BLOCK_K)
    rows = tl.arange(0, M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (offs_n < E)[None, :]
    # logits in the model dtype, as the gate's F.linear would hand them to the top-k
    tl.store(logits_ptr + rows[:, None] * E + offs_n[None, :], acc.to(logits_ptr.dtype.element_ty), mask=mask)
    # all of this program's stores are done (CTA barrier) before its acq_rel ticket: the program
    # drawing the last ticket then sees every program's logits (read from L2, past L1)
    tl.debug_barrier()
    ticket = tl.atomic_add(tickets_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        ks = tl.arange(0, TOPK)
        for m in range(0, num_rows):
            w, ids = softmax_topk(logits_ptr + m * E, E, TOPK, RENORM, BLOCK_E, ".cg")
            tl.store(wts_ptr + m * TOPK + ks, w.to(wts_ptr.dtype.element_ty))
            tl.store(ids_ptr + m * TOPK + ks, ids)
        tl.atomic_xchg(tickets_ptr, 0)  # zero for the next launch (graph replays included)


# (BLOCK_N, BLOCK_K, num_warps) by the weight's row length K: swept on H100 with the Qwen3-30B-A3B
# projections (benchmark/small_batch_kernels.py --sweep)
CONFIGS: dict[int, tuple[int, int, int]] = {
    2048: (2, 2048, 4),
    1 << 30: (2, 4096, 8),
}


def _launch(k: int, m: int) -> dict:
    block_n, block_k, warps = next(cfg for limit, cfg in CONFIGS.items() if k <= limit)
    # M (rows padded to a power of 2) is a constexpr: one compiled variant per padded row count
    return dict(M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)),
                num_warps=warps)  # fmt: skip


def _check(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {x.shape[0]}")
    return x if x.stride(-1) == 1 else x.contiguous()


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for x [M <= MAX_ROWS, K] (last dim contiguous), w [N, K] row-major."""
    x = _check(x)
    (m, k), n = x.shape, w.shape[0]
    y = x.new_empty((m, n))
    if m == 0:
        return y
    launch = _launch(k, m)
    _gemv_kernel[(triton.cdiv(n, launch["BLOCK_N"]),)](
        x, w, bias if bias is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, **launch, **pdl_args(x),
    )  # fmt: skip
    return y


def router_topk(
    x: torch.Tensor, gate: torch.Tensor, topk: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.moe.select_experts(F.linear(x, gate), ...) for x [M <= MAX_ROWS, K], gate [E, K]:
    (weights [M, topk] in x's dtype, ids [M, topk] int64) in one launch. topk a power of 2."""
    x = _check(x)
    (m, k), e = x.shape, gate.shape[0]
    wts = x.new_empty((m, topk))
    ids = torch.empty((m, topk), dtype=torch.int64, device=x.device)
    if m == 0:
        return wts, ids
    tickets = zeroed_counters("router_topk", 1, x.device)  # the last program zeroes it again
    logits = x.new_empty((m, e))
    launch = _launch(k, m)
    _router_topk_kernel[(triton.cdiv(e, launch["BLOCK_N"]),)](
        x, gate.contiguous(), logits, tickets, wts, ids, m, e, k, x.stride(0), TOPK=topk,
        RENORM=renormalize, BLOCK_E=max(32, triton.next_power_of_2(e)), **launch, **pdl_args(x),
    )  # fmt: skip
    return wts, ids
