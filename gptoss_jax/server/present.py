"""Engine outputs -> OpenAI replies. One `Choice` reads one generation (harmony or raw text, stop
strings, logprobs) for both the streaming and the whole reply, so the two always say the same."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import RequestOutput
from ..harmony import CompletionDecoder, Delta, ToolCall
from .protocol import FUNCTIONS, new_id


@dataclass
class ToolCallOut:
    id: str
    name: str
    message: int  # the completion's message that carries the call
    arguments: str = ""

    def chat(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_name(recipient: str) -> str:
    return recipient[len(FUNCTIONS):] if recipient.startswith(FUNCTIONS) else recipient


class Choice:
    """One generation as the user sees it.

    `feed(out)` returns the new pieces (`Delta`s: reasoning, content, tool-call arguments) after stop
    strings are applied to the content; once a stop string matched, `stopped` is set (the caller
    aborts the engine request) and nothing more is reported."""

    def __init__(self, index: int, harmony: bool, stop: list[str], tokenizer, stop_tokens=None,
                 encodings_base=None):
        self.index = index
        self._decoder = CompletionDecoder(encodings_base, stop_tokens, harmony=harmony)
        self._tok = tokenizer
        self._stop = stop
        self._held: Delta | None = None  # content that may be the start of a stop string
        self.stopped = False
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []  # (token, logprob, [(token, logprob)])
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[ToolCallOut] = []
        self._call_message: int | None = None
        self.engine_reason: str | None = None
        self.reasoning_tokens = 0
        self.pieces: list[Delta] = []  # everything reported, in order

    # ---- reading ------------------------------------------------------------------------------
    def feed(self, out: RequestOutput) -> list[Delta]:
        pieces = []
        for i, t in enumerate(out.new_token_ids):
            if self.stopped:
                break
            self.tokens.append(t)
            if out.logprobs is not None:
                top = out.top_logprobs[i] if out.top_logprobs else []
                self.logprobs.append((t, out.logprobs[i], top))
            new = self._apply_stop(self._decoder.feed(t))
            self.reasoning_tokens += any(d.kind == "reasoning" for d in new)
            pieces += new
        if out.finished:
            self.engine_reason = out.finish_reason
            pieces += self._end()
        return [self._record(p) for p in pieces]

    @property
    def closed_calls(self) -> list[ToolCall]:
        """The tool calls whose message closed, as harmony reads them (recipient, channel, content type)."""
        return self._decoder.tool_calls

    def end(self) -> list[Delta]:
        """No more tokens come (the request finished or was stopped): flush what is held."""
        return [self._record(p) for p in self._end()]

    def _end(self) -> list[Delta]:
        pieces = [] if self.stopped else self._apply_stop(self._decoder.finish())
        if self._held is not None and not self.stopped:
            pieces.append(self._take_held())
        return pieces

    def _apply_stop(self, deltas: list[Delta]) -> list[Delta]:
        out = []
        for d in deltas:
            if self.stopped:
                break
            if d.kind != "content" or not self._stop:
                if self._held is not None:
                    out.append(self._take_held())
                out.append(d)
                continue
            if self._held is not None and self._held.message != d.message:
                out.append(self._take_held())
            text = (self._held.text if self._held else "") + d.text
            self._held = None
            hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
            if hits:
                cut = text[:min(hits)]
                if cut:
                    out.append(Delta("content", cut, d.message))
                self.stopped = True
                break
            keep = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            if len(text) > keep:
                out.append(Delta("content", text[:len(text) - keep], d.message))
            if keep:
                self._held = Delta("content", text[len(text) - keep:], d.message)
        return out

    def _take_held(self) -> Delta:
        held, self._held = self._held, None
        return held

    def _record(self, d: Delta) -> Delta:
        self.pieces.append(d)
        if d.kind == "reasoning":
            self.reasoning += d.text
        elif d.kind == "content":
            self.content += d.text
        else:
            if self._call_message != d.message:
                self._call_message = d.message
                self.tool_calls.append(ToolCallOut(new_id("call_"), tool_name(d.recipient), d.message))
            self.tool_calls[-1].arguments += d.text
        return d

    # ---- reporting ----------------------------------------------------------------------------
    @property
    def finish_reason(self) -> str:
        if self.stopped:
            return "stop"
        if self.engine_reason == "length":
            return "length"
        return "tool_calls" if self.tool_calls else "stop"

    def token_logprob(self, tok: int, lp: float) -> dict:
        b = self._tok.decode_single_token_bytes(tok)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    def chat_logprobs(self, entries) -> dict:
        return {"content": [{**self.token_logprob(t, lp), "top_logprobs": [self.token_logprob(u, v) for u, v in top]}
                            for t, lp, top in entries]}

    def completion_logprobs(self, entries, offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in entries:
            tok = self.token_logprob(t, lp)["token"]
            out["tokens"].append(tok)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.token_logprob(u, v)["token"]: v for u, v in top})
            out["text_offset"].append(offset)
            offset += len(tok)
        return out


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def chat(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def responses(self) -> dict:
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class OutputItems:
    """Pieces -> Responses output items (reasoning, message, function_call) and their stream events."""

    def __init__(self):
        self.items: list[dict] = []
        self._open: tuple | None = None  # (kind, message) of the item being written

    def feed(self, p) -> list[tuple[str, dict]]:
        ev = []
        if self._open != (p.kind, p.message):
            ev += self.close()
            ev += self._start(p)
        item, i = self.items[-1], len(self.items) - 1
        if p.kind == "reasoning":
            item["content"][0]["text"] += p.text
            ev.append(("response.reasoning_text.delta", dict(item_id=item["id"], output_index=i, content_index=0,
                                                              delta=p.text)))
        elif p.kind == "content":
            item["content"][0]["text"] += p.text
            ev.append(("response.output_text.delta", dict(item_id=item["id"], output_index=i, content_index=0,
                                                           delta=p.text, logprobs=[])))
        else:
            item["arguments"] += p.text
            ev.append(("response.function_call_arguments.delta", dict(item_id=item["id"], output_index=i,
                                                                       delta=p.text)))
        return ev

    def _start(self, p) -> list[tuple[str, dict]]:
        self._open = (p.kind, p.message)
        i = len(self.items)
        if p.kind == "reasoning":
            item = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "status": "in_progress",
                    "content": [{"type": "reasoning_text", "text": ""}]}
            shown = {**item, "content": []}
            ev = [("response.output_item.added", dict(output_index=i, item=shown))]
        elif p.kind == "content":
            item = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            ev = [("response.output_item.added", dict(output_index=i, item={**item, "content": []})),
                  ("response.content_part.added", dict(item_id=item["id"], output_index=i, content_index=0,
                                                       part=dict(item["content"][0])))]
        else:
            item = {"id": new_id("fc_"), "type": "function_call", "call_id": new_id("call_"),
                    "name": tool_name(p.recipient), "arguments": "", "status": "in_progress"}
            ev = [("response.output_item.added", dict(output_index=i, item=dict(item)))]
        self.items.append(item)
        return ev

    def close(self) -> list[tuple[str, dict]]:
        if self._open is None:
            return []
        self._open = None
        item, i = self.items[-1], len(self.items) - 1
        item["status"] = "completed"
        if item["type"] == "reasoning":
            ev = [("response.reasoning_text.done", dict(item_id=item["id"], output_index=i, content_index=0,
                                                         text=item["content"][0]["text"]))]
        elif item["type"] == "message":
            part = item["content"][0]
            ev = [("response.output_text.done", dict(item_id=item["id"], output_index=i, content_index=0,
                                                      text=part["text"], logprobs=[])),
                  ("response.content_part.done", dict(item_id=item["id"], output_index=i, content_index=0,
                                                      part=part))]
        else:
            ev = [("response.function_call_arguments.done", dict(item_id=item["id"], output_index=i,
                                                                  arguments=item["arguments"]))]
        return ev + [("response.output_item.done", dict(output_index=i, item=item))]
