"""Router process: receives tokenized requests, picks an instance, forwards; tracks cluster state.

Runs without torch. Cluster state comes from the instances' load reports; a snapshot is pushed to
the HTTP process (metrics, /server_info) whenever it changes, at most every 100 ms.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import zmq

from nanocp_router.cluster_state import ClusterState
from nanocp_router.faults import request_fault
from nanocp_router.ipc import PortArgs, drain, pull, push, send_work
from nanocp_router.messages import (
    ROUTER_INBOX,
    Abort,
    Cluster,
    FlushCache,
    Generate,
    Grow,
    Grown,
    KVAgent,
    KVLanded,
    KVReady,
    Load,
    Message,
    Output,
    Outputs,
    PrefillDone,
    PrefillLoad,
    Release,
    Reserve,
    Reserved,
    decoder,
    encode,
)
from nanocp_router.pd import DisaggDecode
from nanocp_router.planner import CPPolicy, Plan, Segment, apply_growth, apply_plan, cp_policy_from
from nanocp_router.policy import create_policy
from nanocp_router.prefix_index import BLOCK_TOKENS, PrefixIndex, block_hashes, context_hash

logger = logging.getLogger("nanocp.router")
SNAPSHOT_INTERVAL_S = 0.1
QUEUE_FULL_RETRY_AFTER_S = 1  # Retry-After of a request refused by --max-queued-requests


def queue_full_reason(where: str, limit: int) -> dict:
    """The finish reason of a request refused because `where`'s queue holds `limit` (503)."""
    return {
        "type": "abort",
        "status_code": 503,
        "retry_after": QUEUE_FULL_RETRY_AFTER_S,
        "message": f"{where}: the request queue is full ({limit} waiting, --max-queued-requests)",
    }


@dataclass
class CPRequest:
    """A request placed by the planner, as the router tracks it until its home finishes it."""

    rid: str
    key: int  # cp_key: names the request's segments on their holders
    home: int
    holders: set[int]  # instances other than the home holding segments of it


class Router:
    def __init__(
        self,
        ports: PortArgs,
        dp_size: int,
        load_balance_method: str,
        cp: dict | None = None,
        max_queued_requests: int | None = None,
        disagg: dict | None = None,
    ) -> None:
        self.ctx = zmq.Context()
        self.inbox = pull(self.ctx, ports.router)
        self.decode = decoder(ROUTER_INBOX)
        self.workers = [push(self.ctx, ep, bind=ports.router_binds_workers) for ep in ports.workers]
        self.to_tokenizer = push(self.ctx, ports.tokenizer)
        self.state = ClusterState.create(dp_size)
        self.policy = create_policy(load_balance_method)
        self.rid_to_instance: dict[str, int] = {}
        self._dirty = True
        self._last_snapshot = 0.0
        # Context parallelism: requests wait here for a placement, then for their holders to
        # reserve the segments (acks), then go to their home.
        self.cp: CPPolicy | None = None
        if cp and cp["policy"] != "none":
            self.cp = cp_policy_from(cp)
        self.queue: list[Generate] = []
        self.max_queued_requests = max_queued_requests  # bounds self.queue (503 past it)
        self.pending: dict[int, dict] = {}  # cp_key -> {"msg", "plan", "waiting", "ok"}
        # cp_key -> placed request, until its home reports it finished (by cp_key, not rid: a
        # client may reuse a rid before that report comes)
        self.placed: dict[int, CPRequest] = {}
        self.growing: dict[tuple[int, int], tuple[int, int]] = {}  # (cp_key, start) -> (inst, end)
        self._keys = itertools.count(1)
        self.degrees: dict[int, int] = {}  # cp degree -> requests placed with it
        self.growth_segments = {"home": 0, "moved": 0}  # growth quotas placed on the home / elsewhere
        # --disaggregation-mode decode: prompts run on prefill servers (nanocp_router.pd), which
        # answer on this inbox's TCP port too
        self.pd: DisaggDecode | None = None
        if disagg is not None and disagg.get("mode") == "decode":
            self.inbox.bind(f"tcp://*:{disagg['reply_port']}")
            self.pd = DisaggDecode(self, disagg)
        # what each instance's prefix cache holds, estimated (cache-aware homes); not for a decode
        # server, whose prompts' KV is written by prefill servers, never matched
        self.prefixes: PrefixIndex | None = None
        if cp and cp.get("prefix_cache") and self.pd is None:
            page = cp.get("page_size", 1)  # blocks are whole pages: cached segments end on pages
            self.prefixes = PrefixIndex(dp_size, page * -(-BLOCK_TOKENS // page))
        self._hashed: tuple[Generate, list[int]] | None = None  # the queue head's block hashes

    def send(self, inst: int, msg: Message) -> None:
        self.workers[inst].send(encode(msg))

    def send_work(self, inst: int, msg: Message) -> None:
        send_work(self.workers, inst, msg)

    def dispatch(self, inst: int, msg: Generate, budget: int) -> None:
        """Send a request whole to an instance (static DP, or pinned by data_parallel_rank)."""
        logger.debug("request %s (%d tokens) -> instance %d", msg.rid, len(msg.input_ids), inst)
        self.note_segments(msg, Plan(inst, [Segment(inst, 0, budget)]), self.block_hashes(msg))
        self.state.on_dispatch(inst, budget)
        self.rid_to_instance[msg.rid] = inst
        self.send_work(inst, msg)

    def place(self) -> None:
        """Plan queued requests first-come first-served; a request that does not fit waits. An
        error planning one fails that request alone (500)."""
        while self.queue and not (self.pd is not None and self.pd.paused):
            msg = self.queue[0]
            try:
                if not self.place_first():
                    return
            except Exception as e:
                logger.exception("router: placing request %s failed", msg.rid)
                if self.queue and self.queue[0] is msg:
                    self.queue.pop(0)
                self.abort_output(msg, {"type": "abort", "status_code": 500, "message": f"router: {e}"})

    def place_first(self) -> bool:
        """Plan the request at the head of the queue; False when it does not fit now."""
        msg = self.queue[0]
        if self.pd is not None:
            why = self.pd.unavailable(time.monotonic())
            if why is not None:
                self.queue.pop(0)
                self.abort_output(msg, {"type": "abort", "status_code": 503, "message": why})
                return True
        hashes = self.block_hashes(msg)
        plan = self.plan(msg, hashes)
        if plan is None:
            return False
        if not plan.segments or plan.segments[-1].instance != plan.home:
            raise RuntimeError(f"planner bug: the home {plan.home} does not hold the tail of {plan}")
        self.queue.pop(0)
        apply_plan(self.state, plan)
        self.note_segments(msg, plan, hashes)
        key = next(self._keys)
        if self.pd is not None:
            self.pd.start(msg, key, plan)
            return True
        holders = [s for s in plan.segments if s.instance != plan.home]
        if not holders:
            self.start_on_home(msg, key, plan)
        else:
            self.pending[key] = {
                "msg": msg,
                "plan": plan,
                "waiting": {(s.instance, s.start) for s in holders},
                "ok": True,
                "reused": plan.reused,  # lowered where a holder finds less cached than expected
                "since": time.monotonic(),
            }
            for s in holders:
                self.reserve(s.instance, key, s.start, s.end, self.segment_cache(msg, s, plan.reused, hashes))
        return True

    def segment_cache(self, msg: Generate, seg: Segment, reused: int, hashes: list[int]) -> dict:
        """Reserve's prefix-cache fields for a holder's segment: its prompt tokens and root (the
        holder caches them when the request is released after its prefill) and the positions it
        should find cached (reused in place)."""
        if self.prefixes is None or seg.start >= len(msg.input_ids):
            return {}
        ids = msg.input_ids
        known = hashes if self.prefixes.block == BLOCK_TOKENS else None
        return {
            "context": context_hash(ids, seg.start, hashes=known),
            "tokens": ids[seg.start : seg.end],
            "reuse": max(0, min(seg.end, reused) - seg.start),
        }

    def note_segments(self, msg: Generate, plan: Plan, hashes: list[int]) -> None:
        """Record the prompt blocks each instance will cache: every holder its segments', the
        home those of its first held range (kvcache.manager caches only that range there)."""
        if not hashes:
            return
        block, plen = self.prefixes.block, len(msg.input_ids)
        home_first = next(s for s in plan.segments if s.instance == plan.home)
        for s in plan.segments:
            if s.instance == plan.home and s is not home_first:
                continue
            first, last = -(-s.start // block), min(s.end, plen) // block
            if first < last:
                i = self.state.instances[s.instance]
                self.prefixes.record(s.instance, hashes[first:last], i.total_pages * i.page_size, s.start)

    def block_hashes(self, msg: Generate) -> list[int]:
        """The prompt's prefix block hashes (none without caches), kept while it heads the queue."""
        if self.prefixes is None:
            return []
        if self._hashed is None or self._hashed[0] is not msg:
            self._hashed = (msg, block_hashes(msg.input_ids, self.prefixes.block))
        return self._hashed[1]

    def plan(self, msg: Generate, hashes: list[int] | None = None) -> Plan | None:
        """The request's placement (None: it does not fit now); hashes: its prompt's blocks, to
        find instances caching its prefix. Without context parallelism (static DP, disaggregated
        decode): all of it on the home the load balancer or the client picks."""
        max_new = msg.sampling_params.get("max_new_tokens", 128)
        cached = self.prefixes.match(hashes) if hashes else None
        if self.cp is not None and msg.data_parallel_rank is None:
            # the last prompt token is always computed (its logits are sampled)
            last = (len(msg.input_ids) - 1) // self.prefixes.block if hashes else 0
            chain = self.prefixes.segments(hashes[:last]) if hashes else None
            return self.cp.plan(len(msg.input_ids) + self.cp.tail_quota(max_new), self.state, cached, chain)
        total = len(msg.input_ids) + max_new
        home = msg.data_parallel_rank
        if home is None:
            home = self.policy.select(self.state, total, cached)
        return Plan(home, [Segment(home, 0, total)])

    def reserve(self, inst: int, key: int, start: int, end: int, cache: dict | None = None) -> None:
        """Ask a holder to reserve positions [start, end) of request `key`; it acks "reserved".
        cache: segment_cache's fields."""
        self.send(inst, Reserve(key, start, end, **(cache or {})))

    def on_reserved(self, msg: Reserved) -> None:
        p = self.pending.get(msg.cp_key)
        if p is None:
            return
        p["waiting"].discard((msg.instance, msg.start))
        p["ok"] &= msg.ok
        seg = next(s for s in p["plan"].segments if s.instance == msg.instance and s.start == msg.start)
        if msg.cached < min(seg.end, p["reused"]) - seg.start:  # evicted meanwhile: recompute from there
            p["reused"] = max(0, seg.start + msg.cached)
        if p["waiting"]:
            return
        key, req, plan = msg.cp_key, p["msg"], p["plan"]
        del self.pending[key]
        logger.debug(
            "request %s: reservations on %d holders %s after %.0f ms",
            req.rid,
            plan.degree - 1,
            "done" if p["ok"] else "FAILED",
            1e3 * (time.monotonic() - p["since"]),
        )
        holders = {s.instance for s in plan.segments if s.instance != plan.home}
        if p.get("aborted") or not p["ok"]:
            for inst in holders:
                self.send(inst, Release(key))
            if p.get("aborted"):
                self.abort_output(req)
            else:
                self.queue.insert(0, req)  # a holder had no room after all: plan again later
            return
        req.cached_prefix = p["reused"]
        self.start_on_home(req, key, plan)

    def start_on_home(self, req: Generate, key: int, plan: Plan, first: KVReady | None = None) -> None:
        """Send a placed request to its home (its holders have reserved their segments); first:
        disaggregated, the home holds it already and starts decoding from this first token."""
        self.degrees[plan.degree] = self.degrees.get(plan.degree, 0) + 1  # counted once it is placed
        req.placement = [[s.instance, s.start, s.end] for s in plan.segments]
        req.cp_key = key
        holders = {s.instance for s in plan.segments if s.instance != plan.home}
        self.placed[key] = CPRequest(req.rid, key, plan.home, holders)
        logger.debug(
            "request %s (%d tokens): home %d, segments %s",
            req.rid,
            len(req.input_ids),
            plan.home,
            [(s.instance, s.end - s.start) for s in plan.segments],
        )
        self.rid_to_instance[req.rid] = plan.home
        self.send_work(plan.home, req if first is None else first)

    def on_grow(self, msg: Grow) -> None:
        """A home used up its request's plan: place the next tail quota (growth re-planning)."""
        key, start = msg.cp_key, msg.start
        r = self.placed.get(key)
        if r is None:  # finished meanwhile; the home drops the answer
            return
        inst, tokens = self.cp.plan_growth(r.home, r.holders, self.cp.tail_quota(msg.need), self.state)
        apply_growth(self.state, inst, tokens)
        if inst == r.home:
            self.grown(r, [inst, start, start + tokens])
            return
        self.growing[(key, start)] = (inst, start + tokens)
        self.reserve(inst, key, start, start + tokens)

    def on_growth_reserved(self, msg: Reserved) -> None:
        key = msg.cp_key
        inst, end = self.growing.pop((key, msg.start))
        r = self.placed.get(key)
        if r is None:  # the request finished while its growth was being reserved
            if msg.ok:
                self.send(inst, Release(key))
            return
        if not msg.ok:  # no room there after all: the home grows on demand
            inst = r.home
        else:
            r.holders.add(inst)
        self.grown(r, [inst, msg.start, end])

    def grown(self, r: CPRequest, segment: list[int]) -> None:
        self.growth_segments["home" if segment[0] == r.home else "moved"] += 1
        self.send_work(r.home, Grown(r.rid, r.key, segment))

    def abort_output(self, req: Generate, reason: dict | None = None) -> None:
        """Finish a request that never reached an instance (aborted, refused or failed here)."""
        reason = reason or {"type": "abort", "message": "aborted by request"}
        out = Output.failed(req.rid, reason, prompt_tokens=len(req.input_ids))
        self.to_tokenizer.send(encode(Outputs([out])))

    def handle_safely(self, msg: Message) -> None:
        """handle(msg); an error it raises fails only the request the message is about (500)."""
        try:
            self.handle(msg)
        except Exception as e:
            logger.exception(
                "router: %s message of request %s failed", type(msg).__name__, getattr(msg, "rid", None)
            )
            if isinstance(msg, Generate):
                self.queue = [m for m in self.queue if m is not msg]
                reason = {"type": "abort", "status_code": 500, "message": f"router: {type(e).__name__}: {e}"}
                self.abort_output(msg, reason)

    def handle(self, msg: Message) -> None:
        if isinstance(msg, Generate):
            request_fault("router", msg.rid)  # tests only (envs.fault_inject)
            budget = len(msg.input_ids) + msg.sampling_params.get("max_new_tokens", 128)
            inst = msg.data_parallel_rank
            if inst is not None and self.pd is None:
                self.dispatch(inst, msg, budget)
            elif self.cp is not None or self.pd is not None:
                limit = self.max_queued_requests
                if limit is not None and len(self.queue) >= limit:
                    self.abort_output(msg, queue_full_reason("router", limit))
                    return
                self.queue.append(msg)
                self.place()
            else:
                self.dispatch(self.plan(msg, self.block_hashes(msg)).home, msg, budget)
        elif isinstance(msg, Reserved):
            if self.pd is not None and msg.cp_key in self.pd.transfers:
                self.pd.on_reserved(msg, time.monotonic())
            elif msg.cp_key in self.pending:
                self.on_reserved(msg)
            else:
                self.on_growth_reserved(msg)
        elif isinstance(msg, Grow):
            self.on_grow(msg)
        elif isinstance(msg, Abort):
            self.on_abort(msg)
        elif isinstance(msg, FlushCache):
            if self.prefixes is not None:
                self.prefixes.clear()
            for w in self.workers:
                w.send(encode(msg))
        elif isinstance(msg, (KVAgent, KVLanded, PrefillDone, PrefillLoad)) and self.pd is not None:
            if isinstance(msg, KVAgent):
                self.pd.on_agent(msg)
            elif isinstance(msg, KVLanded):
                self.pd.on_landed(msg)
            elif isinstance(msg, PrefillDone):
                self.pd.on_done(msg)
            else:
                self.pd.on_heartbeat(msg, time.monotonic())
        elif isinstance(msg, Load):
            self.state.on_report(msg)
            if self.pd is not None:
                self.pd.paused = False
            cacheable = set(msg.cacheable)
            for rid, key in msg.finished:
                if self.rid_to_instance.get(rid) == msg.instance:
                    del self.rid_to_instance[rid]
                r = self.placed.pop(key, None) if key is not None else None
                if r is not None:  # the home is done with it: free its segments
                    for inst in r.holders:
                        self.send(inst, Release(r.key, cache=key in cacheable))
        self._dirty = True

    def on_abort(self, msg: Abort) -> None:
        rid = msg.rid
        if self.pd is not None and self.pd.on_abort(rid):
            return
        queued = next((m for m in self.queue if m.rid == rid), None)
        if queued is not None:
            self.queue.remove(queued)
            self.abort_output(queued)
            return
        for p in self.pending.values():
            if p["msg"].rid == rid:
                p["aborted"] = True
                return
        inst = self.rid_to_instance.get(rid)
        for w in self.workers if inst is None else [self.workers[inst]]:
            w.send(encode(msg))

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if self._dirty and now - self._last_snapshot >= SNAPSHOT_INTERVAL_S:
            snapshot = Cluster(
                self.state.snapshot(),
                {str(k): v for k, v in sorted(self.degrees.items())},
                dict(self.growth_segments),
                len(self.queue),
                self.pd.snapshot(now) if self.pd is not None else None,
            )
            self.to_tokenizer.send(encode(snapshot))

            self._dirty, self._last_snapshot = False, now

    def run_forever(self) -> None:
        while True:
            for msg in drain(self.inbox, self.decode, timeout_ms=int(SNAPSHOT_INTERVAL_S * 1000)):
                self.handle_safely(msg)
            if self.pd is not None:
                self.pd.tick(time.monotonic())
            if self.queue:
                self.place()
            self.maybe_publish()


def run_router_process(
    ports: dict,
    dp_size: int,
    load_balance_method: str,
    cp: dict | None = None,
    log_level: str = "info",
    max_queued_requests: int | None = None,
    fault_inject: str = "",
    disagg: dict | None = None,
) -> None:
    from nanocp_router import faults
    from nanocp_router.process import child_process_setup

    child_process_setup("router", log_level)
    faults.configure(fault_inject)  # tests only (nanocp.envs.fault_inject)
    if disagg is not None and disagg["mode"] == "prefill":
        from nanocp_router.prefill_router import PrefillRouter

        PrefillRouter(PortArgs(**ports), dp_size, disagg).run_forever()
        return
    Router(PortArgs(**ports), dp_size, load_balance_method, cp, max_queued_requests, disagg).run_forever()
