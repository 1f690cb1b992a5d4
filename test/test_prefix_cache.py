"""The prefix cache end to end on one instance (fp32, CPU): greedy tokens identical with the
cache on, off and to transformers, for prompts sharing a document, multi-turn history and
concurrent requests; cached_tokens as the pages say; a tiny pool that must evict; flush."""

from __future__ import annotations

import pytest

from conftest import assert_pool_free, greedy_params, random_prompts
from nanocp import Engine

NEW = 8


def doc_prompts(page_size: int) -> tuple[list[int], list[list[int]]]:
    doc, *questions = random_prompts([300, 9, 14, 21, 5], vocab=500, seed=11)
    return doc, [doc + q for q in questions]


def run(engine: Engine, prompts: list[list[int]]) -> list[dict]:
    return engine.generate(input_ids=prompts, sampling_params=greedy_params(NEW))


@pytest.mark.parametrize("page_size", [1, 16])
def test_shared_document_and_multi_turn_reuse_the_cache_exactly(moe_model, hf_oracle, page_size):
    doc, (p1, p2, p3, p4) = doc_prompts(page_size)
    kw = dict(model_path=moe_model, page_size=page_size, chunked_prefill_size=64, max_total_tokens=4096)
    with Engine(**kw, disable_radix_cache=True) as off:
        first_off = run(off, [p1])[0]
        turn2 = p1 + first_off["output_ids"] + random_prompts([6], vocab=500, seed=12)[0]
        expected = [r["output_ids"] for r in run(off, [p1, p2, p3, p4, turn2])]
        assert off.scheduler.kv.cache is None and all(
            r["meta_info"]["cached_tokens"] == 0 for r in run(off, [p1, p2])
        )
    assert expected[0] == hf_oracle(moe_model).greedy(p1, NEW)
    assert expected[4] == hf_oracle(moe_model).greedy(turn2, NEW)
    with Engine(**kw) as on:
        first = run(on, [p1])[0]
        assert first["meta_info"]["cached_tokens"] == 0
        # one at a time: each finds what the ones before left (chunked prefill starts after it)
        got = [run(on, [p])[0] for p in (p1, p2, p3, p4, turn2)]
        assert [r["output_ids"] for r in got] == expected
        whole = lambda n: n // page_size * page_size  # noqa: E731
        # p1 again: all but its last token (whole pages); p2..p4: the document; turn 2: the first
        # turn's prompt and answer (but its last token, never run through the model)
        want = [whole(len(p1) - 1), whole(300), whole(300), whole(300), whole(len(p1) + NEW - 1)]
        assert [r["meta_info"]["cached_tokens"] for r in got] == want
        cache = on.scheduler.kv.cache
        assert cache.hit_tokens == sum(want) and cache.query_tokens == sum(
            len(p) for p in (p1, p1, p2, p3, p4, turn2)
        )
        assert_pool_free(on)
        assert on.flush_cache() and cache.cached_pages == 0
        assert run(on, [p2])[0]["meta_info"]["cached_tokens"] == 0
        assert_pool_free(on)


def test_concurrent_requests_find_a_prefix_still_being_prefilled(moe_model):
    doc, prompts = doc_prompts(16)
    kw = dict(model_path=moe_model, page_size=16, chunked_prefill_size=64, max_total_tokens=4096)
    with Engine(**kw, disable_radix_cache=True) as off:
        expected = [r["output_ids"] for r in run(off, prompts)]
    with Engine(**kw) as on:
        got = run(on, prompts)  # submitted together: the first one's chunks are cached as they end
        assert [r["output_ids"] for r in got] == expected
        assert got[0]["meta_info"]["cached_tokens"] == 0
        assert all(r["meta_info"]["cached_tokens"] >= 256 for r in got[1:]), [r["meta_info"] for r in got]
        assert_pool_free(on)


def test_tiny_pool_evicts_and_every_request_keeps_its_tokens(moe_model):
    docs = random_prompts([200, 240, 180], vocab=500, seed=21)
    tails = random_prompts([3, 7, 12, 5, 9, 4], vocab=500, seed=22)
    prompts = [docs[i % 3] + tails[i % 6] for i in range(12)]
    kw = dict(model_path=moe_model, page_size=16, chunked_prefill_size=128, max_total_tokens=640)
    with Engine(**kw, disable_radix_cache=True) as off:
        expected = [r["output_ids"] for r in run(off, prompts)]
    with Engine(**kw) as on:
        got = [r for i in range(0, 12, 3) for r in run(on, prompts[i : i + 3])]
        assert [r["output_ids"] for r in got] == expected
        cache = on.scheduler.kv.cache
        assert cache.evicted_pages > 0 and cache.hit_tokens > 0
        assert_pool_free(on)


# ---------------------------------------------------------------- dp=2 server: routing matters
ROUTINGS = {  # --flags: cached_tokens of four requests over one document, sent one at a time,
    # the first pinned to instance 1 (ties between idle instances go to instance 0)
    "round_robin": (["--cp-policy", "none", "--load-balance-method", "round_robin"], [0, 0, 288, 288]),
    "cache_aware": (["--cp-policy", "none", "--load-balance-method", "cache_aware"], [0, 288, 288, 288]),
    "dynamic": ([], [0, 288, 288, 288]),  # DCP's planner (degree 1: shorter than --cp-min-shard-tokens)
}


def wait_reported(client, timeout: float = 15.0) -> None:
    """Until every instance reported after the last dispatch (the router's view is not stale)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        cluster = client.get("/server_info").json()["cluster"]
        if all(i["pending_requests"] == i["running"] == i["waiting"] == 0 for i in cluster):
            return
        assert time.monotonic() < deadline, cluster
        time.sleep(0.1)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_dp2_routing_finds_the_cached_prefix(moe_model, hf_oracle, tmp_path, routing):
    import httpx
    from test_dcp import dcp_server_args
    from test_server import metric, wait_idle

    from nanocp.testing.server import ServerProcess

    flags, want = ROUTINGS[routing]
    doc, prompts = doc_prompts(16)
    args = dcp_server_args(moe_model, 2, 16, *flags)
    with (
        ServerProcess(args, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        got = []
        for i, p in enumerate(prompts):
            pin = {"data_parallel_rank": 1} if i == 0 else {}
            got.append(
                c.post(
                    "/generate", json={"input_ids": p, "sampling_params": greedy_params(NEW), **pin}
                ).json()
            )
            wait_reported(c)  # its KV is in its home's cache before the next one is routed
        assert [r["meta_info"]["cached_tokens"] for r in got] == want, [r["meta_info"] for r in got]
        assert [r["output_ids"] for r in got] == [hf_oracle(moe_model).greedy(p, NEW) for p in prompts]
        assert all(r["meta_info"].get("cp_degree", 1) == 1 for r in got)  # 300 + 8 < 4096 / 2
        if routing != "cache_aware":
            return
        # reporting: OpenAI usage and /metrics
        res = c.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 2, "temperature": 0}).json()
        assert res["usage"]["prompt_tokens_details"] == {"cached_tokens": 304}
        wait_idle(c)
        hit_rates = [metric(c, f'nanocp:cache_hit_rate{{instance="{i}"}}') for i in (0, 1)]
        assert hit_rates[0] == 0 and hit_rates[1] > 0.5  # every request found its document on 1
        assert metric(c, 'nanocp:cached_pages{instance="1"}') >= 19
        # /flush_cache: refused while a request runs, then every cached page is free again
        from conftest import BackgroundRequest

        bg = BackgroundRequest(s.url, {"input_ids": prompts[1], "sampling_params": greedy_params(400)})
        import time

        time.sleep(1.0)
        refused = c.post("/flush_cache")
        assert refused.status_code == 400 and "in flight" in refused.text
        bg.result()
        wait_idle(c)
        assert c.post("/flush_cache").status_code == 200
        deadline = time.monotonic() + 10
        while metric(c, 'nanocp:cached_pages{instance="0"}') + metric(c, 'nanocp:cached_pages{instance="1"}'):
            assert time.monotonic() < deadline, "the caches were not flushed"
            time.sleep(0.2)
        again = c.post(
            "/generate", json={"input_ids": prompts[2], "sampling_params": greedy_params(NEW)}
        ).json()
        assert again["meta_info"]["cached_tokens"] == 0


def test_dcp_prefix_sharded_over_two_instances_is_reused_in_place(moe_model, hf_oracle, tmp_path):
    """A 600-token document is sharded over both instances (DCP degree 2); requests over the
    same document reuse those segments where they are: placement = the cached segments + their
    own tail, the document is not computed again, and tokens equal transformers'."""
    import httpx
    from test_dcp import dcp_server_args

    from nanocp.testing.server import ServerProcess

    doc, *questions = random_prompts([600, 11, 7, 15], vocab=500, seed=31)
    prompts = [doc + q for q in questions]
    args = dcp_server_args(moe_model, 2, 16, "--cp-min-shard-tokens", "64")
    with (
        ServerProcess(args, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        got = []
        for p in prompts:
            got.append(
                c.post("/generate", json={"input_ids": p, "sampling_params": greedy_params(NEW)}).json()
            )
            wait_reported(c)
        metas = [r["meta_info"] for r in got]
        assert metas[0]["cp_degree"] == 2 and metas[0]["cached_tokens"] == 0, metas[0]
        for m in metas[1:]:  # the document's whole blocks (592 of 600) are reused in place
            assert m["cached_tokens"] == 592 and m["cp_degree"] == 2, m
        assert [r["output_ids"] for r in got] == [hf_oracle(moe_model).greedy(p, NEW) for p in prompts]
        from test_server import wait_idle

        cluster = wait_idle(c)  # every page free or cached, unlocked (the holders got their Release)
        assert all(i["cached_pages"] >= 18 for i in cluster)  # each holds its part of the document
