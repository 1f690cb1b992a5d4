"""Shared fixtures: tiny random-weight models (built once per session) and the HF oracle."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before any kernel
# module is imported (the @triton.jit decorator reads it), so here, before nanocp is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from nanocp import envs  # noqa: E402
from nanocp.testing import make_tiny_model  # noqa: E402
from nanocp_kernels import has_triton  # noqa: E402

if torch.cuda.is_available():  # kernel tests launch as the model runner does (NANOCP_PDL)
    from nanocp_kernels.launch import set_pdl

    set_pdl(envs.pdl(), torch.device("cuda"))

# Tests of the Triton kernels need triton; on a torch without it (CPU wheels, macOS) they are
# skipped, and everything else runs on the torch references (test_no_triton checks that path).
needs_triton = pytest.mark.skipif(not has_triton(), reason="needs triton")


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """model_factory(arch="qwen3_moe", **overrides) -> checkpoint dir (cached per argument set)."""
    cache: dict[str, str] = {}

    def make(arch: str = "qwen3_moe", **kwargs) -> str:
        key = json.dumps([arch, kwargs], sort_keys=True)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}_model")
            cache[key] = make_tiny_model(path, arch=arch, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def moe_model(model_factory) -> str:
    return model_factory("qwen3_moe")


@pytest.fixture(scope="session")
def dense_model(model_factory) -> str:
    return model_factory("qwen3")


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Stay below the special tokens (ids 0..2) so prompts look like text.
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


class HFOracle:
    """Greedy generation with transformers (fp32), one prompt at a time (no padding effects)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # the engine side runs with ignore_eos

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        from transformers import GenerationConfig

        cfg = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0
        )
        out = self.model.generate(torch.tensor([prompt]), generation_config=cfg)
        tokens = out[0, len(prompt) :].tolist()
        assert len(tokens) == max_new_tokens, "HF stopped early; the oracle must run to max_new_tokens"
        return tokens


@pytest.fixture(scope="session")
def hf_oracle():
    cache: dict[str, HFOracle] = {}

    def get(path: str) -> HFOracle:
        if path not in cache:
            cache[path] = HFOracle(path)
        return cache[path]

    return get


def assert_pool_free(engine) -> None:
    """Every KV page is back in the free list or in the prefix cache, unlocked (evictable), and
    every request row is free."""
    sched = engine.scheduler
    assert not sched.running and not sched.waiting
    kv = sched.kv
    cached = kv.cache.cached_pages if kv.cache is not None else 0
    assert kv.allocator.num_free_pages + cached == kv.allocator.num_pages
    assert kv.cache is None or kv.cache.locked_pages == 0
    assert sched.kv.req_to_token_pool.num_free == sched.kv.req_to_token_pool.max_reqs


def greedy_params(max_new_tokens: int, **kw) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True, **kw}


class BackgroundRequest:
    """POST /generate from a thread (to abort it, kill a process meanwhile, ...)."""

    def __init__(self, url: str, body: dict, timeout: float = 60.0) -> None:
        import threading

        import httpx

        self._response = None

        def run() -> None:
            self._response = httpx.post(url + "/generate", json=body, timeout=timeout)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 60.0):
        self._thread.join(timeout)
        assert self._response is not None, "the request did not return"
        return self._response
