"""AOT CUDA-graph decode (GPU): replayed graphs give the logits of the eager forward for the same
batch (padding rows included), and greedy tokens of HF transformers in fp32."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from conftest import greedy_params, random_prompts  # noqa: E402
from nanocp import Engine  # noqa: E402
from nanocp.model_executor.cuda_graph_runner import graph_buckets  # noqa: E402

SHAPE = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=128)
# bf16 uses a dense model: with random MoE weights, the last-bit differences between FlashInfer's
# decode (graph) and prefill (eager) kernels can flip a token's top-k experts and its logits with them
BACKENDS = [("triton", "qwen3_moe", "float32", 1e-5), ("flashinfer", "qwen3", "bfloat16", 3e-2)]


def test_buckets_cover_every_batch_size():
    for max_bs in (1, 7, 32, 100, 256):
        b = graph_buckets(max_bs)
        assert b == sorted(set(b)) and b[-1] == max_bs and b[0] == 1


@pytest.mark.parametrize("backend, arch, dtype, tol", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_graph_replay_equals_eager(model_factory, backend, arch, dtype, tol):
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    path = model_factory(arch, **SHAPE)
    compared = []
    with Engine(
        model_path=path, dtype=dtype, attention_backend=backend, cuda_graph_max_bs=8, max_total_tokens=8192
    ) as engine:
        runner = engine.runner
        graphs = runner.graph_runner
        assert graphs is not None and graphs.buckets == [1, 2, 4, 8]
        replay = graphs.replay

        def check(batch):
            logits = replay(batch).clone()
            runner.graph_runner = None  # the same batch eagerly (re-writes the same K/V)
            eager = runner.forward(batch)
            runner.graph_runner = graphs
            compared.append((batch.batch_size, (logits - eager).abs().max().item(), eager.abs().max().item()))
            return logits

        graphs.replay = check
        prompts = random_prompts([5, 17, 33, 64, 100], vocab=500, seed=11)
        engine.generate(input_ids=prompts, sampling_params=greedy_params(6))
    assert {bs for bs, _, _ in compared} >= {5}, compared  # bucket 8 with 3 padding rows
    for bs, diff, scale in compared:
        assert diff <= tol * max(1.0, scale), (bs, diff, scale)


def test_graph_decode_matches_transformers_fp32(model_factory, hf_oracle):
    path = model_factory("qwen3_moe", **SHAPE)
    prompts = random_prompts([1, 9, 40, 77, 130, 3], vocab=500, seed=12)
    with Engine(
        model_path=path, dtype="float32", attention_backend="triton", max_total_tokens=8192
    ) as engine:
        assert engine.runner.graph_runner is not None
        outs = engine.generate(input_ids=prompts, sampling_params=greedy_params(10))
    oracle = hf_oracle(path)
    assert [o["output_ids"] for o in outs] == [oracle.greedy(p, 10) for p in prompts]


def test_one_and_two_request_decode_matches_transformers_fp32(model_factory, hf_oracle):
    """Decode batches of 1-2 rows take the decode-batch kernels (skinny GEMMs; at one row also the
    one-launch router and the two-launch experts) in graphs and eagerly: greedy tokens == HF."""
    path = model_factory("qwen3_moe", **SHAPE)
    oracle = hf_oracle(path)
    for graphs in (True, False):
        with Engine(
            model_path=path, dtype="float32", attention_backend="triton", max_total_tokens=8192,
            disable_cuda_graph=not graphs,
        ) as engine:  # fmt: skip
            assert (engine.runner.graph_runner is not None) == graphs
            for lens in ([21], [7, 50]):
                prompts = random_prompts(lens, vocab=500, seed=13)
                outs = engine.generate(input_ids=prompts, sampling_params=greedy_params(10))
                want = [oracle.greedy(p, 10) for p in prompts]
                assert [o["output_ids"] for o in outs] == want, (graphs, lens)
