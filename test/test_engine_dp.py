"""nanocp.Engine with dp_size > 1: the server's process graph driven in-process (engine.cluster).
Greedy tokens identical to HF's (fp32) at dp=2 and dp=4 with dynamic CP, long prompts sharded;
batch, streaming, validation, a dead instance and shutdown as the server's."""

from __future__ import annotations

import os
import time

import pytest

from conftest import greedy_params, random_prompts
from nanocp import Engine
from nanocp.errors import InvalidRequestError
from nanocp.server.tokenizer_manager import EngineError


@pytest.mark.parametrize("dp", [2, 4])
def test_engine_dp_dynamic_cp_matches_hf(dp, moe_model, hf_oracle):
    oracle = hf_oracle(moe_model)
    prompts = random_prompts([20, 600, 45, 700][:dp], vocab=500, seed=90 + dp)
    kwargs = dict(model_path=moe_model, device="cpu", dp_size=dp, ep_size=dp, cp_policy="dynamic",
                  max_total_tokens=512, chunked_prefill_size=128, cp_min_shard_tokens=64)  # fmt: skip
    with Engine(**kwargs) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=greedy_params(12))
        assert [o["output_ids"] for o in outs] == [oracle.greedy(p, 12) for p in prompts]
        assert max(o["meta_info"]["cp_degree"] for o in outs) >= 2  # the long ones were sharded
        one = engine.generate(input_ids=prompts[0], sampling_params=greedy_params(5))
        assert one["output_ids"] == oracle.greedy(prompts[0], 5)
        if dp == 2:  # streaming: chunks per request, reassembled
            got: dict[int, list[int]] = {}
            for chunk in engine.generate(input_ids=prompts, sampling_params=greedy_params(6), stream=True):
                got.setdefault(chunk["index"], []).extend(chunk["output_ids"])
            assert [got[i] for i in range(len(prompts))] == [oracle.greedy(p, 6) for p in prompts]
            with pytest.raises(InvalidRequestError, match="max_new_tokens"):  # pooled KV: 2 x 512
                engine.generate(input_ids=prompts[1], sampling_params={"max_new_tokens": 1000})
            pids = [p.pid for p in engine._cluster.procs.procs.values()]
            engine._cluster.procs.procs["instance 1"].kill()  # a dead instance fails requests, no hang
            deadline = time.monotonic() + 10
            while engine._cluster.manager.dead is None and time.monotonic() < deadline:
                time.sleep(0.1)
            with pytest.raises(EngineError, match="instance 1"):
                engine.generate(input_ids=prompts[0], sampling_params=greedy_params(5))
    if dp == 2:  # shutdown stops every process
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
