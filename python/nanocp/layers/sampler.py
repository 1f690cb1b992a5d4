"""Token sampling: penalties, greedy, temperature / top-k / top-p / min-p, per-request seeds.

Each request owns a torch.Generator (seeded from ``sampling_seed``, or from the server seed), so
its samples do not depend on which other requests share the batch.
"""

from __future__ import annotations

from typing import Protocol

import torch

from nanocp.sampling.sampling_params import SamplingParams


class SamplingReq(Protocol):
    sampling_params: SamplingParams
    origin_input_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator
    eos_token_ids: set[int]


def apply_penalties(logits: torch.Tensor, reqs: list[SamplingReq]) -> None:
    """In place. Frequency/presence penalise output tokens (OpenAI); repetition penalises
    prompt and output tokens (CTRL / HF: divide positive logits, multiply negative ones)."""
    vocab = logits.shape[-1]
    for i, req in enumerate(reqs):
        p = req.sampling_params
        if not p.has_penalties:
            continue
        row = logits[i]
        if (p.frequency_penalty or p.presence_penalty) and req.output_ids:
            out = torch.tensor(req.output_ids, device=row.device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(req.origin_input_ids) | set(req.output_ids)), device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)


def _mask_early_stops(logits: torch.Tensor, reqs: list[SamplingReq]) -> None:
    """Below min_new_tokens, stop tokens cannot be chosen."""
    for i, req in enumerate(reqs):
        p = req.sampling_params
        if len(req.output_ids) < p.min_new_tokens:
            stops = set(p.stop_token_ids or []) | (set() if p.ignore_eos else req.eos_token_ids)
            if stops:
                logits[i, sorted(stops)] = float("-inf")


def top_k_top_p_min_p_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Probabilities after temperature and the three truncations (rows renormalised)."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[-1]
    rank = torch.arange(vocab, device=probs.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = rank >= k
    # top-p: drop a token once the mass strictly before it exceeds top_p (SGLang semantics;
    # top-k, top-p and min-p all look at the untruncated distribution; the top token always stays)
    drop |= (sorted_probs.cumsum(-1) - sorted_probs) > top_p[:, None]
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(-1, keepdim=True)


class Sampler:
    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, reqs: list[SamplingReq]
    ) -> tuple[list[int], list[tuple[float, list[tuple[float, int]]] | None]]:
        """Returns the next token of every row, and for rows whose request asked for logprobs,
        (logprob of the chosen token, top-n (logprob, id) pairs) under the model's raw logits."""
        logits = logits.float()
        want_lp = [i for i, r in enumerate(reqs) if getattr(r, "return_logprob", False)]
        raw_logprobs = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        logits = logits.clone()
        apply_penalties(logits, reqs)
        _mask_early_stops(logits, reqs)
        next_ids = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(reqs) if not r.sampling_params.is_greedy]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            params = [reqs[i].sampling_params for i in sampled]

            def col(name: str, dtype: torch.dtype) -> torch.Tensor:
                return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=logits.device)

            probs = top_k_top_p_min_p_probs(
                logits[idx],
                col("temperature", torch.float32),
                col("top_k", torch.int64),
                col("top_p", torch.float32),
                col("min_p", torch.float32),
            )
            for row, i in enumerate(sampled):
                next_ids[i] = torch.multinomial(probs[row], 1, generator=reqs[i].generator)[0]
        ids = next_ids.tolist()
        logprobs: list = [None] * len(reqs)
        for row, i in enumerate(want_lp):
            lp = raw_logprobs[row]
            top: list[tuple[float, int]] = []
            if reqs[i].top_logprobs_num:
                vals, top_ids = lp.topk(reqs[i].top_logprobs_num)
                top = list(zip(vals.tolist(), top_ids.tolist()))
            logprobs[i] = (float(lp[ids[i]]), top)
        return ids, logprobs
