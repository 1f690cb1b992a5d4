"""pack_pairs (the IPC MoE backend's dispatch in one launch) against its definition: every pair's
row sits in its expert rank's block at the position returned, with the local expert id in the
last word; per-rank counts are the pair counts; nothing else is written."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "triton", reason="Triton kernels (skipped on a torch without triton)", exc_type=ImportError
)

from nanocp_kernels.dispatch import pack_pairs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_pack_pairs_places_every_pair_once():
    g = torch.Generator().manual_seed(0)
    t, k, hidden, experts, ranks, cap = 9, 3, 16, 12, 3, 9 * 3
    x = torch.randn(t, hidden, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t)]).to(DEVICE)
    ids[0] = torch.tensor([8, 9, 10])  # one token entirely on the last rank
    send = torch.full((ranks, cap, hidden + 1), -7, dtype=torch.int32, device=DEVICE)
    counts = torch.zeros(ranks, dtype=torch.int64, device=DEVICE)
    pos = pack_pairs(x.view(torch.int32), ids, experts // ranks, send, counts)

    per_rank = experts // ranks
    flat_ids = ids.reshape(-1).cpu()
    assert counts.cpu().tolist() == torch.bincount(flat_ids // per_rank, minlength=ranks).tolist()
    rows = send.view(ranks * cap, hidden + 1).cpu()
    pos = pos.cpu()
    assert len(set(pos.tolist())) == t * k  # distinct positions
    for p in range(t * k):
        dest = int(flat_ids[p]) // per_rank
        assert dest * cap <= pos[p] < dest * cap + int(counts[dest])  # inside its rank's valid rows
        assert torch.equal(rows[pos[p], :hidden], x[p // k].view(torch.int32).cpu())
        assert rows[pos[p], hidden] == flat_ids[p] - dest * per_rank
    untouched = torch.ones(ranks * cap, dtype=torch.bool)
    untouched[pos] = False
    assert (rows[untouched] == -7).all()


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("with_rows", [False, True])
def test_combine_rows_is_hf_order_exact_fp32(k, with_rows):
    """The fused combine equals the torch combine (products and partial sums rounded in increasing
    expert order) bit for bit in float32, reading pairs in place through a row index or not."""
    from nanocp.distributed.moe_comm import combine_pairs
    from nanocp_kernels.dispatch import combine_rows

    g = torch.Generator().manual_seed(k)
    t, hidden, experts = 6, 40, 16
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    pairs = torch.randn(t, k, hidden, generator=g)
    want = combine_pairs(pairs, w, ids)  # CPU: the torch path
    if with_rows:
        buf = torch.randn(3 * t * k, hidden, generator=g)
        rows = torch.randperm(3 * t * k, generator=g)[: t * k].view(t, k)
        buf[rows.reshape(-1)] = pairs.reshape(-1, hidden)
        got = combine_rows(buf.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), rows.to(DEVICE))
    else:
        got = combine_rows(pairs.reshape(-1, hidden).to(DEVICE), w.to(DEVICE), ids.to(DEVICE))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("hidden", [128, 512])
def test_dequant_packed_fp8_writes_received_rows_exactly(hidden):
    """DeepEP's FP8 receive layout (column-major scales, one per 128 channels) back to float:
    rows below each expert's count equal fp8 * scale exactly; rows past it are not touched."""
    from nanocp_kernels.dispatch import dequant_packed_fp8

    g = torch.Generator().manual_seed(hidden)
    experts, cap = 3, 20
    x = torch.randn(experts, cap, hidden // 128, 128, generator=g)
    scale = x.abs().amax(-1).clamp(min=1e-4) / 448.0
    xq = (x / scale[..., None]).to(torch.float8_e4m3fn).view(experts, cap, hidden)
    scales = scale.transpose(1, 2).contiguous().transpose(1, 2)  # DeepEP's strides
    counts = torch.tensor([5, 0, cap], dtype=torch.int32)
    out = torch.full((experts, cap, hidden), -3.0, device=DEVICE)
    dequant_packed_fp8(xq.to(DEVICE), scales.to(DEVICE), counts.to(DEVICE), out)
    want = (xq.float().view(experts, cap, -1, 128) * scale[..., None]).view(experts, cap, hidden)
    out = out.cpu()
    for e, n in enumerate(counts.tolist()):
        assert torch.equal(out[e, :n], want[e, :n])
        assert (out[e, n:] == -3.0).all()
