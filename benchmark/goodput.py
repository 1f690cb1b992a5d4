"""SLO goodput: the highest request rate at which enough requests meet the latency SLO.

`goodput_search(measure, ...)` bisects over the request rate. `measure(rate)` runs (or simulates)
the workload at that rate and returns per-request metrics (dicts with "tpot" and "ttft" in
seconds); a rate passes when at least `attainment` of the requests meet the TPOT SLO (and the
TTFT SLO if given). Attainment is assumed to fall as the rate rises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    a = np.asarray(values, dtype=float)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def attainment(metrics: list[dict], tpot_slo: float, ttft_slo: float | None = None) -> float:
    if not metrics:
        return 0.0
    ok = sum(1 for m in metrics if m["tpot"] <= tpot_slo and (ttft_slo is None or m["ttft"] <= ttft_slo))
    return ok / len(metrics)


@dataclass
class GoodputResult:
    goodput: float  # req/s; 0 if even the lowest rate fails
    points: list[dict] = field(default_factory=list)  # every measured rate, in order


MAX_BRACKET_GROWTH = 16  # the search may raise `hi` up to this factor while the SLO still holds


def goodput_search(
    measure: Callable[[float], list[dict]],
    tpot_slo: float,
    ttft_slo: float | None = None,
    attain: float = 0.9,
    lo: float = 0.1,
    hi: float = 64.0,
    rel_tol: float = 0.05,
    max_iters: int = 20,
) -> GoodputResult:
    points: list[dict] = []

    def probe(rate: float) -> bool:
        metrics = measure(rate)
        a = attainment(metrics, tpot_slo, ttft_slo)
        points.append(
            {
                "rate": rate,
                "attainment": a,
                "tpot": percentiles([m["tpot"] for m in metrics]),
                "ttft": percentiles([m["ttft"] for m in metrics]),
                "e2e": percentiles([m["e2e"] for m in metrics if "e2e" in m]),
            }
        )
        return a >= attain

    if not probe(lo):
        return GoodputResult(0.0, points)
    cap = hi * MAX_BRACKET_GROWTH
    while probe(hi):  # grow the bracket until it fails
        lo, hi = hi, hi * 2
        if hi > cap:
            return GoodputResult(lo, points)  # at least this much: the search range ends here

    for _ in range(max_iters):
        if hi - lo <= rel_tol * lo:
            break
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return GoodputResult(lo, points)
