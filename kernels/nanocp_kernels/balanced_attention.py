"""Decode attention over a fixed grid whose work the host balances before every replay.

GraphDCP's foreign attention has W x C fixed query rows, of which a step fills a few (one per
sharded request decoding on a peer) with shards of any length. `paged_attention` launches
(row, KV head, split) programs for all rows with a split count fixed at capture: one lone long
shard then runs on few programs, and every empty row still costs its programs
(benchmark/results/README.md, foreign_attention). A decode batch of one long request among
short ones has the same problem (the triton backend's decode and eager DCP steps run this too).
Here the host cuts this step's keys into
equal chunks of whole key blocks (`BalancedDecode.plan`, before the replay) and a grid of about
BALANCED_WAVES programs per SM, fixed at capture, runs one chunk per program:
  1. program (k, KV head): work item k (a row and a key range) for the KV head's query heads,
     its normalized partial o and lse into scratch row k (items k >= n_items attend nothing);
  2. program (row, q head): LSE merge of the row's items base[row] : base[row] + n[row]
     (none: o = 0, lse = -inf, as for a row without keys).
Chunks are at least total_keys * kv_heads / target keys, so items <= target / kv_heads + rows:
the grid and scratch are bounded by the rows, whatever the lengths.
"""

from __future__ import annotations

import torch

from nanocp_kernels.attention import DECODE_BLOCK_N

try:
    import triton
    import triton.language as tl

    from nanocp_kernels.attention import _attend_split
    from nanocp_kernels.launch import pdl_args, pdl_wait
except ImportError:  # a torch without triton (CPU wheels, macOS): callers use the torch reference
    triton = None

if triton is not None:

    @triton.jit
    def _item_attention_kernel(
        q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, n_items_ptr, item_row_ptr, item_lo_ptr,
        item_hi_ptr, q_pos_ptr, kv_indices_ptr, kv_pos_ptr, sm_scale, D, GROUP,
        stride_qt, stride_qh, stride_ks, stride_kh,
        IEEE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (item k, KV head): the head's GROUP query heads of the item's row over the
        item's keys; scratch [items, Hq, D] / [items, Hq]."""
        pdl_wait(PDL)
        k = tl.program_id(0)
        kvh = tl.program_id(1)
        # items past this step's count are stale (an earlier plan, maybe of more rows than q has):
        # row 0, no keys
        live = k < tl.load(n_items_ptr)
        t = tl.where(live, tl.load(item_row_ptr + k), 0)
        lo = tl.load(item_lo_ptr + k)
        hi = tl.where(live, tl.load(item_hi_ptr + k), lo)
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
        qpos = tl.load(q_pos_ptr + t)
        m, denom, acc, nonempty = _attend_split(
            q, k_ptr, v_ptr, kv_indices_ptr, kv_pos_ptr, qpos, lo, hi, 0, kvh, sm_scale, D,
            stride_ks, stride_kh, 1, IEEE, BLOCK_H, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        safe = tl.where(denom > 0, denom, 1.0)
        row = k * GROUP * tl.num_programs(1) + heads
        o = tl.where(denom[:, None] > 0, acc / safe[:, None], 0.0)
        tl.store(
            part_o_ptr + row[:, None] * D + offs_d[None, :],
            o,
            mask=hmask[:, None] & dmask[None, :] & nonempty,
        )
        tl.store(part_lse_ptr + row, tl.where(denom > 0, m + tl.log(safe), float("-inf")), mask=hmask)

    @triton.jit
    def _merge_items_kernel(
        part_o_ptr, part_lse_ptr, row_base_ptr, row_items_ptr, o_ptr, lse_ptr, D, HQ,
        stride_ot, stride_oh, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """o, lse of (row t, q head h) from its items' partial results (empty ones: -inf)."""
        pdl_wait(PDL)
        t = tl.program_id(0)
        h = tl.program_id(1)
        base = tl.load(row_base_ptr + t)
        n = tl.load(row_items_ptr + t)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for j0 in range(0, n, BLOCK_S):
            offs = j0 + tl.arange(0, BLOCK_S)
            lse = tl.load(part_lse_ptr + (base + offs) * HQ + h, mask=offs < n, other=float("-inf"))
            m_vec = tl.maximum(m_vec, lse)
        m = tl.max(m_vec, axis=0)
        m_safe = tl.where(m > float("-inf"), m, 0.0)
        w_vec = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for j0 in range(0, n, BLOCK_S):
            offs = j0 + tl.arange(0, BLOCK_S)
            lse = tl.load(part_lse_ptr + (base + offs) * HQ + h, mask=offs < n, other=float("-inf"))
            live = lse > float("-inf")
            w = tl.where(live, tl.exp(lse - m_safe), 0.0)
            parts = tl.load(
                part_o_ptr + ((base + offs) * HQ + h)[:, None] * D + offs_d[None, :],
                mask=live[:, None] & dmask[None, :],
                other=0.0,
            )
            acc += parts * w[:, None]
            w_vec += w
        total = tl.sum(w_vec, axis=0)
        safe = tl.where(total > 0, total, 1.0)
        o = tl.where(total > 0, tl.sum(acc, axis=0) / safe, 0.0)
        tl.store(o_ptr + t * stride_ot + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty), mask=dmask)
        tl.store(lse_ptr + t * HQ + h, tl.where(total > 0, m_safe + tl.log(safe), float("-inf")))


# programs per SM the work is cut for (benchmark.foreign_attention --waves, results/README.md):
# 4 is within 2 us of 2 on one 8k shard and 8-16% faster from 4 x 32k up on H100; 8 and 16 cost
# 3-30 us more on small steps.
BALANCED_WAVES = 4


def target_programs(device: torch.device) -> int:
    """Programs of the attention launch: BALANCED_WAVES per SM (4 SMs assumed off the GPU)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return BALANCED_WAVES * sms


def plan_items(
    kv_indptr: torch.Tensor, kv_heads: int, target: int, block_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host plan of one step: row i's keys kv_indptr[i]:kv_indptr[i + 1] (int64, CPU; the
    `paged_attention` convention) cut into chunks of whole blocks of at least
    total * kv_heads / target keys. Returns (item_row, item_lo, item_hi, row_base, row_items); a
    row's items are consecutive, in key order."""
    starts, ends = kv_indptr[:-1], kv_indptr[1:]
    lens = ends - starts
    total = int(lens.sum())
    chunk = block_n * max(1, -(-total * kv_heads // (target * block_n)))
    per_row = (lens + chunk - 1) // chunk
    row_base = per_row.cumsum(0) - per_row
    item_row = torch.repeat_interleave(torch.arange(lens.numel()), per_row)
    j = torch.arange(item_row.numel()) - row_base[item_row]
    item_lo = starts[item_row] + j * chunk
    item_hi = torch.minimum(item_lo + chunk, ends[item_row])
    return item_row, item_lo, item_hi, row_base, per_row


class BalancedDecode:
    """Device buffers of the plan and scratch for up to `rows` query rows, sized once (graph-safe):
    `plan` before each replay (host -> device copies), `run` inside the graph (graphs of fewer
    rows share the buffers: one replays at a time)."""

    def __init__(self, rows: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, device: torch.device):
        self.rows, self.heads = rows, (num_qo_heads, num_kv_heads, head_dim)
        self.block_n = DECODE_BLOCK_N
        self.target = target_programs(device)
        self.max_items = self.target // num_kv_heads + rows + 1  # see the module docstring
        i32 = dict(dtype=torch.int32, device=device)
        self.n_items = torch.zeros(1, **i32)
        self.items = torch.zeros(3, self.max_items, **i32)  # row, lo, hi
        self.row_base = torch.zeros(rows, **i32)
        self.row_items = torch.zeros(rows, **i32)
        self.part_o = torch.zeros(self.max_items, num_qo_heads, head_dim, dtype=torch.float32, device=device)
        self.part_lse = torch.zeros(self.max_items, num_qo_heads, dtype=torch.float32, device=device)

    def plan(self, kv_indptr: list[int] | torch.Tensor) -> None:
        """kv_indptr: host [rows of the next run + 1], row i's keys at kv_indptr[i]:kv_indptr[i + 1]
        of the kv_indices given to run."""
        kv_indptr = torch.as_tensor(kv_indptr, dtype=torch.int64)
        item_row, lo, hi, base, per_row = plan_items(kv_indptr, self.heads[1], self.target, self.block_n)
        n, rows = item_row.numel(), kv_indptr.numel() - 1
        if n > self.max_items:  # cannot happen (module docstring); a bug must not write past scratch
            raise RuntimeError(f"balanced decode: {n} work items > {self.max_items}")
        host = torch.cat([torch.tensor([n]), item_row, lo, hi, base, per_row]).to(torch.int32)
        host = host.to(self.items.device, non_blocking=True)
        self.n_items.copy_(host[:1])
        self.items[:, :n].copy_(host[1 : 1 + 3 * n].view(3, n))
        self.row_base[:rows].copy_(host[1 + 3 * n : 1 + 3 * n + rows])
        self.row_items[:rows].copy_(host[1 + 3 * n + rows :])

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        q_pos: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_pos: torch.Tensor,
        sm_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [rows, Hq, D] (the rows planned) with their keys in kv_indices / kv_pos (as
        `paged_attention`); returns o [rows, Hq, D] (q.dtype), lse [rows, Hq] (-inf where a row has
        no visible key)."""
        hq, hkv, d = self.heads
        rows = q.shape[0]
        o = torch.empty_like(q)
        lse = torch.empty((rows, hq), dtype=torch.float32, device=q.device)
        block_d = triton.next_power_of_2(d)
        _item_attention_kernel[(self.max_items, hkv)](
            q, k_cache, v_cache, self.part_o, self.part_lse, self.n_items, *self.items, q_pos,
            kv_indices, kv_pos, sm_scale, d, hq // hkv, q.stride(0), q.stride(1), k_cache.stride(0),
            k_cache.stride(1), IEEE=q.dtype == torch.float32,
            BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_N=self.block_n, BLOCK_D=block_d,
            **pdl_args(q),
        )  # fmt: skip
        _merge_items_kernel[(rows, hq)](
            self.part_o, self.part_lse, self.row_base, self.row_items, o, lse, d, hq, o.stride(0),
            o.stride(1), BLOCK_S=16, BLOCK_D=block_d, **pdl_args(q),
        )  # fmt: skip
        return o, lse
