"""The OpenAI-compatible HTTP API over an `Engine`: Chat Completions, Responses, Completions.

    app = create_app(engine, model_name="gpt-oss-20b")      # FastAPI; run it with uvicorn
    gptoss-jax serve --model openai/gpt-oss-20b             # the same from the command line

The engine steps on its own thread (`EngineLoop`); handlers only parse, render and wait on queues.
Every error is OpenAI's {"error": {...}} with its status; the server serves on after any of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..tokenizer import load_tokenizer
from ..tools import Toolbox
from .loop import EngineLoop, QueueFull, Stream
from .metrics import Metrics
from .present import Choice, Usage
from .protocol import (ApiError, Job, Limits, bad, chat_job, completion_job, new_id, responses_job)
from .tool_loop import ResponseRun

log = logging.getLogger("gptoss_jax.server")

DEFAULT_MAX_WAITING = 256  # requests queued beyond the slots before 503
DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 128k-token conversation is ~1 MB of JSON: 8 MB leaves room
DEFAULT_STORE_SIZE = 1024  # stored responses (previous_response_id), least recently used dropped
DEFAULT_MAX_N = 8  # choices per request
# A waiting non-streaming handler checks this often whether its client left.
DISCONNECT_POLL_S = 0.5


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_waiting: int = DEFAULT_MAX_WAITING
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    store_size: int = DEFAULT_STORE_SIZE
    max_n: int = DEFAULT_MAX_N


class _State:
    def __init__(self, engine: Engine, cfg: ServerConfig, toolbox: Toolbox | None):
        self.cfg = cfg
        self.engine = engine
        self.toolbox = toolbox
        self.metrics = Metrics(cfg.model_name)
        self.loop = EngineLoop(engine, self.metrics, cfg.max_waiting)
        self.tokenizer = load_tokenizer()
        mc = engine.model.config
        self.limits = Limits(engine.max_len, mc.vocab_size, engine.top_logprobs, cfg.max_n)
        self.raw_stops = tuple(engine.model.generation_defaults.stop_tokens)
        self.store: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.created = int(time.time())

    def remember(self, rid: str, entry: dict) -> None:
        self.store[rid] = entry
        self.store.move_to_end(rid)
        while len(self.store) > self.cfg.store_size:
            self.store.popitem(last=False)

    def recall(self, rid: str) -> dict:
        entry = self.store.get(rid)
        if entry is None:
            raise ApiError(404, f"Response with id {rid!r} not found.", "previous_response_id", "not_found")
        self.store.move_to_end(rid)
        return entry


def create_app(engine: Engine, config: ServerConfig, toolbox: Toolbox | None = None) -> FastAPI:
    """The FastAPI app; its engine thread stops, and the toolbox's sessions close, when the app shuts
    down. `toolbox`: the built-in tools Responses requests may declare (gptoss_jax.tools)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            state.loop.close()
            if toolbox is not None:
                toolbox.close()

    state = _State(engine, config, toolbox)
    app = FastAPI(title="gptoss-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gptoss = state

    # ---- errors: always OpenAI's shape ------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return JSONResponse(bad(f"invalid request: {e.errors()}").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        err = ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = config.api_key
        if key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                err = ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    # ---- info ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    def model_card():
        return {"id": config.model_name, "object": "model", "created": state.created, "owned_by": "gptoss-jax",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id, "model")
        return model_card()

    @app.get("/metrics")
    async def metrics():
        state.metrics.engine_state(running=engine.max_seqs - engine.num_free_slots(),
                                   waiting=engine.num_waiting_requests(), slots=engine.max_seqs)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    def check_model(name, param="model"):
        if name is not None and name != config.model_name:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {config.model_name!r}.",
                           param, "model_not_found")

    async def read_body(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > config.max_body_bytes:
            raise ApiError(413, f"the request body of {size} bytes exceeds {config.max_body_bytes} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > config.max_body_bytes:
                raise ApiError(413, f"the request body exceeds {config.max_body_bytes} bytes")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("'model' must be a string", "model")
        check_model(model)
        return body

    # ---- running a job ------------------------------------------------------------------------------
    def start(job: Job, prefix: str) -> tuple[asyncio.Queue, list[Stream], list[Choice]]:
        q: asyncio.Queue = asyncio.Queue()
        streams = []
        try:
            for p in job.params:
                streams.append(state.loop.submit(job.prompt, p, q, prefix))
        except QueueFull as e:
            for s in streams:
                state.loop.abort(s)
            raise ApiError(503, str(e), code="server_busy") from e
        except ValueError as e:
            for s in streams:
                state.loop.abort(s)
            raise bad(str(e)) from e
        stops = None if job.harmony else state.raw_stops
        choices = [Choice(i, job.harmony, job.stop, state.tokenizer, stops) for i in range(len(streams))]
        return q, streams, choices

    async def events(request: Request | None, q, streams, choices):
        """(choice, pieces, output) as outputs arrive, until every choice finished; stops the
        requests whose client left or whose stop string matched."""
        index = {s.request_id: i for i, s in enumerate(streams)}
        left = set(range(len(streams)))
        checked = time.monotonic()
        try:
            while left:
                try:
                    out, error = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    out = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if request is not None and await request.is_disconnected():
                        return
                if out is None:
                    continue
                i = index[out.request_id]
                s, c = streams[i], choices[i]
                if out.finished and out.finish_reason == "abort" and not s.cancelled:
                    raise ApiError(500, "the engine failed while running this request", code="engine_error")
                pieces = c.feed(out) if not c.stopped else []
                if c.stopped:
                    state.loop.abort(s)
                if out.finished:
                    left.discard(i)
                    pieces += c.end()
                yield c, pieces, out
        finally:
            for s in streams:
                state.loop.abort(s)  # no-op for finished ones; a client that left frees its slots
            for s in streams:
                log_request(s)

    def log_request(s: Stream):
        if s.finish_reason is None and not s.cancelled:
            return
        ttft = (s.first_token - s.submitted) if s.first_token else float("nan")
        span = (s.last_token - s.first_token) if s.first_token and s.last_token else 0.0
        rate = (s.completion_tokens - 1) / span if span > 0 else float("nan")
        log.info("%s prompt=%d completion=%d ttft=%.3fs %.1f tok/s %s", s.request_id, s.prompt_tokens,
                 s.completion_tokens, ttft, rate, s.finish_reason or "aborted")

    async def run_whole(request, job, prefix):
        q, streams, choices = start(job, prefix)
        async with contextlib.aclosing(events(request, q, streams, choices)) as evs:
            async for _ in evs:
                pass
        return choices

    def usage_of(job, choices) -> Usage:
        return Usage(len(job.prompt), sum(len(c.tokens) for c in choices), sum(c.reasoning_tokens for c in choices))

    def sse(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def streaming(gen, error_event: str | None = None) -> StreamingResponse:
        """An SSE reply; an error after it started (the status is sent) becomes an error event."""
        async def guarded():
            try:
                async with contextlib.aclosing(gen) as g:  # closed at once when the client leaves
                    async for x in g:
                        yield x
            except ApiError as e:
                yield (f"event: {error_event}\n" if error_event else "") + sse(e.body())
                if error_event is None:
                    yield "data: [DONE]\n\n"

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- chat completions ------------------------------------------------------------------------------
    def chat_message(c: Choice) -> dict:
        msg = {"role": "assistant", "content": c.content if c.content or not c.tool_calls else None}
        if c.reasoning:
            msg["reasoning_content"] = msg["reasoning"] = c.reasoning
        if c.tool_calls:
            msg["tool_calls"] = [t.chat() for t in c.tool_calls]
        return msg

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        job = chat_job(await read_body(request), state.limits)
        rid, created = new_id("chatcmpl-"), int(time.time())
        head = dict(id=rid, created=created, model=config.model_name)
        if not job.stream:
            choices = await run_whole(request, job, rid)
            return {**head, "object": "chat.completion", "system_fingerprint": None,
                    "choices": [{"index": c.index, "message": chat_message(c), "finish_reason": c.finish_reason,
                                 "logprobs": c.chat_logprobs(c.logprobs) if job.logprobs else None}
                                for c in choices],
                    "usage": usage_of(job, choices).chat()}
        q, streams, choices = start(job, rid)

        async def gen():
            chunk = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
            extra = {"usage": None} if job.include_usage else {}
            for c in choices:
                yield sse({**chunk, **extra, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]})
            seen_lp, announced = [0] * len(choices), [0] * len(choices)
            async with contextlib.aclosing(events(request, q, streams, choices)) as evs:
                async for c, pieces, out in evs:
                    delta, calls = {}, {}
                    for p in pieces:
                        if p.kind == "content":
                            delta["content"] = delta.get("content", "") + p.text
                        elif p.kind == "reasoning":
                            delta["reasoning_content"] = delta.get("reasoning_content", "") + p.text
                            delta["reasoning"] = delta["reasoning_content"]
                        else:  # the first delta of a call names it; the others add arguments
                            j = next(j for j, t in enumerate(c.tool_calls) if t.message == p.message)
                            entry = calls.setdefault(j, {"index": j, "function": {"arguments": ""}})
                            if j >= announced[c.index]:
                                t = c.tool_calls[j]
                                entry.update(id=t.id, type="function")
                                entry["function"]["name"] = t.name
                                announced[c.index] = j + 1
                            entry["function"]["arguments"] += p.text
                    if calls:
                        delta["tool_calls"] = list(calls.values())
                    lp = None
                    if job.logprobs:
                        lp = c.chat_logprobs(c.logprobs[seen_lp[c.index]:])
                        seen_lp[c.index] = len(c.logprobs)
                    finish = c.finish_reason if out.finished else None
                    if delta or calls or finish or (lp and lp["content"]):
                        yield sse({**chunk, **extra, "choices": [{"index": c.index, "delta": delta, "logprobs": lp,
                                                                  "finish_reason": finish}]})
            if job.include_usage:
                yield sse({**chunk, "choices": [], "usage": usage_of(job, choices).chat()})
            yield "data: [DONE]\n\n"

        return streaming(gen())

    # ---- completions ---------------------------------------------------------------------------------
    def encode(text: str) -> list[int]:
        return state.tokenizer.encode(text, allowed_special="all")

    @app.post("/v1/completions")
    async def completions(request: Request):
        job = completion_job(await read_body(request), state.limits, encode)
        rid, created = new_id("cmpl-"), int(time.time())
        head = dict(id=rid, object="text_completion", created=created, model=config.model_name)
        if not job.stream:
            choices = await run_whole(request, job, rid)
            return {**head, "choices": [{"index": c.index, "text": c.content, "finish_reason": c.finish_reason,
                                         "logprobs": c.completion_logprobs(c.logprobs, 0) if job.logprobs else None}
                                        for c in choices],
                    "usage": usage_of(job, choices).chat()}
        q, streams, choices = start(job, rid)

        async def gen():
            seen, offset = [0] * len(choices), [0] * len(choices)
            async with contextlib.aclosing(events(request, q, streams, choices)) as evs:
                async for c, pieces, out in evs:
                    text = "".join(p.text for p in pieces if p.kind == "content")
                    lp = None
                    if job.logprobs:
                        lp = c.completion_logprobs(c.logprobs[seen[c.index]:], offset[c.index])
                        seen[c.index] = len(c.logprobs)
                    offset[c.index] += len(text)
                    finish = c.finish_reason if out.finished else None
                    if text or finish:
                        yield sse({**head, "choices": [{"index": c.index, "text": text, "logprobs": lp,
                                                        "finish_reason": finish}]})
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": usage_of(job, choices).chat()})
            yield "data: [DONE]\n\n"

        return streaming(gen())

    # ---- responses -------------------------------------------------------------------------------------
    @app.post("/v1/responses")
    async def responses(request: Request):
        body = await read_body(request)
        prev = body.get("previous_response_id")
        if prev is not None and not isinstance(prev, str):
            raise bad("'previous_response_id' must be a string", "previous_response_id")
        previous = state.recall(prev) if prev else None
        job = responses_job(body, state.limits, previous["items"] if previous else None, toolbox)
        rid, created = new_id("resp_"), int(time.time())
        # the tool sessions (python kernel, browser pages) follow the chain of previous_response_id
        conversation = previous["conversation"] if previous else new_id("conv_")
        run = ResponseRun(job, start=lambda j: start(j, rid), events=lambda *a: events(request, *a),
                          toolbox=toolbox, conversation=conversation, max_len=engine.max_len)

        def response(status, output, usage=None, incomplete=None):
            x = job.extra
            return {"id": rid, "object": "response", "created_at": created, "model": config.model_name,
                    "status": status, "output": output, "usage": usage, "error": None,
                    "incomplete_details": incomplete, "instructions": x["instructions"],
                    "max_output_tokens": x["max_output_tokens"], "previous_response_id": x["previous_response_id"],
                    "reasoning": {"effort": x["effort"], "summary": None}, "store": x["store"],
                    "temperature": x["temperature"], "top_p": x["top_p"], "tools": x["tools"],
                    "tool_choice": x["tool_choice"], "parallel_tool_calls": True, "text": {"format": x["text_format"]},
                    "truncation": "disabled", "metadata": {}}

        def finished():
            reason = run.incomplete
            resp = response("incomplete" if reason else "completed", run.items.items, run.usage.responses(),
                            {"reason": reason} if reason else None)
            if job.extra["store"]:
                state.remember(rid, {"response": resp, "items": job.extra["items"] + run.items.stored(),
                                     "conversation": conversation})
            elif toolbox is not None and previous is None:  # nobody can continue this conversation
                toolbox.end(conversation)
            return resp

        if not job.stream:
            async with contextlib.aclosing(run.events()) as evs:
                async for _ in evs:
                    pass
            return finished()

        async def gen():
            seq = itertools.count()

            def event(kind, **data):
                data = {"type": kind, "sequence_number": next(seq), **data}
                return f"event: {kind}\n{sse(data)}"

            yield event("response.created", response=response("in_progress", []))
            yield event("response.in_progress", response=response("in_progress", []))
            async with contextlib.aclosing(run.events()) as evs:
                async for kind, data in evs:
                    yield event(kind, **data)
            if not run.client_left:
                # always response.completed (status "incomplete" inside), as gpt_oss's server and the
                # openai client's stream helper expect
                yield event("response.completed", response=finished())

        return streaming(gen(), error_event="error")

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return state.recall(response_id)["response"]

    return app

