"""One simulated instance: the engine's own scheduling loop (nanocp.scheduler.core.SchedulerCore)
over page counts instead of KV tensors.

Context-parallel requests hold only their home's held ranges here; segments this instance holds
for other homes are reserved whole when the router places them (the core's ForeignKV).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.workloads import Request
from nanocp.scheduler.core import SchedulerCore
from nanocp.scheduler.dcp import Placement, held_tokens


@dataclass(eq=False)
class SimRequest:
    req: Request
    rid: int
    home: int = -1
    # where the router placed its positions; None: all on the home, grown on demand (static DP)
    placement: Placement | None = None
    kv_len: int = 0  # positions whose KV is held (scheduled steps included)
    generated: int = 0  # output tokens sampled
    pages: int = 0  # pages held on the home
    growth_asked: bool = False
    growths: int = 0  # tail quotas placed after the first plan
    num_retractions: int = 0
    placed_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None

    @property
    def arrival(self) -> float:
        return self.req.arrival_s

    @property
    def cp_key(self) -> int:
        return self.rid

    @property
    def arrival_s(self) -> float:
        return self.req.arrival_s

    @property
    def num_outputs(self) -> int:
        return self.generated

    @property
    def num_pending(self) -> int:
        """Tokens still to run before the next sample (the prompt, or the last sampled token)."""
        return self.req.input_len + self.generated - self.kv_len

    @property
    def num_runnable(self) -> int:
        if self.placement is None:
            return self.num_pending
        return min(self.num_pending, self.placement.end - self.kv_len)

    @property
    def held_ranges(self) -> list[tuple[int, int]] | None:
        return None if self.placement is None else self.placement.held

    @property
    def total_len(self) -> int:
        return self.req.input_len + self.req.output_len

    @property
    def remaining_output(self) -> int:
        return self.req.output_len - self.generated

    @property
    def degree(self) -> int:
        return len({s[0] for s in self.placement.segments}) if self.placement else 1

    def place(self, placement: Placement, grown: bool = False) -> None:
        self.placement, self.growth_asked = placement, False
        self.growths += grown


class SimPages:
    """An instance's KV pages as counts: the core's KVPages for its own requests and the page
    source of the segments it holds for other homes."""

    def __init__(self, total_pages: int, page_size: int) -> None:
        self.total_pages, self.page_size = total_pages, page_size
        self.num_free_pages = total_pages

    def alloc(self, n: int) -> list[int] | None:
        if n > self.num_free_pages:
            return None
        self.num_free_pages -= n
        return [0] * n

    def free(self, pages: list[int]) -> None:
        self.num_free_pages += len(pages)

    def pages_needed(self, sr: SimRequest, new_len: int) -> int:
        return max(0, -(-held_tokens(sr.held_ranges, new_len) // self.page_size) - sr.pages)

    def extend(self, sr: SimRequest, n: int) -> bool | None:
        need = self.pages_needed(sr, sr.kv_len + n)
        if self.alloc(need) is None:
            return None
        sr.pages += need
        sr.kv_len += n
        return True

    def release(self, sr: SimRequest, cache: bool = True) -> None:
        self.num_free_pages += sr.pages
        sr.pages = sr.kv_len = 0

    # no prefix cache is modelled: the simulated workloads share no prefixes
    def match_prefix(self, sr: SimRequest) -> int:
        return 0

    def unmatch(self, sr: SimRequest) -> None:
        pass


class SimInstance(SchedulerCore):
    def __init__(
        self,
        index: int,
        total_pages: int,
        page_size: int,
        chunk: int,
        max_running: int,
        conservativeness: float = 1.0,
        policy: str = "fcfs",
        ttft_slo_s: float = float("inf"),
        tpot_slo_s: float = float("inf"),
        long_prefill_tokens: int = 0,
    ) -> None:
        pages = SimPages(total_pages, page_size)
        super().__init__(
            pages, pages, chunk, max_running, conservativeness, index, policy, ttft_slo_s, tpot_slo_s,
            long_prefill_tokens,
        )  # fmt: skip
        self.index, self.total_pages, self.page_size = index, total_pages, page_size
        self.now = 0.0
        self.last_report_s = float("-inf")

    @property
    def free_pages(self) -> int:
        return self.kv.num_free_pages

    @property
    def retractions(self) -> int:
        return self.num_retractions

    def step_work(self, now: float) -> list[tuple[SimRequest, int]]:
        """This step's (request, tokens) at time `now`, their pages allocated."""
        self.now = now
        return self.schedule()

    def on_admit(self, sr: SimRequest) -> None:
        if sr.generated and sr.first_token_s is None:  # prefilled elsewhere (disaggregated)
            sr.first_token_s = self.now
