"""GraphDCP: context-parallel decode routing through fixed per-peer blocks with device-side counts
(what CUDA-graph replays run). For a hand-made plan over 2 instances -- a query sent to the holder
of a request's first keys, a token whose K/V goes to the holder of its position, an unsharded
request, padding rows -- every home's merged output equals attention over the request's whole KV.
Ranks are threads and the exchange an in-process stand-in with IpcAllToAll.exchange's contract
(the real exchange and graphs are tested on the GPU: test_ipc_comm, test_multi_instance_gpu)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from nanocp.distributed.dcp import DCPPlan
from nanocp.distributed.dcp_graph import GraphDCP
from nanocp_kernels.reference import paged_attention_ref

HQ, HKV, D, SLOTS, CAP = 4, 2, 16, 512, 4
PAD = SLOTS - 1
SCALE = 1 / math.sqrt(D)


class ThreadExchange:
    """Rows x[j, :counts[j]] of every rank reach rank j; rows of `out` past the counts keep
    whatever they held before, as the real receive blocks do."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.posted: list = [None] * world

    def for_rank(self, rank: int):
        shared = self

        class Comm:
            def exchange(self, x, counts, out, out_counts, blocks=None):
                shared.posted[rank] = (x.clone(), counts.clone())
                shared.barrier.wait()
                for src, (sx, sc) in enumerate(shared.posted):
                    n = int(sc[rank])
                    out[src, :n] = sx[rank, :n]
                    out_counts[src] = n
                shared.barrier.wait()

        return Comm()


def _attend(q, k_cache, v_cache, seqs):
    """seqs: per query row, (slots, positions, q_pos) of the keys it may see."""
    qo = list(range(len(seqs) + 1))
    kv, idx, kpos, qpos = [0], [], [], []
    for slots, pos, qp in seqs:
        kv.append(kv[-1] + len(slots))
        idx.append(torch.as_tensor(slots, dtype=torch.int64))
        kpos.append(torch.as_tensor(pos, dtype=torch.int64))
        qpos.append(qp)
    return paged_attention_ref(
        q, k_cache, v_cache, qo, kv, torch.cat(idx), torch.tensor(qpos), torch.cat(kpos), SCALE
    )


@pytest.mark.parametrize("rows_a", [0, 2], ids=["A-first", "A-last"])
def test_graph_dcp_merges_to_unsharded_attention(rows_a):
    g = torch.Generator().manual_seed(rows_a)
    lengths = {"A": 101, "B": 30, "C": 81}  # the current token is the last position
    k_full = {r: torch.randn(n + 120, HKV, D, generator=g) for r, n in lengths.items()}
    v_full = {r: torch.randn(n + 120, HKV, D, generator=g) for r, n in lengths.items()}
    q_of = {r: torch.randn(HQ, D, generator=g) for r in lengths}
    pools = [(torch.zeros(SLOTS, HKV, D), torch.zeros(SLOTS, HKV, D)) for _ in range(2)]
    perms = [torch.randperm(PAD, generator=g).tolist() for _ in range(2)]
    used = [0, 0]

    def hold(rank: int, req: str, lo: int, hi: int, written: int) -> list[int]:
        """Slots on `rank` for positions [lo, hi) of req; those < written get their K/V (the rest
        are reserved but not yet written: random data that causality must hide)."""
        slots = perms[rank][used[rank] : used[rank] + hi - lo]
        used[rank] += hi - lo
        k, v = pools[rank]
        for s, p in zip(slots, range(lo, hi)):
            k[s], v[s] = (
                (k_full[req][p], v_full[req][p])
                if p < written
                else (torch.randn(HKV, D), torch.randn(HKV, D))
            )
        return slots

    # rank 0: home of A (positions 0-59 held by rank 1) and B; holder of C's grown tail 50-199
    a_local = hold(0, "A", 60, 101, 101)
    b_local = hold(0, "B", 0, 30, 30)
    c_foreign = hold(0, "C", 50, 200, 80)  # position 80 (C's current token) arrives this step
    # rank 1: home of C (positions 0-49 here); holder of A's head 0-59
    c_local = hold(1, "C", 0, 50, 50)
    a_foreign = hold(1, "A", 0, 60, 60)

    rows0 = ["B", "pad"]
    rows0.insert(rows_a, "A")
    rows1 = ["C", "pad"]
    pad = torch.randn(HQ, D, generator=g)

    def batch(rows):
        q = torch.stack([q_of[r] if r != "pad" else pad for r in rows])
        cur = [lengths.get(r, 1) - 1 for r in rows]
        k = torch.stack([k_full[r][c] if r != "pad" else torch.zeros(HKV, D) for r, c in zip(rows, cur)])
        v = torch.stack([v_full[r][c] if r != "pad" else torch.zeros(HKV, D) for r, c in zip(rows, cur)])
        return q, k, v

    ar = rows0.index("A")
    local0 = {"A": (a_local, range(60, 101), 100), "B": (b_local, range(30), 29), "pad": ([], [], 0)}
    local1 = {"C": (c_local, range(50), 80), "pad": ([], [], 0)}
    i64 = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    plans = [
        DCPPlan(
            kv_send_idx=i64([]),
            kv_send_counts=[0, 0],
            kv_recv_counts=[0, 1],
            kv_recv_slots=i64([c_foreign[80 - 50]]),
            q_send_idx=i64([ar]),
            q_send_counts=[0, 1],
            q_recv_counts=[0, 1],
            f_qo_indptr=[0, 1],
            f_kv_indptr=[0, 150],
            f_kv_indices=i64(c_foreign),
            f_q_pos=i64([80]),
            f_kv_pos=torch.arange(50, 200),
        ),
        DCPPlan(
            kv_send_idx=i64([0]),
            kv_send_counts=[1, 0],
            kv_recv_counts=[0, 0],
            kv_recv_slots=i64([]),
            q_send_idx=i64([0]),
            q_send_counts=[1, 0],
            q_recv_counts=[1, 0],
            f_qo_indptr=[0, 1],
            f_kv_indptr=[0, 60],
            f_kv_indices=i64(a_foreign),
            f_q_pos=i64([100]),
            f_kv_pos=torch.arange(60),
        ),
    ]
    unrouted = DCPPlan(
        kv_send_idx=i64([]), kv_send_counts=[0, 0], kv_recv_counts=[0, 0], kv_recv_slots=i64([]),
        q_send_idx=i64([]), q_send_counts=[0, 0], q_recv_counts=[0, 0], f_qo_indptr=[0], f_kv_indptr=[0],
        f_kv_indices=i64([]), f_q_pos=i64([]), f_kv_pos=i64([]),
    )  # fmt: skip
    exchange = ThreadExchange(2)
    results: dict[int, torch.Tensor] = {}
    alone: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int, rows: list[str], local: dict) -> None:
        try:
            dcp = GraphDCP(
                rank, 2, None, torch.device("cpu"), CAP, SLOTS, PAD, HQ, HKV, D, torch.float32,
                comm=exchange.for_rank(rank),
            )  # fmt: skip
            q, k, v = batch(rows)
            o_local, lse_local = _attend(q, *pools[rank], [local[r] for r in rows])
            for _ in range(2):  # the second step finds the blocks holding the first one's rows
                dcp.begin(plans[rank])
                results[rank] = dcp.attend(q, k, v, o_local, lse_local, *pools[rank], SCALE)
            # a step in which no row asks a peer: the peers' answers of the last step are gone
            dcp.begin(unrouted)
            alone[rank] = (dcp.attend(q, k, v, o_local, lse_local, *pools[rank], SCALE), o_local)
        except BaseException as e:  # surface it in the main thread; break the peer's wait
            errors.append(e)
            exchange.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=a) for a in ((0, rows0, local0), (1, rows1, local1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]

    for rank, rows in ((0, rows0), (1, rows1)):
        for i, r in enumerate(rows):
            if r == "pad":
                continue
            n = lengths[r]
            want, _ = _attend(q_of[r][None], k_full[r], v_full[r], [(range(n), range(n), n - 1)])
            torch.testing.assert_close(results[rank][i], want[0], rtol=1e-5, atol=1e-5, msg=f"{r} on {rank}")
    for rank, (got, o_local) in alone.items():
        torch.testing.assert_close(got, o_local, rtol=1e-6, atol=1e-6, msg=f"unrouted step on {rank}")
    # C's current K/V reached its holder's slot
    torch.testing.assert_close(pools[0][0][c_foreign[30]], k_full["C"][80])
