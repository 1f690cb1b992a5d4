"""Router process: receives tokenized requests, picks an instance, forwards; tracks cluster state.

Runs without torch. Cluster state comes from the instances' load reports; a snapshot is pushed to
the HTTP process (metrics, /server_info) whenever it changes, at most every 100 ms.
"""

from __future__ import annotations

import itertools
import logging
import time

import zmq

from nanocp_router.cluster_state import ClusterState
from nanocp_router.ipc import PortArgs, drain, dumps, pull, push
from nanocp_router.planner import CPPolicy, PlannerConfig, apply_plan, create_cp_policy
from nanocp_router.policy import create_policy

logger = logging.getLogger("nanocp.router")
SNAPSHOT_INTERVAL_S = 0.1


class Router:
    def __init__(
        self, ports: PortArgs, dp_size: int, load_balance_method: str, cp: dict | None = None
    ) -> None:
        self.ctx = zmq.Context()
        self.inbox = pull(self.ctx, ports.router)
        self.workers = [push(self.ctx, ep) for ep in ports.workers]
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
            cfg = PlannerConfig(cp["cp_size"], cp["cp_max_degree"], cp["cp_min_shard_tokens"])
            self.cp = create_cp_policy(cp["policy"], cfg)
        self.queue: list[dict] = []
        self.pending: dict[int, dict] = {}  # cp_key -> {"msg", "plan", "waiting", "ok"}
        self.sharded: dict[str, tuple[int, list[int]]] = {}  # rid -> (cp_key, holder instances)
        self._keys = itertools.count(1)
        self.degrees: dict[int, int] = {}  # cp degree -> requests placed with it

    def dispatch(self, inst: int, msg: dict, budget: int) -> None:
        self.state.on_dispatch(inst, budget)
        self.rid_to_instance[msg["rid"]] = inst
        self.workers[inst].send(dumps(msg))

    def place(self) -> None:
        """Plan queued requests first-come first-served; a request that does not fit waits."""
        while self.queue:
            msg = self.queue[0]
            length = len(msg["input_ids"]) + msg["sampling_params"].get("max_new_tokens", 128)
            plan = self.cp.plan(length, self.state)
            if plan is None:
                return
            self.queue.pop(0)
            apply_plan(self.state, plan)
            if plan.degree == 1:
                self.degrees[1] = self.degrees.get(1, 0) + 1
                self.workers[plan.home].send(dumps(msg))
                self.rid_to_instance[msg["rid"]] = plan.home
                continue
            key = next(self._keys)
            holders = [s for s in plan.segments if s.instance != plan.home]
            self.pending[key] = {
                "msg": msg,
                "plan": plan,
                "waiting": {s.instance for s in holders},
                "ok": True,
            }
            for s in holders:
                self.workers[s.instance].send(
                    dumps({"type": "reserve", "cp_key": key, "start": s.start, "end": s.end})
                )

    def on_reserved(self, msg: dict) -> None:
        p = self.pending.get(msg["cp_key"])
        if p is None:
            return
        p["waiting"].discard(msg["instance"])
        p["ok"] &= msg["ok"]
        if p["waiting"]:
            return
        key, req, plan = msg["cp_key"], p["msg"], p["plan"]
        del self.pending[key]
        holders = [s.instance for s in plan.segments if s.instance != plan.home]
        if p.get("aborted") or not p["ok"]:
            for inst in holders:
                self.workers[inst].send(dumps({"type": "release", "cp_key": key}))
            if p.get("aborted"):
                self.abort_output(req)
            else:
                self.queue.insert(0, req)  # a holder had no room after all: plan again later
            return
        self.degrees[plan.degree] = self.degrees.get(plan.degree, 0) + 1  # counted once it is placed
        req["placement"] = [[s.instance, s.start, s.end] for s in plan.segments]

        req["cp_key"] = key
        self.sharded[req["rid"]] = (key, holders)
        self.rid_to_instance[req["rid"]] = plan.home
        self.workers[plan.home].send(dumps(req))

    def abort_output(self, req: dict) -> None:
        """Finish a request that never reached an instance."""
        out = {
            "rid": req["rid"],
            "ids": [],
            "text": "",
            "finished": True,
            "reason": {"type": "abort", "message": "aborted by request"},
            "prompt_tokens": len(req["input_ids"]),
            "completion_tokens": 0,
        }
        self.to_tokenizer.send(dumps({"type": "out", "outputs": [out]}))

    def handle(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "generate":
            budget = len(msg["input_ids"]) + msg["sampling_params"].get("max_new_tokens", 128)
            inst = msg.get("data_parallel_rank")
            if inst is not None:
                self.dispatch(inst, msg, budget)
            elif self.cp is not None:
                self.queue.append(msg)
                self.place()
            else:
                self.dispatch(self.policy.select(self.state, budget), msg, budget)
        elif kind == "reserved":
            self.on_reserved(msg)
        elif kind == "abort":
            rid = msg["rid"]
            queued = next((m for m in self.queue if m["rid"] == rid), None)
            if queued is not None:
                self.queue.remove(queued)
                self.abort_output(queued)
                return
            for p in self.pending.values():
                if p["msg"]["rid"] == rid:
                    p["aborted"] = True
                    return
            inst = self.rid_to_instance.get(rid)
            targets = self.workers if inst is None else [self.workers[inst]]
            for w in targets:
                w.send(dumps(msg))
        elif kind == "flush_cache":
            for w in self.workers:
                w.send(dumps(msg))
        elif kind == "load":
            self.state.on_report(msg)
            for rid in msg.get("finished", []):
                self.rid_to_instance.pop(rid, None)
                if rid in self.sharded:  # the home is done with it: free its segments
                    key, holders = self.sharded.pop(rid)
                    for inst in holders:
                        self.workers[inst].send(dumps({"type": "release", "cp_key": key}))
        else:
            logger.warning("router: unknown message type %r", kind)
            return
        self._dirty = True

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if self._dirty and now - self._last_snapshot >= SNAPSHOT_INTERVAL_S:
            snapshot = {
                "type": "cluster",
                "instances": self.state.snapshot(),
                "cp_degrees": {str(k): v for k, v in sorted(self.degrees.items())},
            }
            self.to_tokenizer.send(dumps(snapshot))

            self._dirty, self._last_snapshot = False, now

    def run_forever(self) -> None:
        while True:
            for msg in drain(self.inbox, timeout_ms=int(SNAPSHOT_INTERVAL_S * 1000)):
                self.handle(msg)
            if self.queue:
                self.place()
            self.maybe_publish()


def run_router_process(ports: dict, dp_size: int, load_balance_method: str, cp: dict | None = None) -> None:
    from nanocp_router.process import child_process_setup

    child_process_setup("router")
    Router(PortArgs(**ports), dp_size, load_balance_method, cp).run_forever()
