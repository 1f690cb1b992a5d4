"""Workload generator, SLO goodput search and the cluster simulator."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.goodput import attainment, goodput_search
from benchmark.simulator.cost import H200, QWEN3_235B, CostModel
from benchmark.simulator.sim import Simulator
from benchmark.workloads import Request, arrivals, load, make_workload, nested_workload, save
from conftest import needs_triton
from nanocp_router.planner import PlannerConfig, create_cp_policy


def test_workload_is_seeded_and_has_the_mix_moments(tmp_path):
    a = make_workload("chat-docs", 20_000, rate=5.0, seed=1)
    assert a == make_workload("chat-docs", 20_000, rate=5.0, seed=1)
    assert a != make_workload("chat-docs", 20_000, rate=5.0, seed=2)
    docs = [r for r in a if r.kind == "doc"]
    assert 0.09 < len(docs) / len(a) < 0.11
    assert all(32_768 <= r.input_len <= 262_144 for r in docs)
    chat = np.array([r.input_len for r in a if r.kind == "chat"])
    assert chat.max() <= 2048 and 500 < np.median(chat) < 700  # lognormal median 600
    # log-uniform on [32k, 256k]: mean = (hi - lo) / ln(hi / lo)
    assert np.mean([r.input_len for r in docs]) == pytest.approx((262_144 - 32_768) / np.log(8), rel=0.05)
    gaps = np.diff([r.arrival_s for r in a])
    assert np.mean(gaps) == pytest.approx(1 / 5.0, rel=0.05) and np.std(gaps) / np.mean(
        gaps
    ) == pytest.approx(1, rel=0.1)
    save(a[:50], tmp_path / "w.jsonl")
    assert load(tmp_path / "w.jsonl") == a[:50]


def test_nested_workloads_share_requests_across_rates():
    """A higher rate replays a longer prefix of the same requests, arrivals compressed by the
    rate ratio; lengths never change with the rate (what makes a goodput search monotone)."""
    slow = nested_workload("chat-docs", 100, rate=2.0, seed=4, pool_size=500)
    fast = nested_workload("chat-docs", 300, rate=6.0, seed=4, pool_size=500)
    assert [(r.input_len, r.output_len, r.kind) for r in fast[:100]] == [
        (r.input_len, r.output_len, r.kind) for r in slow
    ]
    assert [3 * r.arrival_s for r in fast[:100]] == pytest.approx([r.arrival_s for r in slow])
    gaps = np.diff([r.arrival_s for r in fast])
    assert np.mean(gaps) == pytest.approx(1 / 6.0, rel=0.15)
    other = nested_workload("chat-docs", 100, rate=2.0, seed=5, pool_size=500)
    assert [r.input_len for r in other] != [r.input_len for r in slow]


def test_bursty_arrivals_have_the_requested_cv():
    rng = np.random.default_rng(0)
    t = arrivals(rng, 50_000, rate=10.0, kind="gamma", cv=3.0)
    gaps = np.diff(t)
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(3.0, rel=0.1)


def test_goodput_search_finds_the_known_rate():
    """TPOT of request i at rate r: base * u_i / (1 - r / cap), u_i uniform on [0.5, 1.5]. 90%
    meet the SLO while base * q90(u) / (1 - r/cap) <= slo, q90(u) = 1.4 -> r* = cap * (1 - 1.4 base / slo)."""
    base, cap, slo = 0.02, 20.0, 0.05
    us = np.linspace(0.5, 1.5, 1001)

    def measure(rate: float) -> list[dict]:
        if rate >= cap:
            return [{"tpot": float("inf"), "ttft": 0.0}] * len(us)
        return [{"tpot": base * u / (1 - rate / cap), "ttft": 0.0, "e2e": 1.0} for u in us]

    res = goodput_search(measure, tpot_slo=slo, attain=0.9, lo=0.5, hi=4.0, rel_tol=0.002)
    assert res.goodput == pytest.approx(cap * (1 - 1.4 * base / slo), rel=0.01)
    assert attainment(measure(res.goodput), slo) >= 0.9
    assert goodput_search(lambda r: [{"tpot": 1.0, "ttft": 0.0}], tpot_slo=0.1).goodput == 0.0


@pytest.mark.parametrize("policy", ["none", "uniform", "dynamic"])
def test_simulator_conserves_requests_and_memory(policy):
    cost = CostModel(QWEN3_235B, H200, 4)
    work = make_workload("chat-docs", 200, rate=3.0, seed=3)
    sim = Simulator(
        cost, create_cp_policy(policy, PlannerConfig(cp_size=4, cp_max_degree=4)), capacity_tokens=400_000
    )
    res = sim.run(work)
    assert sorted(m["rid"] for m in res.metrics) == list(range(len(work)))  # every request finishes once
    for m, r in zip(res.metrics, work):
        assert m["ttft"] >= 0 and m["e2e"] >= m["ttft"] and m["tpot"] >= 0
        assert m["input_len"] == r.input_len and m["output_len"] == r.output_len


def test_single_instance_is_sequential_execution():
    """One instance, requests far apart: each request's latency is its own steps, back to back."""
    cost = CostModel(QWEN3_235B, H200, 1)
    work = [Request(arrival_s=1000.0 * i, input_len=3000 + 500 * i, output_len=20 + i) for i in range(4)]
    sim = Simulator(cost, create_cp_policy("dynamic"), chunk=1024, capacity_tokens=100_000)
    res = sim.run(work)
    for m, r in zip(res.metrics, work):
        chunks = [(k, min(1024, r.input_len - k)) for k in range(0, r.input_len, 1024)]
        prefill = sum(  # each chunk: its tokens' compute and causal attention over the prompt so far
            cost.dense(c, c)
            + cost.prefill(c)
            + cost.attention(0, 1)
            + cost.prefill_attention(sum(range(k + 1, k + c + 1)))
            for k, c in chunks
        )
        decode = sum(cost.attention(r.input_len + j, 1) + cost.dense(1, 1) for j in range(1, r.output_len))
        assert m["ttft"] == pytest.approx(prefill, rel=1e-9)
        assert m["e2e"] == pytest.approx(prefill + decode, rel=1e-9)
        assert m["degree"] == 1


def test_static_dp_uses_the_load_balancing_policy():
    """--cp-policy none: requests go to instances by the router's load-balancing policy at once."""
    cost = CostModel(QWEN3_235B, H200, 4)
    work = [Request(arrival_s=0.01 * i, input_len=100, output_len=50) for i in range(8)]
    sim = Simulator(cost, create_cp_policy("none"), capacity_tokens=10_000, load_balance_method="round_robin")
    sim.step_log = []
    sim.run(work)
    homes = {}
    for _, step in sim.step_log:
        for rid, home, _ in step:
            homes.setdefault(rid, home)
    assert [homes[i] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("policy", ["none", "dynamic"])
def test_tiny_pool_retracts_and_still_finishes_everything(policy):
    """Admission is optimistic (new token ratio): outputs outgrow a small pool, the newest
    requests are retracted and recomputed; every request finishes with all its tokens."""
    cost = CostModel(QWEN3_235B, H200, 2)
    work = [Request(arrival_s=0.0, input_len=200 + 10 * i, output_len=400) for i in range(12)]
    sim = Simulator(cost, create_cp_policy(policy, PlannerConfig(cp_min_shard_tokens=256)), page_size=16,
                    chunk=512, capacity_tokens=2048)  # fmt: skip
    res = sim.run(work)
    assert res.retractions > 0
    assert sorted(m["rid"] for m in res.metrics) == list(range(12))
    assert sum(m["retractions"] for m in res.metrics) == res.retractions
    for inst in sim.insts:  # every page back
        assert inst.free_pages == inst.total_pages and not inst.foreign.segments


def test_dcp_requests_grow_past_their_first_plan():
    """A tail quota shorter than the output: the request asks for growth before its plan runs out
    and the router places it (on another instance when the home is fuller)."""
    cost = CostModel(QWEN3_235B, H200, 4)
    cfg = PlannerConfig(cp_max_degree=4, cp_min_shard_tokens=512)
    work = [Request(arrival_s=0.0, input_len=4000, output_len=3000)]
    work += [Request(arrival_s=0.0, input_len=300, output_len=10) for _ in range(3)]
    sim = Simulator(cost, create_cp_policy("dynamic", cfg), page_size=16, capacity_tokens=100_000)
    res = sim.run(work)
    assert sorted(m["rid"] for m in res.metrics) == list(range(4))
    long = res.metrics[0]
    # a 512-token tail quota per growth: the plan covered the prompt and 512 outputs
    assert long["growths"] == -(-(3000 - 512) // 512) and long["degree"] >= 2
    assert all(m["growths"] == 0 for m in res.metrics[1:])
    assert all(inst.free_pages == inst.total_pages for inst in sim.insts)


def test_dcp_balances_kv_in_simulation():
    cost = CostModel(QWEN3_235B, H200, 8)
    work = make_workload("chat-docs", 400, rate=4.0, seed=0)
    imb = {}
    for policy in ("none", "dynamic"):
        sim = Simulator(cost, create_cp_policy(policy, PlannerConfig(cp_max_degree=8)), disaggregated=True)
        imb[policy] = sim.run(work).summary()["kv_imbalance_mean"]
    assert imb["dynamic"] < 0.7 * imb["none"]


def test_sim_calibration_recovers_a_known_shared_host_profile(monkeypatch):
    """fit_profile on synthetic step traces generated by a known shared-host cost model (4
    instances on 2 cores) recovers its coefficients; the simulator then uses max(2 * busiest,
    sum) per step."""
    import os

    from benchmark.sim_validate import fit_profile
    from benchmark.simulator.cost import ProfileCost

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    rng = np.random.default_rng(0)
    true = dict(kv=4e-7, pp=2e-7, req=2e-3, tok=1.5e-4, fq=3e-4, routed=0.02, const=0.06)
    steps = []
    for step in range(600):
        routed = step % 3 == 0
        recs = []
        for inst in range(4):
            decode = rng.random() < 0.7
            rec = {
                "instance": inst,
                "step": step,
                "mode": "DECODE" if decode else "EXTEND",
                "attn_pairs": int(rng.integers(0, 40_000 if decode else 400_000)),
                "batch_size": int(rng.integers(0, 6)),
                "num_tokens": int(rng.integers(1, 8 if decode else 1024)),
            }
            if routed:
                rec["foreign_queries"], rec["foreign_pairs"] = int(rng.integers(0, 20)), 0
                rec["foreign_seqs"] = int(rng.integers(0, 5))
            recs.append(rec)
        w = [
            true["kv"] * r["attn_pairs"] * (r["mode"] == "DECODE")
            + true["pp"] * r["attn_pairs"] * (r["mode"] != "DECODE")
            + true["req"] * (r["batch_size"] + r.get("foreign_seqs", 0))  # sequences attended
            + true["tok"] * r["num_tokens"]
            + true["fq"] * r.get("foreign_queries", 0)
            + true["routed"] / 4 * routed
            for r in recs
        ]
        t = max(2 * max(w), sum(w)) + true["const"]
        for r in recs:
            r["step_s"] = t
        steps.append(recs)
    compare = {
        "dp_size": 4,
        "settings": {"max_total_tokens": "65536"},
        "device": "test",
        "command": "",
        "date": "",
    }
    profile, fit = fit_profile(compare, steps)
    assert fit["r2_step_time"] > 0.999 and 0 < fit["steps_bound_by_one_instance"] < 1
    got = {
        "kv": profile.attn_per_kv_token_s,
        "pp": profile.attn_per_prefill_pair_s,
        "req": profile.attn_per_request_s,
        "tok": profile.compute_per_token_s,
        "fq": profile.routing_per_query_s,
        "routed": profile.routing_step_s * 4,
        "const": profile.moe_comm_base_s,
    }
    for k, v in true.items():
        assert got[k] == pytest.approx(v, rel=0.02), k
    assert isinstance(profile, ProfileCost) and profile.combine == "shared" and profile.cores == 2


def test_instance_retracts_its_last_request_when_foreign_segments_took_the_pages():
    """Segments reserved for other homes can take the pages a lone running request grows into:
    it is retracted (and waits for them), as the scheduler does, instead of failing."""
    from benchmark.simulator.instance import SimInstance, SimRequest

    inst = SimInstance(0, total_pages=6, page_size=16, chunk=64, max_running=8)
    own = SimRequest(Request(0.0, input_len=32, output_len=20), rid=0, home=0)
    inst.enqueue(own)
    assert inst.step_work(0.0) == [(own, 32)] and inst.free_pages == 4 and own.kv_len == 32
    own.generated = 1  # prefilled and sampled; its next token needs a third page
    assert inst.reserve_foreign(1, 0, 64) and inst.free_pages == 0  # for another home's request 1
    assert inst.step_work(0.1) == [] and inst.waiting == [own] and own.num_retractions == 1
    inst.release_foreign(1)
    assert inst.step_work(0.2) == [(own, 33)]  # recomputed: prompt + its sampled token


def test_retraction_victim_rule():
    from nanocp.scheduler.admission import retraction_victim

    assert retraction_victim([(100, 100), (50, 50), (70, 70)]) == 2  # all whole here: the newest
    assert retraction_victim([(100, 100), (4000, 1000)]) == 0  # sharded (recompute 4x) goes last
    assert retraction_victim([(10, 0), (500, 500)]) == 1  # freeing nothing helps nothing
    assert retraction_victim([(30, 0)]) == 0


def test_simulated_holder_keeps_its_sharded_request_when_retracting():
    """SimInstance uses the scheduler's victim rule: the unsharded request goes, not the newer
    context-parallel one whose home share is a quarter of what it would recompute."""
    from benchmark.simulator.instance import SimInstance, SimRequest
    from nanocp.scheduler.dcp import Placement

    inst = SimInstance(0, total_pages=100, page_size=16, chunk=512, max_running=8)
    chat = SimRequest(Request(0.0, 320, 10), rid=0, home=0, kv_len=320, pages=20)
    doc = SimRequest(
        Request(1.0, 1280, 10), rid=1, home=0, placement=Placement([(1, 0, 960), (0, 960, 1290)], 0),
        kv_len=1280, pages=20,
    )  # fmt: skip
    inst.running, inst.kv.num_free_pages = [chat, doc], 60
    assert inst.victim() is chat
    assert inst.reserve_foreign(2, 0, 16 * 70)  # another home's request 2
    assert inst.running == [doc] and chat.num_retractions == 1 and doc.num_retractions == 0


@needs_triton
def test_decode_variants_switch_what_they_name():
    """Every variant of benchmark.decode_variants patches attributes that exist (a rename in the
    kernels would otherwise make the A/B silently compare the code with itself)."""
    import os

    import nanocp_kernels.attention as attention
    import nanocp_kernels.elementwise as elementwise
    import nanocp_kernels.gemv as gemv
    import nanocp_kernels.launch as launch
    import nanocp_kernels.small_moe as small_moe
    from benchmark.decode_variants import VARIANTS
    from nanocp import envs
    from nanocp.layers.attention.layer import Attention

    before = (small_moe.SMALL_PAIRS, gemv.NORM_WINS_UP_TO, launch.PDL, Attention.kv_store)
    expect = {
        "small_pairs_8": lambda: small_moe.SMALL_PAIRS == 8,
        "no_norm_fusion": lambda: gemv.NORM_WINS_UP_TO == 0,
        "no_pdl": lambda: launch.PDL is False,
        "qk_early_release": lambda: elementwise.QK_RELEASE_EARLY is True,
        "no_short_blocks": lambda: attention.SHORT_BLOCKS is False,
        "attention_late_release": lambda: attention.RELEASE_EARLY is False,
        "gemv_up_to_4": lambda: gemv.WINS_UP_TO == 4,
        "router_up_to_2": lambda: gemv.ROUTER_WINS_UP_TO == 2,
        "norm_fusion_up_to_2": lambda: gemv.NORM_WINS_UP_TO == 2,
        "split_waves_1": lambda: attention.SPLIT_WAVES == 1,
        "split_waves_4": lambda: attention.SPLIT_WAVES == 4,
        "block_n_32": lambda: attention.DECODE_BLOCK_N == 32,
        "separate_kv_store": lambda: Attention.kv_store(None, None) is None,
        "no_small_batch": lambda: (
            envs.small_batch_kernels() is False and "NANOCP_SMALL_BATCH_KERNELS" in os.environ
        ),
    }
    assert set(VARIANTS) == set(expect) | {"main"}
    for name, check in expect.items():
        with VARIANTS[name][1]():
            assert check(), name
    assert (small_moe.SMALL_PAIRS, gemv.NORM_WINS_UP_TO, launch.PDL, Attention.kv_store) == before


def test_compare_suite_script_passes_flags_compare_and_the_server_accept(tmp_path):
    """benchmark/gpu/compare_suite.sh runs on the GPU machine only; here its command line goes to
    compare's own parser and its --server-args to launch_server's, through a stand-in `python`."""
    import os
    import stat
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    check = (
        "import argparse, shlex, sys; from benchmark.compare import parse_args; from nanocp import ServerArgs; "
        "a = parse_args(sys.argv[1:]); p = argparse.ArgumentParser(); ServerArgs.add_cli_args(p); "
        "p.parse_args(['--model-path', a.model_path, *shlex.split(a.server_args)]); print('PARSED', a.server_args)"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "python": f'#!/bin/bash\nexec {sys.executable} -c "{check}" "${{@:3}}"\n',  # drops "-m benchmark.compare"
        "nvidia-smi": "#!/bin/bash\necho 'GPU 0: stand-in'\n",
        "nvidia-cuda-mps-control": f'#!/bin/bash\necho "mps $* $(cat)" >> {tmp_path}/mps.log\n',
    }.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "DP": "2",
           "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    subprocess.run(
        ["bash", "benchmark/gpu/compare_suite.sh", "all"], cwd=root, env=env, check=True, timeout=120
    )
    for mode in ("none", "dynamic", "uniform"):  # "all": one compare run per mode
        log = (out / f"compare_{mode}.log").read_text()
        assert "PARSED --load-format dummy" in log and "--moe-a2a-backend ipc" in log, log
    # DP=2 on one GPU: an MPS daemon started before compare and told to quit after it
    assert (tmp_path / "mps.log").read_text().split("\n")[:2] == ["mps -d ", "mps  quit"]


def test_warm_up_runs_every_step_kind_on_every_instance(moe_model, tmp_path):
    """benchmark.compare's warm-up: before any measured run, each instance has run a prefill
    chunk with a cached prefix, and decode steps (their kernels' first shapes compile there)."""
    import json

    from benchmark.server_runs import server_flags, warm_up
    from nanocp.testing.server import ServerProcess

    trace = tmp_path / "trace.jsonl"
    cmd = server_flags(moe_model, 2, "cpu", 4096, "--step-trace-file", str(trace), chunked_prefill=64)
    with ServerProcess(cmd, log_path=str(tmp_path / "log")) as s:
        warm_up(s.url, dp=2, chunked_prefill=64)
    for rank in range(2):
        steps = [json.loads(line) for line in open(f"{trace}.{rank}")]
        prefill = [st for st in steps if st["mode"] in ("EXTEND", "MIXED")]
        assert any(st["kv_tokens"] > st["num_tokens"] + 64 for st in prefill), (
            f"instance {rank}: no chunk after a prefix"
        )
        assert any(st["mode"] == "DECODE" for st in steps), f"instance {rank}: no decode step"


@needs_triton
def test_foreign_attention_scenario_splits_agree():
    """benchmark.foreign_attention's step (a few foreign queries among W x C mostly empty
    slots): GraphDCP's balanced kernels and the fixed-split one equal one split on the slots that
    hold a query, and empty slots stay empty (interpreter on CPU; the GPU run checks every point)."""
    import torch

    from benchmark.foreign_attention import max_diff, old_splits, scenario

    g, inputs, slots = scenario(2, 4, 3, 200, heads=(4, 2, 16), device="cpu", dtype=torch.float32)
    assert slots == [0, 4, 1] and old_splits(g) == 2
    assert int(g.foreign.n_items) == 6  # 600 keys * 2 heads over 8 programs: 192-key chunks
    assert max_diff(g, inputs, slots) < 1e-5


@needs_triton
def test_decode_attention_longtail_scenario_kernels_agree():
    """benchmark.decode_attention_longtail's batch (one long row among short ones): the balanced
    kernels equal the fixed-split one (interpreter on CPU; the GPU run checks every point)."""
    import torch

    from benchmark.decode_attention_longtail import attend, scenario

    lens, inputs, meta, bd = scenario(3, 300, 40, heads=(4, 2, 16), device="cpu", dtype=torch.float32)
    assert lens == [300, 40, 40] and int(bd.n_items) > 3  # the long row was cut
    (o_b, lse_b), (o_f, lse_f) = (attend(v, inputs, meta, bd) for v in ("balanced", "fixed_splits"))
    torch.testing.assert_close(o_b, o_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_b, lse_f, rtol=1e-5, atol=1e-5)
