"""Greedy tokens of the engine equal transformers' generate (fp32, CPU) for mixed batches."""

from __future__ import annotations

import pytest

from conftest import assert_pool_free, greedy_params, random_prompts
from nanocp import Engine

LENGTHS = [1, 2, 3, 5, 8, 13, 17, 31, 64, 100, 128, 200, 255, 256, 300, 512]
NEW_TOKENS = 12

MODEL_SHAPES = {
    "moe-default": ("qwen3_moe", {}),
    "moe-mha-noNorm": (
        "qwen3_moe",
        {
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "norm_topk_prob": False,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "seed": 1,
        },
    ),
    "moe-mqa-sparse-step": (
        "qwen3_moe",
        {
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 1,
            "num_hidden_layers": 3,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [2],
            "seed": 2,
        },
    ),
    "dense": ("qwen3", {}),
    "dense-tied-bias": ("qwen3", {"tie_word_embeddings": True, "attention_bias": True, "seed": 3}),
}


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("shape", list(MODEL_SHAPES))
def test_greedy_matches_transformers(model_factory, hf_oracle, shape, page_size):
    arch, overrides = MODEL_SHAPES[shape]
    path = model_factory(arch, **overrides)
    prompts = random_prompts(LENGTHS, vocab=500, seed=hash(shape) % 1000)
    expected = [hf_oracle(path).greedy(p, NEW_TOKENS) for p in prompts]
    # chunked prefill (200 < 512) mixes prefill chunks with decodes of the short prompts
    with Engine(
        model_path=path, page_size=page_size, chunked_prefill_size=200, max_total_tokens=8192
    ) as engine:
        results = engine.generate(input_ids=prompts, sampling_params=greedy_params(NEW_TOKENS))
        for i, (res, exp) in enumerate(zip(results, expected)):
            assert res["output_ids"] == exp, f"prompt {i} (length {LENGTHS[i]}) differs from transformers"
            assert res["meta_info"]["prompt_tokens"] == LENGTHS[i]
            assert res["meta_info"]["completion_tokens"] == NEW_TOKENS
            assert res["meta_info"]["finish_reason"] == {"type": "length", "length": NEW_TOKENS}
        assert_pool_free(engine)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_matches_transformers(model_factory, hf_oracle, rope_scaling):
    path = model_factory("qwen3_moe", rope_scaling=rope_scaling, seed=5)
    prompts = random_prompts([7, 300, 900], vocab=500, seed=7)
    expected = [hf_oracle(path).greedy(p, 8) for p in prompts]
    with Engine(model_path=path, chunked_prefill_size=256, max_total_tokens=4096) as engine:
        results = engine.generate(input_ids=prompts, sampling_params=greedy_params(8))
    assert [r["output_ids"] for r in results] == expected


def test_text_prompts_and_single_prompt(moe_model, hf_oracle):
    with Engine(model_path=moe_model, max_total_tokens=2048) as engine:
        ids = engine.tokenizer.encode("the expert router sends each token to a few experts")
        single = engine.generate(
            prompt="the expert router sends each token to a few experts", sampling_params=greedy_params(10)
        )
        assert isinstance(single, dict)
        assert single["output_ids"] == hf_oracle(moe_model).greedy(ids, 10)
        assert single["text"] == engine.tokenizer.decode(single["output_ids"], skip_special_tokens=True)
        assert_pool_free(engine)
