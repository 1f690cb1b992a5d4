"""A request as the scheduler sees it (the checks it passes first: scheduler/validation.py)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from nanocp.sampling.sampling_params import SamplingParams
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
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None  # when its first output token was sampled (monotonic)
    # KV state (see nanocp.kvcache.manager): tokens of fill_ids already in the cache.
    req_pool_idx: int | None = None
    kv_pages: list[int] = field(default_factory=list)
    kv_len: int = 0
    num_retractions: int = 0
    # prefix cache (kvcache.manager): the tree node its cached prefix ends at, the positions that
    # are the tree's pages, the most positions it computed before (retracted) and the prompt
    # tokens it found cached (usage's cached_tokens)
    cache_node: Any = None
    cached_len: int = 0
    computed_len: int = 0
    cached_tokens: int = 0
    skipped_len: int = 0  # positions the admission skipped (cached), until it is counted
    cached_prefix: int = 0  # reusing DCP segments in place: [0, cached_prefix) cached on holders
    cache_root: Any = None
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
    def num_outputs(self) -> int:
        return len(self.output_ids)

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
