"""Dynamic context parallelism end to end (CPU, gloo): sharded KV and attention across instances
give the tokens of HF transformers and of the unsharded engine, for every degree, uniform and
dynamic policies, mixed short/long batches with chunked prefill, page sizes 1 and 16; every
instance's KV pool is free afterwards."""

from __future__ import annotations

import httpx
import pytest
from test_dp_ep import _post_all
from test_server import wait_idle

from conftest import BackgroundRequest, greedy_params, needs_triton, random_prompts
from nanocp.testing.server import ServerProcess

LONG = [300, 180, 257]
SHORT = [1, 5, 17, 40, 64, 9]
NEW = 10


def dcp_server_args(model: str, dp: int, page: int, *flags: str) -> list[str]:
    return [
        "--model-path",
        model,
        "--dp-size",
        str(dp),
        "--ep-size",
        str(dp),
        "--device",
        "cpu",
        "--max-total-tokens",
        "4096",
        "--chunked-prefill-size",
        "64",
        "--page-size",
        str(page),
        *flags,
    ]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LONG + SHORT, vocab=500, seed=43)


@pytest.fixture(scope="module")
def expected(moe_model, prompts, hf_oracle):
    return [hf_oracle(moe_model).greedy(p, NEW) for p in prompts]


CASES = [
    (2, ["--cp-policy", "uniform", "--cp-size", "2"], 1),
    (2, ["--cp-policy", "dynamic", "--cp-min-shard-tokens", "64"], 16),
    (4, ["--cp-policy", "uniform", "--cp-size", "4"], 16),
    (4, ["--cp-policy", "uniform", "--cp-size", "3"], 1),
    (4, ["--cp-policy", "dynamic", "--cp-min-shard-tokens", "32", "--cp-max-degree", "4"], 1),
]


@pytest.mark.parametrize("dp, flags, page", CASES, ids=[f"dp{d}-{f[1]}-{f[3]}-page{p}" for d, f, p in CASES])
def test_dcp_matches_transformers(moe_model, prompts, expected, tmp_path, dp, flags, page):
    args = dcp_server_args(moe_model, dp, page, *flags)
    with ServerProcess(args, log_path=str(tmp_path / "log")) as s:
        assert _post_all(s.url, prompts, [None] * len(prompts)) == expected
        with httpx.Client(base_url=s.url, timeout=30) as c:
            cluster = wait_idle(c)
            assert all(i["free_pages"] == i["total_pages"] for i in cluster)
            degrees = {int(k): v for k, v in c.get("/server_info").json()["cp_degrees"].items()}
    assert sum(degrees.values()) == len(prompts)
    assert max(degrees) > 1, f"nothing was sharded: {degrees}"
    if flags[1] == "uniform":
        assert max(degrees) == int(flags[3])


def test_meta_info_reports_placement_and_abort_frees_segments(moe_model, tmp_path):
    import time

    args = dcp_server_args(moe_model, 2, 16, "--cp-policy", "uniform", "--cp-size", "2")
    with (
        ServerProcess(args, log_path=str(tmp_path / "log")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        res = c.post("/generate", json={"input_ids": [7] * 200, "sampling_params": greedy_params(8)}).json()
        meta = res["meta_info"]
        assert meta["cp_degree"] == 2
        assert sum(tokens for _, tokens in meta["placement"]) == 208
        assert len({inst for inst, _ in meta["placement"]}) == 2
        # a sharded request aborted mid-decode frees its segments on every instance
        req = BackgroundRequest(
            s.url, {"input_ids": [9] * 300, "sampling_params": greedy_params(3000), "rid": "long-sharded"}
        )
        time.sleep(2.0)
        c.post("/abort_request", json={"rid": "long-sharded"})
        assert req.result().json()["meta_info"]["finish_reason"]["type"] == "abort"
        wait_idle(c)


@pytest.mark.parametrize("page", [1, 16])
def test_request_growing_10x_its_prompt_is_replanned_and_stays_balanced(moe_model, hf_oracle, tmp_path, page):
    """A 40-token prompt generating 400 tokens: its plan covers the prompt plus a 32-token tail
    quota; each further quota is placed by the router (on the home while it is below the water
    level, else elsewhere). Tokens equal HF's, KV ends up spread over both instances, and every
    segment (planned or grown) is freed."""
    prompt, short = random_prompts([40, 12], vocab=500, seed=7)
    new = 400
    expected = [hf_oracle(moe_model).greedy(prompt, new), hf_oracle(moe_model).greedy(short, 20)]
    flags = ["--cp-policy", "dynamic", "--cp-min-shard-tokens", "32"]
    with ServerProcess(dcp_server_args(moe_model, 2, page, *flags), log_path=str(tmp_path / "log")) as s:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            long_req = BackgroundRequest(
                s.url, {"input_ids": prompt, "sampling_params": greedy_params(new)}, timeout=120
            )
            res_short = c.post("/generate", json={"input_ids": short, "sampling_params": greedy_params(20)})
            res = long_req.result(timeout=120).json()
            assert [res["output_ids"], res_short.json()["output_ids"]] == expected
            meta = res["meta_info"]
            per_inst = {0: 0, 1: 0}
            for inst, tokens in meta["placement"]:
                per_inst[inst] += tokens
            assert sum(per_inst.values()) == len(prompt) + new
            assert meta["cp_degree"] == 2 and len(meta["placement"]) >= 4, meta["placement"]
            # growth keeps the request's KV near even over the two instances
            assert min(per_inst.values()) >= 0.35 * (len(prompt) + new), per_inst
            cluster = wait_idle(c)
            assert all(i["free_pages"] == i["total_pages"] for i in cluster)
            info = c.get("/server_info").json()
            assert info["cp_growth_segments"]["moved"] >= 3, info["cp_growth_segments"]
            assert "nanocp:cp_growth_segments" in c.get("/metrics").text


def test_foreign_sequence_stops_at_the_queries_last_position():
    """A holder attends received queries only over the reserved positions they can see: the
    positions at or beyond the step's last query are not written yet (they would only be masked)."""
    import torch

    from nanocp.distributed.dcp import foreign_sequence, foreign_slots
    from nanocp.kvcache.pool import PageAllocator
    from nanocp.scheduler.dcp import ForeignKV

    fk, cpu = ForeignKV(PageAllocator(32, 16)), torch.device("cpu")
    assert fk.reserve(7, 0, 40) and fk.reserve(7, 100, 140)
    slots, pos = foreign_sequence(fk, 7, 120, cpu)
    assert pos.tolist() == [*range(40), *range(100, 120)]
    assert torch.equal(slots, foreign_slots(fk, 7, pos.tolist(), cpu))
    assert foreign_sequence(fk, 7, 10, cpu)[1].tolist() == list(range(10))
    assert foreign_sequence(fk, 7, 1000, cpu)[1].tolist() == [*range(40), *range(100, 140)]
    with pytest.raises(RuntimeError, match="not reserved"):
        foreign_slots(fk, 7, [50], cpu)
    fk.release(7)
    assert fk.allocator.num_free_pages == 32


@needs_triton
def test_foreign_attention_of_a_decode_step_is_balanced_and_exact():
    """An eager step's foreign attention for decode queries (one per sequence) runs BalancedDecode,
    planned once per step (EagerDCP.begin) and reused by every layer; it equals the torch
    reference (Triton's interpreter on CPU; the CPU servers take the reference itself)."""
    import math

    import torch

    from nanocp.distributed.dcp import DCPPlan, EagerDCP
    from nanocp_kernels.reference import paged_attention_ref

    g = torch.Generator().manual_seed(5)
    hq, hkv, d, slots = 4, 2, 16, 600
    lens = [500, 0, 30]  # a long shard, a query whose keys are all on other holders, a short one
    kv_indptr = [0, *torch.tensor(lens).cumsum(0).tolist()]
    kv_idx = torch.randperm(slots, generator=g)[: sum(lens)]
    kv_pos = torch.cat([torch.arange(n) for n in lens])
    q_pos = torch.tensor([520, 3, 29])  # the short one's last key is its own query's: visible
    e = torch.empty(0, dtype=torch.int64)
    st = DCPPlan(e, [], [], e, e, [], [], list(range(len(lens) + 1)), kv_indptr, kv_idx, q_pos, kv_pos)
    k_buf, v_buf = (torch.randn(slots, hkv, d, generator=g) for _ in range(2))
    scale = 1 / math.sqrt(d)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    executor = EagerDCP(None, hq, hkv, d, torch.device(dev), kernels=True)
    executor.begin(st)
    for _layer in range(2):  # the plan of the first layer serves the second
        q = torch.randn(len(lens), hq, d, generator=g)
        o, lse = executor.foreign_attention(q.to(dev), k_buf.to(dev), v_buf.to(dev), scale)
        ref_o, ref_lse = paged_attention_ref(
            q, k_buf, v_buf, st.f_qo_indptr, kv_indptr, kv_idx, q_pos, kv_pos, scale
        )
        torch.testing.assert_close(o.cpu(), ref_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-5, atol=1e-5)
        balanced = executor.balanced
        assert balanced is not None and int(balanced.n_items) > 2  # the 500-key shard was cut
