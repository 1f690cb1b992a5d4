"""Router package: no torch, load-balancing policies over the cluster state."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nanocp_router.cluster_state import ClusterState
from nanocp_router.messages import (
    WORKER_INBOX,
    Generate,
    Grow,
    Load,
    Output,
    Outputs,
    Release,
    Reserve,
    Reserved,
    Wake,
    decoder,
    encode,
)
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
            Load(
                **{
                    "instance": i,
                    "total_pages": 100,
                    "free_pages": 100 - kv,
                    "page_size": 1,
                    "running": running,
                    "waiting": waiting,
                    "kv_tokens": kv,
                }
            )
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
            Load(inst, self.pages, free, 1, running, 0, self.pages - free, finished=list(finished))
        )

    def generate(self, rid: str, prompt: int, new: int = 4) -> None:
        self.router.handle_safely(Generate(rid, [1] * prompt, {"max_new_tokens": new}))

    def received(self, inst: int, quiet_ms: int = 300) -> list:
        """What instance `inst` was sent (wake-ups aside), until nothing more came for quiet_ms;
        decoded as the worker decodes its inbox."""
        from nanocp_router.ipc import drain

        out, decode = [], decoder(WORKER_INBOX)
        while batch := drain(self.workers[inst], decode, timeout_ms=quiet_ms):
            out += [m for m in batch if not isinstance(m, Wake)]
        return out


def test_a_full_instance_is_never_the_home():
    # instance 0 has no request but no free KV either; it was picked as home of a plan that put
    # every position on instance 1, started without reserving them (an instance then crashed)
    h = RouterHarness(dp=2, pages=1000, min_shard=16)
    h.load(0, free=0)
    h.load(1, free=900, running=5)
    h.generate("a", prompt=50)
    (msg,) = h.received(1)
    assert isinstance(msg, Generate) and msg.placement == [[1, 0, 54]]
    assert h.received(0) == []


def test_a_reused_rid_keeps_its_segments_when_the_old_one_is_reported_finished():
    h = RouterHarness(dp=2, pages=1000, min_shard=16)
    h.load(0, free=1000)
    h.load(1, free=1000)

    def place_sharded(rid: str) -> tuple[int, int]:
        h.generate(rid, prompt=1200)  # longer than a pool: sharded over both
        (reserve,) = [m for i in (0, 1) for m in h.received(i)]
        assert isinstance(reserve, Reserve)
        holder = 0 if h.router.pending[reserve.cp_key]["plan"].home == 1 else 1
        h.router.handle_safely(Reserved(reserve.cp_key, reserve.start, True, holder))
        (start,) = h.received(1 - holder)
        assert isinstance(start, Generate) and start.cp_key == reserve.cp_key
        return start.cp_key, holder

    old_key, old_holder = place_sharded("x")
    h.load(0, free=1000)
    h.load(1, free=1000)
    new_key, new_holder = place_sharded("x")  # the client reused the rid before the report came
    h.load(1 - old_holder, free=1000, finished=[("x", old_key)])  # the old one's home reports it
    # the old request's segment is freed, the new one's stays
    assert h.received(old_holder) == [Release(old_key)]
    assert h.received(1 - old_holder) == [] and list(h.router.placed) == [new_key]
    h.load(1 - new_holder, free=1000, finished=[("x", new_key)])
    assert h.received(new_holder) == [Release(new_key)]
    assert h.router.placed == {}


def test_messages_round_trip_and_receivers_refuse_what_they_do_not_take():
    """Typed messages: what a process sends decodes to the same struct at its receiver; a kind
    the receiver does not take, or a field of the wrong type, is refused by its decoder."""
    import msgspec

    from nanocp_router.messages import DETOKENIZER_INBOX, ROUTER_INBOX

    router, worker, detok = decoder(ROUTER_INBOX), decoder(WORKER_INBOX), decoder(DETOKENIZER_INBOX)
    sent = [
        (router, Generate("r", [1, 2], {"max_new_tokens": 3}, data_parallel_rank=1)),
        (router, Load(0, 10, 5, 1, 1, 0, 5, finished=[("r", 7), ("s", None)])),
        (router, Grow("r", 7, 100, 28)),
        (worker, Reserve(7, 0, 64)),
        (detok, Outputs([Output("r", [4], False, None, 2, 1, lp=[-0.5], detok={"stop_strs": ["x"]})], 0)),
    ]
    for dec, msg in sent:
        assert dec.decode(encode(msg)) == msg
    assert b'"type":"reserve"' in encode(Reserve(7, 0, 64))
    for dec, bad in [
        (worker, encode(Load(0, 10, 5, 1, 1, 0, 5))),  # a router's message at a worker
        (router, b'{"type": "generate", "rid": "r", "input_ids": ["a"], "sampling_params": {}}'),
        (router, b'{"type": "grow", "rid": "r", "cp_key": 1, "start": 0}'),  # a field missing
        (router, b'{"type": "nonsense"}'),
    ]:
        with pytest.raises(msgspec.ValidationError):
            dec.decode(bad)
