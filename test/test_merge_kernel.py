"""LSE merge kernels against the torch reference (Triton runs on CPU through its interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip(
    "triton", reason="Triton kernels (skipped on a torch without triton)", exc_type=ImportError
)

from nanocp_kernels.merge import merge_states  # noqa: E402
from nanocp_kernels.reference import merge_states_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, t, h, d, dtype, seed, empty_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, t, h, d, generator=g).to(dtype)
    s = torch.randn(n, t, h, generator=g) * 4
    s[torch.rand(n, t, h, generator=g) < empty_frac] = float("-inf")  # shards that saw no key
    s[:, 0, 0] = float("-inf")  # a (token, head) no shard saw
    return v.to(DEVICE), s.to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n, t, h, d", [(1, 3, 2, 16), (2, 5, 4, 64), (4, 7, 3, 128), (7, 2, 8, 96)])
@pytest.mark.parametrize("base2", [False, True])
def test_merge_matches_reference(backend, n, t, h, d, base2):
    v, s = _inputs(n, t, h, d, torch.float32, seed=n * 100 + d)
    o, lse = merge_states(v, s, base2=base2, backend=backend)
    s_e = s * math.log(2) if base2 else s
    ref_o, ref_lse = merge_states_ref(list(v), list(s_e))
    torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse * (math.log(2) if base2 else 1.0), ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[0, 0]) and (o[0, 0] == 0).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tolerance check is for the GPU path")
@pytest.mark.gpu
def test_merge_bf16_on_gpu():
    v, s = _inputs(4, 64, 8, 128, torch.bfloat16, seed=1)
    o, lse = merge_states(v, s)
    ref_o, ref_lse = merge_states_ref(list(v.float()), list(s))
    torch.testing.assert_close(o.float(), ref_o, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


def test_merge_of_split_attention_is_exact():
    """End to end with the reference attention: keys split in 3 and merged by the kernel."""
    from nanocp_kernels.reference import paged_attention_ref

    g = torch.Generator().manual_seed(3)
    q, k, vv = (
        torch.randn(4, 4, 32, generator=g),
        torch.randn(50, 2, 32, generator=g),
        torch.randn(50, 2, 32, generator=g),
    )
    q_pos, kv_pos, slots = torch.arange(46, 50), torch.arange(50), torch.arange(50)
    full = paged_attention_ref(q, k, vv, [0, 4], [0, 50], slots, q_pos, kv_pos, 0.2)
    parts = [
        paged_attention_ref(q, k, vv, [0, 4], [0, e - b], slots[b:e], q_pos, kv_pos[b:e], 0.2)
        for b, e in ((0, 16), (16, 48), (48, 50))
    ]
    o, lse = merge_states(
        torch.stack([p[0] for p in parts]).to(DEVICE), torch.stack([p[1] for p in parts]).to(DEVICE)
    )
    torch.testing.assert_close(o.cpu(), full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), full[1], rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\[N, T, H, D\]"):
        merge_states(torch.zeros(2, 3, 4), torch.zeros(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="FlashInfer merge needs CUDA")
@pytest.mark.parametrize("base2", [False, True])
def test_flashinfer_merge_matches_reference(base2):
    pytest.importorskip("flashinfer")
    v, s = _inputs(3, 33, 8, 128, torch.float16, seed=7)
    o, lse = merge_states(v, s, base2=base2, backend="flashinfer")
    ref_o, ref_lse = merge_states(v.float(), s, base2=base2, backend="torch")
    torch.testing.assert_close(o.float(), ref_o, rtol=5e-3, atol=5e-3)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-4)
