"""DP attention + EP on CPU (gloo): dp=ep=2 and 4 give HF's and dp=1's greedy tokens, with idle
instances and with one instance holding all long requests; every MoE backend agrees."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from conftest import greedy_params, random_prompts
from nanocp import Engine
from nanocp.testing.server import ServerProcess

LONG = [300, 400, 250]
SHORT = [1, 5, 9, 17, 33, 64, 3, 12]
NEW = 10
BASE = ["--max-total-tokens", "8192", "--chunked-prefill-size", "128", "--device", "cpu"]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LONG + SHORT, vocab=500, seed=41)


@pytest.fixture(scope="module")
def expected(moe_model, prompts, hf_oracle):
    hf = [hf_oracle(moe_model).greedy(p, NEW) for p in prompts]
    with Engine(
        model_path=moe_model, max_total_tokens=8192, chunked_prefill_size=128, device="cpu"
    ) as engine:
        dp1 = [
            r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=greedy_params(NEW))
        ]
    assert dp1 == hf
    return hf


def _post_all(url: str, prompts, ranks, new: int = NEW) -> list[list[int]]:
    """Send every prompt concurrently, pinned to the given instances; `new` greedy tokens each."""
    import asyncio

    async def one(c, ids, rank):
        body = {"input_ids": ids, "sampling_params": greedy_params(new)}
        if rank is not None:
            body["data_parallel_rank"] = rank
        r = await c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(one(c, p, r) for p, r in zip(prompts, ranks)))

    return asyncio.run(main())


@pytest.mark.parametrize(
    "dp, backend", [(2, "all_to_all"), (2, "allgather"), (4, "all_to_all"), (4, "allgather")]
)
def test_dp_ep_matches_transformers(moe_model, prompts, expected, tmp_path, dp, backend):
    trace = tmp_path / "trace.jsonl"
    args = [
        "--model-path",
        moe_model,
        *BASE,
        "--dp-size",
        str(dp),
        "--ep-size",
        str(dp),
        "--moe-a2a-backend",
        backend,
        "--step-trace-file",
        str(trace),
    ]
    with ServerProcess(args, log_path=str(tmp_path / "log")) as s:
        # 1. router's choice (round robin) over a mixed batch
        assert _post_all(s.url, prompts, [None] * len(prompts)) == expected
        # 2. one instance holds every long request; the short ones go elsewhere
        ranks = [0] * len(LONG) + [1 + i % (dp - 1) for i in range(len(SHORT))]
        assert _post_all(s.url, prompts, ranks) == expected
        # 3. all work on the last instance: the others run idle batches in lockstep
        assert _post_all(s.url, prompts[:4], [dp - 1] * 4) == expected[:4]
        info = httpx.get(s.url + "/server_info").json()
        assert [i["instance"] for i in info["instances"]] == list(range(dp))
    steps = [json.loads(line) for line in open(f"{trace}.0")]
    assert any(st["mode"] == "IDLE" for st in steps), "instance 0 must have run idle steps"
    assert any(st["mode"] == "MIXED" for st in steps) or any(st["mode"] == "EXTEND" for st in steps)
    # lockstep: every instance traced the same number of steps with the same global token counts
    other = [json.loads(line) for line in open(f"{trace}.{dp - 1}")]
    assert [st["global_num_tokens"] for st in steps] == [st["global_num_tokens"] for st in other]


def _start_fails(args: list[str], tmp_path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "nanocp.launch_server", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_impossible_layouts_fail_at_start(moe_model, tmp_path):
    out = _start_fails(["--model-path", moe_model, "--dp-size", "4", "--ep-size", "2"], tmp_path)
    assert "--ep-size must be 1" in out
    out = _start_fails(["--model-path", moe_model, "--dp-size", "3", "--ep-size", "3", *BASE], tmp_path)
    assert "--ep-size 3 cannot split the model's 8 experts" in out


def test_deepep_without_deep_ep_is_a_clear_error(moe_model, tmp_path):
    pytest.importorskip("torch")
    try:
        import deep_ep  # noqa: F401

        pytest.skip("deep_ep is installed here")
    except ImportError:
        pass
    out = _start_fails(
        ["--model-path", moe_model, "--dp-size", "2", "--ep-size", "2", "--moe-a2a-backend", "deepep", *BASE],
        tmp_path,
    )
    assert "needs DeepEP" in out and "pip install nanocp[deepep]" in out
