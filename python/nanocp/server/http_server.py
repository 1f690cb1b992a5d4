"""HTTP entrypoints: SGLang's native API (/generate, /health, /server_info, ...) and /metrics.

The OpenAI-compatible routes live in openai_api.py. Every client error becomes an HTTP 400 with an
OpenAI-style error body naming the offending field; engine failures become 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from nanocp.errors import InvalidRequestError
from nanocp.sampling.sampling_params import short_repr
from nanocp.server.errors import error_response, json_response
from nanocp.server.openai_api import add_openai_routes
from nanocp.server.request_body import BodyTooLarge, read_json
from nanocp.server.streaming import (
    ClientDisconnected,
    last_state,
    primed,
    sse_stream,
    until_done_or_disconnect,
)
from nanocp.server.tokenizer_manager import EngineError, ReqState, TokenizerManager
from nanocp.version import __version__

logger = logging.getLogger("nanocp.http")

GENERATE_FIELDS = {
    "data_parallel_rank",
    "text",
    "input_ids",
    "sampling_params",
    "stream",
    "rid",
    "return_logprob",
    "top_logprobs_num",
    "logprob_start_len",
    "return_text_in_logprobs",
    "model",
}


def create_app(manager: TokenizerManager) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        manager.start()
        yield

    app = FastAPI(title="NanoCP", version=__version__, lifespan=lifespan)
    args = manager.server_args
    app.state.manager = manager

    # ------------------------------------------------------------------ errors
    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, e: InvalidRequestError):
        return error_response(400, str(e), e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        param = ".".join(loc) or "body"
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg, param = f"malformed JSON: {msg}", "body"
        return error_response(400, f"{param}: {msg}", param)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, e: BodyTooLarge):
        return error_response(413, str(e), e.param)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, e: EngineError):
        response = error_response(e.status_code, str(e))
        if e.retry_after is not None:
            response.headers["Retry-After"] = str(e.retry_after)
        return response

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        # a fault serving one request (a bug): that request gets a 500 naming it, the server goes on
        # (Starlette still logs the traceback)
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, e: ClientDisconnected):
        return Response(status_code=499)

    # --------------------------------------------------------------- generate
    @app.post("/generate")
    async def generate(request: Request):
        body = await read_json(request)
        # SGLang clients send more fields than NanoCP implements (lora_path, image_data, ...):
        # accept them while unset, refuse them when they ask for something.
        unsupported = sorted(
            k for k, v in body.items() if k not in GENERATE_FIELDS and v not in (None, False, [], {}, "")
        )
        if unsupported:
            raise InvalidRequestError(unsupported[0], "not supported by NanoCP")
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise InvalidRequestError("text", "exactly one of text and input_ids must be given")
        stream = _bool(body, "stream")
        return_logprob = _bool(body, "return_logprob")
        top_n = _default(body, "top_logprobs_num", 0)
        batch = isinstance(text, list) or (
            isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list)
        )
        if batch:
            prompts = text if text is not None else input_ids
        else:
            prompts = [text if text is not None else input_ids]
        if not prompts:
            raise InvalidRequestError(
                "text" if text is not None else "input_ids", "the list of prompts is empty"
            )
        if text is not None and not all(isinstance(t, str) for t in prompts):
            raise InvalidRequestError("text", "must be a string or a list of strings")
        params_list = body.get("sampling_params")
        if isinstance(params_list, list):
            if len(params_list) != len(prompts):
                raise InvalidRequestError("sampling_params", "one object per prompt, or one for all")
        else:
            params_list = [params_list] * len(prompts)
        rids = body.get("rid")
        rids = rids if isinstance(rids, list) else [rids] * len(prompts)
        if len(rids) != len(prompts) or not all(r is None or isinstance(r, str) for r in rids):
            raise InvalidRequestError("rid", "must be a string (or one string per prompt)")
        if batch and rids[0] is not None and len(set(rids)) != len(rids):
            raise InvalidRequestError("rid", "request ids must be unique")
        manager.check_rids(rids)
        dp_rank = body.get("data_parallel_rank")
        if dp_rank is not None and (
            isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < args.dp_size
        ):
            raise InvalidRequestError("data_parallel_rank", f"must be an instance id in [0, {args.dp_size})")
        validated = []
        for p, sp in zip(prompts, params_list):
            try:
                validated.append(
                    manager.validate(
                        manager.tokenize(p) if text is not None else p, sp, return_logprob, top_n, dp_rank
                    )
                )
            except InvalidRequestError as e:
                if text is None or e.param != "input_ids":
                    raise
                raise InvalidRequestError("text", str(e).split(": ", 1)[-1]) from None  # the field sent

        def run(i: int) -> AsyncIterator[ReqState]:
            ids, params = validated[i]
            return manager.generate(ids, params, rids[i], return_logprob, top_n, dp_rank)

        if stream:
            if batch:
                raise InvalidRequestError("stream", "streaming takes a single prompt")

            states = await primed(request, run(0))

            async def chunks() -> AsyncIterator[dict]:
                async for state in states:
                    yield state.result(return_logprob)

            return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")

        async def final(i: int) -> dict:
            return (await last_state(run(i))).result(return_logprob)

        results = await until_done_or_disconnect(
            request, asyncio.gather(*(final(i) for i in range(len(prompts))))
        )
        return json_response(results if batch else results[0])

    # ------------------------------------------------------------------- info
    @app.get("/health")
    async def health():
        if manager.dead:
            return error_response(503, manager.dead)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        if manager.dead:
            return error_response(503, manager.dead)
        ids, params = manager.validate([1], {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True})

        async def one_token() -> None:
            async for _ in manager.generate(ids, params):
                pass

        try:
            await asyncio.wait_for(one_token(), timeout=30)
        except (asyncio.TimeoutError, EngineError) as e:
            return error_response(503, f"health generation failed: {e or 'timed out'}")
        return Response(status_code=200)

    @app.get("/model_info")
    async def model_info():
        return {
            "model_path": args.model_path,
            "tokenizer_path": args.tokenizer_path,
            "served_model_name": args.served_model_name,
            "is_generation": True,
            "context_length": manager.context_length,
            "vocab_size": manager.vocab_size,
        }

    async def server_info():
        return {
            **dataclasses.asdict(args),
            "version": __version__,
            "max_total_num_tokens": manager.max_total_tokens,
            "max_request_tokens": manager.max_request_tokens(),  # KV pooling: what one request may span
            "instances": manager.worker_infos,  # each with its "node"
            "nodes": [
                {"node": n, "instances": list(args.layout.instances_of(n)), "http": n == 0}
                for n in range(args.nnodes)
            ],
            "processes": manager.process_pids,  # node 0's (the instances' pids are in "instances")
            "cluster": manager.cluster,
            "cp_degrees": manager.cp_degrees,
            "cp_growth_segments": manager.cp_growth_segments,
            "disaggregation": manager.disaggregation,
            "internal_states": [{**i, **_load_of(manager, i["instance"])} for i in manager.worker_infos],
        }

    app.get("/server_info")(server_info)
    app.get("/get_server_info")(server_info)

    @app.post("/flush_cache")
    async def flush_cache():
        refused = manager.flush_cache()
        if refused is not None:
            return PlainTextResponse(refused + "\n", status_code=400)
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await read_json(request)
        if _bool(body, "abort_all"):
            manager.abort_all()
        else:
            rid = body.get("rid")
            if not isinstance(rid, str) or not rid:
                raise InvalidRequestError("rid", "must be a non-empty string (or set abort_all)")
            manager.abort(rid)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(manager.metrics.render(), media_type="text/plain; version=0.0.4")

    add_openai_routes(app, manager)
    return app


def _default(body: dict, name: str, default: Any) -> Any:
    """body[name]; null or absent: the default (OpenAI semantics)."""
    value = body.get(name)
    return default if value is None else value


def _bool(body: dict, name: str) -> bool:
    value = _default(body, name, False)
    if not isinstance(value, bool):
        raise InvalidRequestError(name, f"must be a boolean, got {short_repr(value)}")
    return value


def _load_of(manager: TokenizerManager, instance: int) -> dict:
    for item in manager.cluster:
        if item["instance"] == instance:
            return item
    return {}
