"""Tiny random-weight HF checkpoints and an offline-trained tokenizer, for tests and demos.

Everything is generated locally and deterministically from a seed: no model hub is touched. The
checkpoint uses the same tensor names and layout as the published Qwen3 / Qwen3-MoE checkpoints,
so it loads with ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` as well as NanoCP.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_WORDS = (
    "the a of to and in is it that for on with as was at by be this from or have an are not but "
    "model token expert router cache page request batch decode prefill attention context parallel "
    "shard merge layer head query key value latency throughput memory instance home segment plan "
    "long short tail degree balance queue sample greedy seed stop stream server client python "
    "one two three four five six seven eight nine ten hundred thousand "
    "café naïve über 東京 日本語 数据 ✓ → λ π"
).split()

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
}
_COMMON = {
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "torch_dtype": "float32",
    "use_cache": True,
}


def _corpus(seed: int, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ""]))
    return lines


def make_tokenizer(path: str | os.PathLike, vocab_size: int = 512, seed: int = 0) -> Any:
    """Train a byte-level BPE tokenizer offline and save it (tokenizer.json + config + chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def _weight_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, out in (("q_proj", nq * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            shapes[f"{p}.self_attn.{name}.weight"] = (out, h)
            if cfg["attention_bias"]:
                shapes[f"{p}.self_attn.{name}.bias"] = (out,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, nq * hd)
        if cfg["attention_bias"]:
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        shapes[f"{p}.self_attn.q_norm.weight"] = (hd,)
        shapes[f"{p}.self_attn.k_norm.weight"] = (hd,)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if _is_moe_layer(cfg, i):
            inter = cfg["moe_intermediate_size"]
            shapes[f"{p}.mlp.gate.weight"] = (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                shapes[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (inter, h)
                shapes[f"{p}.mlp.experts.{e}.up_proj.weight"] = (inter, h)
                shapes[f"{p}.mlp.experts.{e}.down_proj.weight"] = (h, inter)
        else:
            inter = cfg["intermediate_size"]
            shapes[f"{p}.mlp.gate_proj.weight"] = (inter, h)
            shapes[f"{p}.mlp.up_proj.weight"] = (inter, h)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def _is_moe_layer(cfg: dict[str, Any], i: int) -> bool:
    if cfg["model_type"] != "qwen3_moe":
        return False
    step = cfg.get("decoder_sparse_step", 1) or 1
    return i not in cfg.get("mlp_only_layers", []) and cfg["num_experts"] > 0 and (i + 1) % step == 0


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "qwen3_moe",
    seed: int = 0,
    init_std: float = 0.1,
    num_shards: int = 1,
    vocab_size: int = 512,
    **overrides: Any,
) -> str:
    """Write a random-weight HF checkpoint + tokenizer to `path`; returns the path as a string.

    `overrides` replace config.json fields (e.g. num_experts=16, num_experts_per_tok=4,
    norm_topk_prob=False, num_key_value_heads=1, rope_scaling={...}).
    """
    from safetensors.torch import save_file

    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"arch must be one of {sorted(ARCH_DEFAULTS)}, got {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path, vocab_size=vocab_size, seed=seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = {
        **_COMMON,
        **ARCH_DEFAULTS[arch],
        "vocab_size": len(tokenizer),
        "eos_token_id": eos,
        "bos_token_id": None,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    if cfg["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {cfg['vocab_size']} < tokenizer size {len(tokenizer)}")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "bos_token_id": None}, indent=2)
    )

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in _weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = init_std * torch.randn(shape, generator=gen)
    names = list(tensors)
    if num_shards <= 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // num_shards)
        for s in range(num_shards):
            fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
            chunk = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
            save_file(chunk, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(chunk, fname))
        index = {
            "metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
            "weight_map": weight_map,
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return str(path)


def cached_tiny_model(name: str, **config: Any) -> str:
    """A tiny model kept under NANOCP_CACHE_DIR/name, created on first use. Creation is atomic
    (written to a temporary directory, then renamed), so a half-written model is never used."""
    import shutil
    import tempfile

    from nanocp import envs

    path = envs.cache_dir() / name
    if (path / "config.json").exists():
        return str(path)
    print(f"Creating {name} (tokenizer + random weights) in {path}, first run only ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{name}-"))
    try:
        make_tiny_model(tmp, **config)
        if not (path / "config.json").exists():
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
