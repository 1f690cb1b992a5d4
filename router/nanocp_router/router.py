"""Router process: receives tokenized requests, picks an instance, forwards; tracks cluster state.

Runs without torch. Cluster state comes from the instances' load reports; a snapshot is pushed to
the HTTP process (metrics, /server_info) whenever it changes, at most every 100 ms.
"""

from __future__ import annotations

import logging
import time

import zmq

from nanocp_router.cluster_state import ClusterState
from nanocp_router.ipc import PortArgs, drain, dumps, pull, push
from nanocp_router.policy import create_policy

logger = logging.getLogger("nanocp.router")
SNAPSHOT_INTERVAL_S = 0.1


class Router:
    def __init__(self, ports: PortArgs, dp_size: int, load_balance_method: str) -> None:
        self.ctx = zmq.Context()
        self.inbox = pull(self.ctx, ports.router)
        self.workers = [push(self.ctx, ep) for ep in ports.workers]
        self.to_tokenizer = push(self.ctx, ports.tokenizer)
        self.state = ClusterState.create(dp_size)
        self.policy = create_policy(load_balance_method)
        self.rid_to_instance: dict[str, int] = {}
        self._dirty = True
        self._last_snapshot = 0.0

    def handle(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "generate":
            budget = len(msg["input_ids"]) + msg["sampling_params"].get("max_new_tokens", 128)
            inst = msg.get("data_parallel_rank")
            if inst is None:
                inst = self.policy.select(self.state, budget)

            self.state.on_dispatch(inst, budget)
            self.rid_to_instance[msg["rid"]] = inst
            self.workers[inst].send(dumps(msg))
        elif kind == "abort":
            inst = self.rid_to_instance.get(msg["rid"])
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
        else:
            logger.warning("router: unknown message type %r", kind)
            return
        self._dirty = True

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if self._dirty and now - self._last_snapshot >= SNAPSHOT_INTERVAL_S:
            self.to_tokenizer.send(dumps({"type": "cluster", "instances": self.state.snapshot()}))
            self._dirty, self._last_snapshot = False, now

    def run_forever(self) -> None:
        while True:
            for msg in drain(self.inbox, timeout_ms=int(SNAPSHOT_INTERVAL_S * 1000)):
                self.handle(msg)
            self.maybe_publish()


def run_router_process(ports: dict, dp_size: int, load_balance_method: str) -> None:
    from nanocp_router.process import child_process_setup

    child_process_setup("router")
    Router(PortArgs(**ports), dp_size, load_balance_method).run_forever()
