"""Every message between NanoCP's processes, typed (msgspec Structs, JSON on the wire).

    HTTP/tokenizer --Generate, Abort, FlushCache--> router --Generate, Abort, FlushCache, Wake,
    Reserve, Release, Grown--> worker i --Outputs--> detokenizer --Outputs--> HTTP/tokenizer
    worker i --Reserved, Grow, Load--> router --Outputs (never placed), Cluster--> HTTP/tokenizer
    node r's launcher --NodeHello, NodeStore, NodeReady, NodeAlive, NodeDown--> node 0's
    --DistStore, ClusterReady, NodeAlive, Shutdown--> node r's (several nodes: nanocp_router.nodes)

Each receiver decodes its inbox with `decoder(...)` over the kinds it accepts: a message of
another kind or with a field of the wrong type is refused there (logged, dropped), not
half-handled. The "type" field is each struct's tag. Torch-free: the router imports it.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec


class Message(msgspec.Struct, tag_field="type", omit_defaults=True):
    """Base of every message; the subclass's tag is its wire "type"."""


# ------------------------------------------------------------ requests (tokenizer -> router -> worker)
class Generate(Message, tag="generate"):
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    data_parallel_rank: int | None = None  # pins the request to an instance (no planner)
    # set by the router for a placed request: [instance, start, end] per segment, and its key
    placement: list[list[int]] | None = None
    cp_key: int | None = None
    # --disaggregation-mode decode: the home allocates the prompt's KV at once and answers
    # Reserved with where it lies; a prefill server writes it there (nanocp_router.pd)
    kv_from_prefill: bool = False
    # reusing cached DCP segments in place: positions [0, cached_prefix) are cached on the
    # instances holding them (confirmed by their Reserved), so the home does not compute them
    cached_prefix: int = 0


class Abort(Message, tag="abort"):
    rid: str


class FlushCache(Message, tag="flush_cache"):
    pass


# ------------------------------------------------------------ context parallelism (router <-> worker)
class Wake(Message, tag="wake"):
    """Work arrived somewhere: a lockstep instance idling in its slow poll steps at once."""


class Reserve(Message, tag="reserve"):
    """A holder reserves positions [start, end) of request cp_key; it answers Reserved."""

    cp_key: int
    start: int
    end: int
    want_dest: bool = False  # answer with the pages (a prefill server writes the KV there)
    # prefix cache: the prompt tokens of [start, end), cached under (start, context) when the
    # request is released; reuse: positions from start whose cached KV the router expects there
    context: int = 0
    tokens: list[int] | None = None
    reuse: int = 0


class Reserved(Message, tag="reserved"):
    cp_key: int
    start: int
    ok: bool
    instance: int
    dest: list[KVDest] | None = None  # asked for (want_dest, kv_from_prefill): where the KV goes
    refused: bool = False  # the home refused the request (and answered the client): no retry
    cached: int = 0  # of the positions asked to be reused, those found cached (from start)


class Release(Message, tag="release"):
    """The request is done: a holder frees every segment it holds of it (cache: its prompt KV
    is complete, keep it in the prefix cache)."""

    cp_key: int
    cache: bool = False


class Grow(Message, tag="grow"):
    """A home nears the end of a request's plan: the next `need` positions from `start`."""

    rid: str
    cp_key: int
    start: int
    need: int


class Grown(Message, tag="grown"):
    """The next positions of a request, [instance, start, end], reserved on that instance."""

    rid: str
    cp_key: int
    segment: list[int]


class Load(Message, tag="load"):
    """An instance's load report (at most every REPORT_INTERVAL_S, and when it goes idle)."""

    instance: int
    total_pages: int
    free_pages: int
    page_size: int
    running: int
    waiting: int
    kv_tokens: int
    committed_tokens: int = 0
    retractions: int = 0
    # the prefix cache: pages it holds (free_pages counts the evictable ones as free) and, since
    # start, the prompt tokens admitted and those of them found cached
    cached_pages: int = 0
    cache_hit_tokens: int = 0
    cache_query_tokens: int = 0
    step_kinds: dict[str, int] | None = None
    # [rid, cp_key] of requests finished since the last report: the router frees their
    # segments (the key tells a finished request from a newer one reusing its rid)
    finished: list[tuple[str, int | None]] = []
    cacheable: list[int] = []  # of those, cp_keys whose prompt was prefilled (holders may cache it)
    trace: dict[str, Any] | None = None


# ------------------------------------------------------------ prefill/decode disaggregation (nanocp_router.pd)
class KVDest(msgspec.Struct, array_like=True):
    """Where positions [start, end) of a request go on a decode instance: position p's slot is
    pages[i // page_size] * page_size + i % page_size, i = base + p - start."""

    instance: int
    start: int
    end: int
    base: int
    pages: list[int]


class KVAgent(Message, tag="kv_agent"):
    """A decode instance's transfer endpoint (--disaggregation-transfer-backend), once at start."""

    instance: int
    meta: dict[str, Any]


class PrefillHello(Message, tag="prefill_hello"):
    """A decode server to a prefill server: where to answer, and its instances' endpoints
    (resent every second until the prefill server's heartbeats come)."""

    decode_id: str
    reply_to: str
    agents: list[dict[str, Any]]
    name: str = ""  # what the decode server calls the prefill server (its URL), echoed in heartbeats


class PrefillRequest(Message, tag="prefill_request"):
    """Run a prompt and write its KV to `dest`; answer PrefillDone to the decode server."""

    rid: str
    cp_key: int
    decode_id: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    dest: list[KVDest]
    return_logprob: bool = False
    top_logprobs_num: int = 0


class PrefillAbort(Message, tag="prefill_abort"):
    """Stop a prefill; its PrefillDone (failed) comes once no transfer of it is in flight."""

    decode_id: str
    cp_key: int


class PrefillDone(Message, tag="prefill_done"):
    """A prompt is prefilled and all of its KV written (ok), or it failed (reason); the first
    token comes from the prefill server's logits."""

    cp_key: int
    ok: bool
    token: int = -1
    lp: list[float] | None = None
    top: list[Any] | None = None
    reason: dict[str, Any] | None = None
    kv_bytes: int = 0
    transfer_s: float = 0.0


class PrefillLoad(Message, tag="prefill_load"):
    """A prefill server's heartbeat to each decode server that said hello: its queued tokens."""

    server: str  # the prefill server's id (a new one when it restarts)
    name: str  # PrefillHello.name
    queued_tokens: int
    instances: int


class KVLanded(Message, tag="kv_landed"):
    """KV of [start, end) of request cp_key has landed on a decode instance (a transfer's notice)."""

    instance: int
    cp_key: int
    start: int
    end: int


class KVReady(Message, tag="kv_ready"):
    """To the home: every segment of the request landed; decode starts from the first token."""

    rid: str
    cp_key: int
    token: int
    lp: list[float] | None = None
    top: list[Any] | None = None


class KVFailed(Message, tag="kv_failed"):
    """To the home: the prefill or a transfer failed; the request fails with `reason`."""

    rid: str
    cp_key: int
    reason: dict[str, Any]


# ------------------------------------------------------------ outputs (worker -> detokenizer -> tokenizer)
class Output(msgspec.Struct, omit_defaults=True):
    """What a request produced since its last output; `finished` with its reason at the end."""

    rid: str
    ids: list[int]
    finished: bool
    reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    lp: list[float] | None = None  # logprob of each new token
    top: list[Any] | None = None  # per new token: [[logprob, token id], ...]
    detok: dict[str, Any] | None = None  # the detokenizer's parameters, with a request's first output
    placement: list[list[int]] | None = None  # finished: [instance, tokens] per segment
    cached_tokens: int = 0  # prompt tokens found in the home's prefix cache
    text: str = ""  # set by the detokenizer
    upstream_running: bool = False  # failed in the detokenizer while its worker still runs it

    @classmethod
    def failed(
        cls, rid: str, reason: dict[str, Any], prompt_tokens: int = 0, completion_tokens: int = 0, **kw: Any
    ) -> Output:
        """A request's last output when it ends without (more) tokens: refused, aborted, failed."""
        return cls(rid, [], True, reason, prompt_tokens, completion_tokens, **kw)


class Outputs(Message, tag="out"):
    outputs: list[Output]
    instance: int | None = None  # the worker that sent them


class Cluster(Message, tag="cluster"):
    """The router's view of the cluster, for /server_info and /metrics."""

    instances: list[dict[str, Any]]
    cp_degrees: dict[str, int]
    cp_growth_segments: dict[str, int]
    router_queue: int = 0
    disaggregation: dict[str, Any] | None = None  # a decode server's prefill side (nanocp_router.pd)


# ------------------------------------------------------------ nodes (node r's launcher <-> node 0's)
class NodeReady(Message, tag="node_ready"):
    """Node r's instances have loaded: their info (Worker.info), in instance order."""

    node: int
    instances: list[dict[str, Any]]


class NodeHello(Message, tag="node_hello"):
    """Node r is up (--router-only: it waits for DistStore before starting its instances)."""

    node: int


class NodeStore(Message, tag="node_store"):
    """--router-only: the node of instance 0 hosts the instances' torch.distributed store here."""

    node: int
    address: str  # HOST:PORT


class DistStore(Message, tag="dist_store"):
    """Node 0 to every node (--router-only): where the instances' store is."""

    address: str


class ClusterReady(Message, tag="cluster_ready"):
    """Node 0, once every instance is ready: every instance's KV capacity (Worker.join_cluster)."""

    instance_tokens: list[int]


class NodeAlive(Message, tag="node_alive"):
    """Heartbeat, both ways (nodes.HEARTBEAT_S)."""

    node: int


class NodeDown(Message, tag="node_down"):
    """A process of node r died; its launcher stops the node's other processes."""

    node: int
    message: str


class Shutdown(Message, tag="shutdown"):
    """Node 0 stops: every other node stops its processes."""

    reason: str


# ------------------------------------------------------------ inboxes
ROUTER_INBOX = (
    Generate,
    Abort,
    FlushCache,
    Reserved,
    Grow,
    Load,
    KVAgent,
    KVLanded,
    PrefillDone,
    PrefillLoad,
)
WORKER_INBOX = (Generate, Abort, FlushCache, Wake, Reserve, Release, Grown, KVReady, KVFailed)
PREFILL_ROUTER_INBOX = (PrefillHello, PrefillRequest, PrefillAbort, Load, Generate, Abort, FlushCache)
PREFILL_WORKER_INBOX = (PrefillHello, PrefillRequest, PrefillAbort, Wake)
DETOKENIZER_INBOX = (Outputs,)
TOKENIZER_INBOX = (Outputs, Cluster)
HEAD_CONTROL_INBOX = (NodeHello, NodeStore, NodeReady, NodeAlive, NodeDown)
NODE_CONTROL_INBOX = (DistStore, ClusterReady, NodeAlive, Shutdown)


def _enc_hook(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays in load reports
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decoder(kinds: tuple[type[Message], ...]) -> msgspec.json.Decoder:
    """Decodes (and validates) a message of one of `kinds`; raises msgspec.DecodeError else."""
    return msgspec.json.Decoder(Union[kinds] if len(kinds) > 1 else kinds[0])  # noqa: UP007
