"""A request as the scheduler sees it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from nanocp.sampling.sampling_params import SamplingParams
from nanocp.tokenizer.detokenizer import IncrementalDetokenizer, NullDetokenizer, find_stop_str

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
    detokenizer: IncrementalDetokenizer | NullDetokenizer
    output_ids: list[int] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    finished_reason: dict[str, Any] | None = None
    arrival: int = field(default_factory=lambda: next(_ARRIVAL))
    # KV state (see nanocp.kvcache.manager): tokens of fill_ids already in the cache.
    req_pool_idx: int | None = None
    kv_pages: list[int] = field(default_factory=list)
    kv_len: int = 0
    num_retractions: int = 0
    text: str = ""  # output text so far (stop strings trimmed on finish)

    @property
    def fill_ids(self) -> list[int]:
        """The tokens whose KV the request needs: prompt + all outputs but the last sampled one
        (that one is the next step's input and enters the cache then)."""
        return self.origin_input_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        """Tokens still to be run through the model before the next sample."""
        return len(self.origin_input_ids) + len(self.output_ids) - self.kv_len

    @property
    def finished(self) -> bool:
        return self.status == ReqStatus.FINISHED

    def max_total_len(self) -> int:
        return len(self.origin_input_ids) + self.sampling_params.max_new_tokens

    def append_token(self, token: int) -> str:
        """Record a sampled token, update text and finish state; returns the new text delta."""
        self.output_ids.append(token)
        p = self.sampling_params
        prev_len = len(self.detokenizer.text)
        delta = self.detokenizer.step(self.output_ids)
        n = len(self.output_ids)
        if n >= p.min_new_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                self.finish({"type": "stop", "matched": token})
            elif (
                p.stop_strs and delta and (hit := find_stop_str(self.detokenizer.text, p.stop_strs, prev_len))
            ):
                pos, s = hit
                self.finish({"type": "stop", "matched": s}, trim_at=None if p.no_stop_trim else pos)
        if not self.finished and n >= p.max_new_tokens:
            self.finish({"type": "length", "length": p.max_new_tokens})
        return self._text_delta()

    def finish(self, reason: dict[str, Any], trim_at: int | None = None) -> None:
        if self.finished:
            return
        self.detokenizer.finish(self.output_ids)
        if trim_at is not None:
            self.detokenizer.text = self.detokenizer.text[:trim_at]
        self.status = ReqStatus.FINISHED
        self.finished_reason = reason

    def _text_delta(self) -> str:
        """Newly visible text. While running, a tail that may begin a stop string is held back, so
        streamed text is always a prefix of the final (stop-trimmed) text."""
        text = self.detokenizer.text
        if not self.finished:
            stops = self.sampling_params.stop_strs
            hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        delta, self.text = text[len(self.text) :], text
        return delta
