"""A prefill instance's side of disaggregation: after every forward, the K/V of the tokens each
request just ran goes to the decode instances that will hold those positions (overlapping the
transfers with the prefill of later chunks); once a request sampled its first token and all of
its transfers completed, its decode server gets PrefillDone.

Invariant: a request's pages are never freed (or reused) while one of its transfers reads them:
the scheduler's before_release hook keeps them here until its transfers are done."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from nanocp.disaggregation.transfer import KVTransfer, dest_slots, slot_runs
from nanocp.kvcache.pool import KVCachePool, PageAllocator
from nanocp.scheduler.request import Req
from nanocp_router.faults import request_fault
from nanocp_router.ipc import push
from nanocp_router.messages import Output, PrefillDone, PrefillHello, PrefillRequest, encode

logger = logging.getLogger("nanocp.worker")


@dataclass
class Outgoing:
    msg: PrefillRequest
    started: float
    in_flight: list[Any] = field(default_factory=list)  # transfer handles
    held_pages: list[int] = field(default_factory=list)  # freed once in_flight is empty
    output: Output | None = None  # its last output (the first token, or its failure)
    error: dict[str, Any] | None = None
    kv_bytes: int = 0


class KVSender:
    def __init__(
        self,
        transfer: KVTransfer,
        pool: KVCachePool,
        table: torch.Tensor,
        allocator: PageAllocator,
        ctx: zmq.Context,
        instance: int,
    ) -> None:
        self.transfer = transfer
        self.table = table  # req_to_token
        self.allocator = allocator
        self.ctx = ctx
        self.instance = instance
        self.bytes_per_token = 2 * sum(b[0].numel() * b.element_size() for b in pool.k_buffer)
        self.peers: dict[tuple[str, int], str] = {}  # (decode_id, decode instance) -> peer name
        self.replies: dict[str, tuple[str, zmq.Socket]] = {}  # decode_id -> (address, socket)
        self.out: dict[str, Outgoing] = {}  # by the request's rid here (prefill_rid)
        self.stats = {"requests": 0, "transfers": 0, "sent_bytes": 0, "kv_bytes": 0, "failed": 0}

    # ---------------------------------------------------------------- setup
    def on_hello(self, msg: PrefillHello) -> None:
        for ep in msg.agents:
            self.peers[(msg.decode_id, ep["instance"])] = self.transfer.add_peer(ep)
        known = self.replies.get(msg.decode_id)
        if known is None or known[0] != msg.reply_to:
            if known is not None:
                known[1].close()
            self.replies[msg.decode_id] = (msg.reply_to, push(self.ctx, msg.reply_to))

    def track(self, rid: str, msg: PrefillRequest) -> None:
        missing = sorted({d.instance for d in msg.dest if (msg.decode_id, d.instance) not in self.peers})
        if missing or msg.decode_id not in self.replies:
            raise RuntimeError(
                f"decode server {msg.decode_id[:8]}: no transfer endpoint of its instances {missing} here"
            )
        self.out[rid] = Outgoing(msg, time.monotonic())

    # ------------------------------------------------------------- per step
    def after_forward(self, work: list[tuple[Req, int]]) -> dict[str, Any]:
        """Write the K/V of this step's tokens (positions [kv_len - n, kv_len) of each request);
        returns what was sent, for the step trace."""
        before = (self.stats["transfers"], self.stats["sent_bytes"])
        t0 = time.monotonic()
        if not work:
            return {}
        if self.table.is_cuda:  # the step's K/V writes must be complete before the NIC reads them
            torch.cuda.current_stream().synchronize()
        for req, n in work:
            o = self.out.get(req.rid)
            if o is None or o.error is not None:
                continue
            try:
                self._send(req, o, req.kv_len - n, req.kv_len)
            except Exception as e:  # this request fails alone
                logger.exception("instance %d: KV transfer of %s failed to start", self.instance, req.rid)
                o.error = {"type": "abort", "status_code": 500, "message": f"KV transfer failed: {e}"}
        return {
            "kv_transfers": self.stats["transfers"] - before[0],
            "kv_sent_bytes": self.stats["sent_bytes"] - before[1],
            "kv_post_s": time.monotonic() - t0,  # starting them (NIXL: posting; torch: the whole copy)
        }

    def _send(self, req: Req, o: Outgoing, lo: int, hi: int) -> None:
        request_fault("transfer", o.msg.rid)  # tests only (envs.fault_inject)
        src = self.table[req.req_pool_idx, lo:hi].tolist()
        ps = self.allocator.page_size
        for d in o.msg.dest:
            a, b = max(lo, d.start), min(hi, d.end)
            if a >= b:
                continue
            dst = dest_slots(d.start, d.end, d.base, d.pages, ps, a, b)
            peer = self.peers[(o.msg.decode_id, d.instance)]
            notice = f"{o.msg.cp_key}:{a}:{b}".encode()
            o.in_flight.append(self.transfer.write(peer, slot_runs(src[a - lo : b - lo], dst), notice))
            o.kv_bytes += (b - a) * self.bytes_per_token
            self.stats["transfers"] += 1
            self.stats["sent_bytes"] += (b - a) * self.bytes_per_token

    def before_release(self, req: Req) -> None:
        """The scheduler frees a request's pages: keep them while its transfers read them."""
        o = self.out.get(req.rid)
        if o is not None and o.in_flight and req.kv_pages:
            o.held_pages += req.kv_pages
            req.kv_pages = []

    def on_outputs(self, outputs: list[Output]) -> None:
        """The worker's outputs (never sent to a detokenizer here): a finished one is the first
        token, or the request's failure."""
        for out in outputs:
            o = self.out.get(out.rid)
            if o is not None and out.finished:
                o.output = out

    def fail(self, rid: str, msg: PrefillRequest, reason: dict[str, Any]) -> None:
        """A request refused before it was queued."""
        o = self.out.setdefault(rid, Outgoing(msg, time.monotonic()))
        o.error = o.error or reason
        o.output = Output.failed(rid, reason)

    def poll(self) -> None:
        """Progress transfers; answer the decode server of every request that is done."""
        for rid, o in list(self.out.items()):
            still = []
            for h in o.in_flight:
                state = self.transfer.poll(h)
                if state == "PROC":
                    still.append(h)
                elif state == "ERR" and o.error is None:
                    o.error = {
                        "type": "abort",
                        "status_code": 500,
                        "message": "KV transfer to the decode server failed",
                    }
            o.in_flight = still
            if still:
                continue
            if o.held_pages:
                self.allocator.free(o.held_pages)
                o.held_pages = []
            if o.output is not None:
                self._answer(o)
                del self.out[rid]

    def _answer(self, o: Outgoing) -> None:
        out = o.output
        reason = o.error
        if reason is None and not out.ids:
            reason = out.reason or {"type": "abort", "status_code": 500, "message": "prefill failed"}
        done = PrefillDone(
            o.msg.cp_key, reason is None, kv_bytes=o.kv_bytes, transfer_s=time.monotonic() - o.started
        )
        if reason is None:
            done.token, done.lp, done.top = out.ids[0], out.lp, out.top
            self.stats["requests"] += 1
        else:
            done.reason = reason
            self.stats["failed"] += 1
        self.stats["kv_bytes"] += o.kv_bytes
        reply = self.replies.get(o.msg.decode_id)
        if reply is not None:
            reply[1].send(encode(done))
