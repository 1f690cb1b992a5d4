"""Fuzzing the HTTP API (hypothesis) against a live dp=2 server with dynamic CP.

2,000 generated requests (hypothesis draws them, seeded; they are then sent 80 at a time) over /generate,
/v1/completions, /v1/chat/completions and /abort_request: bodies mixing plausible and arbitrary
JSON values at every field (null, huge integers, NaN / Infinity literals, lone surrogates, wrong
types, nesting) and raw malformed bodies (truncated JSON, wrong top-level types, invalid UTF-8).
Every answer must be 2xx, or 4xx with an OpenAI-style error naming the field; never 5xx, never a
hang. Afterwards a normal request is served and every KV pool is full again. Loopback only;
--context-length 96 bounds what a valid request can generate.
"""

from __future__ import annotations

import asyncio
import collections
import json

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from test_server import wait_idle

from conftest import greedy_params
from nanocp.testing.server import ServerProcess

EXAMPLES, BATCH = 2000, 80  # requests, and how many are in flight at once
TIMEOUT_S = 60.0  # a request without an answer by then is a hang
STATUS: collections.Counter = collections.Counter()  # answers by status class, for the summary
PARAMS: collections.Counter = collections.Counter()  # 4xx answers by the field they name

# -- values: anything JSON can say, and a few that Python's json writes beyond JSON
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 600),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(exclude_categories=()), max_size=12),  # lone surrogates included
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def maybe(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value (so that many requests are served), sometimes anything at all."""
    return st.integers(0, 7).flatmap(lambda k: anything if k == 0 else plausible)


token_ids = st.lists(st.integers(0, 520), min_size=0, max_size=40)
words = st.text(st.characters(exclude_categories=()), max_size=40)
stops = st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(max_size=3), max_size=3))
sampling = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": maybe(st.integers(1, 24)),
        "min_new_tokens": maybe(st.integers(0, 4)),
        "temperature": maybe(st.floats(0, 2)),
        "top_p": maybe(st.floats(0, 1)),
        "top_k": maybe(st.integers(-1, 50)),
        "min_p": maybe(st.floats(0, 1)),
        "frequency_penalty": maybe(st.floats(-2, 2)),
        "presence_penalty": maybe(st.floats(-2, 2)),
        "repetition_penalty": maybe(st.floats(0.5, 2)),
        "stop": maybe(stops),
        "stop_token_ids": maybe(st.lists(st.integers(0, 520), max_size=3)),
        "ignore_eos": maybe(st.booleans()),
        "skip_special_tokens": maybe(st.booleans()),
        "sampling_seed": maybe(st.integers(0, 2**40)),
        "n": maybe(st.just(1)),
        "no_stop_trim": maybe(st.booleans()),
    },
)
rids = maybe(st.sampled_from([f"fz-{i}" for i in range(8)]))
generate = st.fixed_dictionaries(
    {},
    optional={
        "text": maybe(words | st.lists(words, min_size=1, max_size=3)),
        "input_ids": maybe(token_ids | st.lists(token_ids, min_size=1, max_size=3)),
        "sampling_params": maybe(sampling),
        "stream": maybe(st.booleans()),
        "rid": rids,
        "return_logprob": maybe(st.booleans()),
        "top_logprobs_num": maybe(st.integers(0, 5)),
        "data_parallel_rank": maybe(st.integers(0, 1)),
        "logprob_start_len": anything,
        "lora_path": maybe(st.none()),
    },
)
openai_common = {
    "model": maybe(st.just("fuzz-model")),
    "max_tokens": maybe(st.integers(1, 24)),
    "temperature": maybe(st.floats(0, 2)),
    "top_p": maybe(st.floats(0, 1)),
    "n": maybe(st.just(1)),
    "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": maybe(stops),
    "seed": maybe(st.integers(0, 2**40)),
    "frequency_penalty": maybe(st.floats(-2, 2)),
    "logprobs": maybe(st.none()),
    "user": maybe(st.text(max_size=5)),
    "ignore_eos": maybe(st.booleans()),
    "rid": rids,
}
completions = st.fixed_dictionaries(
    {"prompt": maybe(words | token_ids | st.lists(words, min_size=1, max_size=2))},
    optional={**openai_common, "echo": maybe(st.booleans()), "logprobs": maybe(st.integers(0, 3))},
)
message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "user", "assistant"]))},
    optional={
        "content": maybe(words | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words})))
    },
)
chat = st.fixed_dictionaries(
    {"messages": maybe(st.lists(message, min_size=1, max_size=3))},
    optional={
        **openai_common,
        "top_logprobs": maybe(st.integers(0, 3)),
        "max_completion_tokens": maybe(st.integers(1, 24)),
    },
)
abort = st.fixed_dictionaries({}, optional={"rid": rids, "abort_all": maybe(st.just(False))})
PATHS = {
    "/generate": generate,
    "/v1/completions": completions,
    "/v1/chat/completions": chat,
    "/abort_request": abort,
}


def encode(body: dict) -> bytes:
    """Python's json: NaN / Infinity literals and \\udxxx escapes pass through as the fuzz wants."""
    return json.dumps(body).encode()


@st.composite
def raw_body(draw) -> bytes:
    """A malformed body: truncated JSON, a wrong top-level type, invalid UTF-8 or bare bytes."""
    body = encode(draw(st.sampled_from(list(PATHS.values())).flatmap(lambda s: s)))
    kind = draw(st.sampled_from(["truncate", "toplevel", "utf8", "bytes"]))
    if kind == "truncate":
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    if kind == "toplevel":
        return encode(draw(st.lists(anything, max_size=3) | scalars))
    if kind == "utf8":
        cut = draw(st.integers(0, len(body)))
        return (
            body[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + body[cut:]
        )
    return draw(st.binary(max_size=64))


request = st.one_of(
    *(st.tuples(st.just(path), strategy.map(encode)) for path, strategy in PATHS.items()),
    st.tuples(st.sampled_from(list(PATHS)), raw_body()),
)


@pytest.fixture(scope="module")
def fuzz_server(moe_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    args = [
        "--model-path", moe_model, "--device", "cpu", "--dp-size", "2", "--ep-size", "2",
        "--max-total-tokens", "2048", "--cp-min-shard-tokens", "32", "--chunked-prefill-size", "64",
        "--context-length", "96", "--served-model-name", "fuzz-model",
    ]  # fmt: skip
    with ServerProcess(args, log_path=str(log)) as s:
        yield s


def check(path: str, body: bytes, r: httpx.Response, text: str) -> None:
    assert r.status_code < 500, f"{path} {body[:1000]!r}: {r.status_code} {text[:500]}"
    STATUS[f"{r.status_code // 100}xx"] += 1
    if r.status_code >= 400:
        err = json.loads(text)["error"]
        assert err["code"] == r.status_code and isinstance(err["message"], str), text
        assert isinstance(err["param"], str) and err["param"], (
            f"{path}: the error names no field: {text[:500]}"
        )
        PARAMS[f"{path} {err['param'].split('.')[0]}"] += 1
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-500:]
        for e in events[:-1]:
            err = json.loads(e).get("error")
            assert err is None or err["code"] < 500, f"{path}: stream failed: {e[:500]}"


async def send_batch(url: str, batch: list[tuple[str, bytes]]) -> None:
    limits = httpx.Limits(max_connections=BATCH)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as client:

        async def one(path: str, body: bytes) -> None:
            headers = {"content-type": "application/json"}
            async with client.stream("POST", path, content=body, headers=headers) as r:
                text = (await r.aread()).decode("utf-8", "replace")
            check(path, body, r, text)

        await asyncio.gather(*(one(p, b) for p, b in batch))


def draw_requests(n: int) -> list[tuple[str, bytes]]:
    """n requests drawn by hypothesis (seeded: the same every run). Drawing one example per request
    and sending them afterwards keeps examples small (a whole batch per example overruns
    hypothesis's data budget) and lets them run concurrently."""
    drawn: list[tuple[str, bytes]] = []

    @seed(22)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(request)
    def collect(item: tuple[str, bytes]) -> None:
        drawn.append(item)

    collect()
    return drawn


@pytest.mark.slow
def test_fuzzed_requests_never_5xx_never_hang(fuzz_server):
    STATUS.clear()
    PARAMS.clear()
    requests = draw_requests(EXAMPLES)
    for i in range(0, len(requests), BATCH):
        asyncio.run(send_batch(fuzz_server.url, requests[i : i + BATCH]))
    total = sum(STATUS.values())
    print(
        f"\nfuzzed {total} requests: {dict(sorted(STATUS.items()))}; 4xx by field: {PARAMS.most_common(12)}"
    )
    assert total == len(requests) >= EXAMPLES * 0.95 and STATUS["2xx"] > 100 and STATUS["4xx"] > 100
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as client:
        r = client.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": greedy_params(5)})
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 5
        wait_idle(client, timeout=60)
        assert client.get("/health").status_code == 200
    assert "Traceback" not in fuzz_server.log()
