"""Offline engine, like SGLang's ``sgl.Engine``: load a model once, generate for one prompt or a batch."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import torch

from nanocp.errors import InvalidRequestError
from nanocp.model_executor.model_runner import ModelRunner
from nanocp.scheduler.request import Req, RequestFactory
from nanocp.scheduler.scheduler import ReqOutput, Scheduler
from nanocp.scheduler.validation import check_generate
from nanocp.server_args import ServerArgs
from nanocp.tokenizer.detokenizer import eos_token_ids, load_tokenizer
from nanocp.utils import set_log_level


class Engine:
    """In-process engine. ``generate`` takes one prompt (returns a dict) or a batch (a list).

    Each result: {"text", "output_ids", "meta_info": {"id", "prompt_tokens", "completion_tokens",
    "finish_reason"}}. With stream=True it yields incremental results instead: each has the text
    and token ids added since the previous chunk for that request, and "index" (its position in
    the batch); the chunk with meta_info["finish_reason"] set is that request's last.
    """

    def __init__(self, model_path: str | None = None, server_args: ServerArgs | None = None, **kwargs: Any):
        if server_args is None:
            server_args = ServerArgs.from_kwargs(model_path=model_path, **kwargs)
        if server_args.model_path is None:
            raise ValueError("model_path is required")
        set_log_level(server_args.log_level)
        self.server_args = server_args
        self._cluster = None
        if server_args.dp_size > 1:  # the server's process graph (engine.cluster)
            from nanocp.engine.cluster import ClusterEngine

            self._cluster = ClusterEngine(server_args)
            self.tokenizer = self._cluster.tokenizer
            return
        self.tokenizer = (
            None
            if server_args.skip_tokenizer_init
            else load_tokenizer(server_args.tokenizer_path, server_args.trust_remote_code)
        )
        self.runner = ModelRunner(server_args)
        self.scheduler = Scheduler(self.runner)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.runner.hf_config, server_args.model_path)
        self.make_req = RequestFactory(
            self.tokenizer, self.eos_token_ids, self.runner.device, server_args.random_seed
        )
        self._rid_counter = itertools.count()

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Free the model and KV cache (with dp_size > 1: stop every process). The engine cannot
        be used afterwards."""
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
            return
        if hasattr(self, "runner"):
            self.runner.shutdown()
        for attr in ("scheduler", "runner"):
            if hasattr(self, attr):
                delattr(self, attr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ requests
    def flush_cache(self) -> bool:
        """Empty the prefix cache (False: refused or deferred, requests still read cached pages)."""
        if self._cluster is not None:
            return self._cluster.manager.flush_cache() is None
        return self.scheduler.flush_cache()

    def _inputs(self, prompt, input_ids, sampling_params) -> tuple[list, list, bool]:
        """(input ids per prompt, sampling params per prompt, whether one prompt was given)."""
        if (prompt is None) == (input_ids is None):
            raise InvalidRequestError("prompt", "exactly one of prompt and input_ids must be given")
        single = isinstance(prompt, str) or (
            input_ids is not None
            and not (isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list))
        )
        if prompt is not None:
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "prompt", "the server runs with --skip-tokenizer-init; send input_ids"
                )
            prompts = [prompt] if single else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise InvalidRequestError("prompt", "must be a string or a list of strings")
            ids_list = [self.tokenizer.encode(p) for p in prompts]
        else:
            ids_list = [input_ids] if single else list(input_ids)  # checked by check_generate
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(ids_list):
                raise InvalidRequestError("sampling_params", "one dict per prompt, or a single dict for all")
            params_list = sampling_params
        else:
            params_list = [sampling_params] * len(ids_list)
        return ids_list, params_list, single

    def _make_requests(
        self, prompt, input_ids, sampling_params, return_logprob=False, top_logprobs_num=0
    ) -> tuple[list[Req], bool]:
        ids_list, params_list, single = self._inputs(prompt, input_ids, sampling_params)
        limits = self.scheduler.limits(self.tokenizer is not None)
        # the whole batch is validated before any of it is submitted
        params = [
            check_generate(ids, p, limits, return_logprob, top_logprobs_num)
            for ids, p in zip(ids_list, params_list)
        ]
        rids = [f"{next(self._rid_counter)}-{uuid.uuid4().hex[:8]}" for _ in ids_list]
        return [self.make_req(rid, ids, p) for rid, ids, p in zip(rids, ids_list, params)], single

    def generate(
        self,
        prompt: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        sampling_params: dict | list[dict] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> dict | list[dict] | Iterator[dict]:
        """return_logprob: meta_info gets "output_token_logprobs" [(logprob, token_id, None), ...]
        and, with top_logprobs_num > 0, "output_top_logprobs" (as in SGLang; raw model logits).
        With dp_size > 1 the results are the server's /generate answers (meta_info also has
        "cp_degree" and "placement" of context-parallel requests)."""
        if self._cluster is not None:
            ids_list, params_list, single = self._inputs(prompt, input_ids, sampling_params)
            # the whole batch is validated (as the server does) before any of it is submitted
            batch = [
                self._cluster.manager.validate(i, p, return_logprob, top_logprobs_num)
                for i, p in zip(ids_list, params_list)
            ]
            out = self._cluster.generate(batch, return_logprob, top_logprobs_num, stream)
            return out if stream or not single else out[0]
        reqs, single = self._make_requests(
            prompt, input_ids, sampling_params, return_logprob, top_logprobs_num
        )
        for req in reqs:
            req.return_logprob = return_logprob
            req.top_logprobs_num = top_logprobs_num if return_logprob else 0
            self.scheduler.add_request(req)
        if stream:
            return self._stream(reqs)
        for _ in self._run(reqs):
            pass
        results = [self._result(r) for r in reqs]
        return results[0] if single else results

    def _run(self, reqs: list[Req]) -> Iterator[ReqOutput]:
        pending = {r.rid for r in reqs}
        try:
            while pending:
                for out in self.scheduler.step():
                    if out.rid in pending:
                        yield out
                        if out.finished:
                            pending.discard(out.rid)
        finally:  # a closed stream (or an error) must not leave requests holding KV
            for rid in pending:
                self.scheduler.abort_request(rid)

    def _stream(self, reqs: list[Req]) -> Iterator[dict]:
        index = {r.rid: i for i, r in enumerate(reqs)}
        # closing(): a consumer that stops early closes _run at once, so its requests are aborted
        # deterministically rather than whenever the generator happens to be collected.
        with contextlib.closing(self._run(reqs)) as outputs:
            for out in outputs:
                yield {
                    "index": index[out.rid],
                    "text": out.text_delta,
                    "output_ids": out.new_token_ids,
                    "meta_info": self._meta(reqs[index[out.rid]]),
                }

    @staticmethod
    def _meta(req: Req) -> dict:
        meta = {
            "id": req.rid,
            "prompt_tokens": len(req.origin_input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
            "finish_reason": req.finished_reason,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = [
                (lp, t, None) for lp, t in zip(req.output_token_logprobs, req.output_ids)
            ]
            if req.top_logprobs_num:
                meta["output_top_logprobs"] = [
                    [(lp, t, None) for lp, t in top] for top in req.output_top_logprobs
                ]
        return meta

    def _result(self, req: Req) -> dict:
        return {"text": req.stream.text, "output_ids": list(req.output_ids), "meta_info": self._meta(req)}
