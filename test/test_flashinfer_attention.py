"""FlashInfer attention backend (CUDA + flashinfer) against the torch reference."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("flashinfer")

from conftest import greedy_params, random_prompts  # noqa: E402
from nanocp import Engine  # noqa: E402
from nanocp_kernels.reference import paged_attention_ref  # noqa: E402

SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128)


@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_backend_matches_reference(model_factory, page_size):
    """Run a mixed prefill + decode batch through the engine with the FlashInfer backend and
    check one layer's (o, lse) against the reference over the same paged KV."""
    path = model_factory("qwen3_moe", **SHAPE)
    captured = {}
    with Engine(
        model_path=path,
        dtype="bfloat16",
        attention_backend="flashinfer",
        page_size=page_size,
        chunked_prefill_size=64,
        max_total_tokens=4096,
        disable_cuda_graph=True,  # the spy must see eager decode steps (graphs: test_cuda_graph.py)
    ) as engine:
        backend = engine.runner.attn_backend
        orig, orig_with_lse = backend.forward, backend.forward_with_lse

        # Layers without context parallelism call forward (no LSE); the spy checks its output and,
        # on the same batch, forward_with_lse's (o, lse) (storing the same K/V twice is harmless).
        def spy(q, k, v, layer, batch):
            o = orig(q, k, v, layer, batch)
            if layer.layer_id == 1 and batch.batch_size > 1 and "o" not in captured:
                table = backend.req_to_token_pool.req_to_token
                qo, kv, idx, kpos = [0], [0], [], []
                for i, (sl, el) in enumerate(zip(batch.seq_lens_cpu, batch.extend_seq_lens_cpu)):
                    qo.append(qo[-1] + el)
                    kv.append(kv[-1] + sl)
                    idx.append(table[batch.req_pool_indices[i], :sl])
                    kpos.append(torch.arange(sl, device=q.device))
                ref_o, ref_lse = paged_attention_ref(
                    q,
                    backend.kv_pool.k_buffer[1],
                    backend.kv_pool.v_buffer[1],
                    qo,
                    kv,
                    torch.cat(idx),
                    batch.positions,
                    torch.cat(kpos),
                    layer.scaling,
                )
                o2, lse = orig_with_lse(q, k, v, layer, batch)
                captured.update(o=o.float(), o2=o2.float(), lse=lse, ref_o=ref_o.float(), ref_lse=ref_lse)
            return o

        backend.forward = spy
        prompts = random_prompts([3, 100, 37, 200], vocab=500, seed=6)
        engine.generate(input_ids=prompts, sampling_params=greedy_params(6))
    assert captured, "no multi-request step was captured"
    torch.testing.assert_close(captured["o"], captured["ref_o"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(captured["o2"], captured["ref_o"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(captured["lse"], captured["ref_lse"], rtol=1e-2, atol=1e-2)
