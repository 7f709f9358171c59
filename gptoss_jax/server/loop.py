"""The engine in its own thread: the event loop submits and aborts, never waits on the device.

`EngineLoop.submit` checks the request on the caller's thread (`Engine.check_request` reads only
fixed settings), then hands it to the engine thread; each `Engine.step()` output goes back to the
request's `asyncio.Queue` through `loop.call_soon_threadsafe`. The engine is touched by its thread
only, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine import Engine, RequestOutput, SamplingParams
from .metrics import Metrics

log = logging.getLogger("gptoss_jax.server")

# The engine thread waits this long for work when idle: the bound on noticing `close()`.
IDLE_POLL_S = 0.25


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound."""


@dataclass
class Stream:
    """One engine request as the server sees it: its outputs arrive on `queue`."""

    request_id: str
    prompt_tokens: int
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    cancelled: bool = False  # the server asked to stop it (an "abort" without it is the engine's failure)


class EngineLoop:
    """Runs `engine.step()` on a thread while requests are unfinished.

    max_waiting: requests allowed to wait for a slot (beyond them `submit` raises QueueFull)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int):
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = int(max_waiting)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[Stream, asyncio.AbstractEventLoop]] = {}
        self._lock = threading.Lock()  # guards _streams and _unfinished between the two threads
        self._unfinished = 0
        self._ids = itertools.count()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side ----------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, outputs: asyncio.Queue, prefix: str = "req") -> Stream:
        """Queue a request whose outputs go to `outputs` (several requests may share one); ValueError
        on bad input, QueueFull when the queue is at its bound."""
        self.engine.check_request(prompt, params)
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._unfinished >= self.engine.max_seqs + self.max_waiting:
                raise QueueFull(f"all {self.engine.max_seqs} slots are busy and {self.max_waiting} requests "
                                f"wait: try again later")
            rid = f"{prefix}-{next(self._ids)}"
            stream = Stream(rid, len(prompt), outputs)
            self._streams[rid] = (stream, loop)
            self._unfinished += 1
        self._commands.put(("add", rid, prompt, params))
        return stream

    def abort(self, stream: Stream) -> None:
        """Stop a request (client gone, stop string seen); its slot frees at the engine's next step."""
        if stream.finish_reason is None and not stream.cancelled:
            stream.cancelled = True
            self._commands.put(("abort", stream.request_id))

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while not self._closed.is_set():
            cmds = []
            if not eng.has_unfinished_requests():  # idle: wait for work
                try:
                    cmds.append(self._commands.get(timeout=IDLE_POLL_S))
                except queue.Empty:
                    continue
            while True:
                try:
                    cmds.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for c in cmds:
                self._apply(c)
            if not eng.has_unfinished_requests():
                continue
            try:
                outs = eng.step()
            except Exception:  # the engine aborted the requests of the failed step and serves on
                log.exception("engine step failed")
                continue
            self._publish(outs)
            self.metrics.engine_state(running=eng.max_seqs - eng.num_free_slots(), waiting=eng.num_waiting_requests(),
                                      slots=eng.max_seqs)

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params = cmd
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except Exception as e:  # checked at submit: only a bug gets here; the request still ends
                log.exception("add_request failed")
                self._publish([RequestOutput(rid, [], True, "abort")], error=e)
        else:
            self.engine.abort_request(cmd[1])

    def _publish(self, outs: list[RequestOutput], error: Exception | None = None) -> None:
        now = time.perf_counter()
        for o in outs:
            with self._lock:
                entry = self._streams.get(o.request_id)
                if entry is not None and o.finished:
                    del self._streams[o.request_id]
                    self._unfinished -= 1
            if entry is None:
                continue
            stream, loop = entry
            self._account(stream, o, now)
            try:
                loop.call_soon_threadsafe(stream.queue.put_nowait, (o, error))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

    def _account(self, s: Stream, o: RequestOutput, now: float) -> None:
        n = len(o.new_token_ids)
        if n:
            if s.first_token is None:
                s.first_token = now
                self.metrics.ttft.observe(now - s.submitted)
                rest, dt = n - 1, 0.0
            else:  # tokens reported together share the interval since the last report
                rest, dt = n, (now - s.last_token) / n
            for _ in range(rest):
                self.metrics.itl.observe(dt)
            s.last_token = now
            s.completion_tokens += n
            self.metrics.generation_tokens.inc(n)
        if o.finished:
            s.finish_reason = o.finish_reason
            self.metrics.prompt_tokens.inc(s.prompt_tokens)
            self.metrics.finished(o.finish_reason).inc()
