"""Admission rule of the scheduling loop (core.SchedulerCore; SGLang's "new token ratio"), its
retraction victim and its growth request timing, in plain Python.

A waiting request is admitted when the pages of its first chunk, plus the KV every running
request (and it) may still need, fit in the free pages. "May still need" counts its unprocessed
tokens and a fraction (the ratio) of its remaining output budget: optimistic at first, decaying
each step, reset to 1 after a retraction (which shows the optimism was wrong).
"""

from __future__ import annotations

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
RESERVE_CLIP = 4096  # a request reserves at most this many future output tokens
# A context-parallel request asks for its next tail quota this many tokens before its plan ends,
# so the router's answer usually arrives before the request would have to pause.
GROWTH_AHEAD_TOKENS = 8


class NewTokenRatio:
    def __init__(self, conservativeness: float = 1.0) -> None:
        # --schedule-conservativeness scales the reserve (SGLang's init/min new token ratios)
        self.init = min(INIT_NEW_TOKEN_RATIO * conservativeness, 1.0)
        self.min = min(MIN_NEW_TOKEN_RATIO * conservativeness, 1.0)
        self.value = self.init

    def step(self) -> None:
        self.value = max(self.min, self.value - NEW_TOKEN_RATIO_DECAY)

    def on_retract(self) -> None:
        self.value = 1.0

    def future_tokens(self, pending_after: int, remaining_output: int) -> float:
        """KV tokens a request may still need: its `pending_after` tokens not yet scheduled and
        the ratio's share of its remaining output budget."""
        return pending_after + min(remaining_output, RESERVE_CLIP) * self.value

    @staticmethod
    def fits(new_pages: int, future_tokens: float, page_size: int, free_pages: int) -> bool:
        """The first chunk's pages plus everyone's possible growth (`future_tokens`, summed over
        the running requests and the candidate) fit in the free pages."""
        return new_pages + future_tokens / page_size <= free_pages


def retraction_victim(candidates: list[tuple[int, int]]) -> int:
    """Which running request to retract when the pool cannot hold the step. `candidates`, in
    admission order: (tokens a retraction makes the request recompute, tokens of KV it frees
    here). The victim frees the most KV per token of recompute; among equals (every request held
    whole here: one token per token) the newest. A context-parallel request
    frees only its home's share but recomputes all of it (and stalls its holders' steps), so it
    goes last."""

    def cost(i: int) -> tuple[float, int]:
        recompute, freed = candidates[i]
        return (recompute / freed if freed > 0 else float("inf"), -i)

    return min(range(len(candidates)), key=cost)
