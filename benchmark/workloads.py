"""Long-tail serving workloads: request lengths and arrival times, seeded and reproducible.

    from benchmark.workloads import make_workload
    reqs = make_workload("chat-docs", num_requests=1000, rate=4.0, seed=0, arrival="gamma", cv=2.0)

Length models (all clipped to [lo, hi]):
- lognormal(median, sigma): chat-like prompts/answers (a fit to ShareGPT-style traffic);
- pareto(alpha, xmin): heavy tail (documents, agent traces);
- mixes of them, e.g. "chat-docs": 90% chat <= 2k tokens + 10% documents of 32k-256k.
Arrivals: Poisson (exponential gaps) or bursty Gamma gaps with coefficient of variation cv > 1.
`to_bench_serving_jsonl` exports a workload as a `--dataset-name custom` file for
`python -m sglang.bench_serving`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Request:
    arrival_s: float
    input_len: int
    output_len: int
    kind: str = ""


Sampler = Callable[[np.random.Generator, int], np.ndarray]


def lognormal(median: float, sigma: float, lo: int, hi: int) -> Sampler:
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(np.int64)

    return sample


def pareto(alpha: float, xmin: int, hi: int) -> Sampler:
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.clip(np.round(xmin * (1 + rng.pareto(alpha, n))), xmin, hi).astype(np.int64)

    return sample


def log_uniform(lo: int, hi: int) -> Sampler:
    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.round(np.exp(rng.uniform(np.log(lo), np.log(hi), n))).astype(np.int64)

    return sample


@dataclass(frozen=True)
class Component:
    weight: float
    kind: str
    input_len: Sampler
    output_len: Sampler


MIXES: dict[str, list[Component]] = {
    # 90% chat (prompts <= 2k) + 10% long documents (32k-256k), the DCP paper's long-tail setting
    "chat-docs": [
        Component(0.9, "chat", lognormal(600, 0.8, 16, 2048), lognormal(200, 0.7, 8, 1024)),
        Component(0.1, "doc", log_uniform(32_768, 262_144), lognormal(300, 0.6, 16, 2048)),
    ],
    # a smaller tail for CPU-size runs: 90% <= 256, 10% 2k-8k
    "chat-docs-small": [
        Component(0.9, "chat", lognormal(96, 0.7, 4, 256), lognormal(24, 0.5, 4, 64)),
        Component(0.1, "doc", log_uniform(2_048, 8_192), lognormal(24, 0.5, 4, 64)),
    ],
    # one GPU-run size: 90% chat <= 2k, 10% documents 8k-32k; short answers keep runs in minutes
    "chat-docs-medium": [
        Component(0.9, "chat", lognormal(600, 0.8, 16, 2048), lognormal(64, 0.5, 8, 256)),
        Component(0.1, "doc", log_uniform(8_192, 32_768), lognormal(64, 0.5, 8, 256)),
    ],
    # heavy-tailed (Pareto) prompts
    "pareto": [Component(1.0, "pareto", pareto(1.2, 256, 262_144), lognormal(200, 0.7, 8, 1024))],
    "chat": [Component(1.0, "chat", lognormal(600, 0.8, 16, 2048), lognormal(200, 0.7, 8, 1024))],
}


def arrivals(
    rng: np.random.Generator, n: int, rate: float, kind: str = "poisson", cv: float = 1.0
) -> np.ndarray:
    """Arrival times (s) of n requests at mean `rate` req/s. gamma: gaps with the given
    coefficient of variation (cv = 1 is Poisson; cv > 1 is bursty). rate = inf: all at 0."""
    if np.isinf(rate):
        return np.zeros(n)
    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif kind == "gamma":
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    else:
        raise ValueError(f"arrival must be poisson or gamma, got {kind!r}")
    return np.cumsum(gaps) - gaps[0]


def make_workload(
    mix: str | list[Component],
    num_requests: int,
    rate: float = float("inf"),
    seed: int = 0,
    arrival: str = "poisson",
    cv: float = 1.0,
) -> list[Request]:
    comps = MIXES[mix] if isinstance(mix, str) else mix
    rng = np.random.default_rng(seed)
    weights = np.array([c.weight for c in comps], dtype=float)
    which = rng.choice(len(comps), size=num_requests, p=weights / weights.sum())
    ins = np.zeros(num_requests, dtype=np.int64)
    outs = np.zeros(num_requests, dtype=np.int64)
    for k, comp in enumerate(comps):
        idx = np.nonzero(which == k)[0]
        ins[idx] = comp.input_len(rng, len(idx))
        outs[idx] = comp.output_len(rng, len(idx))
    times = arrivals(rng, num_requests, rate, arrival, cv)
    return [Request(float(t), int(i), int(o), comps[k].kind) for t, i, o, k in zip(times, ins, outs, which)]


@functools.lru_cache(maxsize=8)
def _pool(mix: str, size: int, seed: int) -> tuple[Request, ...]:
    return tuple(make_workload(mix, size, rate=1.0, seed=seed))


def nested_workload(
    mix: str, num_requests: int, rate: float, seed: int = 0, pool_size: int = 2000
) -> list[Request]:
    """The first num_requests requests of one seeded pool (at least pool_size long), arrivals
    scaled to `rate`: every rate replays a prefix of the same request sequence, so runs at
    different rates differ only in load (a goodput search over them is not confounded by a new
    draw of lengths per rate). Callers that compare rates must keep pool_size fixed."""
    pool = _pool(mix, max(num_requests, pool_size), seed)
    return [replace(r, arrival_s=r.arrival_s / rate) for r in pool[:num_requests]]


def summary(reqs: list[Request]) -> dict[str, Any]:
    ins = np.array([r.input_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    return {
        "num_requests": len(reqs),
        "input_mean": float(ins.mean()),
        "input_p50": float(np.median(ins)),
        "input_p99": float(np.percentile(ins, 99)),
        "output_mean": float(outs.mean()),
        "duration_s": reqs[-1].arrival_s if reqs else 0.0,
    }


def save(reqs: list[Request], path: str | Path) -> None:
    Path(path).write_text("\n".join(json.dumps(asdict(r)) for r in reqs) + "\n")


def load(path: str | Path) -> list[Request]:
    return [Request(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def to_bench_serving_jsonl(reqs: list[Request], tokenizer: Any, path: str | Path, seed: int = 0) -> None:
    """Write a `--dataset-name custom --dataset-path PATH` file for sglang.bench_serving: one
    conversation per request whose prompt and answer have about input_len / output_len tokens
    (random token ids decoded; retokenization can shift a length by a few tokens)."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ok = np.array([t for t in range(vocab) if t not in special])
    with open(path, "w") as f:
        for r in reqs:
            prompt = tokenizer.decode(rng.choice(ok, r.input_len).tolist())
            answer = tokenizer.decode(rng.choice(ok, r.output_len).tolist())
            f.write(json.dumps({"conversations": [{"content": prompt}, {"content": answer}]}) + "\n")
