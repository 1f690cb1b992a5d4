"""A multi-node server on one machine: two `launch_server` processes as two nodes (SGLang's
--nnodes / --node-rank / --dist-init-addr), everything between them over TCP on node 0's ports."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from test_dcp import dcp_server_args
from test_server import _wait_dead as wait_dead
from test_server import wait_idle

from conftest import BackgroundRequest, greedy_params, random_prompts
from nanocp.testing.server import NodeProcess, ServerProcess, free_port_range

CP = ("--cp-policy", "dynamic", "--cp-min-shard-tokens", "32")


def node_args(model: str, dp: int, rank: int, base: int, *flags: str) -> list[str]:
    multinode = ["--nnodes", "2", "--node-rank", str(rank), "--dist-init-addr", f"127.0.0.1:{base}"]
    return [*dcp_server_args(model, dp, 16, *CP), *multinode, *flags]


def generate_all(url: str, prompts: list[list[int]], new: int) -> list[list[int]]:
    with httpx.Client(base_url=url, timeout=120) as c:
        reqs = [
            BackgroundRequest(url, {"input_ids": p, "sampling_params": greedy_params(new)}) for p in prompts
        ]
        out = [r.result(timeout=120) for r in reqs]
        assert all(r.status_code == 200 for r in out), [r.text for r in out]
        wait_idle(c)
        return [r.json()["output_ids"] for r in out]


@pytest.mark.parametrize("dp", [2, 4], ids=["one-instance-per-node", "two-per-node"])
def test_two_nodes_serve_like_one(moe_model, hf_oracle, tmp_path, dp):
    """dp 2 / dp 4 over two nodes with dynamic CP: greedy tokens equal HF's (a long prompt is
    sharded over instances of both nodes); /server_info lists every node and instance."""
    prompts = random_prompts([300, 12, 40, 7], vocab=500, seed=11)
    new = 8
    expected = [hf_oracle(moe_model).greedy(p, new) for p in prompts]
    base = free_port_range(10 + dp)
    logs = [str(tmp_path / f"node{r}.log") for r in range(2)]
    with NodeProcess(node_args(moe_model, dp, 1, base), log_path=logs[1]) as node1:
        with ServerProcess(node_args(moe_model, dp, 0, base), log_path=logs[0], ready_timeout=180) as head:
            assert generate_all(head.url, prompts, new) == expected
            info = httpx.get(head.url + "/server_info").json()
            assert [i["node"] for i in info["instances"]] == [0] * (dp // 2) + [1] * (dp // 2)
            assert [n["instances"] for n in info["nodes"]] == [list(range(dp // 2)), list(range(dp // 2, dp))]
            assert sum(info["cp_degrees"].get(k, 0) for k in info["cp_degrees"] if k != "1") >= 1
            pids = [i["pid"] for i in info["instances"]] + list(info["processes"].values())
        # node 0 stopped (SIGINT): node 1 stops its instances and exits by itself
        node1.proc.wait(timeout=20)
    wait_dead(pids)


def test_losing_a_node_fails_fast_and_sigterm_leaves_no_orphans(moe_model, tmp_path):
    """Node 1 killed outright: within 10 s node 0's /health is 503 naming the node, and requests
    fail with 5xx instead of hanging; SIGTERM on node 0 then stops every process it started."""
    base = free_port_range(12)
    node1 = NodeProcess(node_args(moe_model, 2, 1, base), log_path=str(tmp_path / "node1.log"))
    with ServerProcess(node_args(moe_model, 2, 0, base), log_path=str(tmp_path / "node0.log")) as head:
        info = httpx.get(head.url + "/server_info").json()
        pids = [i["pid"] for i in info["instances"]] + list(info["processes"].values())
        os.killpg(node1.proc.pid, signal.SIGKILL)  # the node and its instances, as a machine failure
        node1.proc.wait()
        deadline = time.monotonic() + 10
        while True:  # unhealthy at once or soon (instance 0's collective fails), naming the node
            r = httpx.get(head.url + "/health", timeout=5)
            if r.status_code == 503 and "node 1" in r.text:
                break
            assert time.monotonic() < deadline, f"10 s after losing node 1: {r.status_code} {r.text}"
            time.sleep(0.2)
        res = httpx.post(head.url + "/generate", json={"input_ids": [1, 2, 3], "sampling_params": greedy_params(4)},
                         timeout=30)  # fmt: skip
        assert res.status_code >= 500, res.text
        assert head.stop(signal.SIGTERM) is not None
    wait_dead(pids)


NO_TORCH = """import sys
sys.modules["torch"] = None  # as on a node where torch is not installed: import torch fails
"""


def test_router_only_node_serves_instances_of_other_nodes(moe_model, hf_oracle, tmp_path):
    """--router-only: node 0 runs HTTP, tokenizer, router and detokenizer with torch
    unimportable in it and its children, as on a CPU node without torch (node 1, which has
    instance 0, hosts the instances' rendezvous store); both instances run on node 1
    (--worker-only); outputs equal HF's."""
    prompts = random_prompts([200, 9], vocab=500, seed=12)
    expected = [hf_oracle(moe_model).greedy(p, 6) for p in prompts]
    base = free_port_range(12)
    args = lambda rank, *f: node_args(moe_model, 2, rank, base, "--router-only", *f)  # noqa: E731
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_TORCH)
    path = os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])
    with NodeProcess(args(1, "--worker-only"), log_path=str(tmp_path / "node1.log")):
        with ServerProcess(args(0), log_path=str(tmp_path / "node0.log"), env={"PYTHONPATH": path}) as head:
            assert generate_all(head.url, prompts, 6) == expected
            info = httpx.get(head.url + "/server_info").json()
            assert [i["node"] for i in info["instances"]] == [1, 1]
            assert not [name for name in info["processes"] if name.startswith("instance")]


def test_dry_run_prints_the_plan_and_bad_layouts_name_the_flag(moe_model):
    import subprocess
    import sys

    base = [sys.executable, "-m", "nanocp.launch_server", "--model-path", moe_model, "--device", "cpu"]

    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *flags, "--dry-run"], capture_output=True, text=True, timeout=120)

    layout = ("--dp-size", "4", "--ep-size", "4", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:29500")
    r = run(*layout, "--node-rank", "1")
    assert r.returncode == 0, r.stderr
    assert "node 0: HTTP server, tokenizer, router, detokenizer; instances 0..1" in r.stdout
    assert "node 1 (this node): instances 2..3" in r.stdout and "29510..29513 instance inboxes" in r.stdout
    bad = {
        (
            "--dp-size",
            "3",
            "--nnodes",
            "2",
            "--dist-init-addr",
            "127.0.0.1:29500",
        ): "--dp-size 3 cannot be split",
        ("--dp-size", "2", "--nnodes", "2"): "--dist-init-addr",
        (*layout, "--node-rank", "2"): "--node-rank must be in",
        (
            "--dp-size",
            "2",
            "--nnodes",
            "2",
            "--dist-init-addr",
            "127.0.0.1",
        ): "--dist-init-addr must be HOST:PORT",
        (*layout, "--worker-only"): "--worker-only",
        ("--dp-size", "2", "--router-only"): "--router-only needs --nnodes >= 2",
        (*layout, "--nproc-per-node", "3"): "--nproc-per-node 3",
    }
    for flags, message in bad.items():
        r = run(*flags)
        assert r.returncode != 0 and message in r.stderr, (flags, r.stderr[-500:])
