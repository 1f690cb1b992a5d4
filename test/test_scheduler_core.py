"""The engine's Scheduler and the cluster simulator's instance run one scheduling loop
(nanocp.scheduler.core): driven on the same trace, they make the same decisions step by step."""

from __future__ import annotations

import pytest

from benchmark.simulator.cost import H200, QWEN3_235B, CostModel
from benchmark.simulator.sim import Simulator
from benchmark.workloads import Request
from conftest import random_prompts
from nanocp import Engine
from nanocp_router.planner import create_cp_policy

# (prompt, output) tokens; a 512-token pool, at most 8 running and an optimistic reserve:
# admission, chunked prefill, retraction (outputs outgrow the pool) and recompute all happen
TRACE = [(40, 120), (100, 90), (17, 160), (60, 100), (64, 140), (5, 180), (30, 125), (9, 145)]
PAGE, CHUNK, TOKENS, RUNNING, CONSERVATIVENESS = 16, 64, 512, 8, 0.2


def engine_steps(model: str) -> tuple[list[list[tuple[int, int]]], int]:
    with Engine(
        model_path=model,
        page_size=PAGE,
        chunked_prefill_size=CHUNK,
        max_total_tokens=TOKENS,
        max_running_requests=RUNNING,
        schedule_conservativeness=CONSERVATIVENESS,
    ) as engine:
        s = engine.scheduler
        index = {}
        prompts = random_prompts([p for p, _ in TRACE], vocab=500, seed=2)
        for i, (prompt, (_, out)) in enumerate(zip(prompts, TRACE)):
            params = {"max_new_tokens": out, "ignore_eos": True, "temperature": 0.0}
            (req,), _ = engine._make_requests(None, prompt, params)
            req.arrival = 0  # one arrival time for all, as in the simulated trace
            index[req.rid] = i
            s.add_request(req)
        steps = []
        while s.has_work():
            s.step()
            steps.append([(index[req.rid], n) for req, n in s.work])
        return steps, s.num_retractions


def simulator_steps() -> tuple[list[list[tuple[int, int]]], int]:
    sim = Simulator(
        CostModel(QWEN3_235B, H200, 1),
        create_cp_policy("none"),
        page_size=PAGE,
        chunk=CHUNK,
        capacity_tokens=TOKENS,
        max_running=RUNNING,
        schedule_conservativeness=CONSERVATIVENESS,
    )
    sim.step_log = []
    result = sim.run([Request(arrival_s=0.0, input_len=p, output_len=o) for p, o in TRACE])
    return [[(rid, n) for rid, _, n in step] for _, step in sim.step_log], result.retractions


def test_simulator_and_engine_schedule_alike(moe_model):
    real, real_retractions = engine_steps(moe_model)
    sim, sim_retractions = simulator_steps()
    assert real_retractions >= 3  # the trace exercises retraction
    for i, (a, b) in enumerate(zip(real, sim)):
        assert a == b, f"step {i}: engine {a} != simulator {b}"
    assert len(real) == len(sim) and real_retractions == sim_retractions


@pytest.mark.parametrize("conservativeness", [CONSERVATIVENESS, 3.0])
def test_the_simulator_follows_the_schedule_flags(conservativeness):
    """--schedule-conservativeness reaches the simulated instances' admission: retractions when
    optimistic, none when conservative; every request finishes either way."""
    trace = [Request(arrival_s=0.0, input_len=p, output_len=o) for p, o in TRACE]
    cost, policy = CostModel(QWEN3_235B, H200, 1), create_cp_policy("none")
    kw = dict(page_size=PAGE, chunk=CHUNK, capacity_tokens=TOKENS, max_running=RUNNING)
    res = Simulator(cost, policy, schedule_conservativeness=conservativeness, **kw).run(trace)
    assert sorted(m["rid"] for m in res.metrics) == list(range(len(TRACE)))
    assert (res.retractions == 0) == (conservativeness > 1)


def test_slo_order_serves_by_least_slack_and_puts_late_requests_last():
    """--schedule-policy slo on a known case (10 ms per pending token, TTFT SLO 1 s, one running
    request at a time): at t = 0.5 A (200 tokens, arrived at 0) can no longer make its TTFT, B
    (30 tokens, at 0.1) has 0.3 s to spare and C (50 tokens, at 0.2) 0.2 s: slo admits C, then B,
    and A last; fcfs admits A first."""
    from benchmark.simulator.instance import SimInstance, SimRequest

    def admitted(policy: str) -> list[int]:
        inst = SimInstance(0, total_pages=1000, page_size=16, chunk=512, max_running=1, policy=policy,
                           ttft_slo_s=1.0)  # fmt: skip
        inst.prefill_s_per_token = 0.01
        reqs = [
            SimRequest(Request(t, n, 1), rid=i) for i, (t, n) in enumerate([(0.0, 200), (0.1, 30), (0.2, 50)])
        ]
        for r in reqs:
            inst.enqueue(r)
        assert inst.slack(reqs[0]) < 0 and 0 < inst.slack(reqs[2]) + 0.5 < inst.slack(reqs[1]) + 0.5
        order = []
        for step in range(3):
            work = inst.step_work(0.5 + step * 0.001)
            order.append(work[0][0].rid)
            inst.finish(work[0][0])
        return order

    assert admitted("slo") == [2, 1, 0]
    assert admitted("fcfs") == [0, 1, 2]


def test_slo_order_keeps_short_requests_within_their_ttft_behind_long_prompts():
    """One instance, a burst of 4 long prompts (each longer to prefill than the TTFT SLO) queued
    before 16 short requests: in arrival order every short one waits behind the long prefills
    and misses its TTFT; ordered by slack (the long ones cannot make it anyway) every short one
    makes it."""
    cost = CostModel(QWEN3_235B, H200, 1)
    chunk = 8192
    per_token = (cost.prefill(chunk) + cost.dense(chunk, chunk)) / chunk
    long_len = int(3.0 / per_token)  # 3 s of prefill each, against a 2 s TTFT (one full step: ~1.2 s)
    trace = [Request(0.0, long_len, 4) for _ in range(4)] + [Request(0.0, 200, 4) for _ in range(16)]
    ttft = {}
    for policy in ("fcfs", "slo"):
        sim = Simulator(cost, create_cp_policy("none"), page_size=16, chunk=chunk, capacity_tokens=1 << 20,
                        schedule_policy=policy, slo_ttft_s=2.0, slo_tpot_s=1.0)  # fmt: skip
        ttft[policy] = [m["ttft"] for m in sim.run(trace).metrics[4:]]
    assert all(t > 2.0 for t in ttft["fcfs"]), ttft["fcfs"]
    assert all(t <= 2.0 for t in ttft["slo"]), ttft["slo"]


def test_engine_with_the_slo_order_matches_hf(moe_model, hf_oracle):
    """The slo order changes when requests run, never what they generate (the engine measures
    prefill_s_per_token from its steps for the slack)."""
    prompts = random_prompts([300, 12, 80, 5], vocab=500, seed=21)
    expected = [hf_oracle(moe_model).greedy(p, 6) for p in prompts]
    with Engine(model_path=moe_model, chunked_prefill_size=64, max_total_tokens=2048, schedule_policy="slo",
                slo_ttft_ms=50, slo_tpot_ms=10) as engine:  # fmt: skip
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 6, "temperature": 0.0})
        assert engine.scheduler.prefill_s_per_token > 0
    assert [o["output_ids"] for o in outs] == expected


def test_long_prefill_threshold_interleaves_chunks_behind_a_long_prompt():
    """--long-prefill-token-threshold: a 4,000-token prompt admitted first, then 4 short ones.
    Off, the short ones wait for its whole prefill (chunk 512: 8 steps); on (128), they run in
    the long prompt's steps and are prefilled within 2 steps, and it still takes the whole
    budget once alone."""
    from benchmark.simulator.instance import SimInstance, SimRequest

    def run(threshold: int) -> tuple[dict[int, int], list[list[tuple[int, int]]]]:
        inst = SimInstance(0, total_pages=10_000, page_size=16, chunk=512, max_running=8,
                           long_prefill_tokens=threshold)  # fmt: skip
        reqs = [SimRequest(Request(0.0, n, 1), rid=i) for i, n in enumerate([4000, 100, 100, 100, 100])]
        for r in reqs:
            inst.enqueue(r)
        done, steps = {}, []
        for step in range(40):
            work = inst.step_work(step * 0.01)
            steps.append([(r.rid, n) for r, n in work])
            for r, _ in work:
                if r.num_pending == 0 and r.rid not in done:
                    done[r.rid] = step
        return done, steps

    done, _ = run(0)
    assert min(done[i] for i in range(1, 5)) >= 7, done
    done, steps = run(128)
    assert max(done[i] for i in range(1, 5)) <= 1, done
    assert steps[0][0] == (0, 128) and sum(n for _, n in steps[0]) == 512, steps[0]
    assert (0, 512) in steps[3], steps[:4]  # alone: the whole chunk again
