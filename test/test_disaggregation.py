"""Prefill/decode disaggregation on one machine: a prefill server (--disaggregation-mode prefill)
and a decode server (--disaggregation-mode decode) whose router plans each request's placement,
has the prefill server write the prompt's KV straight into it (NIXL, DRAM), then decodes."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from test_dcp import dcp_server_args
from test_server import wait_idle

from conftest import BackgroundRequest, greedy_params, random_prompts
from nanocp.registries import KV_TRANSFER_BACKENDS
from nanocp.testing.server import ServerProcess, free_port_range

BACKENDS = [n for n, c in KV_TRANSFER_BACKENDS.classes().items() if c.available()]
assert "nixl" in BACKENDS, "nixl is missing: it comes with the test extra (pip install -e '.[test]')"
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
        with ServerProcess(
            decode_args(moe_model, dp, [pre.url], *CP, *t), log_path=str(tmp_path / "decode.log")
        ) as dec:
            assert generate_all(dec.url, prompts, new) == expected
            info = httpx.get(dec.url + "/server_info").json()
            assert sum(v for k, v in info["cp_degrees"].items() if k != "1") >= 1, info["cp_degrees"]
            d = info["disaggregation"]
            assert d["requests"] == len(prompts) and d["failed"] == 0 and d["kv_bytes"] > 0, d
            for inst in info["internal_states"]:
                assert inst["free_pages"] == inst["total_pages"], inst
            r = httpx.post(
                pre.url + "/generate", json={"input_ids": [1, 2], "sampling_params": greedy_params(2)}
            )
            assert r.status_code == 400 and "prefill server" in r.text


def wait_in_flight(url: str, n: int, timeout: float = 30.0) -> None:
    """Until n requests are between planning and decoding on the decode server."""
    deadline = time.monotonic() + timeout
    while (httpx.get(url + "/server_info").json().get("disaggregation") or {}).get("in_flight", 0) < n:
        assert time.monotonic() < deadline, "no request reached the prefill server"
        time.sleep(0.05)


SLOW_PREFILL = ("--chunked-prefill-size", "8")  # a 2,000-token prompt prefills in ~250 steps


def test_abort_and_transfer_errors_free_every_reserved_segment(moe_model, hf_oracle, tmp_path):
    """A request aborted while its prompt is prefilled and its KV written ends as aborted; one
    whose transfer fails ends with a 500 naming it. Every page the decode instances reserved
    for them is free again, and the prefill instance's too (after its transfers ended); the
    next request is served as before."""
    boot = free_port_range(1)
    fault = {"NANOCP_FAULT_INJECT": "transfer:bad-transfer"}
    pargs = prefill_args(moe_model, 1, boot, *SLOW_PREFILL)
    with ServerProcess(pargs, env=fault, log_path=str(tmp_path / "p.log")) as pre:
        with ServerProcess(
            decode_args(moe_model, 2, [pre.url], *CP), log_path=str(tmp_path / "d.log")
        ) as dec:
            long = random_prompts([2000], vocab=500, seed=5)[0]
            req = BackgroundRequest(
                dec.url, {"rid": "long", "input_ids": long, "sampling_params": greedy_params(4)}
            )
            wait_in_flight(dec.url, 1)
            assert httpx.post(dec.url + "/abort_request", json={"rid": "long"}).status_code == 200
            res = req.result().json()
            assert res["meta_info"]["finish_reason"]["type"] == "abort", res
            bad = {"rid": "bad-transfer", "input_ids": long[:500], "sampling_params": greedy_params(4)}
            r = httpx.post(dec.url + "/generate", json=bad, timeout=60)
            assert r.status_code == 500 and "KV transfer failed" in r.text, r.text
            with httpx.Client(base_url=dec.url, timeout=30) as c:
                wait_idle(c)
            with httpx.Client(base_url=pre.url, timeout=30) as c:
                wait_idle(c)
            short = random_prompts([30], vocab=500, seed=6)
            assert generate_all(dec.url, short, 4) == [hf_oracle(moe_model).greedy(short[0], 4)]
            assert httpx.get(dec.url + "/server_info").json()["disaggregation"]["failed"] == 2


def test_prefill_server_lost_mid_request_fails_fast_and_decode_keeps_serving(moe_model, hf_oracle, tmp_path):
    """The prefill server killed outright mid-prefill: the request fails with 5xx within
    seconds, the decode server stays healthy (its pages free again; new requests get 503 naming
    the prefill server) and serves again once a prefill server is back on that address."""
    boot = free_port_range(1)
    args = prefill_args(moe_model, 1, boot, *SLOW_PREFILL)
    pre = ServerProcess(args, log_path=str(tmp_path / "p1.log")).wait_ready()
    try:
        with ServerProcess(
            decode_args(moe_model, 2, [pre.url], *CP), log_path=str(tmp_path / "d.log")
        ) as dec:
            long = random_prompts([2000], vocab=500, seed=7)[0]
            req = BackgroundRequest(dec.url, {"input_ids": long, "sampling_params": greedy_params(4)})
            wait_in_flight(dec.url, 1)
            os.killpg(pre.proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            res = req.result(timeout=30)
            assert res.status_code >= 500 and "prefill server" in res.text, res.text
            assert time.monotonic() - t0 < 10
            assert httpx.get(dec.url + "/health").status_code == 200
            with httpx.Client(base_url=dec.url, timeout=30) as c:
                wait_idle(c)
                r = c.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": greedy_params(2)})
                assert r.status_code == 503 and "prefill server" in r.text, r.text
            with ServerProcess(args, log_path=str(tmp_path / "p2.log")):
                short = random_prompts([40, 3], vocab=500, seed=8)
                deadline = time.monotonic() + 30
                while (
                    httpx.get(dec.url + "/server_info").json()["disaggregation"]["prefill_servers"][0]["up"]
                    is False
                ):
                    assert time.monotonic() < deadline, (
                        "the decode server did not find the new prefill server"
                    )
                    time.sleep(0.2)
                assert generate_all(dec.url, short, 5) == [hf_oracle(moe_model).greedy(p, 5) for p in short]
    finally:
        pre.stop()


def client_view(url: str) -> dict:
    """What clients get: a streamed /generate, OpenAI completions with logprobs (the first one
    comes from the prefill server), a streamed chat completion."""
    import json

    import openai

    out = {}
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": greedy_params(6), "stream": True}
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    out["stream"] = [json.loads(ln[len("data: ") :])["output_ids"] for ln in lines[:-1]][-1]
    oai = openai.OpenAI(base_url=url + "/v1", api_key="none")
    model = oai.models.list().data[0].id
    comp = oai.completions.create(model=model, prompt=[9, 10, 11], max_tokens=4, temperature=0, logprobs=2)
    out["text"] = comp.choices[0].text
    out["logprobs"] = comp.choices[0].logprobs.token_logprobs
    messages = [{"role": "user", "content": "hello"}]
    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))  # fmt: skip
    out["chat"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    out["chat_tokens"] = chunks[-1].usage.completion_tokens
    return out


def test_clients_see_no_difference(moe_model, tmp_path):
    """Streaming, the OpenAI API with logprobs and chat give what the colocated server gives;
    /metrics counts the transfers."""
    boot = free_port_range(1)
    with ServerProcess(
        dcp_server_args(moe_model, 2, 16, *CP), log_path=str(tmp_path / "colocated.log")
    ) as col:
        colocated = client_view(col.url)
    with ServerProcess(prefill_args(moe_model, 1, boot), log_path=str(tmp_path / "p.log")) as pre:
        with ServerProcess(
            decode_args(moe_model, 2, [pre.url], *CP), log_path=str(tmp_path / "d.log")
        ) as dec:
            disaggregated = client_view(dec.url)
            deadline = time.monotonic() + 10
            while "nanocp:kv_transfer_requests_total 3.0" not in (
                text := httpx.get(dec.url + "/metrics").text
            ):
                assert time.monotonic() < deadline, text  # the router's snapshots come every 100 ms
                time.sleep(0.1)
    assert disaggregated.pop("logprobs") == pytest.approx(colocated.pop("logprobs"), abs=1e-4)
    assert disaggregated == colocated
    assert "nanocp:kv_transfer_failed_total 0.0" in text and "nanocp:kv_transfer_bytes_total 0.0" not in text


def test_a_request_starts_only_when_every_destination_is_covered():
    """The decode router's landing check (nanocp_router.pd.Transfer.covered): notices in any
    order, overlapping (a prefill retracted and recomputed) or split by chunks."""
    from nanocp_router.messages import Generate, KVDest
    from nanocp_router.pd import Transfer
    from nanocp_router.planner import Plan, Segment

    t = Transfer(
        Generate("r", [1] * 100, {}), 1, Plan(0, [Segment(1, 0, 60), Segment(0, 60, 120)]), set(), 0.0
    )
    t.dests = [KVDest(1, 0, 60, 0, [0]), KVDest(0, 60, 100, 0, [0])]
    for inst, s, e in [(0, 80, 100), (1, 0, 30), (0, 60, 80), (1, 20, 50)]:
        t.landed.setdefault(inst, []).append((s, e))
        assert not t.covered()
    t.landed[1].append((50, 60))
    assert t.covered()
    t.landed[0] = [(60, 79), (80, 100)]  # a gap of one position
    assert not t.covered()
