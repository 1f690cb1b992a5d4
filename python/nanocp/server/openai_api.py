"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from nanocp.errors import InvalidRequestError
from nanocp.server.errors import json_response
from nanocp.server.request_body import read_json
from nanocp.server.streaming import last_state, primed, sse_stream, until_done_or_disconnect
from nanocp.server.tokenizer_manager import ReqState, TokenizerManager


class _Body(BaseModel):
    """A JSON object of the API: unknown fields are ignored, null means the field's default (OpenAI
    semantics), numbers must be finite."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _SamplingFields(_Body):
    """Fields shared by completions and chat (OpenAI names, plus SGLang / vLLM extensions)."""

    model: StrictStr | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    user: str | None = None
    # extensions
    top_k: StrictInt = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    no_stop_trim: StrictBool = False
    rid: StrictStr | None = None

    def sampling_params(self, max_tokens: int | None, default_max: int) -> dict[str, Any]:
        if self.n != 1:
            raise InvalidRequestError("n", f"only n=1 is supported, got {self.n}")
        params: dict[str, Any] = {
            "max_new_tokens": default_max if max_tokens is None else max_tokens,
            "min_new_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "no_stop_trim": self.no_stop_trim,
            "sampling_seed": self.seed,
        }
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        return params


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)


def _finish_reason(reason: dict | None) -> str | None:
    if not reason:
        return None
    return {"stop": "stop", "length": "length"}.get(reason.get("type"), "abort")


def _usage(state: ReqState) -> dict[str, Any]:
    n = len(state.output_ids)
    return {
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": state.prompt_tokens + n,
        "prompt_tokens_details": {"cached_tokens": state.cached_tokens},
    }


M = TypeVar("M", bound=BaseModel)
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|\w+\[.*\])$")


def parse(model: type[M], body: dict) -> M:
    """Validate a JSON body (whatever its Content-Type); errors name the field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # drop union-member tags pydantic puts in the location ("prompt.str" -> "prompt")
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and _TYPE_TAG.match(x))]
        param = ".".join(loc) or "body"
        raise InvalidRequestError(param, err["msg"]) from None


_OPENAI_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "sampling_seed": "seed",
    "input_ids": "prompt",
    "text": "prompt",
    "top_logprobs_num": "logprobs",
}


def validate_openai(
    manager: TokenizerManager, ids: list[int], params: dict, logprobs: bool = False, top_n: int = 0
) -> tuple:
    """manager.validate, with errors naming the OpenAI field the client actually sent."""
    try:
        return manager.validate(ids, params, logprobs, top_n)
    except InvalidRequestError as e:
        name = _OPENAI_NAMES.get(e.param, e.param)
        raise InvalidRequestError(name, str(e).split(": ", 1)[-1]) from None


def add_openai_routes(app: FastAPI, manager: TokenizerManager) -> None:
    args = manager.server_args
    model_name = args.served_model_name

    def check_model(name: str | None) -> None:
        if name is not None and name not in (model_name, args.model_path):
            raise InvalidRequestError("model", f"model {name!r} not found; this server serves {model_name!r}")

    def token_str(token_id: int) -> str:
        if manager.tokenizer is None:
            return str(token_id)
        return manager.tokenizer.decode([token_id])

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "nanocp",
                    "root": args.model_path,
                    "max_model_len": manager.context_length,
                }
            ],
        }

    # ------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request))
        check_model(req.model)
        if req.stream and req.echo:
            raise InvalidRequestError("echo", "echo is not supported with stream")
        if req.echo and manager.tokenizer is None:
            raise InvalidRequestError("echo", "echo needs a tokenizer (--skip-tokenizer-init is set)")
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise InvalidRequestError("prompt", "the prompt is empty")
        params = req.sampling_params(req.max_tokens, 16)
        manager.check_rids([req.rid])
        want_lp = req.logprobs is not None
        validated = [
            validate_openai(
                manager, manager.tokenize(p) if isinstance(p, str) else p, params, want_lp, req.logprobs or 0
            )
            for p in prompts
        ]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs_block(state: ReqState, start: int, offset0: int) -> dict | None:
            if not want_lp:
                return None
            toks = [token_str(t) for t in state.output_ids[start:]]
            offsets, pos = [], offset0
            for t in toks:
                offsets.append(pos)
                pos += len(t)
            tops = state.top_logprobs[start:] if req.logprobs else []
            return {
                "tokens": toks,
                "token_logprobs": state.token_logprobs[start:],
                "top_logprobs": [{token_str(t): lp for lp, t in top} for top in tops] or None,
                "text_offset": offsets,
            }

        def run(i: int) -> AsyncIterator[ReqState]:
            ids, sp = validated[i]
            rid = req.rid if len(prompts) == 1 else None
            return manager.generate(ids, sp, rid, want_lp, req.logprobs or 0)

        if req.stream:
            if len(prompts) != 1:
                raise InvalidRequestError("prompt", "streaming takes a single prompt")
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            states = await primed(request, run(0))

            async def chunks() -> AsyncIterator[dict]:
                sent_ids, sent_chars = 0, 0
                state = None
                async for state in states:
                    choice = {
                        "index": 0,
                        "text": state.delta_text,
                        "logprobs": logprobs_block(state, sent_ids, sent_chars),
                        "finish_reason": _finish_reason(state.finish_reason),
                    }
                    sent_ids, sent_chars = len(state.output_ids), len(state.text)
                    yield {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": model_name,
                        "choices": [choice],
                        "usage": None,
                    }
                if include_usage and state is not None:
                    yield {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": _usage(state),
                    }

            return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")

        states = await until_done_or_disconnect(
            request, asyncio.gather(*(last_state(run(i)) for i in range(len(prompts))))
        )
        choices = []
        for i, state in enumerate(states):
            prefix = ""
            if req.echo:
                prefix = prompts[i] if isinstance(prompts[i], str) else manager.tokenizer.decode(prompts[i])
            choices.append(
                {
                    "index": i,
                    "text": prefix + state.text,
                    "logprobs": logprobs_block(state, 0, len(prefix)),
                    "finish_reason": _finish_reason(state.finish_reason),
                }
            )
        usage = {
            k: sum(_usage(s)[k] for s in states)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        usage["prompt_tokens_details"] = {"cached_tokens": sum(s.cached_tokens for s in states)}
        return json_response(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": choices,
                "usage": usage,
            }
        )

    # ------------------------------------------------------------------- chat
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatCompletionRequest, await read_json(request))
        check_model(req.model)
        if manager.tokenizer is None:
            raise InvalidRequestError("messages", "chat needs a tokenizer (--skip-tokenizer-init is set)")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content or ""
            if isinstance(content, list):
                if not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                    for p in content
                ):
                    raise InvalidRequestError(
                        f"messages.{i}.content", "only text content parts are supported"
                    )
                content = "".join(p["text"] for p in content)
            messages.append({"role": m.role, "content": content})
        try:
            text = manager.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # template errors are the request's fault (e.g. role order)
            raise InvalidRequestError("messages", f"chat template failed: {e}") from None
        ids = manager.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        default_max = max(1, min(manager.context_length, manager.max_request_tokens()) - len(ids))
        top_n = req.top_logprobs or 0
        ids, sp = validate_openai(
            manager, ids, req.sampling_params(max_tokens, default_max), req.logprobs, top_n
        )
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs_block(state: ReqState, start: int) -> dict | None:
            if not req.logprobs:
                return None
            content = []
            for k in range(start, len(state.output_ids)):
                tok = token_str(state.output_ids[k])
                tops = state.top_logprobs[k] if top_n and k < len(state.top_logprobs) else []
                content.append(
                    {
                        "token": tok,
                        "logprob": state.token_logprobs[k],
                        "bytes": list(tok.encode()),
                        "top_logprobs": [
                            {"token": token_str(t), "logprob": lp, "bytes": list(token_str(t).encode())}
                            for lp, t in tops
                        ],
                    }
                )
            return {"content": content}

        manager.check_rids([req.rid])
        gen = manager.generate(ids, sp, req.rid, req.logprobs, top_n)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(delta: dict, finish: str | None, logprobs: dict | None = None, usage=None) -> dict:
                choices = (
                    []
                    if usage
                    else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
                )
                return {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model_name,
                    "choices": choices,
                    "usage": usage,
                }

            states = await primed(request, gen)

            async def chunks() -> AsyncIterator[dict]:
                yield chunk({"role": "assistant", "content": ""}, None)
                sent, state = 0, None
                async for state in states:
                    delta = {"content": state.delta_text} if state.delta_text or not state.finished else {}
                    yield chunk(delta, _finish_reason(state.finish_reason), logprobs_block(state, sent))
                    sent = len(state.output_ids)
                if include_usage and state is not None:
                    yield chunk({}, None, usage=_usage(state))

            return StreamingResponse(sse_stream(chunks()), media_type="text/event-stream")

        state = await until_done_or_disconnect(request, last_state(gen))
        return json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": state.text},
                        "logprobs": logprobs_block(state, 0),
                        "finish_reason": _finish_reason(state.finish_reason),
                    }
                ],
                "usage": _usage(state),
            }
        )
