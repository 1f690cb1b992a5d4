"""Sampling: filters and penalties against transformers' logits processors, seeds, stops, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_pool_free, greedy_params, random_prompts
from nanocp import Engine
from nanocp.layers.sampler import apply_penalties, top_k_top_p_min_p_probs
from nanocp.sampling.sampling_params import SamplingParams, SamplingParamsError


def _hf_probs(logits: torch.Tensor, processor) -> torch.Tensor:
    return torch.softmax(processor(None, logits.clone()), dim=-1)


@pytest.mark.parametrize("seed", range(5))
def test_single_filters_match_transformers(seed):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 300, generator=g) * 3
    ones, none_k = torch.ones(4), torch.full((4,), -1, dtype=torch.int64)
    zeros = torch.zeros(4)
    cases = [
        (
            dict(temperature=torch.full((4,), 0.7), top_k=none_k, top_p=ones, min_p=zeros),
            TemperatureLogitsWarper(0.7),
        ),
        (dict(temperature=ones, top_k=torch.full((4,), 20), top_p=ones, min_p=zeros), TopKLogitsWarper(20)),
        (
            dict(temperature=ones, top_k=none_k, top_p=torch.full((4,), 0.8), min_p=zeros),
            TopPLogitsWarper(0.8),
        ),
        (
            dict(temperature=ones, top_k=none_k, top_p=ones, min_p=torch.full((4,), 0.05)),
            MinPLogitsWarper(0.05),
        ),
    ]
    for kwargs, proc in cases:
        ours = top_k_top_p_min_p_probs(logits, **kwargs)
        torch.testing.assert_close(ours, _hf_probs(logits, proc), rtol=1e-5, atol=1e-7)


def test_combined_filters_keep_the_intersection():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    out = top_k_top_p_min_p_probs(
        logits, torch.ones(1), torch.tensor([4]), torch.tensor([0.9]), torch.tensor([0.1])
    )[0]
    # top_k=4 keeps 0..3; top_p=0.9 keeps tokens whose preceding mass <= 0.9 (0..2 here);
    # min_p keeps p >= 0.1 * p_max (0..2)
    keep = [0, 1, 2]
    assert (probs[:3].cumsum(0)[1] < 0.9) and probs[:3].sum() > 0.9
    torch.testing.assert_close(out[keep], probs[keep] / probs[keep].sum())
    assert out[3:].sum() == 0


class _R:
    def __init__(self, params, prompt, output):
        self.sampling_params, self.origin_input_ids, self.output_ids = params, prompt, output


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    reqs = [
        _R(SamplingParams(repetition_penalty=1.3), [1, 2, 3, 7], [7, 9]),
        _R(SamplingParams(repetition_penalty=0.8), [4], [40, 41, 41]),
    ]
    ours = logits.clone()
    apply_penalties(ours, reqs)
    for i, r in enumerate(reqs):
        proc = RepetitionPenaltyLogitsProcessor(r.sampling_params.repetition_penalty)
        ref = proc(torch.tensor([r.origin_input_ids + r.output_ids]), logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], ref)


def test_frequency_and_presence_penalties():
    logits = torch.zeros(1, 10)
    apply_penalties(
        logits, [_R(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [3, 3], [1, 1, 1, 2])]
    )
    expected = torch.zeros(1, 10)
    expected[0, 1] = -(0.5 * 3 + 0.25)
    expected[0, 2] = -(0.5 * 1 + 0.25)  # prompt tokens (3) are not penalised
    torch.testing.assert_close(logits, expected)


@pytest.fixture(scope="module")
def engine(moe_model):
    with Engine(model_path=moe_model, max_total_tokens=4096, random_seed=3) as eng:
        yield eng


SAMPLED = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95, "ignore_eos": True}


def test_seeded_sampling_is_reproducible_across_batches(engine):
    prompts = random_prompts([12, 30, 7], vocab=500, seed=21)
    alone = engine.generate(input_ids=prompts[0], sampling_params={**SAMPLED, "sampling_seed": 1234})
    # same seed, now batched with other requests in a different position
    batch = engine.generate(
        input_ids=[prompts[1], prompts[0], prompts[2]],
        sampling_params=[{**SAMPLED, "sampling_seed": 7}, {**SAMPLED, "sampling_seed": 1234}, SAMPLED],
    )
    assert batch[1]["output_ids"] == alone["output_ids"]
    other = engine.generate(input_ids=prompts[0], sampling_params={**SAMPLED, "sampling_seed": 99})
    assert other["output_ids"] != alone["output_ids"]
    greedy = engine.generate(input_ids=prompts[0], sampling_params=greedy_params(24))
    assert alone["output_ids"] != greedy["output_ids"], "temperature 1 must actually sample"
    assert_pool_free(engine)


def test_unseeded_sampling_follows_the_server_seed(moe_model):
    prompts = random_prompts([10, 20], vocab=500, seed=5)
    outs = []
    for _ in range(2):
        with Engine(model_path=moe_model, max_total_tokens=1024, random_seed=42) as eng:
            outs.append([r["output_ids"] for r in eng.generate(input_ids=prompts, sampling_params=SAMPLED)])
    assert outs[0] == outs[1]


def test_stop_token_ids_and_eos(engine):
    prompt = random_prompts([20], vocab=500, seed=8)[0]
    full = engine.generate(input_ids=prompt, sampling_params=greedy_params(20))["output_ids"]
    stop_tok = full[5]
    first = full.index(stop_tok)
    res = engine.generate(input_ids=prompt, sampling_params=greedy_params(20, stop_token_ids=[stop_tok]))
    assert res["output_ids"] == full[: first + 1]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    # min_new_tokens masks stop tokens until reached
    res = engine.generate(
        input_ids=prompt, sampling_params=greedy_params(20, stop_token_ids=[full[0]], min_new_tokens=3)
    )
    assert len(res["output_ids"]) >= 3 and full[0] not in res["output_ids"][:3]
    # EOS stops unless ignore_eos
    saved = set(engine.eos_token_ids)
    engine.eos_token_ids.clear()
    engine.eos_token_ids.add(stop_tok)
    try:
        res = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 20, "temperature": 0})
        assert res["output_ids"] == full[: first + 1]
        res = engine.generate(input_ids=prompt, sampling_params=greedy_params(20))
        assert res["output_ids"] == full
    finally:
        engine.eos_token_ids.clear()
        engine.eos_token_ids.update(saved)


def test_stop_strings(engine):
    prompt = random_prompts([15], vocab=500, seed=9)[0]
    full = engine.generate(input_ids=prompt, sampling_params=greedy_params(30))
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "pick a visible stop string"
    cut = text.find(stop)
    res = engine.generate(input_ids=prompt, sampling_params=greedy_params(30, stop=[stop, "\x00never"]))
    assert res["text"] == text[:cut]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert res["output_ids"] == full["output_ids"][: len(res["output_ids"])]
    kept = engine.generate(input_ids=prompt, sampling_params=greedy_params(30, stop=stop, no_stop_trim=True))
    assert kept["text"].startswith(text[:cut] + stop)
    # streamed text never shows the stop string and adds up to the final text
    chunks = list(
        engine.generate(input_ids=prompt, sampling_params=greedy_params(30, stop=stop), stream=True)
    )
    assert "".join(c["text"] for c in chunks) == res["text"]
    assert sum((c["output_ids"] for c in chunks), []) == res["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert_pool_free(engine)


def test_streaming_batch_matches_non_streaming(engine):
    prompts = random_prompts([5, 50, 9], vocab=500, seed=10)
    params = [greedy_params(8), greedy_params(15), {**SAMPLED, "sampling_seed": 5}]
    ref = engine.generate(input_ids=prompts, sampling_params=params)
    text, ids = ["", "", ""], [[], [], []]
    for chunk in engine.generate(input_ids=prompts, sampling_params=params, stream=True):
        text[chunk["index"]] += chunk["text"]
        ids[chunk["index"]] += chunk["output_ids"]
    assert ids == [r["output_ids"] for r in ref]
    assert text == [r["text"] for r in ref]


def test_abandoned_stream_frees_kv(engine):
    stream = engine.generate(input_ids=[5] * 30, sampling_params=greedy_params(50), stream=True)
    next(stream)
    stream.close()
    assert_pool_free(engine)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": "ten"}, "max_new_tokens"),
        ({"min_new_tokens": 200, "max_new_tokens": 10}, "min_new_tokens"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"stop_token_ids": "x"}, "stop_token_ids"),
        ({"n": 2}, "n"),
        ({"sampling_seed": 1.5}, "sampling_seed"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"temprature": 0.5}, "temprature"),
    ],
)
def test_bad_sampling_params_are_rejected(engine, params, field):
    with pytest.raises(SamplingParamsError) as err:
        engine.generate(input_ids=[5, 6, 7], sampling_params=params)
    assert err.value.param == field
    assert field in str(err.value)


def test_bad_batch_submits_nothing(engine):
    with pytest.raises(SamplingParamsError):
        engine.generate(input_ids=[[5, 6], [7, 8]], sampling_params=[{"max_new_tokens": 4}, {"top_p": 2}])
    assert_pool_free(engine)


def test_logprobs_match_transformers(moe_model, engine):
    from transformers import AutoModelForCausalLM

    prompt = random_prompts([9], vocab=500, seed=12)[0]
    res = engine.generate(
        input_ids=prompt, sampling_params=greedy_params(5), return_logprob=True, top_logprobs_num=3
    )
    lps = res["meta_info"]["output_token_logprobs"]
    tops = res["meta_info"]["output_top_logprobs"]
    assert [t for _, t, _ in lps] == res["output_ids"]
    hf = AutoModelForCausalLM.from_pretrained(moe_model, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + res["output_ids"]])).logits[0, len(prompt) - 1 : -1]
    ref = torch.log_softmax(logits, -1)
    for step, ((lp, tok, _), top) in enumerate(zip(lps, tops)):
        assert abs(lp - ref[step, tok].item()) < 1e-4
        vals, ids = ref[step].topk(3)
        assert [t for _, t, _ in top] == ids.tolist()
        assert top[0][1] == tok  # greedy: the chosen token is the most likely one
