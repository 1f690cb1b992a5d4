"""Prefill/decode disaggregation, the decode server's router side (--disaggregation-mode decode).

A request's life here, by its cp_key:
  1. reserve: the router planned its placement (home, segments); the home allocates the prompt's
     KV at once (Generate with kv_from_prefill) and every holder reserves its segment
     (Reserve with want_dest); each answers Reserved with where the KV goes (KVDest pages).
  2. prefill: the least-loaded live prefill server gets the prompt and the destinations
     (PrefillRequest); its worker writes each step's K/V straight into them, each transfer
     followed by a notice that the receiving instance reports (KVLanded).
  3. start: once the prefill server answered (PrefillDone, with the first token) and every
     destination is covered by landed notices, the home starts decoding (KVReady). From here
     on the request is a placed request like any other (the router frees its holders when the
     home reports it finished).
A failure (prefill error, dead or silent prefill server, timeout, abort) fails the request with
5xx (or as aborted): the home fails it (KVFailed) and the holders free their segments
(Release), but only once the prefill side can no longer write into those pages (its
PrefillDone came, or the server is dead). Plain Python, no torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from nanocp_router.ipc import push
from nanocp_router.messages import (
    Generate,
    KVAgent,
    KVDest,
    KVFailed,
    KVLanded,
    KVReady,
    PrefillAbort,
    PrefillDone,
    PrefillHello,
    PrefillLoad,
    PrefillRequest,
    Release,
    Reserve,
    Reserved,
    encode,
)
from nanocp_router.planner import Plan

logger = logging.getLogger("nanocp.router")
HEARTBEAT_S = 0.5  # a prefill server's PrefillLoad to every decode server that said hello
SERVER_TIMEOUT_S = 5.0  # no heartbeat for this long: the prefill server is down
HELLO_RETRY_S = 1.0  # hello again to a server that is not (or no longer) sending heartbeats


class RouterSide(Protocol):
    """What DisaggDecode uses of the decode server's router (nanocp_router.router.Router)."""

    ctx: Any
    workers: list[Any]
    queue: list[Generate]

    def send(self, inst: int, msg: Any) -> None: ...
    def send_work(self, inst: int, msg: Any) -> None: ...
    def abort_output(self, req: Generate, reason: dict | None = None) -> None: ...
    def start_on_home(self, req: Generate, key: int, plan: Plan, first: KVReady | None = None) -> None: ...


@dataclass
class PrefillServer:
    url: str
    inbox: str
    sock: Any
    server_id: str | None = None
    last_seen: float | None = None  # of its latest heartbeat (None: never heard of)
    last_hello: float = 0.0
    queued_tokens: int = 0  # its latest report, plus what was sent to it since
    in_flight: set[int] = field(default_factory=set)  # cp_keys of requests it prefills

    def up(self, now: float) -> bool:
        return self.last_seen is not None and now - self.last_seen < SERVER_TIMEOUT_S


@dataclass
class Transfer:
    """A request between planning and its start on the home (module docstring)."""

    msg: Generate
    key: int
    plan: Plan
    waiting: set[int]  # instances that have not answered Reserved yet
    since: float
    dests: list[KVDest] = field(default_factory=list)
    ok: bool = True
    refused: bool = False  # the home refused the request (it answered the client itself)
    server: PrefillServer | None = None
    sent_s: float = 0.0
    landed: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    done: PrefillDone | None = None
    failure: dict[str, Any] | None = None  # fail with this once the prefill side is quiet
    abort_sent_s: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.msg.input_ids)

    def covered(self) -> bool:
        """Every destination range is covered by landed notices."""
        for d in self.dests:
            got = sorted(self.landed.get(d.instance, []))
            at = d.start
            for s, e in got:
                if s <= at < e:
                    at = e
            if at < d.end:
                return False
        return True


class DisaggDecode:
    """The decode router's prefill servers and the requests between them and the instances."""

    def __init__(self, router: RouterSide, config: dict[str, Any]) -> None:
        self.router = router
        self.decode_id: str = config["decode_id"]
        self.reply_to: str = config["reply_to"]
        self.timeout_s: float = config.get("timeout_s", 600.0)
        self.servers = [
            PrefillServer(s["url"], s["inbox"], push(router.ctx, s["inbox"])) for s in config["servers"]
        ]
        self.agents: dict[int, dict[str, Any]] = {}  # decode instance -> its transfer endpoint
        self.transfers: dict[int, Transfer] = {}
        self.paused = False  # a reservation failed for lack of room: wait for the next load report
        self.stats: dict[str, float] = {
            "requests": 0, "failed": 0, "kv_bytes": 0, "transfer_s": 0.0, "kv_wait_s": 0.0,
        }  # fmt: skip

    # ------------------------------------------------------------------ servers
    def on_agent(self, msg: KVAgent) -> None:
        self.agents[msg.instance] = msg.meta
        if len(self.agents) == len(self.router.workers):
            logger.info("disaggregation: every decode instance's KV endpoint is known")

    def on_heartbeat(self, msg: PrefillLoad, now: float) -> None:
        server = next((s for s in self.servers if s.url == msg.name), None)
        if server is None:
            return
        if server.server_id != msg.server:  # its first heartbeat, or one from a restarted server
            if server.server_id is not None:
                self._server_lost(server, "restarted")
            server.server_id = msg.server
            logger.info("prefill server %s up (%d instances)", server.url, msg.instances)
        server.last_seen = now
        server.queued_tokens = msg.queued_tokens

    def live(self, now: float) -> list[PrefillServer]:
        return [s for s in self.servers if s.up(now)]

    def unavailable(self, now: float) -> str | None:
        """Why no request can start now (None: one can)."""
        if len(self.agents) < len(self.router.workers):
            return "the decode instances' KV endpoints are not all known yet"
        if not self.live(now):
            urls = ", ".join(s.url for s in self.servers)
            return f"no prefill server is reachable ({urls}: no heartbeat for {SERVER_TIMEOUT_S:.0f} s)"
        return None

    def tick(self, now: float) -> None:
        """Hello to servers that are not up, notice lost ones, time out stuck requests."""
        if len(self.agents) == len(self.router.workers):
            for s in self.servers:
                if not s.up(now) and now - s.last_hello >= HELLO_RETRY_S:
                    if s.last_seen is not None:  # it was up: lost
                        self._server_lost(s, f"no heartbeat for {now - s.last_seen:.1f} s")
                        s.last_seen = None
                    s.last_hello = now
                    agents = [self.agents[i] for i in sorted(self.agents)]
                    s.sock.send(encode(PrefillHello(self.decode_id, self.reply_to, agents, s.url)))
        for t in list(self.transfers.values()):
            if t.server is None or t.done is not None:
                continue
            if t.failure is None and now - t.sent_s > self.timeout_s:
                reason = f"prefill and KV transfer took longer than {self.timeout_s:.0f} s (NANOCP_DISAGGREGATION_TIMEOUT_S)"
                self._stop(t, {"type": "abort", "status_code": 504, "message": reason})
            elif t.abort_sent_s is not None and now - t.abort_sent_s > SERVER_TIMEOUT_S:
                logger.warning(
                    "request %s: prefill server %s never confirmed the abort", t.msg.rid, t.server.url
                )
                self._finish_failed(t)

    def _server_lost(self, server: PrefillServer, why: str) -> None:
        """Its requests fail (it can no longer write into their pages)."""
        logger.error(
            "prefill server %s lost (%s): failing its %d requests", server.url, why, len(server.in_flight)
        )
        message = f"prefill server {server.url} was lost ({why})"
        for key in list(server.in_flight):
            t = self.transfers.get(key)
            if t is not None:
                t.failure = t.failure or {"type": "abort", "status_code": 503, "message": message}
                self._finish_failed(t)
        server.in_flight.clear()
        server.server_id = None

    # ------------------------------------------------------------------ requests
    def start(self, msg: Generate, key: int, plan: Plan) -> None:
        """Step 1: the home allocates the prompt's KV, the holders reserve their segments."""
        holders = [s for s in plan.segments if s.instance != plan.home]
        t = Transfer(msg, key, plan, {plan.home} | {s.instance for s in holders}, time.monotonic())
        self.transfers[key] = t
        placement = [[s.instance, s.start, s.end] for s in plan.segments]
        home_msg = Generate(
            msg.rid, msg.input_ids, msg.sampling_params, msg.return_logprob, msg.top_logprobs_num,
            placement=placement, cp_key=key, kv_from_prefill=True,
        )  # fmt: skip
        self.router.send_work(plan.home, home_msg)
        for s in holders:
            self.router.send(s.instance, Reserve(key, s.start, s.end, want_dest=True))

    def on_reserved(self, msg: Reserved, now: float) -> None:
        t = self.transfers[msg.cp_key]
        t.waiting.discard(msg.instance)
        t.ok &= msg.ok
        t.refused |= msg.refused
        t.dests += msg.dest or []
        if t.waiting:
            return
        if t.failure is not None or not t.ok:
            self._release(t, home=not t.refused)
            del self.transfers[t.key]
            if t.failure is not None:  # aborted meanwhile
                self.router.abort_output(t.msg, t.failure)
            elif not t.refused:  # no room after all: plan again after the next load report
                self.router.queue.insert(0, t.msg)
                self.paused = True
            return
        self._send_prefill(t, now)

    def _send_prefill(self, t: Transfer, now: float) -> None:
        """Step 2: the prompt and its destinations to the least-loaded live prefill server."""
        live = self.live(now)
        if not live:
            t.failure = {"type": "abort", "status_code": 503, "message": self.unavailable(now)}
            self._finish_failed(t)
            return
        server = min(live, key=lambda s: (s.queued_tokens, len(s.in_flight)))
        L = t.prompt_len
        dests = [KVDest(d.instance, d.start, min(d.end, L), d.base, d.pages) for d in t.dests if d.start < L]
        t.dests, t.server, t.sent_s = dests, server, now
        server.in_flight.add(t.key)
        server.queued_tokens += L
        m = t.msg
        req = PrefillRequest(
            m.rid,
            t.key,
            self.decode_id,
            m.input_ids,
            m.sampling_params,
            dests,
            m.return_logprob,
            m.top_logprobs_num,
        )
        server.sock.send(encode(req))

    def on_landed(self, msg: KVLanded) -> None:
        t = self.transfers.get(msg.cp_key)
        if t is not None:
            t.landed.setdefault(msg.instance, []).append((msg.start, msg.end))
            self._maybe_start(t)

    def on_done(self, msg: PrefillDone) -> None:
        t = self.transfers.get(msg.cp_key)
        if t is None:
            return
        t.done = msg
        if t.server is not None:
            t.server.in_flight.discard(t.key)
        self.stats["kv_bytes"] += msg.kv_bytes
        self.stats["transfer_s"] += msg.transfer_s
        if not msg.ok and t.failure is None:
            t.failure = msg.reason or {"type": "abort", "status_code": 500, "message": "prefill failed"}
        self._maybe_start(t)

    def _maybe_start(self, t: Transfer) -> None:
        """Step 3, or the failure once the prefill side is quiet."""
        if t.done is None:
            return
        if t.failure is not None:
            self._finish_failed(t)
            return
        if not t.covered():
            return
        del self.transfers[t.key]
        wait = time.monotonic() - t.since
        self.stats["requests"] += 1
        self.stats["kv_wait_s"] += wait
        d = t.done
        logger.debug(
            "request %s: KV of %d tokens landed %.0f ms after planning", t.msg.rid, t.prompt_len, 1e3 * wait
        )
        self.router.start_on_home(t.msg, t.key, t.plan, KVReady(t.msg.rid, t.key, d.token, d.lp, d.top))

    def on_abort(self, rid: str) -> bool:
        """A client abort of a request here (False: not one of ours)."""
        t = next((t for t in self.transfers.values() if t.msg.rid == rid), None)
        if t is None:
            return False
        self._stop(t, {"type": "abort", "message": "aborted by request"})
        return True

    def _stop(self, t: Transfer, reason: dict[str, Any]) -> None:
        """Fail the request with `reason` as soon as the prefill side is quiet."""
        if t.failure is None:
            t.failure = reason
        if t.waiting:  # still reserving: on_reserved ends it
            return
        if t.server is not None and t.done is None and t.abort_sent_s is None:
            t.abort_sent_s = time.monotonic()
            t.server.sock.send(encode(PrefillAbort(self.decode_id, t.key)))
            return
        self._maybe_start(t)

    def _finish_failed(self, t: Transfer) -> None:
        if self.transfers.pop(t.key, None) is None:
            return
        if t.server is not None:
            t.server.in_flight.discard(t.key)
        self.stats["failed"] += 1
        reason = t.failure or {"type": "abort", "status_code": 500, "message": "disaggregated prefill failed"}
        logger.info("request %s failed before decoding: %s", t.msg.rid, reason.get("message"))
        self.router.send(t.plan.home, KVFailed(t.msg.rid, t.key, reason))
        self._release(t, home=False)

    def _release(self, t: Transfer, home: bool) -> None:
        """The holders (and the home: its allocated prompt KV, silently) free the request's pages."""
        for inst in {s.instance for s in t.plan.segments if home or s.instance != t.plan.home}:
            self.router.send(inst, Release(t.key))

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            **self.stats,
            "in_flight": len(self.transfers),
            "prefill_servers": [
                {
                    "url": s.url,
                    "up": s.up(now),
                    "queued_tokens": s.queued_tokens,
                    "in_flight": len(s.in_flight),
                }
                for s in self.servers
            ],
        }
