"""KV transfer between a prefill instance's pool and a decode instance's pool, behind one
interface (--disaggregation-transfer-backend; the names are in nanocp.registries).

A transfer writes runs of slots (every layer's K and V rows of those slots) into a peer's pool
and ends with a notice to the peer: the peer sees the notice only after the data (the backend
guarantees it), so a notice means "these positions have landed"."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from nanocp.kvcache.pool import KVCachePool

Run = tuple[int, int, int]  # (first source slot, first destination slot, slots)


def slot_runs(src: list[int], dst: list[int]) -> list[Run]:
    """Pairs of slots grouped into runs contiguous on both sides."""
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [(s, d, n) for s, d, n in runs]


def dest_slots(
    start: int, end: int, base: int, pages: list[int], page_size: int, lo: int, hi: int
) -> list[int]:
    """The destination slots of positions [lo, hi) within a KVDest [start, end) (messages.KVDest)."""
    assert start <= lo <= hi <= end, (start, end, lo, hi)
    out = []
    for p in range(lo, hi):
        i = base + p - start
        out.append(pages[i // page_size] * page_size + i % page_size)
    return out


def pool_layout(pool: KVCachePool) -> dict[str, Any]:
    """What must match between the two sides of a transfer."""
    k = pool.k_buffer[0]
    return {"layers": len(pool.k_buffer), "heads": k.shape[1], "head_dim": k.shape[2], "dtype": str(k.dtype)}


class KVTransfer(ABC):
    """One instance's side. Every call comes from the worker's loop (one thread)."""

    name: str = ""
    mem_types: tuple[str, ...] = ()  # "cpu", "cuda": where its pools may live

    def __init__(self, agent_name: str, pool: KVCachePool) -> None:
        self.agent_name = agent_name
        self.pool = pool
        self.layout = pool_layout(pool)

    @classmethod
    def available(cls) -> bool:
        return True

    @abstractmethod
    def endpoint(self) -> dict[str, Any]:
        """What a peer needs to write into this pool (JSON-encodable; includes the layout)."""

    @abstractmethod
    def add_peer(self, endpoint: dict[str, Any]) -> str:
        """Learn a peer's endpoint (its name is returned); raises if its layout differs."""

    @abstractmethod
    def write(self, peer: str, runs: list[Run], notice: bytes) -> Any:
        """Start writing the runs into the peer's pool; the notice follows the data. Returns a
        handle for poll()."""

    @abstractmethod
    def poll(self, handle: Any) -> str:
        """ "DONE", "PROC" (in flight) or "ERR"; a handle is released once DONE or ERR."""

    @abstractmethod
    def notices(self) -> list[bytes]:
        """Notices of transfers into this pool that landed since the last call."""

    def check_layout(self, endpoint: dict[str, Any]) -> None:
        theirs = endpoint.get("layout")
        if theirs != self.layout:
            raise ValueError(
                f"KV layout of {endpoint.get('agent')} ({theirs}) differs from this instance's "
                f"({self.layout}): the prefill and decode servers must run the same model and --dtype"
            )
