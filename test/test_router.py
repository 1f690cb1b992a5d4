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
