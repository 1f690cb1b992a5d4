"""nanocp.Engine with dp_size > 1: an in-process client of the server's own process graph.

The router, the detokenizer and one worker per instance run as child processes, exactly as under
`launch_server`; the tokenizer manager runs here, on an event loop in a background thread, and
`generate` submits to it. So DP attention + EP + dynamic CP give the server's outputs offline
(batch inference, RL rollouts), with the server's validation and KV pooling. Shutdown (or a
dead child process: its requests fail with EngineError) stops every process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from nanocp.server.launch import EngineProcesses
from nanocp.server.streaming import last_state
from nanocp.server.tokenizer_manager import ReqState, TokenizerManager
from nanocp.server_args import ServerArgs
from nanocp.tokenizer.detokenizer import load_tokenizer

_DONE = object()


class ClusterEngine:
    def __init__(self, server_args: ServerArgs) -> None:
        self.server_args = server_args
        self.procs = EngineProcesses(server_args)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="nanocp-engine-loop")
        self.manager: TokenizerManager | None = None
        try:
            infos = self.procs.start()
            self.tokenizer = (
                None
                if server_args.skip_tokenizer_init
                else load_tokenizer(server_args.tokenizer_path, server_args.trust_remote_code)
            )
            self.thread.start()
            self.manager = self._call(self._start_manager(infos))
            self.procs.watch(lambda msg: self.loop.call_soon_threadsafe(self.manager.on_process_death, msg))
        except BaseException:
            self.shutdown()
            raise

    async def _start_manager(self, infos: list[dict]) -> TokenizerManager:
        manager = TokenizerManager(self.server_args, self.procs.ports, infos, self.tokenizer)
        manager.process_pids = {name: p.pid for name, p in self.procs.procs.items()}
        manager.start()
        return manager

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def generate(
        self, batch: list[tuple[list[int], Any]], return_logprob: bool, top_logprobs_num: int, stream: bool
    ) -> list[dict] | Iterator[dict]:
        """batch: validated (input_ids, SamplingParams) pairs. All finish before this returns the
        results (an error of any raises it, after the others finished); with stream, yields
        {"index", "text" and "output_ids" added, "meta_info"} per update instead."""
        top_n = top_logprobs_num if return_logprob else 0

        def run(i: int) -> AsyncIterator[ReqState]:
            ids, params = batch[i]
            return self.manager.generate(ids, params, None, return_logprob, top_n)

        if stream:
            return self._stream(run, len(batch), return_logprob)

        async def final(i: int) -> dict:
            return (await last_state(run(i))).result(return_logprob)

        async def all_of() -> list:
            return await asyncio.gather(*(final(i) for i in range(len(batch))), return_exceptions=True)

        results = self._call(all_of())
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            raise error
        return results

    def _stream(self, run, n: int, return_logprob: bool) -> Iterator[dict]:
        updates: queue.Queue = queue.Queue()

        async def one(i: int) -> None:
            async for state in run(i):
                chunk = {"index": i, "text": state.delta_text, "output_ids": list(state.delta_ids),
                         "meta_info": state.meta_info(return_logprob)}  # fmt: skip
                updates.put(chunk)

        async def all_of() -> None:
            try:
                await asyncio.gather(*(one(i) for i in range(n)))
            except BaseException as e:  # raised to the consumer; cancelling aborts the rest
                updates.put(e)
            finally:
                updates.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(all_of(), self.loop)
        try:
            while (item := updates.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # a consumer that stops early aborts what still runs
            future.cancel()

    def shutdown(self) -> None:
        if self.manager is not None and self.loop.is_running():
            manager = self.manager

            async def close() -> None:
                manager.abort_all()
                await asyncio.sleep(0)  # let the aborts go out before the sockets close
                manager.close()

            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        self.procs.shutdown()
        self.manager = None
