"""A decode instance's side of disaggregation: its pool is a transfer endpoint (KVAgent, once),
each transfer's notice becomes a KVLanded for the router, and a reservation answers with where
its positions' KV goes (KVDest)."""

from __future__ import annotations

import logging

from nanocp.disaggregation.transfer import KVTransfer
from nanocp.scheduler.dcp import ForeignKV, held_spans
from nanocp.scheduler.request import Req
from nanocp_router.messages import KVAgent, KVDest, KVLanded

logger = logging.getLogger("nanocp.worker")


class KVReceiver:
    def __init__(self, transfer: KVTransfer, instance: int) -> None:
        self.transfer = transfer
        self.instance = instance

    def agent(self) -> KVAgent:
        return KVAgent(self.instance, {**self.transfer.endpoint(), "instance": self.instance})

    def landed(self) -> list[KVLanded]:
        out = []
        for notice in self.transfer.notices():
            try:
                key, start, end = (int(x) for x in notice.decode().split(":"))
            except ValueError:
                logger.error(
                    "instance %d: dropped a transfer notice it cannot read: %.80r", self.instance, notice
                )
                continue
            out.append(KVLanded(self.instance, key, start, end))
        return out

    def home_dests(self, req: Req) -> list[KVDest]:
        """Where the prompt positions a landing request holds here go (its pages, allocated)."""
        spans = held_spans(req.held_ranges, 0, len(req.origin_input_ids))
        return [KVDest(self.instance, lo, hi, idx0, list(req.kv_pages)) for lo, hi, idx0 in spans]

    def holder_dests(self, foreign: ForeignKV, key: int, start: int) -> list[KVDest]:
        """Where the positions of another home's request reserved here (the segment at start) go."""
        segs = foreign.segments.get(key, [])
        return [KVDest(self.instance, s.start, s.end, 0, list(s.pages)) for s in segs if s.start == start]
