"""Decode-batch kernels (GPU): skinny GEMMs vs cuBLAS, two-launch experts vs the grouped GEMM.

At 1-4 tokens a projection or an MoE layer is a weight stream. For the Qwen3-30B-A3B shapes
(qkv 5120x2048, o 2048x4096, router 128x2048; 128 experts, top-8, 2048 -> 768, bf16) this times
inside CUDA graphs: qkv / o as F.linear (cuBLAS) vs nanocp_kernels.gemv; the router as F.linear +
the top-k launch vs gemv.router_topk; the experts given the routing as fused_moe (align, grouped
GEMMs, sum) vs small_moe's two launches; each against the memory roofline (bytes read / measured
copy bandwidth). Every timed call reads a different copy of the weights (more bytes than L2
holds), as consecutive layers do. --sweep also times each launch config (to tune gemv.CONFIGS,
small_moe.GATE_UP_CONFIG / DOWN_CONFIG).

    python -m benchmark.small_batch_kernels --sweep
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
import torch.nn.functional as F

from benchmark.attention_bandwidth import graph_time
from benchmark.common import RESULTS, environment, gpu_tag, pyplot, save_figure, write_json
from benchmark.decode_step import copy_bandwidth
from nanocp.layers.moe import select_experts
from nanocp_kernels import gemv as gv
from nanocp_kernels import small_moe as sm
from nanocp_kernels.fused_moe import fused_moe

PROJECTIONS = {"qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048)}
E, TOPK, H, INTER = 128, 8, 2048, 768
L2_SAFE_BYTES = 512 << 20  # weight copies cycled per timing: several times any L2
GEMV_GRID = [(bn, bk, w) for bn in (1, 2, 4) for bk in (1024, 2048, 4096) for w in (4, 8)]
GATE_UP_GRID = [(bn, bk, w) for bn in (2, 4, 8) for bk in (512, 1024, 2048) for w in (4, 8)]
DOWN_GRID = [(bn, bk, w) for bn in (1, 2, 4) for bk in (128, 256, 512) for w in (4, 8)]


def cycled(make_call, copies: int):
    """A function whose successive calls (as captured into a graph) use copy 0, 1, ... in turn."""
    state = {"i": 0}

    def call():
        make_call(state["i"] % copies)
        state["i"] += 1

    return call


def time_projection(m: int, name: str, new: bool) -> float:
    n, k = PROJECTIONS[name]
    copies = max(2, -(-L2_SAFE_BYTES // (n * k * 2)))
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(copies)]
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    if name == "router":  # the gate projection and the top-k: two launches before, one now
        fn = (
            (lambda w: gv.router_topk(x, w, TOPK, True))
            if new
            else (lambda w: select_experts(F.linear(x, w), TOPK, True, x.dtype))
        )
    else:
        fn = (lambda w: gv.gemv(x, w)) if new else (lambda w: F.linear(x, w))
    return graph_time(cycled(lambda i: fn(ws[i]), copies), copies)


def time_experts(t: int, new: bool, layers: int = 3) -> float:
    """The experts given the router's (weights, ids): grouped GEMM (align, 2 GEMMs, sum) or the
    two-launch small_moe."""
    dev = "cuda"
    x = torch.randn(t, H, dtype=torch.bfloat16, device=dev)
    ws = [
        (
            torch.randn(E, 2 * INTER, H, dtype=torch.bfloat16, device=dev) / H**0.5,
            torch.randn(E, H, INTER, dtype=torch.bfloat16, device=dev) / INTER**0.5,
        )
        for _ in range(layers)
    ]
    w, ids = select_experts(torch.randn(t, E, device=dev), TOPK, True, x.dtype)
    fn = sm.small_fused_moe if new else functools.partial(fused_moe, all_local=True)
    return graph_time(cycled(lambda i: fn(x, ws[i][0], ws[i][1], w, ids, 0), layers), layers)


def best_config(configs, set_config, measure) -> tuple[float, tuple]:
    best = None
    for cfg in configs:
        set_config(cfg)
        try:
            s = measure()
        except Exception:  # noqa: BLE001 (a config the compiler rejects: out of shared memory)
            continue
        if best is None or s < best[0]:
            best = (s, cfg)
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    bw = copy_bandwidth(torch.device("cuda"))
    rows = []
    for m in args.rows:
        for name, (n, k) in PROJECTIONS.items():
            row = {"op": name, "rows": m, "n": n, "k": k, "roofline_s": n * k * 2 / bw}
            row["before_s"] = time_projection(m, name, new=False)
            row["after_s"] = time_projection(m, name, new=True)
            if args.sweep:
                saved = dict(gv.CONFIGS)

                def set_cfg(cfg):
                    gv.CONFIGS.clear()
                    gv.CONFIGS[1 << 30] = cfg

                best = best_config(GEMV_GRID, set_cfg, lambda: time_projection(m, name, True))  # noqa: B023
                gv.CONFIGS.clear()
                gv.CONFIGS.update(saved)
                row["best_after_s"], row["best_config"] = best
            rows.append(finish(row))
        if m * TOPK > sm.SMALL_PAIRS:  # the layer keeps the grouped GEMM there
            continue
        ids = select_experts(torch.randn(m, E, device="cuda"), TOPK, True, torch.bfloat16)[1]
        touched = ids.unique().numel()
        row = {
            "op": "experts",
            "rows": m,
            "experts_touched": touched,
            "roofline_s": touched * 3 * INTER * H * 2 / bw,
        }
        row["before_s"] = time_experts(m, new=False)
        row["after_s"] = time_experts(m, new=True)
        if args.sweep:
            saved = (sm.GATE_UP_CONFIG, sm.DOWN_CONFIG)
            set_up = functools.partial(setattr, sm, "GATE_UP_CONFIG")
            best_up = best_config(GATE_UP_GRID, set_up, lambda: time_experts(m, True))  # noqa: B023
            sm.GATE_UP_CONFIG = best_up[1]
            set_down = functools.partial(setattr, sm, "DOWN_CONFIG")
            best_down = best_config(DOWN_GRID, set_down, lambda: time_experts(m, True))  # noqa: B023
            sm.GATE_UP_CONFIG, sm.DOWN_CONFIG = saved
            row["best_after_s"], row["best_config"] = best_down[0], [best_up[1], best_down[1]]
        rows.append(finish(row))
    tag = args.tag or gpu_tag()
    result = {
        "benchmark": "small_batch_kernels",
        "command": "python -m benchmark.small_batch_kernels "
        + " ".join(sys.argv[1:] if argv is None else argv),
        **environment("cuda"),
        "copy_bandwidth_Bps": bw,
        "rows": rows,
    }
    write_json(RESULTS / f"small_batch_kernels_{tag}.json", result)
    plot(result, RESULTS / f"small_batch_kernels_{tag}.png")
    return result


def finish(row: dict) -> dict:
    for key in ("before", "after"):
        row[f"{key}_pct_of_roofline"] = 100 * row["roofline_s"] / row[f"{key}_s"]
    print(json.dumps(row), flush=True)
    return row


def plot(result: dict, path) -> None:
    plt = pyplot()
    rows = result["rows"]
    labels = [f"{r['op']}\nT={r['rows']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 4))
    before, after = "cuBLAS (+ top-k) / grouped-GEMM experts", "skinny GEMM (+ top-k) / two-launch experts"
    ax.bar([i - 0.2 for i in xs], [r["before_pct_of_roofline"] for r in rows], 0.4, label=before)
    ax.bar([i + 0.2 for i in xs], [r["after_pct_of_roofline"] for r in rows], 0.4, label=after)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("% of copy-bandwidth roofline")
    ax.set_title(f"Decode-batch kernels, {result['device']} (CUDA graphs)")
    ax.legend()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
