"""The router of a prefill server (--disaggregation-mode prefill): takes prompts from decode
servers on --disaggregation-bootstrap-port, hands each to the prefill instance with the fewest
queued prefill tokens, and sends every decode server that said hello a heartbeat with its load
(nanocp_router.pd is the other side). Clients do not talk to it: its HTTP server refuses
/generate. Plain Python, no torch."""

from __future__ import annotations

import logging
import time
import uuid

import zmq

from nanocp_router.cluster_state import ClusterState
from nanocp_router.ipc import PortArgs, drain, pull, push, send_work
from nanocp_router.messages import (
    PREFILL_ROUTER_INBOX,
    Abort,
    Cluster,
    FlushCache,
    Generate,
    Load,
    Message,
    Output,
    Outputs,
    PrefillAbort,
    PrefillHello,
    PrefillLoad,
    PrefillRequest,
    decoder,
    encode,
)
from nanocp_router.pd import HEARTBEAT_S

logger = logging.getLogger("nanocp.router")


def prefill_rid(decode_id: str, cp_key: int) -> str:
    """A request's id on a prefill server (unique over the decode servers it serves)."""
    return f"{decode_id}/{cp_key}"


class PrefillRouter:
    def __init__(self, ports: PortArgs, dp_size: int, disagg: dict) -> None:
        self.ctx = zmq.Context()
        self.inbox = pull(self.ctx, ports.router)
        self.inbox.bind(f"tcp://*:{disagg['bootstrap_port']}")
        self.decode = decoder(PREFILL_ROUTER_INBOX)
        self.workers = [push(self.ctx, ep, bind=ports.router_binds_workers) for ep in ports.workers]
        self.to_tokenizer = push(self.ctx, ports.tokenizer)
        self.server_id = uuid.uuid4().hex
        self.decoders: dict[str, tuple[PrefillHello, zmq.Socket]] = {}  # decode_id -> hello, reply socket
        self.reported = [0] * dp_size  # each instance's queued prefill tokens, as it last reported
        self.sent = [0] * dp_size  # tokens sent to it since
        self.where: dict[str, int] = {}  # prefill_rid(...) of a request -> its instance
        self._last_beat = 0.0
        self.state = ClusterState.create(dp_size)  # for the HTTP process (/server_info, /metrics)

    def queued(self, inst: int) -> int:
        return self.reported[inst] + self.sent[inst]

    def handle(self, msg: Message) -> None:
        if isinstance(msg, PrefillHello):
            known = self.decoders.get(msg.decode_id)
            if known is None or known[0] != msg:
                if known is not None:
                    known[1].close()
                self.decoders[msg.decode_id] = (msg, push(self.ctx, msg.reply_to))
                logger.info("decode server %s said hello (%d instances)", msg.decode_id[:8], len(msg.agents))
                for w in self.workers:  # before any of its requests (one socket each: in order)
                    w.send(encode(msg))
            self._beat(msg.decode_id)
        elif isinstance(msg, PrefillRequest):
            if msg.decode_id not in self.decoders:
                return  # cannot answer a server that never said hello; it times the request out
            inst = min(range(len(self.workers)), key=lambda i: (self.queued(i), i))
            self.sent[inst] += len(msg.input_ids)
            self.where[prefill_rid(msg.decode_id, msg.cp_key)] = inst
            send_work(self.workers, inst, msg)
        elif isinstance(msg, PrefillAbort):
            inst = self.where.get(prefill_rid(msg.decode_id, msg.cp_key))
            for i in range(len(self.workers)) if inst is None else [inst]:
                self.workers[i].send(encode(msg))
        elif isinstance(msg, Load):
            self.state.on_report(msg)
            self.reported[msg.instance] = msg.committed_tokens
            self.sent[msg.instance] = 0
            for rid, _ in msg.finished:
                self.where.pop(rid, None)
        elif isinstance(msg, Generate):  # the HTTP server refuses these; one that got here anyway
            reason = {"type": "abort", "status_code": 400, "message": "this is a prefill server "
                      "(--disaggregation-mode prefill): send requests to a decode server"}  # fmt: skip
            self.to_tokenizer.send(encode(Outputs([Output.failed(msg.rid, reason, len(msg.input_ids))])))
        elif isinstance(msg, (Abort, FlushCache)):
            pass

    def _beat(self, decode_id: str | None = None) -> None:
        total = sum(self.queued(i) for i in range(len(self.workers)))
        for did, (hello, sock) in self.decoders.items():
            if decode_id is None or did == decode_id:
                sock.send(encode(PrefillLoad(self.server_id, hello.name, total, len(self.workers))))

    def run_forever(self) -> None:
        while True:
            for msg in drain(self.inbox, self.decode, timeout_ms=int(HEARTBEAT_S * 500)):
                try:
                    self.handle(msg)
                except Exception:
                    logger.exception("prefill router: %s message failed", type(msg).__name__)
            now = time.monotonic()
            if now - self._last_beat >= HEARTBEAT_S:
                self._beat()
                self._last_beat = now
                self.to_tokenizer.send(encode(Cluster(self.state.snapshot(), {}, {})))
