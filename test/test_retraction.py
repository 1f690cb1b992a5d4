"""A KV cache far smaller than the batch needs: requests are retracted and recomputed, none fails."""

from __future__ import annotations

from conftest import assert_pool_free, greedy_params, random_prompts
from nanocp import Engine

LENGTHS = [40, 3, 90, 17, 60, 120, 8, 75, 33, 100, 5, 64]
NEW_TOKENS = 40
SERVER_NEW_TOKENS = 24


def test_tiny_pool_completes_everything_with_same_tokens(moe_model, hf_oracle):
    prompts = random_prompts(LENGTHS, vocab=500, seed=11)
    expected = [hf_oracle(moe_model).greedy(p, NEW_TOKENS) for p in prompts]
    need = sum(LENGTHS) + NEW_TOKENS * len(LENGTHS)  # ~1200 tokens
    with Engine(model_path=moe_model, page_size=16, max_total_tokens=256, chunked_prefill_size=64) as engine:
        assert engine.runner.max_total_num_tokens * 4 < need
        results = engine.generate(input_ids=prompts, sampling_params=greedy_params(NEW_TOKENS))
        assert engine.scheduler.num_retractions > 0, "the test must exercise retraction"
        assert [r["output_ids"] for r in results] == expected
        assert_pool_free(engine)


def test_request_larger_than_pool_is_rejected_clearly(moe_model):
    import pytest

    from nanocp.errors import InvalidRequestError

    with Engine(model_path=moe_model, max_total_tokens=64) as engine:
        with pytest.raises(InvalidRequestError, match="KV cache capacity"):
            engine.generate(input_ids=[5] * 50, sampling_params={"max_new_tokens": 20})
        with pytest.raises(InvalidRequestError, match="context length"):
            engine.generate(input_ids=[5] * 10, sampling_params={"max_new_tokens": 5000})
        # the engine still serves afterwards
        assert (
            engine.generate(input_ids=[5] * 10, sampling_params=greedy_params(4))["meta_info"][
                "completion_tokens"
            ]
            == 4
        )
        assert_pool_free(engine)


def test_server_reports_retractions_in_metrics(moe_model, tmp_path):
    """Retractions and forward steps by kind show up in /metrics (per instance); with
    --log-level debug the router and schedulers log placements and admissions."""
    import httpx
    from test_dp_ep import _post_all

    from nanocp.testing.server import ServerProcess

    # the Engine test's load (~3.5x the pool), and admission reserves nothing for future outputs:
    # however the HTTP arrivals spread out, the pool fills with prompts and decodes overflow it
    prompts = random_prompts(LENGTHS, vocab=500, seed=11)
    args = ["--model-path", moe_model, "--device", "cpu", "--page-size", "16", "--max-total-tokens", "256"]
    flags = ["--chunked-prefill-size", "64", "--schedule-conservativeness", "0", "--log-level", "debug"]
    with ServerProcess([*args, *flags], log_path=str(tmp_path / "log")) as s:
        got = _post_all(s.url, prompts, [None] * len(prompts), new=SERVER_NEW_TOKENS)
        assert all(len(ids) == SERVER_NEW_TOKENS for ids in got)
        text = ""
        for _ in range(50):  # load reports reach the metrics within a second or two
            text = httpx.get(f"{s.url}/metrics").text
            line = next(
                x for x in text.splitlines() if x.startswith('nanocp:num_retracted_reqs_total{instance="0"}')
            )
            if float(line.split()[-1]) > 0:
                break
            __import__("time").sleep(0.2)
        else:
            raise AssertionError(f"no retraction reported:\n{text}")
        eager = next(
            x
            for x in text.splitlines()
            if x.startswith('nanocp:forward_steps_total{instance="0",kind="eager"}')
        )
        assert float(eager.split()[-1]) > 0  # CPU: every step eager (no CUDA graphs)
        # --log-level reaches every process's loggers (router placements, scheduler admissions)
        log = (tmp_path / "log").read_text()  # whole: s.log() is only its tail
        assert "router] request" in log and "admitted" in log, log[-3000:]


def test_lone_request_is_retracted_when_foreign_segments_take_its_pages(moe_model, hf_oracle):
    """Segments reserved for other homes' context-parallel requests can take the pages the only
    running request grows into: it is retracted, waits for them, and then finishes with the
    same tokens (this used to fail the step as an admission bug)."""
    prompt = random_prompts([30], vocab=500, seed=5)[0]
    expected = hf_oracle(moe_model).greedy(prompt, 12)
    with Engine(model_path=moe_model, page_size=16, max_total_tokens=96, chunked_prefill_size=64) as engine:
        s = engine.scheduler
        (req,), _ = engine._make_requests(None, prompt, greedy_params(12))
        s.add_request(req)
        while req.kv_len < 32:  # prompt + 2 tokens: its 2 pages are full
            s.step()
        free = s.kv.allocator.num_free_pages
        assert s.foreign.reserve(7, 1000, 1000 + 16 * free) and s.kv.allocator.num_free_pages == 0
        assert s.step() == [] and s.waiting == [req] and s.num_retractions == 1
        s.release_foreign(7)
        while not req.finished:
            s.step()
        assert req.output_ids == expected
        assert_pool_free(engine)


def test_victim_is_the_request_freeing_most_kv_per_recomputed_token(moe_model):
    """A context-parallel request holds only its home's share here but would recompute all of
    its positions: an older unsharded request is retracted first; among unsharded ones the newest
    (the rule before)."""
    from nanocp.scheduler.dcp import Placement

    with Engine(model_path=moe_model, page_size=16, max_total_tokens=512) as engine:
        s = engine.scheduler
        reqs, _ = engine._make_requests(
            None, random_prompts([40, 40, 300], vocab=500, seed=1), greedy_params(4)
        )
        old, mid, sharded = reqs
        old.kv_len, mid.kv_len = 40, 40
        sharded.set_placement(Placement([(1, 0, 224), (0, 224, 304)], home=0))  # 80 of 304 held here
        sharded.kv_len = 300
        s.running = [old, sharded]
        assert s.victim() is old
        s.running = [old, mid, sharded]
        assert s.victim() is mid
        s.running = [sharded]
        assert s.victim() is sharded
