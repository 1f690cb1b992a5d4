"""Several instances sharing ONE GPU (GPU): NCCL refuses two ranks on a device, so MoE tokens and
context-parallel q / KV / (o, lse) travel through the CUDA-IPC routing backend. Sharded DCP
outputs equal HF transformers (fp32 greedy) for dp=2 and dp=4, and with MoE tokens through the
graph-capturable `--moe-a2a-backend ipc`, with which decode steps, context-parallel ones included,
replay CUDA graphs. On a machine with enough GPUs the dp=2 cases get one
GPU per instance (NCCL for the rest, NVLink peer writes for ipc)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from test_dcp import LONG, SHORT  # noqa: E402
from test_dp_ep import _post_all  # noqa: E402

from conftest import random_prompts  # noqa: E402
from nanocp.testing.server import ServerProcess  # noqa: E402

NEW = 10
CASES = [
    (2, ["--cp-policy", "uniform", "--cp-size", "2"]),
    (4, ["--cp-policy", "dynamic", "--cp-min-shard-tokens", "32", "--cp-max-degree", "4"]),
    # graph-capturable MoE exchange: decode (sharded or not) replays CUDA graphs
    (2, ["--cp-policy", "dynamic", "--cp-min-shard-tokens", "32", "--moe-a2a-backend", "ipc"]),
    (4, ["--cp-policy", "uniform", "--cp-size", "4", "--moe-a2a-backend", "ipc"]),
]


@pytest.mark.parametrize("dp, flags", CASES, ids=[f"dp{d}-{'-'.join(f[1::2])}" for d, f in CASES])
def test_instances_sharing_one_gpu_match_transformers(moe_model, hf_oracle, tmp_path, dp, flags):
    prompts = random_prompts(LONG + SHORT, vocab=500, seed=43)
    expected = [hf_oracle(moe_model).greedy(p, NEW) for p in prompts]
    args = [
        "--model-path", moe_model, "--device", "cuda", "--dtype", "float32", "--attention-backend", "triton",
        "--dp-size", str(dp), "--ep-size", str(dp), "--max-total-tokens", "4096", "--chunked-prefill-size", "64",
        "--cuda-graph-max-bs", "8",
        *flags,
    ]  # fmt: skip
    with ServerProcess(args, log_path=str(tmp_path / "log")) as s:
        try:
            got = _post_all(s.url, prompts, [None] * len(prompts))
        except AssertionError as e:
            pytest.fail(f"{e}\nserver log tail:\n{s.log()[-4000:]}")
        assert got == expected, s.log()
        if "ipc" in flags:
            assert "Context-parallel decode steps replay from CUDA graphs" in s.log(), s.log()[-4000:]
            assert _graph_dcp_steps(s.url, dp) > 0


def _graph_dcp_steps(url: str, dp: int) -> float:
    """Decode steps replayed with DCP routing inside, over all instances (from /metrics, which
    follows the workers' load reports: give them a moment)."""
    import time

    import httpx

    total = 0.0
    for _ in range(20):
        lines = httpx.get(f"{url}/metrics").text.splitlines()
        total = sum(
            float(x.split()[-1])
            for x in lines
            if x.startswith("nanocp:forward_steps_total") and 'kind="graph_dcp"' in x
        )
        if total > 0:
            break
        time.sleep(0.25)
    return total
