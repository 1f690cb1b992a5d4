"""Prometheus metrics of the HTTP process (GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1,
    2,
    5,
    10,
    20,
    60,
    120,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "nanocp:num_requests",
            "Finished requests by outcome: stop / length, abort (by the client), error (failed after it was "
            "accepted), rejected (503: the request queue was full, --max-queued-requests)",
            ["outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("nanocp:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("nanocp:generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "nanocp:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "nanocp:time_per_output_token_seconds",
            "Mean time per output token after the first",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "nanocp:e2e_request_latency_seconds",
            "End-to-end request latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "nanocp:num_requests_in_flight", "Requests accepted and not finished", registry=r
        )
        self.queue = Gauge(
            "nanocp:num_queue_reqs",
            "Requests waiting: on the instances and in the router's queue",
            registry=r,
        )
        self.router_queue = Gauge(
            "nanocp:num_router_queue_reqs",
            "Requests waiting in the router for a placement (dynamic CP)",
            registry=r,
        )
        self.running = Gauge("nanocp:num_running_reqs", "Running batch size", ["instance"], registry=r)
        self.kv_usage = Gauge(
            "nanocp:kv_usage",
            "Fraction of KV cache pages in use by requests (evictable cached pages count as free)",
            ["instance"],
            registry=r,
        )
        self.cached_pages = Gauge(
            "nanocp:cached_pages", "KV pages held by the prefix cache", ["instance"], registry=r
        )
        self.cache_hit_rate = Gauge(
            "nanocp:cache_hit_rate",
            "Admitted prompt tokens found in the prefix cache / all admitted prompt tokens, since start",
            ["instance"],
            registry=r,
        )
        self.cached_tokens = Gauge(
            "nanocp:cached_tokens_total",
            "Admitted prompt tokens found in the prefix cache",
            ["instance"],
            registry=r,
        )
        self.kv_tokens = Gauge("nanocp:kv_tokens", "Tokens held in the KV cache", ["instance"], registry=r)
        self.step_time = Gauge(
            "nanocp:step_time_seconds_total",
            "Cumulative step time by part (with --step-trace-file; moe_comm includes waiting for stragglers)",
            ["instance", "part"],
            registry=r,
        )
        self.cp_degree = Gauge(
            "nanocp:cp_degree_requests", "Requests placed per context-parallel degree", ["degree"], registry=r
        )
        self.cp_growth = Gauge(
            "nanocp:cp_growth_segments",
            "Tail quotas placed by growth re-planning, on the request's home or moved to another instance",
            ["where"],
            registry=r,
        )
        self.steps = Gauge("nanocp:traced_steps_total", "Traced steps", ["instance"], registry=r)
        self.forward_steps = Gauge(
            "nanocp:forward_steps_total",
            "Forward steps by how they ran: eager, graph (CUDA graph), graph_dcp (with DCP routing inside)",
            ["instance", "kind"],
            registry=r,
        )
        self.retractions = Gauge(
            "nanocp:num_retracted_reqs_total",
            "Requests retracted to free KV cache (recomputed later), cumulative",
            ["instance"],
            registry=r,
        )
        # --disaggregation-mode decode (cumulative, from the router): KV from prefill servers
        disagg = {
            "requests": ("kv_transfer_requests_total", "Requests whose prompt KV came from a prefill server"),
            "failed": ("kv_transfer_failed_total", "Requests failed before decoding (prefill or transfer)"),
            "kv_bytes": ("kv_transfer_bytes_total", "KV bytes written by prefill servers"),
            "transfer_s": ("kv_transfer_seconds_total", "Prefill + transfer time on the prefill servers"),
            "kv_wait_s": ("kv_wait_seconds_total", "Time requests waited from planning until all KV landed"),
            "in_flight": ("kv_transfer_in_flight", "Requests between planning and their first decode step"),
        }
        self.disagg = {k: Gauge(f"nanocp:{name}", doc, registry=r) for k, (name, doc) in disagg.items()}

    def on_finish(
        self, outcome: str, prompt_tokens: int, completion_tokens: int, ttft: float | None, e2e: float
    ) -> None:
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
            if completion_tokens > 1:
                self.tpot.observe((e2e - ttft) / (completion_tokens - 1))

    def on_cluster(
        self,
        instances: list[dict],
        cp_degrees: dict[str, int] | None = None,
        growth: dict[str, int] | None = None,
        router_queue: int = 0,
        disaggregation: dict | None = None,
    ) -> None:
        self.queue.set(sum(i["waiting"] for i in instances) + router_queue)
        if disaggregation:
            for key, gauge in self.disagg.items():
                gauge.set(disaggregation.get(key, 0))
        self.router_queue.set(router_queue)
        for degree, count in (cp_degrees or {}).items():
            self.cp_degree.labels(degree).set(count)
        for where, count in (growth or {}).items():
            self.cp_growth.labels(where).set(count)
        for i in instances:
            label = str(i["instance"])
            self.running.labels(label).set(i["running"])
            self.kv_usage.labels(label).set(i["kv_usage"])
            self.kv_tokens.labels(label).set(i["kv_tokens"])
            self.retractions.labels(label).set(i.get("retractions", 0))
            self.cached_pages.labels(label).set(i.get("cached_pages", 0))
            hits, queries = i.get("cache_hit_tokens", 0), i.get("cache_query_tokens", 0)
            self.cached_tokens.labels(label).set(hits)
            self.cache_hit_rate.labels(label).set(hits / queries if queries else 0.0)
            for kind, n in (i.get("step_kinds") or {}).items():
                self.forward_steps.labels(label, kind).set(n)
            trace = i.get("trace")
            if trace:
                self.steps.labels(label).set(trace["steps"])
                for part in ("step", "attention", "moe_compute", "moe_comm"):
                    self.step_time.labels(label, part).set(trace.get(f"{part}_s", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
