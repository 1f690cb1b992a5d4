"""Running a real server per context-parallel mode and watching its cluster state over time
(shared by benchmark.compare and benchmark.dcp_balance)."""

from __future__ import annotations

import threading
import time
from statistics import mean

import httpx
import numpy as np


def modes(dp: int, min_shard_tokens: int) -> dict[str, list[str]]:
    """The three policies compared: static DP, uniform CP over every instance, DCP."""
    return {
        "static DP": ["--cp-policy", "none", "--load-balance-method", "total_requests"],
        f"uniform CP (cp-size {dp})": ["--cp-policy", "uniform", "--cp-size", str(dp)],
        "DCP": ["--cp-policy", "dynamic", "--cp-min-shard-tokens", str(min_shard_tokens)],
    }


def server_flags(
    model: str, dp: int, device: str, max_total_tokens: int, *extra: str, chunked_prefill: int = 1024
) -> list[str]:
    return [
        "--model-path", model, "--dp-size", str(dp), "--ep-size", str(dp), "--device", device,
        "--chunked-prefill-size", str(chunked_prefill), "--page-size", "16",
        "--max-total-tokens", str(max_total_tokens), *extra,
    ]  # fmt: skip


def warm_up(url: str, dp: int, chunked_prefill: int, timeout: float = 900.0) -> None:
    """Before measuring: per instance one prompt of two prefill chunks beside short ones, so each
    instance runs extend, extend-with-prefix, mixed and decode steps (and a context-parallel
    policy shards the long ones). Kernels JIT-compile on their first shapes (seconds each on a
    GPU); with an 8-token warm-up the first measured run of a fresh machine paid for them."""
    from concurrent.futures import ThreadPoolExecutor

    info = httpx.get(url + "/model_info", timeout=30).json()
    long_len = min(2 * chunked_prefill + 16, info["context_length"] - 8)
    # (prompt, instance): pinned, so no balancing policy can put both long ones on one instance
    prompts = [([11] * long_len, i) for i in range(dp)] + [([11] * 8, i % dp) for i in range(2 * dp)]

    def send(prompt: tuple[list[int], int]) -> None:
        ids, rank = prompt
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 4, "ignore_eos": True},
            "data_parallel_rank": rank,
        }
        httpx.post(url + "/generate", json=body, timeout=timeout).raise_for_status()

    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(send, prompts))


def wait_idle(url: str, timeout: float = 600.0) -> None:
    """Until every instance is idle with its KV pool free (between measured runs)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            cluster = c.get("/server_info").json()["cluster"]
            if all(
                i["running"] == 0 and i["waiting"] == 0 and i["free_pages"] == i["total_pages"]
                for i in cluster
            ):
                return
            time.sleep(0.25)
    raise TimeoutError(f"server at {url} did not become idle")


class ClusterSampler:
    """Polls /server_info in a thread: per-instance KV tokens held and running requests, and the
    cluster's retractions so far."""

    def __init__(self, url: str, interval: float = 0.25) -> None:
        self.url, self.interval = url, interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self._stop.is_set():
                cluster = c.get("/server_info").json()["cluster"]
                self.samples.append(
                    {
                        "t": round(time.perf_counter() - t0, 3),
                        "kv_tokens": [(i["total_pages"] - i["free_pages"]) * i["page_size"] for i in cluster],
                        "batch": [i["running"] for i in cluster],
                        "retracted": sum(i.get("retractions", 0) for i in cluster),
                    }
                )
                self._stop.wait(self.interval)

    def __enter__(self) -> ClusterSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def retractions(self) -> int:
        """Requests retracted (KV freed, recomputed later) while sampling."""
        return self.samples[-1]["retracted"] - self.samples[0]["retracted"] if self.samples else 0

    def imbalance(self) -> dict[str, float]:
        """Time-averaged max/mean over instances of KV held and of running requests (busy samples)."""
        busy = [x for x in self.samples if sum(x["kv_tokens"]) > 0]

        def ratio(key: str) -> float:
            vals = [max(x[key]) / mean(x[key]) for x in busy if mean(x[key]) > 0]
            return float(np.mean(vals)) if vals else 1.0

        return {"kv_max_over_mean": ratio("kv_tokens"), "batch_max_over_mean": ratio("batch")}


def plot_timelines(axes_rows, runs: dict[str, dict]) -> None:
    """One row per mode: KV tokens and running requests per instance over time."""
    for row, (mode, r) in zip(axes_rows, runs.items()):
        t = [x["t"] for x in r["samples"]]
        for col, (key, label, stat) in enumerate(
            (
                ("kv_tokens", "KV tokens held", "kv_max_over_mean"),
                ("batch", "running requests", "batch_max_over_mean"),
            )
        ):
            ax = row[col]
            series = np.array([x[key] for x in r["samples"]])
            for i in range(series.shape[1] if len(series) else 0):
                ax.plot(t, series[:, i], label=f"instance {i}", lw=1)
            ax.set_title(f"{mode}: {label} (mean max/mean {r['imbalance'][stat]:.2f})", fontsize=9)
            ax.set_xlabel("s")
        row[0].legend(fontsize=7)
