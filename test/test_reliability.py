"""Reliability: a request's failure is that request's alone; a process's failure is reported.

Faults are injected where NANOCP_FAULT_INJECT says (nanocp_router.faults): inside one
instance's model forward or sampling, and in each loop (worker, router, tokenizer, detokenizer)
while it handles one request. Overload: --max-queued-requests, and many more requests than the
KV cache and --max-running-requests hold. Clients: disconnects and /abort_request of a sharded
request while it is prefilled. Faults of processes: one instance killed at dp=2.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from test_server import _wait_dead, metric, wait_idle

from conftest import BackgroundRequest, greedy_params, random_prompts
from nanocp import Engine
from nanocp.testing.server import ServerProcess


def dp2_args(model: str, *flags: str) -> list[str]:
    return [
        "--model-path", model, "--device", "cpu", "--dp-size", "2", "--ep-size", "2",
        "--max-total-tokens", "2048", "--chunked-prefill-size", "64", "--cp-min-shard-tokens", "64", *flags,
    ]  # fmt: skip


def _error(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


# ------------------------------------------------------------------ faults
STEP_FAULTS = "forward:1:3,sample:1:9"  # counted from the server's start: the test has it alone
LOOP_FAULTS = "worker:rid-worker,router:rid-router,tokenizer:rid-tok,detokenizer:rid-detok"


def _fault_server(moe_model, tmp_path_factory, faults: str):
    log = tmp_path_factory.mktemp("faults") / "server.log"
    return ServerProcess(dp2_args(moe_model), env={"NANOCP_FAULT_INJECT": faults}, log_path=str(log))


@pytest.fixture(scope="module")
def loop_fault_server(moe_model, tmp_path_factory):
    with _fault_server(moe_model, tmp_path_factory, LOOP_FAULTS) as s:
        yield s


def test_a_fault_in_one_instances_step_fails_its_requests_alone(moe_model, hf_oracle, tmp_path_factory):
    """dp=2, EP=2 (lockstep): instance 1's 3rd forward raises at its start. Its request of that
    step fails with 500; instance 1 completes the step with its peer (the MoE exchange carries
    instance 0's tokens through instance 1's experts), so the request running meanwhile on
    instance 0 stays token-exact; then a fault in instance 1's sampling; then both serve again."""
    with _fault_server(moe_model, tmp_path_factory, STEP_FAULTS) as server:
        _step_faults(server, moe_model, hf_oracle)


def _step_faults(fault_server, moe_model, hf_oracle):
    """Run by the test above."""
    oracle = hf_oracle(moe_model)
    a, b, c, d = random_prompts([20, 12, 9, 7], vocab=500, seed=71)
    url = fault_server.url
    bg = BackgroundRequest(
        url, {"input_ids": a, "sampling_params": greedy_params(60), "data_parallel_rank": 0}
    )
    time.sleep(0.3)
    with httpx.Client(base_url=url, timeout=60) as client:
        # steps 1, 2 of instance 1 run; step 3's forward raises (+1 for the run that completes it)
        r = client.post(
            "/generate", json={"input_ids": b, "sampling_params": greedy_params(10), "data_parallel_rank": 1}
        )
        assert r.status_code == 500 and "instance 1's step" in _error(r), r.text
        # steps 5-8 run, step 9's sampling raises
        r = client.post(
            "/generate", json={"input_ids": c, "sampling_params": greedy_params(8), "data_parallel_rank": 1}
        )
        assert r.status_code == 500 and "instance 1's step" in _error(r), r.text
        assert bg.result().json()["output_ids"] == oracle.greedy(a, 60)
        for inst in (0, 1):
            r = client.post(
                "/generate",
                json={"input_ids": d, "sampling_params": greedy_params(6), "data_parallel_rank": inst},
            )
            assert r.json()["output_ids"] == oracle.greedy(d, 6)
        long = random_prompts([300], vocab=500, seed=72)[0]  # sharded over both instances
        r = client.post("/generate", json={"input_ids": long, "sampling_params": greedy_params(5)}).json()
        assert r["meta_info"]["cp_degree"] == 2 and r["output_ids"] == oracle.greedy(long, 5)
        wait_idle(client)
        assert client.get("/health").status_code == 200
        assert metric(client, 'nanocp:num_requests_total{outcome="error"}') >= 2
    assert "step failed" in fault_server.log()


@pytest.mark.parametrize(
    "rid, where",
    [
        ("rid-worker", "instance"),
        ("rid-router", "router"),
        ("rid-tok", "output"),
        ("rid-detok", "detokenizer"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_fault_in_a_loop_fails_that_request_alone(loop_fault_server, rid, where, stream):
    """An exception while a process's loop handles one request fails that request with a 500
    naming the process; the process goes on serving (the next request is served)."""
    body = {
        "input_ids": [5, 6, 7, 8] * 20,
        "sampling_params": greedy_params(40),
        "rid": rid,
        "stream": stream,
    }
    with httpx.Client(base_url=loop_fault_server.url, timeout=60) as client:
        r = client.post("/generate", json=body)
        if stream and r.status_code == 200:  # failed after its first token: the stream's last event
            events = [ln for ln in r.text.splitlines() if ln.startswith("data: {")]
            assert '"error"' in events[-1] and where in events[-1], r.text
        else:
            assert r.status_code == 500 and where in _error(r), r.text
        ok = client.post("/generate", json={**body, "rid": None, "stream": False})
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 40
        wait_idle(client)


def test_a_fault_while_prefilling_a_sharded_request_frees_it_everywhere(moe_model, hf_oracle, tmp_path):
    """The home of a request sharded over both instances fails in its 2nd prefill chunk: the
    request fails with 500, its segments on the other instance are released, pools are full."""
    faults = {"NANOCP_FAULT_INJECT": "forward:0:2,forward:1:2"}
    args = dp2_args(moe_model, "--chunked-prefill-size", "32")
    with (
        ServerProcess(args, env=faults, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url) as c,
    ):
        long = random_prompts([300], vocab=500, seed=73)[0]
        r = c.post("/generate", json={"input_ids": long, "sampling_params": greedy_params(5)}, timeout=60)
        assert r.status_code == 500, r.text
        home = int(_error(r).split("instance ")[1].split("'")[0])
        wait_idle(c)
        d = random_prompts([9], vocab=500, seed=74)[0]
        r = c.post(
            "/generate",
            json={"input_ids": d, "sampling_params": greedy_params(4), "data_parallel_rank": home},
        )
        assert r.json()["output_ids"] == hf_oracle(moe_model).greedy(d, 4)


# ---------------------------------------------------------------- overload
def test_queue_limit_refuses_with_503_and_retry_after(moe_model, tmp_path):
    args = ["--model-path", moe_model, "--device", "cpu", "--max-total-tokens", "2048", "--max-running-requests", "1",
            "--max-queued-requests", "2"]  # fmt: skip
    with (
        ServerProcess(args, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        body = {"input_ids": [5] * 10, "sampling_params": greedy_params(30)}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as ac:
                return await asyncio.gather(
                    *(ac.post("/generate", json={**body, "stream": i % 2 == 1}) for i in range(12))
                )

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        refused = [r for r in responses if r.status_code == 503]
        assert set(codes) == {200, 503} and len(refused) >= 12 - 1 - 2 - 2, (
            codes
        )  # a few may finish meanwhile
        assert all(r.headers["retry-after"] == "1" and "queue is full" in _error(r) for r in refused)
        served = [r for r in responses if r.status_code == 200]
        assert all(r.text.count('"completion_tokens":30') >= 1 for r in served)
        assert any(
            r.request.content.count(b'"stream":true') for r in refused
        )  # a stream is refused by status
        wait_idle(c)
        assert metric(c, 'nanocp:num_requests_total{outcome="rejected"}') == len(refused)
        assert "nanocp:num_queue_reqs" in c.get("/metrics").text


def test_sharded_requests_beyond_the_clusters_kv_wait_and_all_complete(moe_model, hf_oracle, tmp_path):
    """8 requests of 400 tokens at once on two instances of 512: each is sharded, its segments on
    the peer reserved before its home admits it. The home must admit it by the KV it holds there
    (not all of its tokens), and the planner must count what queued requests were promised, or
    every home waits for pages its peer's segments hold: a deadlock (fixed in #22)."""
    args = dp2_args(moe_model)
    args[args.index("--max-total-tokens") + 1] = "512"
    prompt = random_prompts([400], vocab=500, seed=78)[0]
    with (
        ServerProcess(args, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as ac:
                body = {"input_ids": prompt, "sampling_params": greedy_params(4)}
                return await asyncio.gather(*(ac.post("/generate", json=body) for _ in range(8)))

        outs = [r.json() for r in asyncio.run(burst())]
        expected = hf_oracle(moe_model).greedy(prompt, 4)
        assert all(o["output_ids"] == expected for o in outs)
        assert any(o["meta_info"]["cp_degree"] == 2 for o in outs)
        wait_idle(c)


def test_router_queue_limit_refuses_with_503(moe_model, tmp_path):
    """Dynamic CP: requests wait in the router until the planner can place them; that queue is
    bounded by --max-queued-requests too."""
    args = dp2_args(moe_model, "--max-queued-requests", "1")
    args[args.index("--max-total-tokens") + 1] = "512"  # a 400-token request fills an instance
    with (
        ServerProcess(args, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as ac:
                body = {"input_ids": [7] * 400, "sampling_params": greedy_params(4)}
                return await asyncio.gather(*(ac.post("/generate", json=body) for _ in range(8)))

        responses = asyncio.run(burst())
        refused = [r for r in responses if r.status_code == 503]
        assert refused and all("router" in _error(r) and r.headers["retry-after"] == "1" for r in refused)
        assert all(r.json()["meta_info"]["completion_tokens"] == 4 for r in responses if r.status_code == 200)
        wait_idle(c)


@pytest.mark.parametrize("policy", ["none", "dynamic"])
def test_far_more_requests_than_kv_and_running_slots(moe_model, tmp_path, policy):
    """Concurrency far above what the KV cache and --max-running-requests hold, at dp=2 (EP=2):
    nothing lost or duplicated, greedy outputs as the unsharded offline engine's. Static DP
    dispatches at once and instances retract and recompute; dynamic CP's planner holds requests
    in the router until their KV fits."""
    prompts = random_prompts([30 + 7 * i for i in range(40)], vocab=500, seed=75)
    with Engine(model_path=moe_model, device="cpu", max_total_tokens=8192) as engine:
        expected = [
            o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=greedy_params(24))
        ]
    # conservativeness 0: admission reserves nothing for outputs, so static DP surely retracts
    args = dp2_args(moe_model, "--max-running-requests", "3", "--cp-policy", policy,
                    "--schedule-conservativeness", "0")  # fmt: skip
    args[args.index("--max-total-tokens") + 1] = "400"
    with (
        ServerProcess(args, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):

        async def burst() -> list[dict]:
            async with httpx.AsyncClient(base_url=s.url, timeout=300) as ac:
                posts = [
                    ac.post(
                        "/generate",
                        json={"input_ids": p, "sampling_params": greedy_params(24), "rid": f"r{i}"},
                    )
                    for i, p in enumerate(prompts)
                ]
                return [r.json() for r in await asyncio.gather(*posts)]

        got = asyncio.run(burst())
        assert [g["meta_info"]["id"] for g in got] == [f"r{i}" for i in range(40)]
        assert [g["output_ids"] for g in got] == expected
        wait_idle(c)
        if policy == "none":
            assert sum(i["retractions"] for i in c.get("/server_info").json()["cluster"]) > 0


# ----------------------------------------------------------------- clients
def test_disconnect_and_abort_of_a_sharded_request_while_prefilling(moe_model, tmp_path):
    """dp=2: a request sharded over both instances, its prefill in 16-token chunks, is aborted
    (/abort_request) or its client disconnects while it is still being prefilled: every
    instance's pool is full again."""
    args = dp2_args(moe_model, "--chunked-prefill-size", "16")
    long = random_prompts([1200], vocab=500, seed=76)[0]
    with (
        ServerProcess(args, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        bg = BackgroundRequest(
            s.url, {"input_ids": long, "sampling_params": greedy_params(50), "rid": "sharded"}
        )
        time.sleep(0.6)
        busy = c.get("/server_info").json()["cluster"]
        # still prefilling (the first positions live on the holder, the tail on the home)
        assert 0 < sum(i["kv_tokens"] for i in busy) < len(long), busy
        assert any(i["free_pages"] < i["total_pages"] for i in busy), busy
        assert c.post("/abort_request", json={"rid": "sharded"}).status_code == 200
        meta = bg.result().json()["meta_info"]
        assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] == 0
        wait_idle(c)
        for seed, stream in ((77, False), (78, True)):  # other prompts: nothing of them is cached
            prompt = random_prompts([1200], vocab=500, seed=seed)[0]
            body = {"input_ids": prompt, "sampling_params": greedy_params(50), "stream": stream}
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while the prompt is prefilled
                with httpx.stream("POST", s.url + "/generate", json=body, timeout=0.6) as r:
                    r.read()
            wait_idle(c)


# ------------------------------------------------------------ process death
def test_killed_instance_at_dp2_fails_in_flight_requests_and_stops_cleanly(moe_model, tmp_path):
    s = ServerProcess(dp2_args(moe_model), log_path=str(tmp_path / "log")).wait_ready()
    try:
        info = httpx.get(s.url + "/server_info").json()
        pids = list(info["processes"].values())
        long = random_prompts([300], vocab=500, seed=77)[0]
        reqs = [
            BackgroundRequest(s.url, {"input_ids": long, "sampling_params": greedy_params(1500)}),  # sharded
            BackgroundRequest(
                s.url, {"input_ids": [5] * 9, "sampling_params": greedy_params(1500), "data_parallel_rank": 0}
            ),
        ]
        time.sleep(1.0)
        t0 = time.monotonic()
        os.kill(info["instances"][1]["pid"], signal.SIGKILL)
        for req in reqs:
            r = req.result(30)
            assert r.status_code >= 500 and "instance 1" in _error(r), r.text
        assert time.monotonic() - t0 < 5
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.url + "/generate", json={"text": "x", "sampling_params": greedy_params(2)})
        assert r.status_code == 503 and "instance 1" in _error(r)
    finally:
        code = s.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), s.log()
    _wait_dead(pids)  # no orphan


# -------------------------------------------------------------------- soak
RSS_GROWTH_BOUND_MIB = 64  # per worker over the soak, measured after a warm-up


def test_soak_500_mixed_requests_at_dp2_with_dynamic_cp(moe_model, tmp_path):
    """benchmark.soak at 500 requests (the committed run has 2,000): short and long (sharded),
    streamed and not, some aborted, some invalid: 0 lost, 0 hung, every invalid one a 4xx, no
    leaked KV page, worker RSS growth within the bound."""
    from benchmark.soak import server_args, soak

    with ServerProcess(server_args(moe_model), log_path=str(tmp_path / "log")) as s:
        result = soak(s.url, 500, seed=1)
    print(result)
    assert result["lost"] == result["hung"] == result["invalid_not_4xx"] == 0, result["errors"]
    assert result["leaked_pages"] == result["busy_after"] == 0 and result["served_after"]
    counts = result["counts"]
    assert counts["served"] > 300 and counts["sharded"] > 10 and counts["invalid_4xx"] > 20
    assert counts.get("aborted", 0) + counts.get("disconnected", 0) > 50
    assert result["worker_rss_growth_mib"] < RSS_GROWTH_BOUND_MIB
