"""Decode-step A/B of code-path variants in ONE process (GPU): the runner and its weights are
built once, and for each variant the CUDA graphs are re-captured with that variant's switches
set, then every (batch, context) is timed; variants are interleaved over --reps repetitions, so
clock and thermal drift between separate processes does not pose as a code effect.

A variant (VARIANTS) switches module attributes the decode path reads at call (capture) time;
"a+b" applies both.

    python -m benchmark.decode_variants --model-path benchmark/configs/qwen3-30b-a3b \\
        --load-format dummy --attention-backend triton --batch 1 2 4 8 --context 1024 32768 131072 \\
        --variants main separate_kv_store small_pairs_8 --tag fusions_h200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from unittest import mock

import torch

from benchmark.common import RESULTS, environment, pyplot, save_figure, write_json
from benchmark.decode_step import decode_batch, kv_bytes_per_token, setup, step_bytes, time_step
from nanocp import ServerArgs
from nanocp.model_executor.cuda_graph_runner import CudaGraphRunner
from nanocp.model_executor.model_runner import ModelRunner


def _attr(target: str, value) -> Callable[[], contextlib.AbstractContextManager]:
    return lambda: mock.patch(target, value)


# name -> (what it changes, the switches as a context manager)
VARIANTS: dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]] = {
    "main": ("the code as it is", contextlib.nullcontext),
    "separate_kv_store": (
        "the step's K/V stored by their own launch, not by qk_norm_rope",
        _attr("nanocp.layers.attention.layer.Attention.kv_store", lambda self, v: None),
    ),
    "small_pairs_8": (
        "the two-launch MoE only up to 8 (token, expert) pairs (1 token at top-8)",
        _attr("nanocp_kernels.small_moe.SMALL_PAIRS", 8),
    ),
    "no_norm_fusion": (
        "the RMSNorms before qkv_proj / the router in their own launches",
        _attr("nanocp_kernels.gemv.NORM_WINS_UP_TO", 0),
    ),
    "qk_early_release": (
        "qk_norm_rope lets the attention launch early (PDL), before it has finished",
        _attr("nanocp_kernels.elementwise.QK_RELEASE_EARLY", True),
    ),
    "no_short_blocks": (
        "the Triton decode attention steps 64 keys at a time also through splits of <= 64 keys",
        _attr("nanocp_kernels.attention.SHORT_BLOCKS", False),
    ),
    "split_waves_1": (
        "Triton decode splits sized to one program per SM (not two)",
        _attr("nanocp_kernels.attention.SPLIT_WAVES", 1),
    ),
    "split_waves_4": (
        "Triton decode splits sized to four programs per SM",
        _attr("nanocp_kernels.attention.SPLIT_WAVES", 4),
    ),
    "block_n_32": (
        "Triton decode attention steps 32 keys at a time (not 64)",
        _attr("nanocp_kernels.attention.DECODE_BLOCK_N", 32),
    ),
    "attention_late_release": (
        "the Triton decode attention lets the split merge launch only when it has finished",
        _attr("nanocp_kernels.attention.RELEASE_EARLY", False),
    ),
    "gemv_up_to_4": (
        "the GEMV projections (not cuBLAS) up to 4 rows",
        _attr("nanocp_kernels.gemv.WINS_UP_TO", 4),
    ),
    "router_up_to_2": (
        "the one-launch router (not cuBLAS + top-k) up to 2 rows",
        _attr("nanocp_kernels.gemv.ROUTER_WINS_UP_TO", 2),
    ),
    "norm_fusion_up_to_2": (
        "the RMSNorm inside the projection / router launch up to 2 rows",
        _attr("nanocp_kernels.gemv.NORM_WINS_UP_TO", 2),
    ),
    "no_pdl": ("no programmatic dependent launch", _attr("nanocp_kernels.launch.PDL", False)),
    "no_small_batch": (
        "cuBLAS projections, cuBLAS router + top-k, grouped-GEMM MoE",
        lambda: mock.patch.dict(os.environ, {"NANOCP_SMALL_BATCH_KERNELS": "0"}),
    ),
}


@contextlib.contextmanager
def captured(runner: ModelRunner, max_bs: int, variant: str) -> Iterator[None]:
    """The variant's switches set, and the runner's graphs captured under them."""
    with contextlib.ExitStack() as stack:
        for name in variant.split("+"):
            stack.enter_context(VARIANTS[name][1]())
        runner.graph_runner = None
        torch.cuda.empty_cache()
        runner.graph_runner = CudaGraphRunner(runner, max_bs)  # ctx.dcp_graph: the runner's, if any
        yield


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 32768])
    p.add_argument("--variants", nargs="+", default=["main"], help=f"names from {sorted(VARIANTS)}, or a+b")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tag", required=True)
    args = p.parse_args(argv)
    for name in {n for v in args.variants for n in v.split("+")} - VARIANTS.keys():
        p.error(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
    sa, runner, kv, bw = setup(args)
    cfg, kv_tok = runner.hf_config, kv_bytes_per_token(runner)
    rows = []
    for rep in range(args.reps):
        for variant in args.variants:
            with captured(runner, max(args.batch), variant):
                for context in args.context:
                    for batch in args.batch:
                        if batch * (context + 1) > runner.max_total_num_tokens:
                            continue
                        fb, reqs = decode_batch(runner, kv, batch, context)
                        t = time_step(runner, fb, True, args.iters)
                        for r in reqs:
                            kv.release(r)
                        roof = step_bytes(cfg, batch, context, kv_tok) / bw
                        rows.append(dict(rep=rep, variant=variant, batch=batch, context=context, graph_s=t,
                                         graph_pct_of_roofline=100 * roof / t))  # fmt: skip
                        print(
                            json.dumps(
                                {k: round(v, 6) if isinstance(v, float) else v for k, v in rows[-1].items()}
                            )
                        )
    result = {
        "benchmark": "decode_variants",
        "command": "python -m benchmark.decode_variants " + " ".join(sys.argv[1:] if argv is None else argv),
        **environment("cuda"),
        "model": sa.model_path,
        "attention_backend": sa.attention_backend,
        "copy_bandwidth_Bps": bw,
        "variants": {v: "; ".join(VARIANTS[n][0] for n in v.split("+")) for v in args.variants},
        "rows": rows,
        "summary": summarize(rows),
    }
    write_json(RESULTS / f"decode_variants_{args.tag}.json", result)
    plot(result, args.tag)
    for line in result["summary"]:
        print(line)
    return result


def summarize(rows: list[dict]) -> list[str]:
    """One line per (batch, context): each variant's best-of-reps ms and its ratio to the first."""
    best: dict[tuple, dict[str, float]] = {}
    for r in rows:
        cell = best.setdefault((r["batch"], r["context"]), {})
        cell[r["variant"]] = min(cell.get(r["variant"], float("inf")), r["graph_s"])
    out = []
    for (b, c), cell in best.items():
        first = next(iter(cell.values()))
        out.append(
            f"batch {b} ctx {c}: "
            + ", ".join(f"{v} {1e3 * s:.3f} ms ({s / first:.3f}x)" for v, s in cell.items())
        )
    return out


def plot(result: dict, tag: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    keys = sorted({(r["context"], r["batch"]) for r in result["rows"]})
    width = 0.8 / len(result["variants"])
    for i, v in enumerate(result["variants"]):
        pct = [max(r["graph_pct_of_roofline"] for r in result["rows"] if r["variant"] == v and (r["context"], r["batch"]) == k)
               for k in keys]  # fmt: skip
        ax.bar([j + i * width for j in range(len(keys))], pct, width, label=v)
    ax.axhline(70, color="grey", ls="--", lw=0.8)
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(keys))], [f"b{b}\n{c // 1024}k" for c, b in keys], fontsize=7
    )
    ax.set_ylabel("% of roofline (CUDA graphs, best of reps)")
    ax.legend(fontsize=7)
    ax.set_title(f"Decode-step variants, one process, {result['device']}", fontsize=9)
    save_figure(fig, RESULTS / f"decode_variants_{tag}.png")


if __name__ == "__main__":
    main()
