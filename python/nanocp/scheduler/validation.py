"""The checks every generate request passes before it is queued, in plain Python: the HTTP
boundary (the tokenizer process, which needs no torch), the offline engine and the worker (again,
on what it receives) apply these same rules."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from nanocp.errors import InvalidRequestError
from nanocp.sampling.sampling_params import SamplingParams, check_int, short_repr


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the model's bounds and the KV cache's."""

    vocab_size: int
    context_length: int
    max_total_tokens: int  # KV tokens of one instance: a request kept whole on one instance
    has_tokenizer: bool = True
    # KV pooling: the KV tokens one request placed by the DCP planner may span (its policy's
    # capacity() over every instance's pool) and how that comes about; None without CP
    pooled_tokens: int | None = None
    pooled_note: str = ""

    def with_pool(self, cp: dict, instance_tokens: list[int], page: int) -> RequestLimits:
        """These limits for a cluster whose instances hold `instance_tokens` KV tokens each, with
        the context-parallel settings `cp` (ServerArgs.cp_config)."""
        if cp["policy"] == "none" or len(instance_tokens) < 2:
            return self
        from nanocp_router.planner import cp_policy_from

        policy = cp_policy_from(cp)
        return replace(
            self, pooled_tokens=policy.capacity(instance_tokens, page), pooled_note=policy.capacity_note()
        )

    def kv_capacity(self, placed: bool) -> tuple[int, str]:
        """(KV tokens, how they come about) a request may need at most: placed by the planner
        (no data_parallel_rank, CP on), or kept on one instance."""
        if placed and self.pooled_tokens is not None:
            return self.pooled_tokens, self.pooled_note
        return self.max_total_tokens, "one instance's KV cache; raise --max-total-tokens"


def check_token_ids(name: str, ids: Any) -> list[int]:
    if not isinstance(ids, list) or not all(type(t) is int for t in ids):
        bad = ids if not isinstance(ids, list) else next(t for t in ids if type(t) is not int)
        raise InvalidRequestError(name, f"must be a list of integers, got {short_repr(bad)}")
    return ids


def check_generate(
    input_ids: Any,
    sampling_params: Any,
    limits: RequestLimits,
    return_logprob: Any = False,
    top_logprobs_num: Any = 0,
    placed: bool = False,
) -> SamplingParams:
    """The one validator of a generate request, whatever its values' types: the HTTP boundary, the
    offline engine and the worker (again, on what it receives) apply these same rules. Raises
    InvalidRequestError naming the field; returns the parsed sampling parameters. placed: the
    DCP planner places the request, so its KV may span instances (RequestLimits.kv_capacity)."""
    check_token_ids("input_ids", input_ids)
    if sampling_params is not None and not isinstance(sampling_params, dict):
        raise InvalidRequestError("sampling_params", f"must be an object, got {short_repr(sampling_params)}")
    params = SamplingParams.from_dict(sampling_params)
    if params.stop_strs and not limits.has_tokenizer:
        raise InvalidRequestError("stop", "stop strings need a tokenizer (--skip-tokenizer-init is set)")
    params.verify(limits.vocab_size)
    if not isinstance(return_logprob, bool):
        raise InvalidRequestError("return_logprob", f"must be a boolean, got {short_repr(return_logprob)}")
    check_int("top_logprobs_num", top_logprobs_num, 0, limits.vocab_size)
    capacity, note = limits.kv_capacity(placed)
    validate_input(input_ids, params.max_new_tokens, limits.vocab_size, limits.context_length, capacity, note)
    return params


def validate_input(
    input_ids: list[int],
    max_new_tokens: int,
    vocab_size: int,
    context_length: int,
    max_total_tokens: int,
    capacity_note: str,
) -> None:
    """Reject what could never run: empty prompts, unknown token ids, too long for the model or
    for the whole KV cache (such a request would wait forever)."""
    if not input_ids:
        raise InvalidRequestError("input_ids", "the prompt is empty")
    bad = next((t for t in input_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            "input_ids", f"token id {short_repr(bad)} outside the vocabulary [0, {vocab_size})"
        )
    if len(input_ids) >= context_length:
        raise InvalidRequestError(
            "input_ids",
            f"the prompt ({len(input_ids)} tokens) leaves no room for output in the context length {context_length}",
        )
    total = len(input_ids) + max_new_tokens
    if total > context_length:
        raise InvalidRequestError(
            "max_new_tokens",
            f"prompt ({len(input_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the context length {context_length}",
        )
    if total > max_total_tokens:
        raise InvalidRequestError(
            "max_new_tokens",
            f"prompt + max_new_tokens = {total} tokens exceeds the KV cache capacity "
            f"({max_total_tokens} tokens: {capacity_note})",
        )
