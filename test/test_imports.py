"""The import graph of python/nanocp, router/ and kernels/ (ast; imports under TYPE_CHECKING and
inside functions count): no cycles, and the router and the kernels never import nanocp."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"nanocp": ROOT / "python", "nanocp_router": ROOT / "router", "nanocp_kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for f in (base / pkg).rglob("*.py"):
            parts = f.relative_to(base).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def known(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for a in node.names:  # `from pkg import mod` imports pkg.mod
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in mods else known(base))
        graph[mod] = {d for d in deps if d is not None and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found}"


def test_router_and_kernels_do_not_import_nanocp():
    bad = {
        mod: sorted(d for d in deps if d.split(".")[0] == "nanocp")
        for mod, deps in import_graph().items()
        if mod.split(".")[0] != "nanocp"
    }
    assert not {m: d for m, d in bad.items() if d}, bad


def test_the_checker_sees_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    graph = import_graph()  # TYPE_CHECKING and function-level imports are edges too
    assert "nanocp.distributed.dcp" in graph["nanocp.engine.forward_batch"]  # TYPE_CHECKING
    assert "nanocp.server.openai_api" in graph["nanocp.server.http_server"]


ROUTER_NODE = """
import sys
import nanocp.server.http_server, nanocp.server.tokenizer_manager, nanocp.server.launch
import nanocp.tokenizer.detokenizer_process, nanocp_router.router, nanocp_router.nodes
from nanocp.server_args import ServerArgs
args = ServerArgs.parse(["--dp-size", "2", "--nnodes", "2", "--router-only", "--dist-init-addr", "127.0.0.1:29500",
                         "--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--device", "cuda"])
print("torch" in sys.modules)
"""


def test_a_router_node_needs_no_torch():
    """What node 0 of a --router-only server runs (HTTP server, tokenizer manager, router,
    detokenizer, the launcher, its flags, even naming GPU-only backends) imports no torch:
    request checks live in scheduler/validation.py apart from the torch-using Req, backend
    names in nanocp.registries, and the instances' store is hosted on an instance node.
    (transformers itself imports torch when it is installed; test_multinode runs a --router-only
    node with torch unimportable.)"""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", ROUTER_NODE], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
