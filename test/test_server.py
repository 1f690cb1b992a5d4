"""HTTP server: SGLang native + OpenAI APIs, errors, disconnects, load, failures, shutdown."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time

import httpx
import openai
import pytest

from conftest import BackgroundRequest, greedy_params, needs_triton, random_prompts
from nanocp import Engine
from nanocp.testing.server import ServerProcess

SERVER_FLAGS = ["--max-total-tokens", "8192", "--chunked-prefill-size", "256", "--device", "cpu"]


@pytest.fixture(scope="module")
def server(moe_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"NANOCP_MAX_REQUEST_BODY_MB": "1"}
    with ServerProcess(["--model-path", moe_model, *SERVER_FLAGS], env=env, log_path=str(log)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def wait_idle(client: httpx.Client, timeout: float = 15.0) -> list[dict]:
    """Poll the router's cluster state until every instance is idle with a fully free KV pool."""
    deadline = time.monotonic() + timeout
    while True:
        cluster = client.get("/server_info").json()["cluster"]
        if cluster and all(
            i["running"] == 0 and i["waiting"] == 0 and i["free_pages"] == i["total_pages"] for i in cluster
        ):
            return cluster
        if time.monotonic() > deadline:
            raise AssertionError(f"instances not idle/free: {cluster}")
        time.sleep(0.2)


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------------ parity
def test_generate_equals_offline_engine(server, client, moe_model):
    prompts = random_prompts([1, 7, 40, 300], vocab=500, seed=31)
    params = [
        greedy_params(10),
        greedy_params(6),
        {"max_new_tokens": 12, "temperature": 0.8, "sampling_seed": 3},
        greedy_params(10, stop_token_ids=[7]),
    ]
    with Engine(
        model_path=moe_model, max_total_tokens=8192, chunked_prefill_size=256, device="cpu"
    ) as engine:
        expected = engine.generate(input_ids=prompts, sampling_params=params)
        text_expected = engine.generate(
            prompt="the expert router", sampling_params=greedy_params(8, stop="xyz")
        )
    got = client.post("/generate", json={"input_ids": prompts, "sampling_params": params}).json()
    for g, e in zip(got, expected):
        assert g["output_ids"] == e["output_ids"]
        assert g["text"] == e["text"]
        assert g["meta_info"]["finish_reason"] == e["meta_info"]["finish_reason"]
        assert g["meta_info"]["prompt_tokens"] == e["meta_info"]["prompt_tokens"]
        assert g["meta_info"]["e2e_latency"] > 0
    single = client.post(
        "/generate", json={"text": "the expert router", "sampling_params": greedy_params(8, stop="xyz")}
    )
    assert single.json()["output_ids"] == text_expected["output_ids"]
    assert single.json()["text"] == text_expected["text"]


def test_generate_streaming_is_cumulative(client):
    body = {"input_ids": [5, 6, 7], "sampling_params": greedy_params(6), "stream": True}
    final = client.post("/generate", json={**body, "stream": False}).json()
    chunks = []
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]
    lens = [len(c["output_ids"]) for c in chunks]  # updates arriving together are coalesced
    assert lens == sorted(set(lens)) and lens[-1] == 6
    assert all(final["output_ids"][: len(c["output_ids"])] == c["output_ids"] for c in chunks)
    assert chunks[-1]["output_ids"] == final["output_ids"] and chunks[-1]["text"] == final["text"]
    assert all(final["text"].startswith(c["text"]) for c in chunks)
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}


def test_stop_strings_over_http(client):
    full = client.post(
        "/generate", json={"input_ids": [9, 10, 11], "sampling_params": greedy_params(30)}
    ).json()
    stop = full["text"][10:13]
    res = client.post(
        "/generate", json={"input_ids": [9, 10, 11], "sampling_params": greedy_params(30, stop=stop)}
    ).json()
    assert res["text"] == full["text"][: full["text"].find(stop)]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_logprobs_over_http(client):
    res = client.post(
        "/generate",
        json={
            "input_ids": [5, 6],
            "sampling_params": greedy_params(4),
            "return_logprob": True,
            "top_logprobs_num": 2,
        },
    ).json()
    lps = res["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == res["output_ids"] and all(lp <= 0 for lp, _, _ in lps)
    assert [top[0][1] for top in res["meta_info"]["output_top_logprobs"]] == res["output_ids"]


# ------------------------------------------------------------------ openai
def test_openai_client(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    model = oai.models.list().data[0].id
    comp = oai.completions.create(model=model, prompt="the model", max_tokens=8, temperature=0)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 8
    streamed = oai.completions.create(
        model=model,
        prompt="the model",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == comp.choices[0].text
    assert (
        chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == comp.usage.prompt_tokens
    )

    ids = oai.completions.create(model=model, prompt=[5, 6, 7], max_tokens=3, temperature=0, logprobs=2)
    assert len(ids.choices[0].logprobs.token_logprobs) == 3 and ids.usage.prompt_tokens == 3

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = oai.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 10
    stream = oai.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens
    # stop sequences and seeds
    seeded = [
        oai.completions.create(model=model, prompt="a", max_tokens=10, temperature=1.0, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_router_process_has_no_torch(client):
    pid = client.get("/server_info").json()["processes"]["router"]
    maps = open(f"/proc/{pid}/maps").read()
    assert "libtorch" not in maps


def test_info_endpoints(server, client, moe_model):
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200
    info = client.get("/model_info").json()
    assert info["model_path"] == moe_model and info["is_generation"]
    for path in ("/server_info", "/get_server_info"):
        si = client.get(path).json()
        assert si["max_total_num_tokens"] == 8192 and si["page_size"] == 1 and len(si["instances"]) == 1
    assert client.post("/flush_cache").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == moe_model


# -------------------------------------------------------------- bad input
BAD = [
    ("/generate", b"{bad json", "body"),
    ("/generate", b"[1, 2]", "body"),
    ("/generate", {"text": 5}, "text"),
    ("/generate", {"text": ""}, "text"),
    ("/generate", {"input_ids": []}, "input_ids"),
    ("/generate", {"input_ids": "abc"}, "input_ids"),
    ("/generate", {"input_ids": [1, 10**6]}, "input_ids"),
    ("/generate", {"text": "hi", "input_ids": [1]}, "text"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -3}}, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**6}}, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "10"}}, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
    ("/generate", {"text": "hi", "sampling_params": {"top_p": 0}}, "top_p"),
    ("/generate", {"text": "hi", "sampling_params": {"top_p": 1.01}}, "top_p"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": -2}}, "top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [10**6]}}, "stop_token_ids"),
    ("/generate", {"text": "hi", "sampling_params": "greedy"}, "sampling_params"),
    ("/generate", {"text": "hi", "stream": "yes"}, "stream"),
    ("/generate", {"text": "hi", "lora_path": "adapter"}, "lora_path"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, "model"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "x"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -7}, "top_k"),
    ("/v1/completions", {"prompt": [3, 10**6]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, "model"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        "temperature",
    ),
    ("/abort_request", {}, "rid"),
    # hostile values: non-finite numbers, odd unicode, huge numbers, wrong types at any depth
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),  # once a DoS (#22)
    ("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "presence_penalty": -Infinity}', "presence_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', "temperature"),
    ("/generate", b'{"text": "hi", "sampling_params": {"temperature": NaN}}', "sampling_params.temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "min_p": NaN}', "min_p"),
    ("/generate", b'{"text": "\\ud800"}', "text"),  # a lone surrogate
    ("/generate", b'{"text": "hi", "rid": "\\udfff"}', "rid"),
    (
        "/generate",
        b'{"text": "hi", "sampling_params": {"stop": ["ok", "\\ud83d"]}}',
        "sampling_params.stop.1",
    ),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages.0.content"),
    ("/generate", b'{"text": "\xff\xfe"}', "body"),  # invalid UTF-8
    ("/generate", b'{"text": "hi"', "body"),  # truncated
    ("/generate", b"", "body"),
    ("/generate", b"null", "body"),
    ("/generate", b'"text"', "body"),
    ("/generate", b"[" * 100_000 + b"]" * 100_000, "body"),
    ("/generate", b'{"text": ' + b"[" * 40 + b"]" * 40 + b"}", "text" + ".0" * 31),
    ("/generate", {"input_ids": [1, 2**70]}, "input_ids"),
    ("/generate", {"input_ids": [1, True]}, "input_ids"),
    ("/generate", {"input_ids": [[1, 2], [3, [4]]]}, "input_ids"),
    ("/generate", {"input_ids": [[[1]]]}, "input_ids"),
    ("/generate", {"input_ids": [[1], 2]}, "input_ids"),
    ("/generate", {"input_ids": [[]]}, "input_ids"),
    ("/generate", {"input_ids": [5] * 5000}, "input_ids"),
    ("/generate", {"text": [["a"]]}, "text"),
    ("/generate", {"text": []}, "text"),  # found by test_fuzz
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2**70}}, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": True}}, "max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": 2**63}}, "top_k"),
    ("/generate", {"text": "hi", "sampling_params": {"sampling_seed": 2**64 - 1}}, "sampling_seed"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": [[[[1]]]]}}, "temperature"),
    ("/generate", {"text": "hi", "sampling_params": {"stop": ["x"] * 1000}}, "stop"),
    ("/generate", {"text": "hi", "sampling_params": {"stop": [["x"]]}}, "stop"),
    ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [-1]}}, "stop_token_ids"),
    ("/generate", {"text": "hi", "sampling_params": {"n": 2}}, "n"),
    ("/generate", {"text": "hi", "sampling_params": {"x" * 10_000: 1}}, "x" * 100),
    ("/generate", {"text": "hi", "return_logprob": True, "top_logprobs_num": 10**6}, "top_logprobs_num"),
    ("/generate", {"text": "hi", "top_logprobs_num": -1}, "top_logprobs_num"),
    ("/generate", {"text": "hi", "data_parallel_rank": 2**63}, "data_parallel_rank"),
    ("/generate", {"text": "hi", "rid": ["a", "b"]}, "rid"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64 - 1}, "seed"),
    ("/v1/completions", {"prompt": [[[1]]]}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 10**30}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stream_options": "yes"}, "stream_options"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages.0.content",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user"}] * 3, "max_tokens": 2**70}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [None]}, "messages.0"),
    ("/abort_request", {"rid": ["x"]}, "rid"),
    ("/abort_request", {"abort_all": "yes"}, "abort_all"),
]


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{p}-{b}"[:60] for p, b, _ in BAD])
def test_bad_input_is_a_400_naming_the_field(client, path, body, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == 400 and param.split(".")[-1] in err["message"]


def test_null_means_the_default(client):
    """OpenAI semantics: a field sent as null is the field left out."""
    sp = {"max_new_tokens": 4, "ignore_eos": True, "sampling_seed": 7}
    plain = client.post("/generate", json={"text": "hi", "sampling_params": sp}).json()
    nulls = {
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "stop": None,
        "stop_token_ids": None,
        "n": None,
    }
    body = {
        "text": "hi",
        "sampling_params": {**sp, **nulls},
        **dict.fromkeys(
            ("stream", "return_logprob", "top_logprobs_num", "rid", "data_parallel_rank", "input_ids")
        ),
    }
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == plain["output_ids"]
    openai_nulls = dict.fromkeys(
        (
            "temperature",
            "top_p",
            "n",
            "stream",
            "stream_options",
            "stop",
            "seed",
            "frequency_penalty",
            "logprobs",
        )
    )
    r = client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True, **openai_nulls}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    chat = {"messages": [{"role": "user", "content": None}], "max_tokens": 2, "top_logprobs": None}
    r = client.post("/v1/chat/completions", json={**chat, **openai_nulls})
    assert r.status_code == 200, r.text


ODD_TEXT = ["\u0000", "a\u202eb", "e\u0301", "\U0001f600", "\uffff", "\U0010ffff", "\u200b" * 50, "\r\n\t"]


@pytest.mark.parametrize("text", ODD_TEXT, ids=range(len(ODD_TEXT)))
def test_odd_but_valid_unicode_is_served(client, text):
    r = client.post("/generate", json={"text": text, "sampling_params": greedy_params(2, stop=[text])})
    assert r.status_code == 200, r.text
    r = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "max_tokens": 2}
    )
    assert r.status_code == 200, r.text


def test_request_body_is_bounded(client):
    big = {"text": "a " * 600_000}  # 1.2 MB, above the fixture's NANOCP_MAX_REQUEST_BODY_MB=1
    r = client.post("/generate", json=big)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text

    def chunks():  # no Content-Length: the limit is kept while reading
        yield b'{"text": "'
        for _ in range(300):
            yield b"a" * 4096
        yield b'"}'

    r = client.post("/generate", content=chunks())
    assert r.status_code == 413, r.text


def test_server_still_serves_after_bad_input(client):
    for path, body, _ in BAD:
        client.post(path, **({"content": body} if isinstance(body, bytes) else {"json": body}))
    r = client.post("/generate", json={"text": "still alive", "sampling_params": greedy_params(3)})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 3
    wait_idle(client)


# ------------------------------------------------------- disconnect / abort
def test_client_disconnect_aborts_and_frees_kv(server, client):
    aborted = metric(client, 'nanocp:num_requests_total{outcome="abort"}')
    body = {"input_ids": [5] * 50, "sampling_params": greedy_params(3000), "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/generate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    # non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json={**body, "stream": False}, timeout=1.0)
    wait_idle(client)
    assert metric(client, 'nanocp:num_requests_total{outcome="abort"}') >= aborted + 2


def test_abort_request_endpoint(server, client):
    req = BackgroundRequest(
        server.url, {"input_ids": [5] * 20, "sampling_params": greedy_params(3000), "rid": "to-abort"}
    )
    time.sleep(1.0)
    assert client.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
    res = req.result().json()
    assert res["meta_info"]["finish_reason"]["type"] == "abort"
    assert res["meta_info"]["completion_tokens"] < 3000
    wait_idle(client)


# -------------------------------------------------------------------- load
def test_bounded_load_500_requests(server, client):
    before = metric(client, 'nanocp:num_requests_total{outcome="length"}')
    rng = random.Random(0)
    jobs = [
        (random_prompts([rng.randint(1, 64)], vocab=500, seed=i)[0], rng.randint(1, 16), i % 5 == 0)
        for i in range(500)
    ]

    async def one(c: httpx.AsyncClient, sem: asyncio.Semaphore, ids, n, stream) -> int:
        async with sem:
            body = {"input_ids": ids, "sampling_params": greedy_params(n), "stream": stream}
            if not stream:
                r = await c.post("/generate", json=body)
                assert r.status_code == 200, r.text
                return r.json()["meta_info"]["completion_tokens"]
            last = None
            async with c.stream("POST", "/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        last = line
            import json

            return json.loads(last[6:])["meta_info"]["completion_tokens"]

    async def main() -> list[int]:
        sem = asyncio.Semaphore(128)
        limits = httpx.Limits(max_connections=128)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, sem, *j) for j in jobs)), timeout=300)

    counts = asyncio.run(main())
    assert counts == [n for _, n, _ in jobs]  # nothing lost, nothing cut short
    wait_idle(client)
    assert metric(client, 'nanocp:num_requests_total{outcome="length"}') == before + 500


def test_metrics_exposes_latency_and_instance_state(client):
    text = client.get("/metrics").text
    for name in (
        "nanocp:time_to_first_token_seconds_bucket",
        "nanocp:time_per_output_token_seconds_count",
        "nanocp:e2e_request_latency_seconds_sum",
        "nanocp:num_queue_reqs",
        'nanocp:kv_usage{instance="0"}',
        'nanocp:num_running_reqs{instance="0"}',
        "nanocp:prompt_tokens_total",
        "nanocp:generation_tokens_total",
    ):
        assert name in text, name


# -------------------------------------------------------- failures, shutdown
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_dead(pids, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"orphan processes: {[p for p in pids if _alive(p)]}"
        time.sleep(0.1)


def test_worker_death_fails_requests_and_health(moe_model, tmp_path):
    log = tmp_path / "server.log"
    s = ServerProcess(["--model-path", moe_model, *SERVER_FLAGS], log_path=str(log)).wait_ready()
    try:
        info = httpx.get(s.url + "/server_info").json()
        worker_pid = info["instances"][0]["pid"]
        pids = list(info["processes"].values())
        req = BackgroundRequest(s.url, {"input_ids": [5] * 20, "sampling_params": greedy_params(3000)})
        time.sleep(1.0)
        t0 = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        resp = req.result(30)
        assert resp.status_code == 503 and time.monotonic() - t0 < 5
        assert "instance 0" in resp.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.url + "/generate", json={"text": "x", "sampling_params": greedy_params(2)})
        assert r.status_code == 503
        assert f"instance 0 (pid {worker_pid}) died" in log.read_text()
    finally:
        s.stop()
    _wait_dead([p for p in pids if p != worker_pid])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_shuts_everything_down(moe_model, tmp_path, sig):
    s = ServerProcess(["--model-path", moe_model, *SERVER_FLAGS], log_path=str(tmp_path / "log")).wait_ready()
    pids = list(httpx.get(s.url + "/server_info").json()["processes"].values())
    assert all(_alive(p) for p in pids)
    code = s.stop(sig)
    assert code in (0, -sig, 128 + sig), s.log()
    _wait_dead(pids + [s.proc.pid])
    assert "Traceback" not in s.log()


def test_demo_model_server(tmp_path):
    """`python -m nanocp.launch_server` with no model: builds the demo model, serves it on CPU."""
    env = {"NANOCP_CACHE_DIR": str(tmp_path / "cache")}
    with ServerProcess([], env=env, log_path=str(tmp_path / "log")) as s:
        oai = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        model = oai.models.list().data[0].id
        assert model == "nanocp-demo-qwen3-moe"
        out = oai.completions.create(model=model, prompt="Hello", max_tokens=5)
        assert out.usage.completion_tokens == 5
        chat = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.usage.completion_tokens <= 4
    assert "Creating nanocp-demo-qwen3-moe" in s.log()


# ------------------------------------------------------------ bench_serving
def _require_sglang() -> None:
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        msg = "sglang's client is not installed: pip install --no-deps sglang==0.5.23 (see README)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs it; its absence there is a broken install step
        pytest.skip(msg)


@needs_triton  # sglang's client imports triton
@pytest.mark.parametrize("backend", ["sglang", "sglang-oai"])
def test_sglang_bench_serving(server, client, moe_model, tmp_path, backend):
    """SGLang's own benchmark client runs unchanged against NanoCP, and its token counts agree
    with what the server generated (its warm-up request included)."""
    import json
    import subprocess
    import sys

    _require_sglang()
    wait_idle(client)
    prompt0, gen0 = (
        metric(client, "nanocp:prompt_tokens_total"),
        metric(client, "nanocp:generation_tokens_total"),
    )
    out = tmp_path / "bench.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "sglang.bench_serving",
        "--backend",
        backend,
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--dataset-name",
        "random-ids",
        "--random-input-len",
        "64",
        "--random-output-len",
        "16",
        "--num-prompts",
        "50",
        "--tokenizer",
        moe_model,
        "--model",
        moe_model,
        "--output-file",
        str(out),
        "--output-details",
        "--disable-tqdm",
    ]
    if backend == "sglang":
        cmd.append("--tokenize-prompt")  # send input_ids, so prompt token counts can be compared exactly
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text().strip().splitlines()[-1])
    assert res["completed"] == 50 and not any(res["errors"])
    wait_idle(client)
    warm_in, warm_out = res["input_lens"][0], res["output_lens"][0]
    assert metric(client, "nanocp:generation_tokens_total") - gen0 == res["total_output_tokens"] + warm_out
    if backend == "sglang":
        assert metric(client, "nanocp:prompt_tokens_total") - prompt0 == res["total_input_tokens"] + warm_in


@needs_triton  # sglang's client imports triton
def test_serve_bench_clients_measure_every_request(server, client, moe_model, tmp_path):
    """benchmark.serve_bench: the native streaming client and the bench_serving wrapper run one
    workload; every request completes with its exact (native) output length and sane latencies."""
    import asyncio

    from benchmark.serve_bench import run_bench_serving, run_workload, server_vocab, summarize
    from benchmark.workloads import Component, lognormal, make_workload

    mix = [Component(1.0, "chat", lognormal(40, 0.5, 8, 120), lognormal(10, 0.4, 4, 24))]
    work = make_workload(mix, 12, rate=20.0, seed=3)
    metrics = asyncio.run(run_workload(server.url, work, server_vocab(server.url)))
    assert [m["output_len"] for m in metrics] == [r.output_len for r in work]
    for m in metrics:
        assert "error" not in m and 0 < m["ttft"] <= m["e2e"] and m["cp_degree"] == 1
        assert len(m["itl"]) == m["output_len"] - 1
        assert m["tpot"] == pytest.approx((m["e2e"] - m["ttft"]) / (m["output_len"] - 1))
    s = summarize(metrics, 1.0)
    assert s["completed"] == 12 and s["failed"] == 0 and s["cp_degrees"] == {"1": 12}
    assert s["tpot"]["p50"] <= s["tpot"]["p99"]

    _require_sglang()
    wait_idle(client)
    bs = run_bench_serving(server.url, work, moe_model, rate=20.0, out_dir=tmp_path / "bs")
    assert len(bs) == 12 and not any("error" in m for m in bs)
    assert all(m["ttft"] > 0 and m["tpot"] >= 0 for m in bs)


def test_a_terminated_caller_stops_the_servers_it_started(tmp_path):
    """`timeout` (SIGTERM) on a benchmark must not leave its servers holding the GPU: the
    caller's exit stops every ServerProcess it started (the server runs in its own session,
    so nothing else would)."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from nanocp.testing.server import ServerProcess

            class Idle(ServerProcess):  # stands in for launch_server
                def command(self, args):
                    return [sys.executable, "-c", "import time; time.sleep(600)"]

            print(Idle([]).proc.pid, flush=True)
            time.sleep(600)
            """
        )
    )
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    server_pid = int(caller.stdout.readline())
    os.kill(server_pid, 0)  # running
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # stopped and reaped by the caller before it exited
        os.kill(server_pid, 0)
