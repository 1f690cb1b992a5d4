"""NanoCP runs on a torch without triton (CPU wheels, macOS): engine, server and router import and
serve with `import triton` blocked, the kernels falling back to their torch references."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from conftest import greedy_params, random_prompts
from nanocp.testing.no_triton import no_triton_env
from nanocp.testing.server import ServerProcess

ENGINE_SCRIPT = """
import json, sys
import nanocp
assert sys.modules.get("triton") is None, "triton was imported"
with nanocp.Engine(model_path=sys.argv[1], device="cpu", max_total_tokens=2048) as engine:
    outs = engine.generate(input_ids=json.loads(sys.argv[2]), sampling_params=json.loads(sys.argv[3]))
try:
    import triton  # noqa: F401
except ImportError:
    print(json.dumps([o["output_ids"] for o in outs]))
"""


def test_blocked_triton_is_an_import_error(tmp_path):
    env = {**os.environ, **no_triton_env(tmp_path)}
    r = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "ImportError" in r.stderr


def test_engine_without_triton_matches_transformers(moe_model, hf_oracle, tmp_path):
    import json

    prompts = random_prompts([5, 40], vocab=500, seed=3)
    # TRITON_INTERPRET as the tests set it: the interpreter is part of triton, so it must not be used
    env = {**os.environ, **no_triton_env(tmp_path), "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, moe_model, json.dumps(prompts), json.dumps(greedy_params(6))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == [hf_oracle(moe_model).greedy(p, 6) for p in prompts]


def test_server_without_triton_serves_dp2_with_dynamic_cp(moe_model, hf_oracle, tmp_path):
    prompt = random_prompts([150], vocab=500, seed=5)[0]
    args = [
        "--model-path", moe_model, "--device", "cpu", "--dp-size", "2", "--ep-size", "2",
        "--max-total-tokens", "2048", "--cp-min-shard-tokens", "64", "--chunked-prefill-size", "64",
    ]  # fmt: skip
    env = {**no_triton_env(tmp_path), "TRITON_INTERPRET": "1"}
    with ServerProcess(args, env=env, log_path=str(tmp_path / "log")) as s, httpx.Client(base_url=s.url) as c:
        res = c.post(
            "/generate", json={"input_ids": prompt, "sampling_params": greedy_params(6)}, timeout=120
        )
        assert res.status_code == 200, res.text
        assert res.json()["meta_info"]["cp_degree"] == 2
        assert res.json()["output_ids"] == hf_oracle(moe_model).greedy(prompt, 6)
        for name, pid in c.get("/server_info").json()["processes"].items():
            assert "libtriton" not in open(f"/proc/{pid}/maps").read(), f"{name} loaded triton"
