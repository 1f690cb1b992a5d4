"""Triton paged attention over any query/key split, returning (o, lse).

Same contract as `paged_attention_ref`: sequence i pairs query rows
qo_indptr[i]:qo_indptr[i+1] with KV slots kv_indices[kv_indptr[i]:kv_indptr[i+1]] whose absolute
positions are kv_pos; a key is visible to a query iff kv_pos <= q_pos. `paged_attention`
(decode-style rows): one program per (query row, KV head, KV split) runs the KV head's query
heads together with an online softmax over its split of the keys, a second launch merges the
splits by LSE (flash-decoding). `paged_prefill_attention`: blocks of query rows. Runs on CPU
under TRITON_INTERPRET=1 for tests.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from nanocp_kernels.launch import pdl_args, pdl_wait
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _attend_split(
        q, k_ptr, v_ptr, kv_indices_ptr, kv_pos_ptr, qpos, start, end, sp, kvh, sm_scale, D,
        stride_ks, stride_kh, SPLITS: tl.constexpr, IEEE: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Online softmax of q [BLOCK_H, BLOCK_D] over split sp of the keys start:end, BLOCK_N
        keys a step (splits are whole blocks): (running max, denominator, unnormalized o)."""
        chunk = tl.cdiv(tl.cdiv(end - start, SPLITS), BLOCK_N) * BLOCK_N
        lo = start + sp * chunk
        hi = tl.minimum(end, lo + chunk)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < hi
            slot = tl.load(kv_indices_ptr + offs_n, mask=nmask, other=0)
            kpos = tl.load(kv_pos_ptr + offs_n, mask=nmask, other=0)
            visible = nmask & (kpos <= qpos)
            kv_off = slot[:, None].to(tl.int64) * stride_ks + kvh * stride_kh + offs_d[None, :]
            kmask = visible[:, None] & dmask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kmask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(visible[None, :], s * sm_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            p = tl.where(visible[None, :], tl.exp(s - m_safe[:, None]), 0.0)
            alpha = tl.where(m > float("-inf"), tl.exp(m - m_safe), 0.0)
            v = tl.load(v_ptr + kv_off, mask=kmask, other=0.0)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        return m, denom, acc, hi > lo

    @triton.jit
    def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_seq_ptr, q_pos_ptr, kv_indptr_ptr, kv_indices_ptr,
        kv_pos_ptr, sm_scale, D, GROUP, stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh,
        SPLITS: tl.constexpr, IEEE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, SHORT_BLOCKS: tl.constexpr, RELEASE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (query row t, KV head, split s): the GROUP query heads sharing the KV head
        (one read of each key for all of them, tensor-core dots) over split s of the row's keys.
        SPLITS == 1: writes o / lse; else the split's normalized o (float32) and lse at
        [t, head, s] for _merge_splits_kernel. SHORT_BLOCKS: a row with at most 1.5 * BLOCK_N keys
        per split steps BLOCK_N / 2 (>= 16, the dot's minimum) keys at a time. RELEASE: the
        merge may launch before this kernel ends (RELEASE_EARLY)."""
        pdl_wait(PDL, RELEASE)
        t = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        seq = tl.load(q_seq_ptr + t)
        qpos = tl.load(q_pos_ptr + t)
        start = tl.load(kv_indptr_ptr + seq)
        end = tl.load(kv_indptr_ptr + seq + 1)
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < GROUP
        heads = kvh * GROUP + offs_h
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q = tl.load(
            q_ptr + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=hmask[:, None] & dmask[None, :],
            other=0.0,
        )
        half: tl.constexpr = BLOCK_N // 2
        # rows of few keys per split (a split of the short path is at most 3 half blocks) step
        # half blocks: finer splits, so more of them are busy
        if SHORT_BLOCKS:
            if tl.cdiv(end - start, SPLITS) <= BLOCK_N + half:
                m, denom, acc, nonempty = _attend_split(
                    q, k_ptr, v_ptr, kv_indices_ptr, kv_pos_ptr, qpos, start, end, sp, kvh, sm_scale, D,
                    stride_ks, stride_kh, SPLITS, IEEE, BLOCK_H, half, BLOCK_D,
                )  # fmt: skip
            else:
                m, denom, acc, nonempty = _attend_split(
                    q, k_ptr, v_ptr, kv_indices_ptr, kv_pos_ptr, qpos, start, end, sp, kvh, sm_scale, D,
                    stride_ks, stride_kh, SPLITS, IEEE, BLOCK_H, BLOCK_N, BLOCK_D,
                )  # fmt: skip
        else:
            m, denom, acc, nonempty = _attend_split(
                q, k_ptr, v_ptr, kv_indices_ptr, kv_pos_ptr, qpos, start, end, sp, kvh, sm_scale, D,
                stride_ks, stride_kh, SPLITS, IEEE, BLOCK_H, BLOCK_N, BLOCK_D,
            )  # fmt: skip
        safe = tl.where(denom > 0, denom, 1.0)
        o = tl.where(denom[:, None] > 0, acc / safe[:, None], 0.0)
        lse = tl.where(denom > 0, m + tl.log(safe), float("-inf"))
        omask = hmask[:, None] & dmask[None, :]
        if SPLITS == 1:
            o_off = t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=omask)
            tl.store(lse_ptr + t * GROUP * tl.num_programs(1) + heads, lse, mask=hmask)
        else:  # scratch [T, Hq, SPLITS, D] and [T, Hq, SPLITS]
            row = (t * GROUP * tl.num_programs(1) + heads) * SPLITS + sp
            # an empty split (short context: most of them) writes only its lse; the merge reads
            # no o of a split whose lse is -inf
            tl.store(o_ptr + row[:, None] * D + offs_d[None, :], o, mask=omask & nonempty)
            tl.store(lse_ptr + row, lse, mask=hmask)

    @triton.jit
    def _merge_splits_kernel(
        part_o_ptr, part_lse_ptr, o_ptr, lse_ptr, D, stride_ot, stride_oh,
        SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """o, lse of (query row t, head h) from its SPLITS partial results (empty ones: -inf)."""
        pdl_wait(PDL)
        t = tl.program_id(0)
        h = tl.program_id(1)
        row = t * tl.num_programs(1) + h
        offs_s = tl.arange(0, SPLITS)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        lse = tl.load(part_lse_ptr + row * SPLITS + offs_s)
        m = tl.max(lse, axis=0)
        m_safe = tl.where(m > float("-inf"), m, 0.0)
        w = tl.where(lse > float("-inf"), tl.exp(lse - m_safe), 0.0)
        total = tl.sum(w, axis=0)
        parts = tl.load(
            part_o_ptr + (row * SPLITS + offs_s)[:, None] * D + offs_d[None, :],
            mask=(lse > float("-inf"))[:, None] & dmask[None, :],
            other=0.0,
        )
        safe = tl.where(total > 0, total, 1.0)
        o = tl.where(total > 0, tl.sum(parts * w[:, None], axis=0) / safe, 0.0)
        tl.store(o_ptr + t * stride_ot + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty), mask=dmask)
        tl.store(lse_ptr + row, tl.where(total > 0, m_safe + tl.log(safe), float("-inf")))


if triton is not None:

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
        blk_seq_ptr, blk_row_ptr, qo_indptr_ptr, q_pos_ptr, kv_indptr_ptr, kv_indices_ptr, kv_pos_ptr,
        sm_scale, D, GROUP, HQ,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_ot, stride_oh,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One program per (block of BLOCK_M query rows of one sequence, q head): flash-attention
        over the sequence's keys with tensor-core dots; the mask is kv_pos <= q_pos per pair."""
        blk, h = tl.program_id(0), tl.program_id(1)
        kvh = h // GROUP
        seq = tl.load(blk_seq_ptr + blk)
        row0 = tl.load(blk_row_ptr + blk)
        q_end = tl.load(qo_indptr_ptr + seq + 1)
        start = tl.load(kv_indptr_ptr + seq)
        end = tl.load(kv_indptr_ptr + seq + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < q_end
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )
        qpos = tl.load(q_pos_ptr + rows, mask=rmask, other=-1)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            slot = tl.load(kv_indices_ptr + offs_n, mask=nmask, other=0).to(tl.int64)
            kpos = tl.load(kv_pos_ptr + offs_n, mask=nmask, other=0)
            kv_off = slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
            kvmask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
            if IEEE:  # float32 models: exact dots (tensor-core tf32 would lose the HF parity)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
            else:
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale
            visible = nmask[None, :] & (kpos[None, :] <= qpos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            p = tl.where(visible, tl.exp(s - m_safe[:, None]), 0.0)
            alpha = tl.where(m > float("-inf"), tl.exp(m - m_safe), 0.0)
            v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v).to(tl.float32)
            acc = acc * alpha[:, None] + pv
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        safe = tl.where(denom > 0, denom, 1.0)
        o = tl.where(denom[:, None] > 0, acc / safe[:, None], 0.0)
        lse = tl.where(denom > 0, m + tl.log(safe), float("-inf"))
        o_off = rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + rows * HQ + h, lse, mask=rmask)


def query_blocks(qo_indptr: list[int], block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first row) of every block of block_m query rows (blocks never span sequences)."""
    seqs, rows = [], []
    for i, (a, b) in enumerate(zip(qo_indptr, qo_indptr[1:])):
        for r in range(a, b, block_m):
            seqs.append(i)
            rows.append(r)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(seqs), as_tensor(rows)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: list[int],
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    sm_scale: float,
    block_m: int = 64,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_attention` for many queries per sequence (prefill chunks; q routed to KV holders):
    blocks of block_m query rows share each key block (tensor-core dots). qo_indptr is a host
    list (it shapes the launch); the rest as in `paged_attention`."""
    if triton is None:
        raise RuntimeError("the triton attention backend needs the triton package")
    tq, hq, d = q.shape
    o = torch.zeros_like(q)
    lse = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=q.device)
    blk_seq, blk_row = query_blocks(qo_indptr, block_m, q.device)
    if tq == 0 or blk_seq.numel() == 0:
        return o, lse
    _paged_prefill_kernel[(blk_seq.numel(), hq)](
        q, k_cache, v_cache, o, lse,
        blk_seq, blk_row, torch.tensor(qo_indptr, dtype=torch.int32, device=q.device), q_pos, kv_indptr,
        kv_indices, kv_pos,
        sm_scale, d, hq // k_cache.shape[1], hq,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), o.stride(0), o.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    return o, lse


# Decode-kernel tuning, each measured in one process against its alternatives (H200, Qwen3-30B-A3B
# decode step, benchmark/results/decode_variants_{attention,short_blocks}_h200):
# keys per step: 32 is 1-4% faster at batch 1 below 8k tokens but 4-10% slower from 32k, so 64,
# with half steps only where a split holds few keys (SHORT_BLOCKS: batch 1 at 1k-8k 2% faster);
# programs per SM the splits aim at: 1 and 4 were up to 16% and 6% slower than 2.
DECODE_BLOCK_N = 64
SHORT_BLOCKS = True
SPLIT_WAVES = 2
RELEASE_EARLY = True  # the merge's programs may launch (and wait) while the attention runs
MAX_SPLITS = 128  # batch 1 at 128k context: 42% -> 60% of the decode roofline vs 32 (H200)


def decode_splits(rows: int, kv_heads: int, device: torch.device) -> int:
    """KV splits per (query row, KV head): about SPLIT_WAVES programs per SM. It depends only on
    the shapes, so a captured graph keeps it for any context length."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return min(MAX_SPLITS, triton.next_power_of_2(max(1, -(-SPLIT_WAVES * sms // (rows * kv_heads)))))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_seq: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    sm_scale: float,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [Tq, Hq, D]; k/v_cache: [S, Hkv, D]; q_seq: [Tq] sequence of each query row;
    kv_indptr: [num_seqs + 1]; kv_indices / kv_pos: [Tk]; q_pos: [Tq]. Returns o [Tq, Hq, D]
    (q.dtype) and lse [Tq, Hq] (float32, natural log; -inf where no key is visible).
    Flash-decoding: each row's keys are cut into num_splits (default: from the shapes) parts
    computed in parallel, then merged by LSE in a second launch."""
    if triton is None:
        raise RuntimeError("the triton attention backend needs the triton package")
    tq, hq, d = q.shape
    hkv = k_cache.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty((tq, hq), dtype=torch.float32, device=q.device)
    if tq == 0:
        return o, lse
    group = hq // hkv
    block_n = block_n or DECODE_BLOCK_N
    splits = num_splits or decode_splits(tq, hkv, q.device)
    block_d = triton.next_power_of_2(d)
    if splits > 1:
        part_o = torch.empty((tq, hq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((tq, hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_o, part_lse = o, lse
    _paged_attention_kernel[(tq, hkv, splits)](
        q, k_cache, v_cache, part_o, part_lse, q_seq, q_pos, kv_indptr, kv_indices, kv_pos, sm_scale,
        d, group, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), o.stride(0), o.stride(1),
        SPLITS=splits, IEEE=q.dtype == torch.float32, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, BLOCK_D=block_d, SHORT_BLOCKS=SHORT_BLOCKS and block_n >= 32, RELEASE=RELEASE_EARLY,
        **pdl_args(q),
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(tq, hq)](
            part_o, part_lse, o, lse, d, o.stride(0), o.stride(1), SPLITS=splits, BLOCK_D=block_d,
            **pdl_args(part_o),
        )  # fmt: skip
    return o, lse
