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

Both may take the RMSNorm before them (with its residual add, SGLang's layout) into their launch
(`norm=`): every program normalizes the few input rows itself (a few KB, while its weight rows
stream in) and program 0 writes the residual stream: one launch less per norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp_kernels.elementwise import rms_inv, rms_scale, softmax_topk
from nanocp_kernels.launch import pdl_args, pdl_wait, zeroed_counters

MAX_ROWS = 4  # rows of x these kernels take
# rows up to which they beat cuBLAS (H100: at 4 rows its tiles win), and cuBLAS + the top-k launch
WINS_UP_TO, ROUTER_WINS_UP_TO = 2, 1
# rows up to which the RMSNorm before a projection runs inside it (`norm=`): every program re-reads
# the input rows, so at 2 rows that L2 traffic costs more than the norm launch saves (H100)
NORM_WINS_UP_TO = 1


@triton.jit
def _w_tile(w_ptr, N, K, stride_wn, pid_n, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows pid_n * BLOCK_N : +BLOCK_N, columns k0 : +BLOCK_K of w (0 outside), as stored."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    return tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _rows_dot(
    acc, w, x_ptr, r_ptr, nw, ro_ptr, ho_ptr, num_rows, K, stride_xm, stride_rm, eps, k0,
    NORM: tl.constexpr, HAS_RES: tl.constexpr, WRITE_H: tl.constexpr, M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc [M, BLOCK_N] += x[:M, k0 : k0 + BLOCK_K] @ w^T (the norm prologue: see _skinny_tile)."""
    rows = tl.arange(0, M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    wf = w.to(tl.float32)
    for m in tl.static_range(M):  # each row of x against the same weight tile
        mask_k = (offs_k < K) & (m < num_rows)
        xm = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k, other=0.0)
        if NORM:
            if HAS_RES:
                xm = xm + tl.load(r_ptr + m * stride_rm + offs_k, mask=mask_k, other=0.0)
                tl.store(ro_ptr + m * K + offs_k, xm, mask=mask_k & (tl.program_id(0) == 0))
            xm = rms_scale(xm, rms_inv(xm, K, eps), nw, x_ptr.dtype.element_ty)
            if WRITE_H:
                tl.store(ho_ptr + m * K + offs_k, xm, mask=mask_k & (tl.program_id(0) == 0))
        part = tl.sum(wf * xm.to(tl.float32)[None, :], axis=1)
        acc += tl.where(rows[:, None] == m, part[None, :], 0.0)
    return acc


@triton.jit
def _skinny_tile(
    x_ptr, w_ptr, r_ptr, nw_ptr, ro_ptr, ho_ptr, num_rows, N, K, stride_xm, stride_wn, stride_rm, eps,
    NORM: tl.constexpr, HAS_RES: tl.constexpr, WRITE_H: tl.constexpr, M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """acc [M, BLOCK_N] = x[:M] @ w[pid_n * BLOCK_N : +BLOCK_N]^T in float32 (rows >= num_rows: 0).
    NORM (K <= BLOCK_K: one tile): x is first replaced by rmsnorm(x (+ residual)) with weight nw,
    as elementwise.fused_add_rmsnorm computes it; program 0 stores x + residual (HAS_RES) and the
    normalized rows (WRITE_H) for later kernels.
    The weight loads stay inside the K loop even for one tile: Triton pipelines them there, and
    issuing them before the PDL wait instead measured slower (H100, batch 1-2)."""
    pdl_wait(PDL)
    pid_n = tl.program_id(0)
    acc = tl.zeros((M, BLOCK_N), dtype=tl.float32)
    nw = w_ptr  # unused unless NORM
    if NORM:
        nw = tl.load(nw_ptr + tl.arange(0, BLOCK_K), mask=tl.arange(0, BLOCK_K) < K, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        w = _w_tile(w_ptr, N, K, stride_wn, pid_n, k0, BLOCK_N, BLOCK_K)
        acc = _rows_dot(
            acc, w, x_ptr, r_ptr, nw, ro_ptr, ho_ptr, num_rows, K, stride_xm, stride_rm, eps, k0,
            NORM, HAS_RES, WRITE_H, M, BLOCK_K,
        )  # fmt: skip
    return acc


@triton.jit
def _store_tile(y_ptr, acc, num_rows, N, stride_ym, M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[:num_rows, pid_n * BLOCK_N : +BLOCK_N] = acc, in y's dtype."""
    rows = tl.arange(0, M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, nw_ptr, ro_ptr, num_rows, N, K, stride_xm, stride_wn, stride_ym,
    stride_rm, eps, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    acc = _skinny_tile(
        x_ptr, w_ptr, r_ptr, nw_ptr, ro_ptr, ro_ptr, num_rows, N, K, stride_xm, stride_wn, stride_rm, eps,
        NORM, HAS_RES, False, M, BLOCK_N, BLOCK_K, PDL,
    )  # fmt: skip
    if HAS_BIAS:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(y_ptr, acc, num_rows, N, stride_ym, M, BLOCK_N)


@triton.jit
def _router_topk_kernel(
    x_ptr, w_ptr, r_ptr, nw_ptr, ro_ptr, ho_ptr, logits_ptr, tickets_ptr, wts_ptr, ids_ptr, num_rows,
    E, K, stride_xm, stride_rm, eps, TOPK: tl.constexpr, RENORM: tl.constexpr, NORM: tl.constexpr,
    HAS_RES: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    acc = _skinny_tile(
        x_ptr, w_ptr, r_ptr, nw_ptr, ro_ptr, ho_ptr, num_rows, E, K, stride_xm, K, stride_rm, eps,
        NORM, HAS_RES, NORM, M, BLOCK_N, BLOCK_K, PDL,
    )  # fmt: skip
    # logits in the model dtype, as the gate's F.linear would hand them to the top-k
    _store_tile(logits_ptr, acc, num_rows, E, E, M, BLOCK_N)
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


def _launch(k: int, m: int, norm: bool = False) -> dict:
    block_n, block_k, warps = next(cfg for limit, cfg in CONFIGS.items() if k <= limit)
    # the norm prologue needs whole rows in one tile
    block_k = triton.next_power_of_2(k) if norm else min(block_k, triton.next_power_of_2(k))
    # M (rows padded to a power of 2) is a constexpr: one compiled variant per padded row count
    return dict(M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)


def _check(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {x.shape[0]}")
    return x if x.stride(-1) == 1 else x.contiguous()


# (residual or None, RMSNorm weight, eps): the projection's input is rmsnorm(x + residual)
AddNorm = tuple["torch.Tensor | None", torch.Tensor, float]


def _norm_args(x: torch.Tensor, norm: AddNorm | None) -> tuple[list, float, dict, torch.Tensor]:
    """The norm prologue's kernel arguments [residual, norm weight, residual out] (x where unused),
    its eps, its constexprs, and the residual stream after it (x + residual, or x)."""
    if norm is None:
        return [x, x, x], 0.0, dict(NORM=False, HAS_RES=False), x
    residual, weight, eps = norm
    if residual is None:
        return [x, weight, x], eps, dict(NORM=True, HAS_RES=False), x
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return [residual, weight, res_out], eps, dict(NORM=True, HAS_RES=True), res_out


def gemv(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, norm: AddNorm | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """F.linear(x, w, bias) for x [M <= MAX_ROWS, K] (last dim contiguous), w [N, K] row-major.
    norm=(residual, weight, eps): F.linear(h, w, bias) with h, s = fused_add_rmsnorm(x, residual,
    weight, eps) (residual None: h = rmsnorm(x), s = x) in the same launch; returns (y, s)."""
    x = _check(x)
    (m, k), n = x.shape, w.shape[0]
    y = x.new_empty((m, n))
    (r, nw, ro), eps, flags, res_out = _norm_args(x, norm)
    if m:
        launch = _launch(k, m, norm is not None)
        _gemv_kernel[(triton.cdiv(n, launch["BLOCK_N"]),)](
            x, w, bias if bias is not None else w, y, r, nw, ro, m, n, k, x.stride(0), w.stride(0),
            y.stride(0), r.stride(0), eps, HAS_BIAS=bias is not None, **flags, **launch,
            **pdl_args(x),
        )  # fmt: skip
    return y if norm is None else (y, res_out)


def router_topk(
    x: torch.Tensor, gate: torch.Tensor, topk: int, renormalize: bool, norm: AddNorm | None = None
) -> tuple[torch.Tensor, ...]:
    """layers.moe.select_experts(F.linear(x, gate), ...) for x [M <= MAX_ROWS, K], gate [E, K]:
    (weights [M, topk] in x's dtype, ids [M, topk] int64) in one launch. topk a power of 2.
    norm=(residual, weight, eps): routes h, s = fused_add_rmsnorm(x, residual, weight, eps) in the
    same launch and returns (weights, ids, h, s)."""
    x = _check(x)
    (m, k), e = x.shape, gate.shape[0]
    wts = x.new_empty((m, topk))
    ids = torch.empty((m, topk), dtype=torch.int64, device=x.device)
    (r, nw, ro), eps, flags, res_out = _norm_args(x, norm)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if norm is not None else x
    if m:
        tickets = zeroed_counters("router_topk", 1, x.device)  # the last program zeroes it again
        logits = x.new_empty((m, e))
        launch = _launch(k, m, norm is not None)
        _router_topk_kernel[(triton.cdiv(e, launch["BLOCK_N"]),)](
            x, gate.contiguous(), r, nw, ro, h, logits, tickets, wts, ids, m, e, k, x.stride(0), r.stride(0),
            eps, TOPK=topk, RENORM=renormalize, BLOCK_E=max(32, triton.next_power_of_2(e)),
            **flags, **launch, **pdl_args(x),
        )  # fmt: skip
    return (wts, ids) if norm is None else (wts, ids, h, res_out)
