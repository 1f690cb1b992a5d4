"""Reading a request's JSON body at the HTTP boundary, whatever a client sends.

Bodies are parsed with orjson, which takes only strict JSON: no NaN / Infinity literals, numbers
that fit a double, UTF-8 without lone surrogates (so everything parsed can be sent on to the
workers as it is). A body orjson refuses is parsed once more leniently (Python's json) only to
name the field at fault ("temperature: must be a finite number, got NaN"); one that neither
parses is malformed JSON. Every body is bounded in size (NANOCP_MAX_REQUEST_BODY_MB: 413) and
nesting depth (MAX_DEPTH).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from fastapi import Request

from nanocp import envs
from nanocp.errors import InvalidRequestError

MAX_DEPTH = 32  # the deepest a valid request nests: chat content parts are 4 levels down


class BodyTooLarge(InvalidRequestError):
    """HTTP 413."""


async def read_json(request: Request) -> dict:
    """The body as a JSON object; InvalidRequestError (400, or BodyTooLarge: 413) naming the field."""
    limit = envs.max_request_body_bytes()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge("body", f"the request body ({declared} bytes) is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge("body", f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return parse_object(b"".join(chunks))


def parse_object(raw: bytes) -> dict:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as strict_error:
        try:
            lenient = json.loads(raw)
        except (ValueError, RecursionError):
            raise InvalidRequestError("body", f"malformed JSON: {strict_error}") from None
        if isinstance(lenient, dict):
            check_tree(lenient)  # names the field orjson refused (NaN, Infinity, a lone surrogate)
        raise InvalidRequestError("body", f"malformed JSON: {strict_error}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(
            "body", f"the request body must be a JSON object, not {type(body).__name__}"
        )
    check_tree(body)
    return body


def check_tree(value: Any) -> None:
    """Every string is valid unicode, every float finite, nothing nested deeper than MAX_DEPTH.
    Iterative (a deep body must not exhaust the stack); errors name the path ("messages.0.content")."""
    stack: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            _check_str(node, path)
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise InvalidRequestError(_name(path), f"must be a finite number, got {node}")
        elif isinstance(node, (list, dict)):
            if depth >= MAX_DEPTH:
                raise InvalidRequestError(_name(path), f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(node, list):
                if all(type(x) is int for x in node):
                    continue  # token ids: nothing to check (and fast for a long prompt)
                stack.extend((x, (*path, i), depth + 1) for i, x in enumerate(node))
            else:
                for k, v in node.items():
                    _check_str(k, path)
                    stack.append((v, (*path, k), depth + 1))


def _check_str(s: str, path: tuple) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(_name(path), "invalid unicode (a lone surrogate)") from None


def _name(path: tuple) -> str:
    return ".".join(str(p)[:100] or '""' for p in path) or "body"
