"""CUDA-IPC routing backend (GPU): ranks exchange variable-size blocks; every rank receives
exactly the rows each peer addressed to it, over many calls (both buffer parities reused).
Ranks share one GPU, or sit on one GPU each when the machine has enough (NVLink peer access).
`exchange` (device counts, device epoch) is also checked replayed from a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from nanocp.testing.multiproc import run_ranks  # noqa: E402

PLACEMENTS = ["one GPU", pytest.param("GPU per rank", marks=pytest.mark.multi_gpu)]


def _count(step: int, src: int, dst: int) -> int:
    return (7 * step + 3 * src + 5 * dst) % 11  # 0 included: empty blocks


def _rows(step: int, src: int, dst: int, n: int, dtype) -> torch.Tensor:
    base = torch.arange(n * 3 * 5, dtype=torch.float32).view(n, 3, 5)
    return (base + 1000 * step + 100 * src + 10 * dst).to(dtype)


def _device(rank: int, placement: str) -> torch.device:
    dev = torch.device(f"cuda:{rank if placement == 'GPU per rank' else 0}")
    torch.cuda.set_device(dev)
    return dev


def _skip_unless_gpus(world: int, placement: str) -> None:
    if placement == "GPU per rank" and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")


def _exchange(rank: int, world: int, dtype, device_sync: bool, placement: str) -> None:
    import torch.distributed as dist

    from nanocp.distributed.ipc_comm import IpcAllToAll

    dev = _device(rank, placement)
    comm = IpcAllToAll(rank, world, dist.group.WORLD, dev, capacity_bytes=1 << 16)
    assert comm.shared_gpu == (placement == "one GPU")
    # the flag protocol is correct on one GPU too (only slow when time-sliced, without MPS)
    comm.host_sync = comm.shared_gpu and not device_sync
    for step in range(12):
        send = [_count(step, rank, j) for j in range(world)]
        recv = [_count(step, j, rank) for j in range(world)]
        x = torch.cat([_rows(step, rank, j, send[j], dtype) for j in range(world)]).to(dev)
        out = comm.all_to_all(x, send, recv)
        want = torch.cat([_rows(step, j, rank, recv[j], dtype) for j in range(world)]).to(dev)
        assert torch.equal(out, want), f"rank {rank} step {step}"
    torch.cuda.synchronize()
    dist.barrier()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "dtype, device_sync", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
)
def test_ipc_all_to_all(world, dtype, device_sync, placement):
    _skip_unless_gpus(world, placement)
    run_ranks(_exchange, world, dtype, device_sync, placement)


CAP = 12  # rows per peer block (counts go up to 10)


def _fill(x: torch.Tensor, counts: torch.Tensor, step: int, rank: int, world: int) -> None:
    x.fill_(-1)
    for j in range(world):
        n = _count(step, rank, j)
        x[j, :n] = _rows(step, rank, j, n, x.dtype)
        counts[j] = n


def _fixed_exchange(rank: int, world: int, graph: bool, placement: str) -> None:
    import torch.distributed as dist

    from nanocp.distributed.ipc_comm import IpcAllToAll

    dev = _device(rank, placement)
    comm = IpcAllToAll(rank, world, dist.group.WORLD, dev, capacity_bytes=16, graph_capacity_bytes=CAP * 60)
    x = torch.empty(world, CAP, 3, 5, device=dev)
    out = torch.empty_like(x)
    counts = torch.zeros(world, dtype=torch.int64, device=dev)
    out_counts = torch.zeros_like(counts)
    replay = comm.exchange
    if graph:
        comm.exchange(x, counts, out, out_counts)  # compile (a real exchange: every rank does it)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            comm.exchange(x, counts, out, out_counts)
        replay = lambda *_: g.replay()  # noqa: E731
    for step in range(12):
        _fill(x, counts, step, rank, world)
        out.fill_(-7)
        replay(x, counts, out, out_counts)
        torch.cuda.synchronize()
        for src in range(world):
            n = _count(step, src, rank)
            assert out_counts[src].item() == n, f"rank {rank} step {step} src {src}"
            assert torch.equal(out[src, :n].cpu(), _rows(step, src, rank, n, x.dtype)), (
                f"rank {rank} step {step}"
            )
            assert bool((out[src, n:] == -7).all()), "rows past the count must stay untouched"
    dist.barrier()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_ipc_exchange_fixed_blocks(world, graph, placement):
    _skip_unless_gpus(world, placement)
    run_ranks(_fixed_exchange, world, graph, placement)
