"""DeepEP low-latency MoE backend (GPU + deep_ep; one rank dispatching to itself on one GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("deep_ep")

from conftest import greedy_params, random_prompts  # noqa: E402
from nanocp import Engine  # noqa: E402
from nanocp.layers.moe import select_experts  # noqa: E402
from nanocp_kernels.reference import fused_moe_ref  # noqa: E402

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=16,
    num_experts_per_tok=4,
    init_std=0.02,
)


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("qwen3_moe", **SHAPE)


@pytest.fixture(scope="module")
def deepep_engine(model):
    # one per process: NVSHMEM (under DeepEP's buffer) is initialised once
    with Engine(
        model_path=model,
        dtype="bfloat16",
        moe_a2a_backend="deepep",
        attention_backend="triton",
        max_total_tokens=4096,
    ) as engine:
        yield engine


def test_deepep_moe_layer_matches_reference(deepep_engine):
    comm = deepep_engine.runner.moe_comm
    assert type(comm).__name__ == "DeepEPMoE"
    experts = deepep_engine.runner.model.model.layers[0].mlp.experts
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in (1, 7, 64, 300):  # 300 > max tokens per dispatch: chunked
        x = torch.randn(t, 2048, device="cuda", generator=g).bfloat16()
        logits = torch.randn(t, 16, device="cuda", generator=g)
        w, ids = select_experts(logits, 4, True, torch.bfloat16)
        ref = fused_moe_ref(x.float(), experts.w13_weight.float(), experts.w2_weight.float(), w.float(), ids)
        out = comm.forward(x, w, ids, experts, [t])
        torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def test_deepep_fp8_dispatch_matches_reference_eager_and_graph(deepep_engine):
    """--deepep-fp8-dispatch: tokens travel as FP8 (a scale per 128 channels) and are dequantized
    on arrival; the layer output stays within FP8 rounding of the bf16 reference, eagerly and when
    the dispatch, dequantization and combine replay from a CUDA graph with new inputs."""
    comm = deepep_engine.runner.moe_comm
    experts = deepep_engine.runner.model.model.layers[0].mlp.experts
    g = torch.Generator(device="cuda").manual_seed(3)

    def inputs(t):
        x = torch.randn(t, 2048, device="cuda", generator=g).bfloat16()
        w, ids = select_experts(torch.randn(t, 16, device="cuda", generator=g), 4, True, torch.bfloat16)
        ref = fused_moe_ref(x.float(), experts.w13_weight.float(), experts.w2_weight.float(), w.float(), ids)
        return x, w, ids, ref

    comm.use_fp8 = True
    try:
        for t in (1, 7, 64):
            x, w, ids, ref = inputs(t)
            out = comm.forward(x, w, ids, experts, [t])
            assert _rel_err(out, ref) < 0.06, (t, _rel_err(out, ref))
        comm.use_fp8 = False
        bf16_err = _rel_err(comm.forward(x, w, ids, experts, [t]), ref)
        comm.use_fp8 = True
        assert _rel_err(out, ref) > bf16_err  # the FP8 path really ran (coarser than bf16)
        x, w, ids, _ = inputs(8)
        comm.forward(x, w, ids, experts, [8])  # warm-up outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = comm.forward(x, w, ids, experts, [8])
        for _ in range(2):
            nx, nw, nids, ref = inputs(8)
            x.copy_(nx), w.copy_(nw), ids.copy_(nids)
            comm.prepare_replay()
            graph.replay()
            assert _rel_err(out, ref) < 0.06
    finally:
        comm.use_fp8 = False


def test_deepep_engine_greedy_tokens(model, deepep_engine):
    """Decode replays CUDA graphs with DeepEP's dispatch/combine inside; each replay is checked
    against the eager forward of the same batch, and the tokens against all-local experts."""
    runner = deepep_engine.runner
    graphs = runner.graph_runner
    assert graphs is not None and graphs.moe_comm is runner.moe_comm
    replay, compared = graphs.replay, []

    def check(batch):
        logits = replay(batch).clone()
        runner.graph_runner = None  # the same batch eagerly (re-writes the same K/V)
        eager = runner.forward(batch)
        runner.graph_runner = graphs
        compared.append((logits - eager).abs().max().item() / max(1.0, eager.abs().max().item()))
        return logits

    graphs.replay = check
    prompts = random_prompts([5, 40, 200, 3], vocab=500, seed=2)
    try:
        outs = deepep_engine.generate(input_ids=prompts, sampling_params=greedy_params(12))
    finally:
        graphs.replay = replay
    got = [r["output_ids"] for r in outs]
    assert compared and max(compared) < 3e-2, compared
    with Engine(
        model_path=model, dtype="bfloat16", attention_backend="triton", max_total_tokens=4096
    ) as local:
        expected = [
            r["output_ids"] for r in local.generate(input_ids=prompts, sampling_params=greedy_params(12))
        ]
    assert got == expected


def _normal_mode_rank(rank: int, world: int) -> None:
    """One EP rank: DeepEP auto mode on 2 GPUs, a step larger than the low-latency buffer (normal
    kernels), then small ones (low-latency kernels, after the buffer clean), each against the
    reference with every expert."""
    import torch.distributed as dist

    from nanocp.distributed.a2a import A2AComm
    from nanocp.distributed.moe_comm import create_moe_comm
    from nanocp.distributed.parallel_state import ParallelState
    from nanocp.layers.moe import FusedMoE

    dev = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(dev)
    nccl = dist.new_group(backend="nccl")
    state = ParallelState(
        rank, world, rank, world, nccl, dist.group.WORLD, dev, A2AComm(nccl, dist.group.WORLD)
    )
    hidden, experts, k = 2048, 16, 4
    full = FusedMoE(experts, k, hidden, 256, True).to(dev, torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)  # the same weights on every rank
    full.w13_weight.data.normal_(std=0.02, generator=g)
    full.w2_weight.data.normal_(std=0.02, generator=g)
    local = FusedMoE(experts, k, hidden, 256, True, ep_rank=rank, ep_size=world).to(dev, torch.bfloat16)
    sl = slice(rank * experts // world, (rank + 1) * experts // world)
    local.w13_weight.data.copy_(full.w13_weight.data[sl])
    local.w2_weight.data.copy_(full.w2_weight.data[sl])
    local.runner_backend = "triton"
    comm = create_moe_comm(
        "deepep", state, hidden_size=hidden, num_experts=experts, max_tokens_per_rank=32, deepep_mode="auto"
    )
    assert comm.normal and comm.low_latency
    g = torch.Generator(device=dev).manual_seed(1 + rank)
    for counts in ([300, 170], [5, 9], [200, 0], [1, 32]):  # big: normal kernels; small: low-latency
        t = counts[rank]
        x = torch.randn(t, hidden, device=dev, generator=g).bfloat16()
        w, ids = select_experts(torch.randn(t, experts, device=dev, generator=g), k, True, torch.bfloat16)
        ref = fused_moe_ref(x.float(), full.w13_weight.float(), full.w2_weight.float(), w.float(), ids)
        out = comm.forward(x, w, ids, local, counts)
        assert out.shape == (t, hidden)
        if t:
            torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    dist.barrier()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DeepEP's normal kernels need 2+ GPUs")
def test_deepep_normal_mode_for_big_steps_two_gpus():
    from nanocp.testing.multiproc import run_ranks

    run_ranks(_normal_mode_rank, 2)
