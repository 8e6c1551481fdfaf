"""Runs an Engine's step loop in a background thread for asyncio code (the server)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator

from codegen2.engine.engine import Engine, EngineStats, RequestOutput
from codegen2.engine.prompt import PreparedRequest, Prompt
from codegen2.engine.sampling import SamplingParams


class AsyncEngine:
    """Runs an Engine's step loop in a background thread; ``stream()`` yields a request's outputs to asyncio.

    Only the loop thread touches the engine: new requests and aborts go through a thread-safe inbox that the
    loop drains between steps, so the event loop never waits for a step. Leaving the ``async for`` early (a
    client disconnecting, a cancelled task) aborts the request, which frees its cache slots. If the loop ever
    fails, ``error`` holds the exception and every stream, current or new, raises instead of waiting forever.
    ``stats()`` is the engine's state after its latest step, safe to read from any thread.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="codegen2-engine", daemon=True)
        self._thread.start()

    async def stream(self, prompt: Prompt | PreparedRequest, params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs (deltas) of one request as they come. A prompt the engine rejects raises its InvalidRequest
        here; prepare it first (``engine.prepare``, in a worker thread) to fail before anything is queued."""
        if self.error is not None:
            raise RuntimeError("the engine loop has stopped") from self.error
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        self._queues[rid] = (loop, outputs)
        self._inbox.put(("add", rid, prompt, params))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, ValueError):
                    raise out
                if isinstance(out, BaseException):
                    raise RuntimeError("the engine loop failed") from out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)
            self._queues.pop(rid, None)

    def stats(self) -> EngineStats:
        return self._stats

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            target[0].call_soon_threadsafe(target[1].put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "abort":
                self.engine.abort(item[1])
                continue
            _, rid, prompt, params = item
            try:
                self.engine.add_request(prompt, params, rid)
            except ValueError as e:  # a bad prompt fails its own stream only
                self._deliver(rid, e)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                self._stats = self.engine.stats()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
                self._stats = self.engine.stats()
            self._drain_inbox()  # aborts sent just before shutdown still free their slots
        except BaseException as e:  # deliver the failure to every waiting stream instead of hanging them
            self.error = e
            for rid in list(self._queues):
                self._deliver(rid, e)
            raise
