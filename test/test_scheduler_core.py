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
