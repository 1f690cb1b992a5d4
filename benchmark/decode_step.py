"""Decode step time vs the memory roofline (GPU), with and without CUDA graphs.

For each (batch, context) that fits in the KV cache, `batch` synthetic requests with `context`
tokens of KV each run one decode step through the real model runner (random KV contents; the
cost does not depend on them). Roofline = bytes a step must read / the device's measured copy
bandwidth, where bytes = attention + dense weights (lm_head included) + the experts the batch
routes to (expected count for uniform routing: E * (1 - (1 - k/E)^batch) per layer) + the KV.
Also writes a cost profile (simulator.cost.ProfileCost) fitted to the measurements.

    python -m benchmark.decode_step --model-path benchmark/configs/qwen3-30b-a3b --load-format dummy \
        --attention-backend flashinfer --batch 1 8 32 64 128 256 --context 1024 8192 32768 131072
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmark.common import (
    RESULTS,
    environment,
    gpu_tag,
    kernel_profile,
    print_kernel_profile,
    pyplot,
    save_figure,
    write_json,
)
from benchmark.simulator.cost import ProfileCost
from nanocp import ServerArgs
from nanocp.engine.forward_batch import ForwardBatch, ForwardMode
from nanocp.kvcache.manager import KVManager
from nanocp.model_executor.model_runner import ModelRunner


@dataclass
class FakeReq:  # what KVManager needs of a request
    req_pool_idx: int | None = None
    kv_pages: list[int] = field(default_factory=list)
    kv_len: int = 0
    held_ranges: list[tuple[int, int]] | None = None


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy (read + write)."""
    n = int(gib * 2**30) // 2
    a, b = (
        torch.empty(n, dtype=torch.bfloat16, device=device),
        torch.empty(n, dtype=torch.bfloat16, device=device),
    )
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 2 * 10 / (start.elapsed_time(end) / 1e3)


def decode_batch(
    runner: ModelRunner, kv: KVManager, batch: int, context: int
) -> tuple[ForwardBatch, list[FakeReq]]:
    reqs = [FakeReq() for _ in range(batch)]
    for r in reqs:
        if kv.extend(r, context + 1) is None:
            raise RuntimeError("KV cache full")
    dev = runner.device
    table = runner.req_to_token_pool.req_to_token
    rows = torch.tensor([r.req_pool_idx for r in reqs], device=dev)
    return (
        ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=batch,
            input_ids=torch.randint(0, runner.vocab_size, (batch,), device=dev),
            positions=torch.full((batch,), context, device=dev),
            out_cache_loc=table[rows, context],
            req_pool_indices=rows,
            seq_lens=torch.full((batch,), context + 1, device=dev),
            logits_indices=torch.arange(batch, device=dev),
            seq_lens_cpu=[context + 1] * batch,
            extend_seq_lens_cpu=[1] * batch,
        ),
        reqs,
    )


def time_step(runner: ModelRunner, batch: ForwardBatch, graphs: bool, iters: int) -> float:
    saved = runner.graph_runner
    if not graphs:
        runner.graph_runner = None
    try:
        for _ in range(3):
            runner.forward(batch)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            runner.forward(batch)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    finally:
        runner.graph_runner = saved


def step_bytes(cfg, batch: int, context: int, kv_bytes_per_token: int) -> float:
    h, layers, e, k = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
    d = cfg.head_dim
    attn = h * d * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2) + h * e  # qkvo + router
    expert = 3 * h * cfg.moe_intermediate_size
    touched = e * (1 - (1 - k / e) ** batch)
    weights = layers * (attn + touched * expert) + cfg.vocab_size * h  # lm_head (embedding: a few rows)
    return 2 * weights + batch * (context + 1) * kv_bytes_per_token


def profile_step(runner: ModelRunner, kv: KVManager, batch: int, context: int) -> dict:
    """CUDA kernels of one decode step (replayed from its CUDA graph when there is one), per step:
    where the roofline gap is."""
    fb, reqs = decode_batch(runner, kv, batch, context)
    time_step(runner, fb, True, 2)
    rows = kernel_profile(lambda: runner.forward(fb), reps=5)
    for r in reqs:
        kv.release(r)
    mode = "graph" if runner.graph_runner else "eager"
    print_kernel_profile(f"kernels of one decode step ({mode}), batch {batch}, context {context}:", rows)
    return {"batch": batch, "context": context, "mode": mode, "kernels": rows}


def fit_profile(rows: list[dict], kv_capacity: int, device: str) -> ProfileCost:
    """Linear fit of the graph step time: a + b * tokens + c * KV tokens (one instance)."""
    x = np.array([[1.0, r["batch"], r["batch"] * r["context"]] for r in rows])
    y = np.array([r["graph_s"] for r in rows])
    a, b, c = np.linalg.lstsq(x, y, rcond=None)[0]
    return ProfileCost(
        num_instances=1,
        kv_capacity=kv_capacity,
        attn_per_kv_token_s=float(max(c, 0.0)),
        attn_per_request_s=0.0,
        compute_base_s=float(max(a, 0.0)),
        compute_per_token_s=float(max(b, 0.0)),
        moe_comm_base_s=0.0,
        moe_comm_per_token_s=0.0,
        routing_per_query_s=0.0,
        device=device,
        source="benchmark.decode_step (CUDA-graph decode, one instance; MoE comm and routing not measured)",
    )


def setup(args: argparse.Namespace) -> tuple[ServerArgs, ModelRunner, KVManager, float]:
    """The runner for decode batches up to max(args.batch) x max(args.context) (graphs for every
    batch bucket), its KV manager and the device's measured copy bandwidth."""
    args.device, args.skip_tokenizer_init = "cuda", True
    args.max_running_requests = max(args.max_running_requests or 0, max(args.batch))
    args.cuda_graph_max_bs = max(args.batch)
    args.context_length = args.context_length or max(args.context) + 1
    sa = ServerArgs.from_cli_args(args)
    runner = ModelRunner(sa)
    return (
        sa,
        runner,
        KVManager(runner.page_allocator, runner.req_to_token_pool),
        copy_bandwidth(runner.device),
    )


def kv_bytes_per_token(runner: ModelRunner) -> int:
    cfg = runner.hf_config
    return runner.kv_pool.bytes_per_token(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, runner.dtype
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tag", default=None)
    p.add_argument(
        "--profile",
        type=int,
        nargs=2,
        action="append",
        metavar=("BATCH", "CONTEXT"),
        help="kernel breakdown of one step at BATCH x CONTEXT (repeatable; saved in the result)",
    )
    args = p.parse_args(argv)
    sa, runner, kv, bw = setup(args)
    cfg, kv_tok = runner.hf_config, kv_bytes_per_token(runner)
    rows = []
    for context in args.context:
        for batch in args.batch:
            if batch * (context + 1) > runner.max_total_num_tokens or context >= runner.context_length:
                continue
            fb, reqs = decode_batch(runner, kv, batch, context)
            graph_s = time_step(runner, fb, True, args.iters) if runner.graph_runner else float("nan")
            eager_s = time_step(runner, fb, False, max(3, args.iters // 4))
            for r in reqs:
                kv.release(r)
            roof = step_bytes(cfg, batch, context, kv_tok) / bw
            rows.append(
                {
                    "batch": batch,
                    "context": context,
                    "graph_s": graph_s,
                    "eager_s": eager_s,
                    "roofline_s": roof,
                    "graph_pct_of_roofline": 100 * roof / graph_s,
                    "eager_pct_of_roofline": 100 * roof / eager_s,
                }
            )
            print(
                json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                flush=True,
            )
    profiles = [profile_step(runner, kv, *bc) for bc in args.profile or []]
    tag = args.tag or f"{sa.attention_backend}_{gpu_tag()}"
    result = {
        "benchmark": "decode_step",
        "command": "python -m benchmark.decode_step " + " ".join(sys.argv[1:] if argv is None else argv),
        **environment("cuda"),
        "model": sa.model_path,
        "load_format": sa.load_format,
        "attention_backend": sa.attention_backend,
        "moe_runner_backend": sa.moe_runner_backend,
        "copy_bandwidth_Bps": bw,
        "kv_capacity_tokens": runner.max_total_num_tokens,
        "rows": rows,
        **({"profiles": profiles} if profiles else {}),
    }
    write_json(RESULTS / f"decode_step_{tag}.json", result)
    (RESULTS / f"profile_{tag}.json").write_text(
        fit_profile(rows, runner.max_total_num_tokens, result["device"]).to_json() + "\n"
    )
    plot(result, tag)
    return result


def plot(result: dict, tag: str) -> None:
    plt = pyplot()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    for context in sorted({r["context"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["context"] == context]
        b = [r["batch"] for r in rs]
        line = ax.plot(b, [1e3 * r["graph_s"] for r in rs], marker="o", label=f"ctx {context} graph")[0]
        ax.plot(
            b, [1e3 * r["eager_s"] for r in rs], ls=":", color=line.get_color(), label=f"ctx {context} eager"
        )
        ax.plot(b, [1e3 * r["roofline_s"] for r in rs], ls="--", color=line.get_color(), lw=0.8)
        bx.plot(b, [r["graph_pct_of_roofline"] for r in rs], marker="o", label=f"ctx {context}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode step (ms); dashed: roofline")
    ax.legend(fontsize=6)
    bx.axhline(70, color="grey", ls="--", lw=0.8)
    bx.set_xscale("log", base=2)
    bx.set_xlabel("batch")
    bx.set_ylabel("% of roofline (CUDA graphs)")
    bx.legend(fontsize=7)
    fig.suptitle(
        f"Decode step, {result['model'].rstrip('/').split('/')[-1]} ({result['load_format']}), {result['device']}, "
        f"{result['attention_backend']} attention, {result['moe_runner_backend']} MoE; copy BW "
        f"{result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s",
        fontsize=9,
    )
    save_figure(fig, RESULTS / f"decode_step_{tag}.png")


if __name__ == "__main__":
    main()
