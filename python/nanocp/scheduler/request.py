"""A request as the scheduler sees it, and the checks every request passes before it is queued."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from enum import Enum, auto
from typing import Any

import torch

from nanocp.errors import InvalidRequestError
from nanocp.sampling.sampling_params import SamplingParams, check_int, short_repr
from nanocp.scheduler.dcp import Placement
from nanocp.tokenizer.detokenizer import TextStream

_ARRIVAL = itertools.count()


class ReqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator
    eos_token_ids: set[int]
    stream: TextStream
    return_logprob: bool = False
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    output_token_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    finished_reason: dict[str, Any] | None = None
    arrival: int = field(default_factory=lambda: next(_ARRIVAL))
    # KV state (see nanocp.kvcache.manager): tokens of fill_ids already in the cache.
    req_pool_idx: int | None = None
    kv_pages: list[int] = field(default_factory=list)
    kv_len: int = 0
    num_retractions: int = 0
    # Context parallelism (scheduler/dcp.py): where the router placed the request's positions
    # (None: all KV here, unbounded); cp_key names the request to its holders.
    placement: Placement | None = None
    cp_key: int | None = None
    growth_asked: bool = False  # the home asked the router to place the next tail quota

    def set_placement(self, placement: Placement) -> None:
        """Adopt a plan or its growth."""
        self.placement = placement
        self.growth_asked = False

    @property
    def held_ranges(self) -> list[tuple[int, int]] | None:
        """The [start, end) position ranges whose KV is held here (None: all of them)."""
        return None if self.placement is None else self.placement.held

    @property
    def total_len(self) -> int:
        """The most positions it may take: prompt + max_new_tokens."""
        return len(self.origin_input_ids) + self.sampling_params.max_new_tokens

    @property
    def remaining_output(self) -> int:
        return self.sampling_params.max_new_tokens - len(self.output_ids)

    @property
    def num_runnable(self) -> int:
        """Pending tokens that may run now: those inside the placed positions."""
        if self.placement is None:
            return self.num_pending
        return min(self.num_pending, self.placement.end - self.kv_len)

    @property
    def fill_ids(self) -> list[int]:
        """Prompt + outputs. All but the newest output are in the KV cache of a running request;
        the newest is the next step's input."""
        return self.origin_input_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        """Tokens still to be run through the model before the next sample."""
        return len(self.origin_input_ids) + len(self.output_ids) - self.kv_len

    @property
    def finished(self) -> bool:
        return self.status == ReqStatus.FINISHED

    def append_token(self, token: int) -> None:
        """Record a sampled token and decide whether the request is finished."""
        self.output_ids.append(token)
        p = self.sampling_params
        stop_str = self.stream.update(self.output_ids)
        n = len(self.output_ids)
        if n >= p.min_new_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                self.finish({"type": "stop", "matched": token})
            elif stop_str is not None:
                self.finish({"type": "stop", "matched": stop_str})
        if not self.finished and n >= p.max_new_tokens:
            self.finish({"type": "length", "length": p.max_new_tokens})

    def finish(self, reason: dict[str, Any]) -> None:
        if self.finished:
            return
        matched = reason.get("matched")
        self.stream.finish(self.output_ids, matched if isinstance(matched, str) else None)
        self.status = ReqStatus.FINISHED
        self.finished_reason = reason


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


class RequestFactory:
    """Builds Reqs with their sampling generator, EOS ids and text stream (engine and workers)."""

    def __init__(
        self, tokenizer: Any | None, eos_token_ids: set[int], device: torch.device, seed: int
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.device = device
        self._seed_rng = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        rid: str,
        input_ids: list[int],
        params: SamplingParams,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        need_text: bool = True,
    ) -> Req:
        """need_text=False: text is made elsewhere (the detokenizer process); the stream then only
        decodes for requests with stop strings, to detect them."""
        seed = params.sampling_seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        decode = self.tokenizer if (need_text or params.stop_strs) else None
        stream = TextStream(
            decode,
            params.stop_strs,
            params.no_stop_trim,
            params.skip_special_tokens,
            params.spaces_between_special_tokens,
        )
        return Req(
            rid,
            list(input_ids),
            params,
            generator,
            self.eos_token_ids,
            stream,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
        )
