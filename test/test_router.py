"""Router package: no torch, load-balancing policies over the cluster state."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nanocp_router.cluster_state import ClusterState
from nanocp_router.policy import create_policy


def test_router_imports_no_torch():
    code = (
        "import sys, nanocp_router.router, nanocp_router.policy, nanocp_router.process; "
        "assert 'torch' not in sys.modules, 'router pulled in torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _state(loads):
    s = ClusterState.create(len(loads))
    for i, (running, waiting, kv) in enumerate(loads):
        s.on_report(
            {
                "instance": i,
                "total_pages": 100,
                "free_pages": 100 - kv,
                "page_size": 1,
                "running": running,
                "waiting": waiting,
                "kv_tokens": kv,
            }
        )
    return s


def test_round_robin_cycles():
    policy, s = create_policy("round_robin"), _state([(0, 0, 0)] * 3)
    assert [policy.select(s, 10) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_total_requests_counts_dispatches_between_reports():
    policy, s = create_policy("total_requests"), _state([(3, 0, 0), (1, 0, 0), (2, 0, 0)])
    picks = []
    for _ in range(4):
        i = policy.select(s, 10)
        s.on_dispatch(i, 10)
        picks.append(i)
    assert picks == [1, 1, 2, 0]  # least loaded first, ties to the lower instance id


def test_total_tokens_prefers_least_kv():
    policy, s = create_policy("total_tokens"), _state([(1, 0, 50), (5, 0, 10), (1, 0, 30)])
    assert policy.select(s, 100) == 1
    s.on_dispatch(1, 100)
    assert policy.select(s, 100) == 2
    assert s.snapshot()[0]["kv_usage"] == 0.5


def test_unknown_policy_names_the_flag():
    with pytest.raises(ValueError, match="--load-balance-method"):
        create_policy("random")


class RouterHarness:
    """A Router driven message by message; the test plays the workers and the tokenizer."""

    def __init__(self, dp: int, pages: int, min_shard: int) -> None:
        import zmq

        from nanocp_router.ipc import PortArgs, pull
        from nanocp_router.router import Router

        ports = PortArgs.create(dp)
        self.ctx = zmq.Context()
        self.workers = [pull(self.ctx, ep) for ep in ports.workers]
        self.tokenizer = pull(self.ctx, ports.tokenizer)
        cp = {"policy": "dynamic", "cp_size": 2, "cp_max_degree": dp, "cp_min_shard_tokens": min_shard}
        self.router = Router(ports, dp, "total_requests", cp)
        self.pages = pages

    def load(self, inst: int, free: int, running: int = 0, finished=()) -> None:
        self.router.handle_safely(
            {"type": "load", "instance": inst, "total_pages": self.pages, "free_pages": free,
             "page_size": 1, "running": running, "waiting": 0, "kv_tokens": self.pages - free,
             "finished": [list(f) for f in finished]}
        )  # fmt: skip

    def generate(self, rid: str, prompt: int, new: int = 4) -> None:
        msg = {
            "type": "generate",
            "rid": rid,
            "input_ids": [1] * prompt,
            "sampling_params": {"max_new_tokens": new},
        }
        self.router.handle_safely(msg)

    def received(self, inst: int, quiet_ms: int = 300) -> list[dict]:
        """What instance `inst` was sent (wake-ups aside), until nothing more came for quiet_ms."""
        from nanocp_router.ipc import drain

        out = []
        while batch := drain(self.workers[inst], timeout_ms=quiet_ms):
            out += [m for m in batch if m["type"] != "wake"]
        return out


def test_a_full_instance_is_never_the_home():
    # instance 0 has no request but no free KV either; it was picked as home of a plan that put
    # every position on instance 1, started without reserving them (an instance then crashed)
    h = RouterHarness(dp=2, pages=1000, min_shard=16)
    h.load(0, free=0)
    h.load(1, free=900, running=5)
    h.generate("a", prompt=50)
    (msg,) = h.received(1)
    assert msg["type"] == "generate" and msg["placement"] == [[1, 0, 54]]
    assert h.received(0) == []


def test_a_reused_rid_keeps_its_segments_when_the_old_one_is_reported_finished():
    h = RouterHarness(dp=2, pages=1000, min_shard=16)
    h.load(0, free=1000)
    h.load(1, free=1000)

    def place_sharded(rid: str) -> tuple[int, int]:
        h.generate(rid, prompt=1200)  # longer than a pool: sharded over both
        (reserve,) = [m for i in (0, 1) for m in h.received(i)]
        assert reserve["type"] == "reserve"
        holder = 0 if h.router.pending[reserve["cp_key"]]["plan"].home == 1 else 1
        h.router.handle_safely({"type": "reserved", "cp_key": reserve["cp_key"], "start": reserve["start"],
                                "ok": True, "instance": holder})  # fmt: skip
        (start,) = h.received(1 - holder)
        assert start["type"] == "generate" and start["cp_key"] == reserve["cp_key"]
        return start["cp_key"], holder

    old_key, old_holder = place_sharded("x")
    h.load(0, free=1000)
    h.load(1, free=1000)
    new_key, new_holder = place_sharded("x")  # the client reused the rid before the report came
    h.load(1 - old_holder, free=1000, finished=[("x", old_key)])  # the old one's home reports it
    # the old request's segment is freed, the new one's stays
    assert h.received(old_holder) == [{"type": "release", "cp_key": old_key}]
    assert h.received(1 - old_holder) == [] and list(h.router.placed) == [new_key]
    h.load(1 - new_holder, free=1000, finished=[("x", new_key)])
    assert h.received(new_holder) == [{"type": "release", "cp_key": new_key}]
    assert h.router.placed == {}
