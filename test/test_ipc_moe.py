"""--moe-a2a-backend ipc (GPU): the MoE layer over expert-parallel ranks, tokens routed through the
CUDA-IPC routing backend, equals the single-rank reference over all experts; eager and replayed
from a captured CUDA graph with new tokens and routing each replay (device-side counts)."""

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


def _layer(rank: int, world: int, graph: bool) -> None:
    import torch.distributed as dist

    from nanocp.distributed.moe_comm import create_moe_comm
    from nanocp.distributed.parallel_state import ParallelState
    from nanocp.layers.moe import FusedMoE
    from nanocp_kernels.reference import fused_moe_ref

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
