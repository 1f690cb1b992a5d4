"""Checkpoint loading: single file vs sharded, missing tensors, dummy weights, bad architectures."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import greedy_params
from nanocp import Engine
from nanocp.models.config import load_hf_config
from nanocp.models.loader import load_model


def _params(path: str, load_format: str = "auto") -> dict[str, torch.Tensor]:
    cfg = load_hf_config(path)
    model = load_model(path, cfg, load_format, torch.float32, "cpu")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_checkpoint_equals_single_file(model_factory):
    single = _params(model_factory("qwen3_moe", seed=4))
    sharded_path = model_factory("qwen3_moe", seed=4, num_shards=3)
    assert os.path.exists(os.path.join(sharded_path, "model.safetensors.index.json"))
    sharded = _params(sharded_path)
    assert single.keys() == sharded.keys()
    for k in single:
        torch.testing.assert_close(single[k], sharded[k], rtol=0, atol=0)


def test_loaded_weights_equal_transformers(moe_model):
    from transformers import AutoModelForCausalLM

    ours = _params(moe_model)
    hf = AutoModelForCausalLM.from_pretrained(moe_model, dtype=torch.float32).state_dict()
    torch.testing.assert_close(ours["model.embed_tokens.weight"], hf["model.embed_tokens.weight"])
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    torch.testing.assert_close(ours["model.layers.1.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
    torch.testing.assert_close(
        ours["model.layers.0.mlp.experts.w13_weight"], hf["model.layers.0.mlp.experts.gate_up_proj"]
    )
    torch.testing.assert_close(
        ours["model.layers.0.mlp.experts.w2_weight"], hf["model.layers.0.mlp.experts.down_proj"]
    )


def test_missing_tensor_is_reported(model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    src = model_factory("qwen3_moe", seed=4)
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            (tmp_path / name).write_bytes(open(os.path.join(src, name), "rb").read())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*experts\.3\.up_proj"):
        _params(str(tmp_path))


def test_dummy_load_format_needs_only_config(model_factory, tmp_path):
    src = model_factory("qwen3_moe")
    for name in os.listdir(src):  # everything but the weights
        if not name.endswith(".safetensors"):
            (tmp_path / name).write_bytes(open(os.path.join(src, name), "rb").read())
    with Engine(model_path=str(tmp_path), load_format="dummy", max_total_tokens=256) as engine:
        out = engine.generate(input_ids=[5, 6, 7], sampling_params=greedy_params(4))
        assert out["meta_info"]["completion_tokens"] == 4
    a, b = _params(str(tmp_path), "dummy"), _params(str(tmp_path), "dummy")
    torch.testing.assert_close(a["lm_head.weight"], b["lm_head.weight"], rtol=0, atol=0)
    assert a["lm_head.weight"].std() > 0.01


def test_unsupported_architecture(model_factory, tmp_path):
    src = model_factory("qwen3")
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported; supported: Qwen3ForCausalLM"):
        load_model(str(tmp_path), load_hf_config(str(tmp_path)), "dummy", torch.float32, "cpu")
