"""One simulated instance: its KV pool and its scheduler, as nanocp.scheduler.Scheduler runs them.

FCFS waiting queue; each step the running requests go first (every decode, prefill chunks within
the `chunk` token budget), then waiting requests are admitted by the scheduler's own
new-token-ratio rule (nanocp.scheduler.admission) while the budget and the pool allow; when the
pool cannot hold a step, a running request is retracted by the scheduler's rule (its KV freed,
recomputed later).
Context-parallel requests hold only their home segments here; segments this instance holds for
other homes are reserved whole when the router places them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from benchmark.workloads import Request
from nanocp.scheduler.admission import GROWTH_AHEAD_TOKENS, NewTokenRatio, retraction_victim


@dataclass
class SimRequest:
    req: Request
    rid: int
    home: int = -1
    # (instance, start, end) per placed segment; None: all on the home, grown on demand (static DP)
    segments: list[tuple[int, int, int]] | None = None
    computed: int = 0  # positions run through the model (their KV is held)
    generated: int = 0  # output tokens sampled
    pages: int = 0  # pages held on the home
    growth_asked: bool = False
    growths: int = 0  # tail quotas placed after the first plan
    retractions: int = 0
    placed_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None

    @property
    def arrival(self) -> float:
        return self.req.arrival_s

    @property
    def pending(self) -> int:
        """Tokens still to run before the next sample (the prompt, or the last sampled token)."""
        return self.req.input_len + self.generated - self.computed

    @property
    def remaining_output(self) -> int:
        return self.req.output_len - self.generated

    @property
    def planned_end(self) -> int | None:
        return self.segments[-1][2] if self.segments else None

    @property
    def runnable(self) -> int:
        end = self.planned_end
        return self.pending if end is None else min(self.pending, end - self.computed)

    @property
    def degree(self) -> int:
        return len({s[0] for s in self.segments}) if self.segments else 1

    def future(self, ratio: NewTokenRatio, scheduled: int) -> float:
        """KV it may still need on its home after `scheduled` more tokens (Scheduler._future_tokens:
        a plan's unallocated home positions; without one, the ratio's share of the output)."""
        if self.segments is not None:
            upto = self.computed + scheduled
            return ratio.future_tokens(self.local_tokens(self.planned_end) - self.local_tokens(upto), 0)
        return ratio.future_tokens(self.pending - scheduled, self.remaining_output)

    def local_tokens(self, upto: int) -> int:
        """Positions below `upto` held on the home."""
        if self.segments is None:
            return upto
        return sum(max(0, min(e, upto) - s) for inst, s, e in self.segments if inst == self.home)

    def add_segment(self, inst: int, start: int, end: int) -> None:
        segs = self.segments
        if segs and segs[-1][0] == inst and segs[-1][2] == start:
            segs[-1] = (inst, segs[-1][1], end)
        else:
            segs.append((inst, start, end))
        self.growth_asked = False
        self.growths += 1


@dataclass
class SimInstance:
    index: int
    total_pages: int
    page_size: int
    chunk: int
    max_running: int
    ratio: NewTokenRatio = field(default_factory=NewTokenRatio)
    free_pages: int = 0
    waiting: list[SimRequest] = field(default_factory=list)  # by arrival
    running: list[SimRequest] = field(default_factory=list)  # admission order
    foreign: dict[int, int] = field(default_factory=dict)  # rid -> pages held for another home
    retractions: int = 0
    last_report_s: float = float("-inf")

    def __post_init__(self) -> None:
        self.free_pages = self.total_pages

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def enqueue(self, sr: SimRequest) -> None:
        self.waiting.insert(bisect.bisect([r.arrival for r in self.waiting], sr.arrival), sr)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def pages_needed(self, sr: SimRequest, new_len: int) -> int:
        return max(0, self.pages_for(sr.local_tokens(new_len)) - sr.pages)

    def reserve_foreign(self, sr: SimRequest, start: int, end: int) -> bool:
        """Hold [start, end) of another home's request; own requests are retracted if need be."""
        need = self.pages_for(end - start)
        while self.free_pages < need and self.running:
            self.retract(self.victim())
        if self.free_pages < need:
            return False
        self.free_pages -= need
        self.foreign[sr.rid] = self.foreign.get(sr.rid, 0) + need
        return True

    def release_foreign(self, sr: SimRequest) -> None:
        self.free_pages += self.foreign.pop(sr.rid, 0)

    def release(self, sr: SimRequest) -> None:
        self.free_pages += sr.pages
        sr.pages = 0

    def victim(self) -> SimRequest:
        """The running request to retract (the scheduler's rule: most KV freed per recompute)."""
        return self.running[
            retraction_victim([(sr.computed, sr.local_tokens(sr.computed)) for sr in self.running])
        ]

    def retract(self, victim: SimRequest) -> None:
        self.running.remove(victim)
        self.release(victim)
        victim.computed = 0
        victim.retractions += 1
        self.retractions += 1
        self.enqueue(victim)
        self.ratio.on_retract()

    def schedule(self, now: float, growth_asks: list[SimRequest]) -> list[tuple[SimRequest, int]]:
        """This step's (request, tokens), with their pages allocated (Scheduler._schedule)."""
        budget = self.chunk
        work: list[tuple[SimRequest, int]] = []
        for sr in self.running:
            self._ask_growth(sr, growth_asks)
            n = sr.runnable
            if n <= 0:
                continue  # paused until its growth is placed
            if sr.pending == 1:
                work.append((sr, 1))
            elif budget > 0:
                n = min(n, budget)
                budget -= n
                work.append((sr, n))
        while sum(self.pages_needed(sr, sr.computed + n) for sr, n in work) > self.free_pages:
            if len(self.running) <= 1 and not self.foreign:  # as Scheduler._fit_or_retract
                raise RuntimeError(f"instance {self.index}: its KV cannot hold a single request")
            victim = self.victim()
            self.retract(victim)
            work = [(sr, n) for sr, n in work if sr is not victim]
        for sr, n in work:
            self._allocate(sr, n)
        # what the running requests may still need (Scheduler._can_admit sums it per candidate)
        reserved = sum(r.future(self.ratio, 0) for r in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            sr = self.waiting[0]
            n = min(sr.runnable, budget)
            if n <= 0:
                break
            need = self.pages_needed(sr, sr.computed + n)
            future = sr.future(self.ratio, n) + reserved
            if need > self.free_pages or not self.ratio.fits(need, future, self.page_size, self.free_pages):
                break
            reserved += sr.future(self.ratio, 0)
            self.waiting.pop(0)
            self.running.append(sr)
            if sr.generated and sr.first_token_s is None:  # prefilled elsewhere (disaggregated)
                sr.first_token_s = now
            self._allocate(sr, n)
            work.append((sr, n))
            budget -= n
        return work

    def _allocate(self, sr: SimRequest, n: int) -> None:
        need = self.pages_needed(sr, sr.computed + n)
        self.free_pages -= need
        sr.pages += need

    @staticmethod
    def _ask_growth(sr: SimRequest, asks: list[SimRequest]) -> None:
        end = sr.planned_end
        if end is None or sr.growth_asked or sr.computed < end - GROWTH_AHEAD_TOKENS:
            return
        if sr.req.input_len + sr.req.output_len > end:
            sr.growth_asked = True
            asks.append(sr)
