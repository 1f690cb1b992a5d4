"""Prefill/decode disaggregation on one machine: a prefill server (--disaggregation-mode prefill)
and a decode server (--disaggregation-mode decode) whose router plans each request's placement,
has the prefill server write the prompt's KV straight into it (NIXL, DRAM), then decodes."""

from __future__ import annotations

import httpx
import pytest
from test_dcp import dcp_server_args
from test_server import wait_idle

from conftest import BackgroundRequest, greedy_params, random_prompts
from nanocp.registries import KV_TRANSFER_BACKENDS
from nanocp.testing.server import ServerProcess, free_port_range

BACKENDS = [n for n, c in KV_TRANSFER_BACKENDS.classes().items() if c.available()]
CP = ("--cp-policy", "dynamic", "--cp-min-shard-tokens", "32")


def prefill_args(model: str, dp: int, bootstrap: int, *flags: str) -> list[str]:
    """A prefill server: its own DP/EP layout, chunked prefill (chunks of 64)."""
    args = dcp_server_args(model, dp, 16, *flags)
    return [*args, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap)]


def decode_args(model: str, dp: int, prefill_urls: list[str], *flags: str) -> list[str]:
    urls = ",".join(prefill_urls)
    return [*dcp_server_args(model, dp, 16, *flags), "--disaggregation-mode", "decode",
            "--disaggregation-prefill-url", urls]  # fmt: skip


def generate_all(url: str, prompts: list[list[int]], new: int) -> list[list[int]]:
    reqs = [BackgroundRequest(url, {"input_ids": p, "sampling_params": greedy_params(new)}) for p in prompts]
    out = [r.result(timeout=120) for r in reqs]
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    with httpx.Client(base_url=url, timeout=60) as c:
        wait_idle(c)
    return [r.json()["output_ids"] for r in out]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dp", [2, 4])
def test_disaggregated_tokens_equal_hf(moe_model, hf_oracle, tmp_path, dp, backend):
    """Prompts of 1-300 tokens, DCP degrees 1-2 at decode dp 2 and 4: greedy tokens equal HF's;
    the KV pools are whole again afterwards."""
    prompts = random_prompts([300, 1, 12, 150, 40, 7], vocab=500, seed=21)
    new = 8
    expected = [hf_oracle(moe_model).greedy(p, new) for p in prompts]
    boot = free_port_range(1)
    t = ("--disaggregation-transfer-backend", backend)
    with ServerProcess(prefill_args(moe_model, 1, boot, *t), log_path=str(tmp_path / "prefill.log")) as pre:
        with ServerProcess(decode_args(moe_model, dp, [pre.url], *CP, *t), log_path=str(tmp_path / "decode.log")) as dec:
            assert generate_all(dec.url, prompts, new) == expected
            info = httpx.get(dec.url + "/server_info").json()
            assert sum(v for k, v in info["cp_degrees"].items() if k != "1") >= 1, info["cp_degrees"]
            d = info["disaggregation"]
            assert d["requests"] == len(prompts) and d["failed"] == 0 and d["kv_bytes"] > 0, d
            for inst in info["internal_states"]:
                assert inst["free_pages"] == inst["total_pages"], inst
            r = httpx.post(pre.url + "/generate", json={"input_ids": [1, 2], "sampling_params": greedy_params(2)})
            assert r.status_code == 400 and "prefill server" in r.text
