"""Streaming and disconnect handling shared by the native and the OpenAI routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request

from nanocp.errors import InvalidRequestError
from nanocp.server.errors import error_body
from nanocp.server.tokenizer_manager import EngineError, ReqState

logger = logging.getLogger("nanocp.http")

T = TypeVar("T")
DISCONNECT_POLL_S = 0.5


class ClientDisconnected(Exception):
    pass


async def until_done_or_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientDisconnected()


async def primed(request: Request, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """`items` once its first item has come: an error before it (a bad request, a full queue, a
    dead engine) is raised here, so a stream's HTTP status reports it rather than a 200 whose body
    carries an error event. A client that leaves meanwhile aborts the request."""
    try:
        first = await until_done_or_disconnect(request, anext(items))
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[T]:
        if first is None:
            return
        yield first
        async for item in items:
            yield item

    return rest()


async def last_state(states: AsyncIterator[ReqState]) -> ReqState:
    """Run a request to completion; its final state."""
    state = None
    async for state in states:  # noqa: B007
        pass
    assert state is not None
    return state


def sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def sse_stream(chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """Server-sent events; an error after the stream began is sent as a final error event.
    If the client disconnects, Starlette closes this generator and `chunks` aborts its request."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except (InvalidRequestError, EngineError) as e:
        status = 400 if isinstance(e, InvalidRequestError) else e.status_code
        yield sse(error_body(status, str(e), getattr(e, "param", None)))
    except Exception as e:  # a fault serving this request: it alone fails
        logger.exception("stream failed")
        yield sse(error_body(500, f"internal error: {type(e).__name__}: {e}"))
    yield SSE_DONE
