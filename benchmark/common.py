"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

# A CPU-friendly MoE big enough that attention and experts take measurable time.
BENCH_MODEL = dict(
    arch="qwen3_moe",
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=32768,
)


def pyplot():
    """matplotlib.pyplot with the file-only backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gpu_tag() -> str:
    """The GPU's short name, lower case ("h200", "h100"): the default tag of result files."""
    import torch

    return torch.cuda.get_device_name().split()[1].lower()


def log_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes (x in powers of 2: sizes, batches, counts) with labels and a small legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def save_figure(fig, path, dpi: int = 110) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")


def bench_model_path() -> str:
    """The benchmark model (random weights), created once in the cache dir."""
    from nanocp.testing.tiny_model import cached_tiny_model

    return cached_tiny_model("bench-tiny-moe-v2", **BENCH_MODEL)


def environment(device: str = "cpu") -> dict[str, Any]:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def print_row(row: dict[str, Any]) -> None:
    """One measured point as a JSON line (floats rounded), as the GPU benchmarks print them."""
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def save_rows(name: str, tag: str | None, args, rows: list[dict[str, Any]], plot) -> dict[str, Any]:
    """results/<name>_<tag>.{json,png} (tag: the GPU's) of a GPU benchmark's rows, with the
    device, date and command; plot(result, path) draws the figure."""
    tag = tag or gpu_tag()
    result = {"benchmark": name, **environment("cuda"), "command": f"{vars(args)}", "rows": rows}
    write_json(RESULTS / f"{name}_{tag}.json", result)
    plot(result, RESULTS / f"{name}_{tag}.png")
    return result


def kernel_profile(fn, reps: int = 5, per_call: int = 1, top: int = 25) -> list[dict[str, Any]]:
    """GPU kernels of `fn` (e.g. a CUDA-graph replay: its kernels are traced one by one), as
    [{kernel, us, calls}] per call of the measured unit (reps runs of fn, each holding per_call
    units), most expensive first; the last row sums the rest and "total" all of them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    n = reps * per_call
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None)
        us = evt.cuda_time_total if us is None else us
        if us > 0:
            rows.append({"kernel": evt.key[:90], "us": us / n, "calls": evt.count / n})
    rows.sort(key=lambda r: -r["us"])
    rest = rows[top:]
    out = rows[:top]
    if rest:
        out.append({"kernel": f"({len(rest)} others)", "us": sum(r["us"] for r in rest),
                    "calls": sum(r["calls"] for r in rest)})  # fmt: skip
    out.append({"kernel": "total", "us": sum(r["us"] for r in rows), "calls": sum(r["calls"] for r in rows)})
    return [{**r, "us": round(r["us"], 2), "calls": round(r["calls"], 2)} for r in out]


def print_kernel_profile(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    for r in rows:
        print(f"  {r['us']:10.2f} us  {r['calls']:7.2f}x  {r['kernel']}")
