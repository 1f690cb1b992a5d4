"""--moe-a2a-backend ipc (GPU): the MoE layer over expert-parallel ranks, tokens routed through the
CUDA-IPC routing backend, equals the single-rank reference over all experts; eager and replayed
from a captured CUDA graph with new tokens and routing each replay (device-side counts). Steps
bigger than the fixed blocks (prefill) go through the variable-size all_to_all in chunks that
fit its receive buffers."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from nanocp.testing.multiproc import run_ranks  # noqa: E402

E, K, H, INTER, MAX_TOKENS = 16, 4, 64, 32, 24


def _inputs(step: int, rank: int, tokens: int, dev) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(tokens, H, generator=g)
    logits = torch.randn(tokens, E, generator=g)
    if step % 3 == 0:  # skewed routing: every pair of every token to the last rank's experts
        logits[:, : E // 2] -= 100
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    return x.to(dev), (w / w.sum(-1, keepdim=True)).to(dev), ids.to(dev)


def _experts(rank: int, world: int):
    """This rank's device and its share of one set of random experts (and all experts' weights)."""
    from nanocp.layers.moe import FusedMoE

    dev = torch.device(f"cuda:{rank % torch.cuda.device_count()}")
    torch.cuda.set_device(dev)
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * INTER, H, generator=g) / 8, torch.randn(E, H, INTER, generator=g) / 6
    w13, w2 = w13.to(dev), w2.to(dev)
    experts = FusedMoE(E, K, H, INTER, True, ep_rank=rank, ep_size=world).to(dev)
    sl = slice(experts.expert_offset, experts.expert_offset + experts.num_local_experts)
    experts.w13_weight.data.copy_(w13[sl])
    experts.w2_weight.data.copy_(w2[sl])
    experts.runner_backend = "triton"
    return dev, experts, w13, w2


def _layer(rank: int, world: int, graph: bool) -> None:
    import torch.distributed as dist

    from nanocp.distributed.moe_comm import create_moe_comm
    from nanocp.distributed.parallel_state import ParallelState
    from nanocp_kernels.reference import fused_moe_ref

    dev, experts, w13, w2 = _experts(rank, world)
    state = ParallelState(rank, world, rank, world, None, dist.group.WORLD, dev)
    comm = create_moe_comm(
        "ipc", state, hidden_size=H, max_tokens_per_rank=MAX_TOKENS, top_k=K, dtype=torch.float32
    )
    tokens = MAX_TOKENS - 3 * rank  # ranks send different amounts
    x, w, ids = _inputs(0, rank, tokens, dev)
    run = lambda: comm.forward(x, w, ids, experts, None)  # noqa: E731
    out = run()
    if graph:
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            out = run()
        run = lambda: (cuda_graph.replay(), out)[1]  # noqa: E731
    for step in range(1, 7):
        nx, nw, nids = _inputs(step, rank, tokens, dev)
        x.copy_(nx), w.copy_(nw), ids.copy_(nids)
        got = run().clone()
        want = fused_moe_ref(nx, w13, w2, nw, nids, 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"rank {rank} step {step}")
    torch.cuda.synchronize()
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_ipc_moe_layer_matches_reference(world, graph):
    run_ranks(_layer, world, graph)


def _large_step(rank: int, world: int) -> None:
    import torch.distributed as dist

    from nanocp.distributed.ipc_comm import IpcAllToAll
    from nanocp.distributed.moe_comm import create_moe_comm
    from nanocp.distributed.parallel_state import ParallelState
    from nanocp_kernels.reference import fused_moe_ref

    dev, experts, w13, w2 = _experts(rank, world)
    # receive buffers for 2 * MAX_TOKENS tokens' pairs (fp32 rows of H): big steps take 2 calls
    a2a = IpcAllToAll(rank, world, dist.group.WORLD, dev, capacity_bytes=2 * MAX_TOKENS * K * H * 4)
    state = ParallelState(rank, world, rank, world, None, dist.group.WORLD, dev, a2a)
    comm = create_moe_comm(
        "ipc", state, hidden_size=H, max_tokens_per_rank=MAX_TOKENS, top_k=K, dtype=torch.float32
    )
    assert comm.large_chunk == 2 * MAX_TOKENS
    calls, large = [], comm.large.forward
    comm.large.forward = lambda *a: (calls.append(a[0].shape[0]), large(*a))[1]
    global_tokens = [4 * MAX_TOKENS - 7 * r for r in range(world)]  # 96, 89, ... tokens
    for step in range(4):
        x, w, ids = _inputs(step, rank, global_tokens[rank], dev)
        got = comm.forward(x, w, ids, experts, global_tokens)
        torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, w, ids, 0), rtol=1e-4, atol=1e-4)
    # every rank makes 2 calls per step, also when its own tokens fit in fewer
    assert len(calls) == 8 and sum(calls) == 4 * global_tokens[rank], calls
    torch.cuda.synchronize()
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
def test_ipc_moe_large_steps_take_the_variable_size_exchange(world):
    run_ranks(_large_step, world)
