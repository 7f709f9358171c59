"""Built-in tools in the Responses API: one request's generation in rounds.

A round is one engine request. When its completion ends with a call (`<|call|>`) to a built-in tool
the request declared (`python` for `code_interpreter`, `browser.*` for `web_search`), the tool runs
on a worker thread (the event loop never waits on it), and the next round generates from the prompt,
the completion and the tool's answer as harmony tool messages: the exact tokens harmony renders for
that conversation. The rounds end when the model answers (or calls a function tool, which the client
runs), when `max_output_tokens` (over all rounds) or the context is spent, or after `max_tool_calls`
calls: the next call is answered that the limit is reached, and a call after that ends the response
(`incomplete`, reason `max_tool_calls`).

Tools fail softly: a timeout, a dead kernel or a missing page is an answer the model reads (the item's
status says `failed`), and the response goes on.

Forced calls (`tool_choice` {"type": "code_interpreter"} / {"type": "web_search_preview"}): the first
round's sampling gets the grammar of a complete call to the tool (`force_builtin`, constrained
decoding); the rounds after it are free (or keep the request's `text.format`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools

from ..engine import SamplingParams
from ..structured import Reply
from ..tools import BrowserSession, Toolbox, ToolResult
from ..tools.rounds import ended_with_call, limit_reached, next_prompt
from .present import OutputItems, Usage
from .protocol import TOOL_OUTPUT_KEY, ApiError, Job, builtin_calls, new_id

_SEED_MOD = 1 << 31  # seeds are 31-bit (protocol._SEED_BITS)


def force_builtin(params: SamplingParams, tool: str, toolbox: Toolbox,
                  max_reasoning_tokens: int | None = None) -> SamplingParams:
    """The first round's sampling when `tool_choice` forces the built-in `tool`: the grammar of an
    optional analysis message (at most `max_reasoning_tokens`, default half the budget), then the
    call `<|channel|>analysis to=python code<|message|>CODE<|call|>` (CODE free text of at most half
    the budget: the rounds after the call need the rest) or, for the browser, `to=browser.search
    code` with JSON arguments that validate against the namespace's `search` parameters; `<|call|>`
    closes it within `params.max_tokens` for any weights. A budget too small for the call is refused
    (400) before the response starts."""
    calls = builtin_calls(toolbox, [tool], functions={"search"}, code_tokens=max(1, params.max_tokens // 2))
    reply = Reply(tuple(calls), max_reasoning_tokens)
    try:
        reply.grammar(params.max_tokens)
    except ValueError as e:
        raise ApiError(400, f"'tool_choice' forcing the {tool} tool: {e}", "tool_choice") from e
    return dataclasses.replace(params, grammar=reply, max_reasoning_tokens=None)


class ToolOutputItems(OutputItems):
    """`OutputItems` plus the items of built-in calls, and citations:

    * `code_interpreter_call`: added when the call starts, its code streamed as
      `response.code_interpreter_call_code.delta`, then `.interpreting`, `.completed` with the outputs;
    * `web_search_call`: added when the call is complete (its action is known then), `.in_progress`,
      `.searching`, `.completed`;
    * a message that cites browser pages (`【cursor†Lx-Ly】`) gets `url_citation` annotations.

    route(recipient): the built-in tool a call addresses, or None; cite(text): annotation dicts."""

    def __init__(self, route, cite, container_id: str):
        super().__init__()
        self._route, self._cite, self._container = route, cite, container_id
        self.pending: int | None = None  # the index of the built-in call item that waits for its tool
        self.outputs: dict[str, str] = {}  # web_search_call id -> the tool's answer (kept for later turns)

    def feed(self, p) -> list[tuple[str, dict]]:
        ev = []
        if self.pending is not None and self._open != (p.kind, p.message):
            ev += self.close() + self._abandon()  # output after a built-in call: it did not end the round
        tool = self._route(p.recipient) if p.kind == "tool_call" else None
        if tool is None:
            return ev + super().feed(p)
        if self._open != (p.kind, p.message):
            ev += self.close()
            ev += self._start_call(tool)
            self._open = (p.kind, p.message)
        i = len(self.items) - 1
        item = self.items[i]
        if item["type"] == "code_interpreter_call":
            item["code"] += p.text
            ev.append(("response.code_interpreter_call_code.delta",
                       dict(item_id=item["id"], output_index=i, delta=p.text)))
        return ev  # a web search call's arguments show in its action once it is complete

    def _start_call(self, tool: str) -> list[tuple[str, dict]]:
        i = len(self.items)
        self.pending = i
        if tool == "python":
            item = {"id": new_id("ci_"), "type": "code_interpreter_call", "status": "in_progress", "code": "",
                    "outputs": None, "container_id": self._container}
            self.items.append(item)
            return [("response.output_item.added", dict(output_index=i, item=dict(item))),
                    ("response.code_interpreter_call.in_progress", dict(item_id=item["id"], output_index=i))]
        self.items.append({"id": new_id("ws_"), "type": "web_search_call", "status": "in_progress", "action": None})
        return []

    def close(self) -> list[tuple[str, dict]]:
        if self._open is None:
            return []
        i, item = len(self.items) - 1, self.items[-1]
        if item["type"] in ("code_interpreter_call", "web_search_call"):
            self._open = None
            if item["type"] == "web_search_call":
                return []
            return [("response.code_interpreter_call_code.done",
                     dict(item_id=item["id"], output_index=i, code=item["code"]))]
        ev = []
        if item["type"] == "message":
            part = item["content"][0]
            part["annotations"] = self._cite(part["text"])
            ev = [("response.output_text.annotation.added",
                   dict(item_id=item["id"], output_index=i, content_index=0, annotation_index=k, annotation=a))
                  for k, a in enumerate(part["annotations"])]
        return ev + super().close()

    # ---- the tool runs --------------------------------------------------------------------------------
    def tool_started(self, tool: str, action: dict | None) -> list[tuple[str, dict]]:
        """The call is complete and its tool starts (`action`: what a web search will do)."""
        ev = self.close()
        if self.pending is None:  # a call with an empty body sent no delta
            ev += self._start_call(tool)
            self._open = None
        i = self.pending
        item = self.items[i]
        if item["type"] == "code_interpreter_call":
            item["status"] = "interpreting"
            return ev + [("response.code_interpreter_call.interpreting", dict(item_id=item["id"], output_index=i))]
        item["action"] = action or {"type": "search", "query": None}
        return ev + [("response.output_item.added", dict(output_index=i, item=dict(item))),
                     ("response.web_search_call.in_progress", dict(item_id=item["id"], output_index=i)),
                     ("response.web_search_call.searching", dict(item_id=item["id"], output_index=i))]

    def tool_done(self, result: ToolResult) -> list[tuple[str, dict]]:
        i, self.pending = self.pending, None
        item = self.items[i]
        item["status"] = "failed" if result.failed else "completed"
        if item["type"] == "code_interpreter_call":
            item["outputs"] = [{"type": "logs", "logs": result.output}]
            done = "response.code_interpreter_call.completed"
        else:
            item["action"] = result.action or item["action"]
            self.outputs[item["id"]] = result.output
            done = "response.web_search_call.completed"
        ev = [] if result.failed else [(done, dict(item_id=item["id"], output_index=i))]
        return ev + [("response.output_item.done", dict(output_index=i, item=item))]

    def settle(self) -> list[tuple[str, dict]]:
        """The response ends: close the last item; a call that will not run is abandoned."""
        return self.close() + self._abandon()

    def _abandon(self) -> list[tuple[str, dict]]:
        """The pending call will not run: incomplete (a web search, never announced, is dropped: it is
        the last item)."""
        i, self.pending = self.pending, None
        if i is None:
            return []
        item = self.items[i]
        if item["type"] == "web_search_call":
            del self.items[i]
            return []
        item["status"] = "incomplete"
        return [("response.output_item.done", dict(output_index=i, item=item))]

    def stored(self) -> list[dict]:
        """The items as kept for `previous_response_id`: web searches with the tool's answer."""
        return [{**it, TOOL_OUTPUT_KEY: self.outputs[it["id"]]} if it["id"] in self.outputs else it
                for it in self.items]


class ResponseRun:
    """One /v1/responses request: its rounds, their items and events, its usage.

    start(job) -> (queue, streams, choices) and events(queue, streams, choices) are the app's (they
    submit to the engine thread and read its outputs); toolbox and conversation: whose tool sessions
    the calls use (None: the server has no tools)."""

    def __init__(self, job: Job, *, start, events, toolbox: Toolbox | None, conversation: str, max_len: int):
        self.job, self._start, self._events = job, start, events
        self.toolbox, self.conversation, self.max_len = toolbox, conversation, max_len
        self.names: list[str] = job.extra["builtin"]
        self.max_calls: int = job.extra["max_tool_calls"]
        self.usage = Usage(len(job.prompt))
        self.incomplete: str | None = None  # why the response stopped short
        self.client_left = False
        self.items = ToolOutputItems(self._route, self._cite, f"cntr_{conversation}")
        first = job.params[0]
        forced = job.extra["forced_builtin"]
        self._first = (force_builtin(first, forced, toolbox, job.extra["max_reasoning_tokens"]) if forced
                       else first)  # before any event: a 400

    def _route(self, recipient: str | None) -> str | None:
        return self.toolbox.route(recipient, self.names) if self.names else None

    def _cite(self, text: str) -> list[dict]:
        session = self.toolbox.session(self.conversation, "browser") if "browser" in self.names else None
        if not isinstance(session, BrowserSession):
            return []
        return [{"type": "url_citation", "start_index": c.start, "end_index": c.end, "url": c.url, "title": c.title}
                for c in session.citations(text)]

    async def events(self):
        """(event type, data) as the response is made, rounds and tool runs included."""
        prompt, budget = list(self.job.prompt), self.job.params[0].max_tokens
        calls = 0
        for n in itertools.count():
            room = self.max_len - len(prompt)
            if min(room, budget) < 1:
                self.incomplete = "max_output_tokens"
                break
            base = self._first if n == 0 else self.job.params[0]
            params = dataclasses.replace(base, max_tokens=min(budget, room), seed=(base.seed + n) % _SEED_MOD)
            q, streams, choices = self._start(dataclasses.replace(self.job, prompt=prompt, params=[params]))
            async with contextlib.aclosing(self._events(q, streams, choices)) as evs:
                async for _, pieces, _ in evs:
                    for p in pieces:
                        for ev in self.items.feed(p):
                            yield ev
            (c,) = choices
            if c.engine_reason is None:  # the client left: nothing more to make
                self.client_left = True
                return
            tokens = c.tokens
            self.usage.completion_tokens += len(tokens)
            self.usage.reasoning_tokens += c.reasoning_tokens
            budget -= len(tokens)
            call = ended_with_call(tokens, c.closed_calls, self.toolbox, self.names)
            if call is None:
                if c.finish_reason == "length":
                    self.incomplete = "max_output_tokens"
                break
            if calls > self.max_calls:  # the model was told the limit and called again
                self.incomplete = "max_tool_calls"
                break
            tool = self._route(call.recipient)
            for ev in self.items.tool_started(tool, self.toolbox.preview(self.conversation, call)):
                yield ev
            if calls < self.max_calls:
                result = await asyncio.to_thread(self.toolbox.run, self.conversation, call)
            else:
                result = limit_reached(call, self.max_calls)
            calls += 1
            for ev in self.items.tool_done(result):
                yield ev
            prompt, added = next_prompt(prompt, tokens, result)
            self.usage.prompt_tokens += added
        for ev in self.items.settle():
            yield ev
