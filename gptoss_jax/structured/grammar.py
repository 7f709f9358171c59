"""Harmony replies as llguidance grammars (lark syntax), with their token bounds.

A gpt-oss reply is harmony: after the prompt's `<|start|>assistant` the model may reason in an
`analysis` message, then writes the message that answers. `harmony_reply` builds the grammar of

    [<|channel|>analysis<|message|>REASONING<|end|><|start|>assistant]   (optional, <= R tokens of text)
    one of the given messages:
      <|channel|>final<|message|>ANSWER<|return|>                          (final_json / final_regex)
      <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>   (function_call)
      <|channel|>analysis to=python code<|message|>CODE<|call|>                          (tool_message)

(the headers as the harmony cookbook shows the model writing them; openai-harmony parses both the
channel-first and the recipient-first forms) and proves its length: every reply of the grammar
takes at most `Grammar.max_tokens` tokens, whatever the weights. Header text is forced as its
o200k tokens (the tokenization harmony renders and the model was trained on), special tokens one
each, the reasoning and free-text bodies their llguidance `max_tokens`, JSON answers at most their
bounded schema's bytes (`schema.fit_schema`: a token holds at least one byte) and regex answers 4
bytes a character of their capped length.

Budget: the reasoning gets `max_reasoning_tokens` (default half of `max_tokens`); the answer what
remains. When the default reasoning budget leaves too little for the shortest answer, the reasoning
shrinks (to nothing: the reply then starts with the answer); an explicit budget is kept and the
request refused instead (`SchemaError`, a ValueError).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Sequence

from .. import tokenizer as tk
from .schema import BYTES_PER_CHAR, SchemaError, regex_width, fit_schema

__all__ = ["Grammar", "Reply", "Message", "JsonBody", "TextBody", "RegexBody", "harmony_reply", "final_json",
           "final_regex", "function_call", "tool_message", "raw_grammar"]

ANALYSIS, FINAL, COMMENTARY = "analysis", "final", "commentary"
CHANNELS = (ANALYSIS, COMMENTARY, FINAL)
CONSTRAIN = "<|constrain|>"
RETURN, CALL = "<|return|>", "<|call|>"
END_IDS = {RETURN: tk.RETURN, CALL: tk.CALL}
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")  # recipients and content types: no quotes, no specials


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A reply grammar for llguidance: `lark` text, the longest reply in tokens (None: unknown, a
    raw grammar), the shortest, the special tokens that end a reply, the reasoning budget used."""

    lark: str
    max_tokens: int | None
    min_tokens: int = 0
    end_tokens: tuple[int, ...] = ()
    reasoning_tokens: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Grammar":
        return cls(d["lark"], d["max_tokens"], d["min_tokens"], tuple(d["end_tokens"]), d["reasoning_tokens"])


# ---- message bodies ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JsonBody:
    """JSON that validates against `schema` (bounded to the budget, see `schema.fit_schema`)."""

    schema: Any


@dataclasses.dataclass(frozen=True)
class TextBody:
    """Free text of at most `max_tokens` tokens (None: whatever the budget leaves)."""

    max_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class RegexBody:
    """Text that fully matches `pattern` (Rust regex syntax, as llguidance reads it; no anchors
    needed), capped at the characters the budget allows."""

    pattern: str


@dataclasses.dataclass(frozen=True)
class Message:
    """One harmony message the reply may end with. `end`: `<|return|>` (default for the final
    channel) or `<|call|>` (default when there is a recipient)."""

    channel: str
    body: JsonBody | TextBody | RegexBody
    recipient: str | None = None
    content_type: str | None = None  # "<|constrain|>json", "code", "json", ...
    end: str | None = None

    def __post_init__(self):
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {self.channel!r}")
        for what, v in (("recipient", self.recipient), ("content_type", _plain_type(self.content_type))):
            if v is not None and not _NAME.match(v):
                raise ValueError(f"{what} {v!r}: letters, digits, '_', '-' and '.' only")
        if self.end not in (None, RETURN, CALL):
            raise ValueError(f"end must be {RETURN!r} or {CALL!r}, got {self.end!r}")

    @property
    def end_token(self) -> str:
        return self.end or (CALL if self.recipient else RETURN)

    def header(self) -> tuple[list[str], int]:
        """(lark items of `<|channel|>... <|message|>`, their worst-case tokens)."""
        text = self.channel + (f" to={self.recipient}" if self.recipient else "")
        ct = self.content_type
        if ct and ct.startswith(CONSTRAIN):
            items = ["<|channel|>", *_literal(text + " "), CONSTRAIN, *_literal(ct[len(CONSTRAIN):])]
        else:
            items = ["<|channel|>", *_literal(text + (f" {ct}" if ct else ""))]
        items.append("<|message|>")
        return items, len(items)


def _literal(text: str) -> list[str]:
    """`text` as its o200k tokens, each a lark token item `<[id]>`."""
    return [f"<[{t}]>" for t in tk.load_tokenizer().encode(text)] if text else []


def _reasoning_rules(budget: int) -> tuple[list[str], int]:
    """(lark rules of the analysis message, its worst-case tokens) around `budget` tokens of text."""
    items = ["<|channel|>", *_literal(ANALYSIS), "<|message|>", "reasoning", "<|end|>", "<|start|>",
             *_literal("assistant")]
    return [f"analysis: {' '.join(items)}", f"reasoning[max_tokens={budget}]: /(?s:.*)/"], len(items) - 1 + budget


def _plain_type(ct: str | None) -> str | None:
    return ct[len(CONSTRAIN):] or None if ct and ct.startswith(CONSTRAIN) else ct


def final_json(schema: Any) -> Message:
    """The final answer as JSON validating against `schema`."""
    return Message(FINAL, JsonBody(schema))


def final_regex(pattern: str) -> Message:
    """The final answer as text fully matching `pattern`."""
    return Message(FINAL, RegexBody(pattern))


def function_call(name: str, parameters: Any = None) -> Message:
    """A call to the developer function `name` (`functions.NAME`, commentary channel, JSON arguments
    validating against `parameters`; None: no arguments, `{}`), ended by `<|call|>`."""
    schema = {"type": "object", "properties": {}, "additionalProperties": False} if parameters is None else parameters
    return Message(COMMENTARY, JsonBody(schema), recipient=f"functions.{name}", content_type=CONSTRAIN + "json")


def tool_message(recipient: str, *, channel: str = ANALYSIS, content_type: str | None = "code",
                 body: JsonBody | TextBody | RegexBody | None = None) -> Message:
    """A message to a built-in tool, ended by `<|call|>`. The gpt-oss tools are called in the
    analysis channel with content type `code`: `tool_message("python")` is
    `<|channel|>analysis to=python code<|message|>CODE<|call|>` (CODE free text within the budget);
    `tool_message("browser.search", body=JsonBody({...}))` is
    `<|channel|>analysis to=browser.search code<|message|>{"query":...}<|call|>`."""
    return Message(channel, TextBody() if body is None else body, recipient=recipient, content_type=content_type,
                   end=CALL)


# ---- the reply ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Reply:
    """`harmony_reply`'s arguments without the budget: `SamplingParams(grammar=Reply(...))` builds the
    grammar with the request's own max_tokens when it is added (so a copy of the params with another
    max_tokens, as the built-in tool rounds make, gets a grammar of its own budget)."""

    messages: tuple[Message, ...]
    max_reasoning_tokens: int | None = None
    reasoning: bool = True

    def grammar(self, max_tokens: int) -> Grammar:
        return harmony_reply(*self.messages, max_tokens=max_tokens, max_reasoning_tokens=self.max_reasoning_tokens,
                             reasoning=self.reasoning)


def harmony_reply(*messages: Message, max_tokens: int, max_reasoning_tokens: int | None = None,
                  reasoning: bool = True) -> Grammar:
    """The grammar of a harmony reply: an optional analysis message (at most `max_reasoning_tokens`
    tokens of text, default `max_tokens // 2`; `reasoning=False` or 0: none), then one of
    `messages`. Every reply it allows takes at most `max_tokens` tokens (`Grammar.max_tokens`).

    This is the one builder for forced replies: structured outputs (`final_json`), forced function
    calls (`function_call`, several for "one of these tools"), calls to built-in tools
    (`tool_message("python")`, `tool_message("browser.search", body=JsonBody(schema))`). Pass the
    result as `SamplingParams(grammar=...)`; the request's max_tokens must be at least
    `Grammar.max_tokens` (or pass `Reply(messages, max_reasoning_tokens)`, built at the request's
    max_tokens). Raises `SchemaError` (a ValueError) naming an unsupported schema feature,
    or when `max_tokens` cannot hold the shortest reply."""
    if not messages:
        raise ValueError("harmony_reply needs at least one message")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    explicit = max_reasoning_tokens is not None
    if explicit and (not isinstance(max_reasoning_tokens, int) or isinstance(max_reasoning_tokens, bool)
                     or max_reasoning_tokens < 0):
        raise ValueError(f"max_reasoning_tokens must be a non-negative integer, got {max_reasoning_tokens!r}")
    r = (max_reasoning_tokens if explicit else max_tokens // 2) if reasoning else 0
    try:
        return _build(messages, max_tokens, r)
    except SchemaError:
        if explicit or r == 0:
            raise
    # the default reasoning budget left too little: give the answers what their shortest form needs
    need = max(_shortest(m) for m in messages)
    return _build(messages, max_tokens, max(0, max_tokens - _reasoning_rules(0)[1] - need))


def _shortest(m: Message) -> int:
    """Tokens the message takes at its shortest bounded form (its header and end included)."""
    try:
        _, _, worst = _body(m.body, 10 ** 9, minimal=True)
    except SchemaError:
        return 10 ** 9
    return m.header()[1] + worst + 1


def _build(messages: Sequence[Message], max_tokens: int, reasoning: int) -> Grammar:
    analysis, overhead = _reasoning_rules(reasoning) if reasoning > 0 else ([], 0)
    rules, alts, worst, best = [], [], 0, math.inf
    for i, m in enumerate(messages):
        items, header = m.header()
        budget = max_tokens - overhead - header - 1
        if budget < 0:
            raise SchemaError(f"max_tokens {max_tokens} cannot hold the {m.channel} message header "
                              f"({header + 1} tokens) after {overhead} tokens of reasoning: raise max_tokens "
                              f"(or lower max_reasoning_tokens)")
        body_rules, lo, hi = _body(m.body, budget, name=f"body{i}")
        rules += body_rules
        alts.append(f"msg{i}")
        rules.append(f"msg{i}: {' '.join(items)} body{i} {m.end_token}")
        worst = max(worst, header + hi + 1)
        best = min(best, header + lo + 1)
    head = ["start: analysis? answer" if reasoning > 0 else "start: answer", *analysis,
            "answer: " + " | ".join(alts)]
    total = overhead + worst
    assert total <= max_tokens, (total, max_tokens)
    ends = tuple(sorted({END_IDS[m.end_token] for m in messages}))
    return Grammar("\n".join(head + rules) + "\n", total, int(best), ends, reasoning)


def _body(body, budget: int, name: str = "body", minimal: bool = False) -> tuple[list[str], int, int]:
    """(lark rules defining `name`, shortest tokens, longest tokens) of a message body."""
    if isinstance(body, JsonBody):
        fitted = fit_schema(body.schema, 10 ** 9 if minimal else budget, minimal=minimal)
        text = json.dumps(fitted.schema, ensure_ascii=False, separators=(",", ":"))
        return [f"{name}: %json {text}"], fitted.min_bytes, fitted.max_bytes
    if isinstance(body, TextBody):
        n = budget if body.max_tokens is None else min(body.max_tokens, budget)
        if n < 1:
            raise SchemaError(f"no tokens are left for the message text (budget {budget})")
        return [f"{name}[max_tokens={n}]: /(?s:.*)/"], 0, n
    if isinstance(body, RegexBody):
        lo, hi = regex_width(body.pattern)
        chars = min(hi, budget // BYTES_PER_CHAR)
        if chars < lo:
            raise SchemaError(f"the regex answer needs at least {lo} characters ({BYTES_PER_CHAR * lo} tokens at "
                              f"most), but only {budget} tokens are left for it: raise max_tokens")
        pattern = body.pattern.replace("/", "\\/")
        return [f"{name}: {name.upper()}", f"{name.upper()}: /{pattern}/ & /(?s:.{{0,{int(chars)}}})/"], lo, \
            BYTES_PER_CHAR * int(chars)
    raise TypeError(f"a message body is a JsonBody, TextBody or RegexBody, got {type(body).__name__}")


def raw_grammar(lark: str, max_tokens: int | None = None, end_tokens: Sequence[int] = ()) -> Grammar:
    """A grammar given as llguidance lark text, used as is: its termination within a request's
    max_tokens is the caller's to ensure (`max_tokens`, when known, is checked against it)."""
    if not isinstance(lark, str) or not lark.strip():
        raise ValueError("a grammar is non-empty lark text")
    return Grammar(lark, max_tokens, 0, tuple(int(t) for t in end_tokens), 0)
