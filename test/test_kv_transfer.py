"""Every KV transfer backend against a torch reference: slot runs of every layer's K and V land
in the peer's pool exactly where they were sent, and only there; the notice comes after them."""

from __future__ import annotations

import time

import pytest
import torch

from nanocp.disaggregation.transfer import dest_slots, slot_runs
from nanocp.kvcache.pool import KVCachePool
from nanocp.registries import KV_TRANSFER_BACKENDS

BACKENDS = [n for n, c in KV_TRANSFER_BACKENDS.classes().items() if c.available()]


def test_slot_runs_and_dest_slots():
    assert slot_runs([4, 5, 6, 9, 10], [32, 33, 40, 41, 42]) == [(4, 32, 2), (6, 40, 1), (9, 41, 2)]
    # positions 10..14 of a destination [8, 20) whose local index starts at 3, pages of 4
    assert dest_slots(8, 20, 3, [7, 2, 9, 5], 4, 10, 14) == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_land_where_sent(backend, dtype):
    cls = KV_TRANSFER_BACKENDS.get(backend)
    src_pool = KVCachePool(3, 64, 2, 8, dtype, "cpu")
    dst_pool = KVCachePool(3, 48, 2, 8, dtype, "cpu")
    for b in src_pool.k_buffer + src_pool.v_buffer:
        b.copy_(torch.randn(b.shape).to(dtype))
    sender = cls(f"test-src-{backend}-{dtype}", src_pool)
    receiver = cls(f"test-dst-{backend}-{dtype}", dst_pool)
    peer = sender.add_peer(receiver.endpoint())
    runs = [(3, 10, 4), (20, 30, 2), (50, 0, 1)]
    handle = sender.write(peer, runs, b"7:0:7")
    deadline = time.monotonic() + 10
    state, notices = "PROC", []
    while state == "PROC" or not notices:  # both sides progress only when polled (as in the workers)
        if state == "PROC":
            state = sender.poll(handle)
        notices += receiver.notices()
        assert time.monotonic() < deadline, (state, notices)
    assert state == "DONE" and notices == [b"7:0:7"]
    src = torch.tensor([s + i for s, _, n in runs for i in range(n)])
    dst = torch.tensor([d + i for _, d, n in runs for i in range(n)])
    untouched = torch.ones(48, dtype=torch.bool)
    untouched[dst] = False
    for a, b in zip(src_pool.k_buffer + src_pool.v_buffer, dst_pool.k_buffer + dst_pool.v_buffer):
        assert torch.equal(b[dst], a[src])
        assert not b[untouched].any()


def test_a_layout_mismatch_is_refused():
    cls = KV_TRANSFER_BACKENDS.get(BACKENDS[0])
    a = cls("test-a", KVCachePool(2, 16, 2, 8, torch.float32, "cpu"))
    b = cls("test-b", KVCachePool(2, 16, 2, 8, torch.bfloat16, "cpu"))
    with pytest.raises(ValueError, match="same model and --dtype"):
        a.add_peer(b.endpoint())
