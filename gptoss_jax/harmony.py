"""The harmony chat format of gpt-oss: render conversations to prompt tokens, parse completions.

A thin layer over OpenAI's ``openai-harmony`` (pinned in pyproject.toml): plain dataclasses or dicts in and out,
harmony objects inside. The token ids are those of :func:`gptoss_jax.tokenizer.load_tokenizer` (checked by the
tests).

openai-harmony loads ``o200k_base.tiktoken`` itself: from ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` when the
variable is set (hash-checked; the same variable and file name as our tokenizer, so one folder serves both and
works offline), otherwise it downloads the file into its own cache (``TIKTOKEN_RS_CACHE_DIR``).

Example::

    from gptoss_jax.harmony import render_prompt, parse_completion, FunctionTool
    ids = render_prompt(
        [{"role": "user", "content": "What is the weather in Paris?"}],
        reasoning_effort="low",
        conversation_start_date="2025-08-05",
        instructions="Answer briefly.",
        tools=[FunctionTool("get_weather", "Current weather", {"type": "object", "properties": {...}})],
    )
    ... generate completion token ids after ``ids`` ...
    out = parse_completion(completion_ids)
    out.analysis, out.final, out.tool_calls
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import openai_harmony as oh

from gptoss_jax import tokenizer as _tok

__all__ = [
    "REASONING_EFFORTS",
    "FunctionTool",
    "ResponseFormat",
    "ChatMessage",
    "ToolCall",
    "ParsedCompletion",
    "HarmonyLoadError",
    "load_harmony_encoding",
    "build_conversation",
    "render_prompt",
    "render_continuation",
    "parse_completion",
    "stop_token_ids",
    "Delta",
    "CompletionDecoder",
]

REASONING_EFFORTS = ("low", "medium", "high")
_EFFORT = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}
_ROLES = {r.value: r for r in oh.Role}


class HarmonyLoadError(RuntimeError):
    """openai-harmony could not load its encoding (no vocab file, offline, hash mismatch)."""


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call: ``parameters`` is a JSON schema (an ``"object"`` schema) or None."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ResponseFormat:
    """A structured-output format: the developer message ends with harmony's section

        # Response Formats

        ## {name}

        // {description}
        {schema as compact JSON}

    so that the model knows what it is asked (constrained decoding enforces it)."""

    name: str
    schema: Mapping[str, Any]
    description: str | None = None

    def section(self) -> str:
        schema = json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"))
        note = f"// {self.description}\n" if self.description else ""
        return f"# Response Formats\n\n## {self.name}\n\n{note}{schema}"


@dataclass
class ChatMessage:
    """One message of a conversation.

    role: ``"user"``, ``"assistant"``, ``"tool"``, or (first message only) ``"system"``/``"developer"``, whose
        content becomes the developer instructions (as in gpt-oss's Hugging Face chat template).
    channel: assistant messages: ``"analysis"`` (reasoning), ``"commentary"`` (tool calls, preambles) or
        ``"final"`` (the answer). Defaults: ``"final"``, or ``"commentary"`` when ``recipient`` is set; tool
        results default to ``"commentary"``.
    recipient: for a tool call, the tool, e.g. ``"functions.get_weather"``; tool results default to
        ``"assistant"``.
    name: for a tool result, the tool that answered, e.g. ``"functions.get_weather"`` (required for role tool).
    content_type: e.g. ``"<|constrain|>json"`` for a tool call's JSON arguments.
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    name: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class ToolCall:
    """A tool call of the assistant: ``recipient`` like ``"functions.get_weather"``, raw ``arguments`` text."""

    recipient: str
    arguments: str
    channel: str | None = None
    content_type: str | None = None

    @property
    def namespace(self) -> str | None:
        """``"functions"`` for ``"functions.get_weather"``; None for a recipient without a dot."""
        return self.recipient.split(".", 1)[0] if "." in self.recipient else None

    @property
    def name(self) -> str:
        """The function name without its namespace: ``"get_weather"``."""
        return self.recipient.split(".", 1)[1] if "." in self.recipient else self.recipient

    def json_arguments(self) -> Any:
        """The arguments parsed as JSON (raises json.JSONDecodeError when they are not JSON)."""
        return json.loads(self.arguments)


@dataclass
class ParsedCompletion:
    """The messages of one assistant completion.

    messages: every parsed message, in order (role ``"assistant"``).
    stop_token: the stop token that ended the completion (``<|return|>``, ``<|call|>`` or ``<|endoftext|>``), or
        None when the tokens ran out first (e.g. max_tokens); tokens after it are ignored.
    error: when not strict, the parser's complaint if the tokens ended inside a message header or were
        malformed (the messages parsed before it are kept); None otherwise.
    """

    messages: list[ChatMessage] = field(default_factory=list)
    stop_token: int | None = None
    error: str | None = None

    @property
    def analysis(self) -> str:
        """The reasoning: the analysis-channel messages, joined by newlines."""
        return "\n".join(m.content for m in self.messages if m.channel == "analysis")

    @property
    def final(self) -> str | None:
        """The answer: the last final-channel message, or None when there is none."""
        finals = [m.content for m in self.messages if m.channel == "final"]
        return finals[-1] if finals else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Messages addressed to a tool (any recipient other than the user/assistant)."""
        return [
            ToolCall(m.recipient, m.content, m.channel, m.content_type)
            for m in self.messages
            if m.recipient and m.recipient not in ("user", "all", "assistant")
        ]


def _resolve_base(encodings_base: str | os.PathLike | None) -> str | None:
    if encodings_base is not None:
        return os.path.abspath(os.fspath(encodings_base))
    env = os.environ.get(_tok.ENCODINGS_BASE_ENV)
    return os.path.abspath(env) if env else None


@functools.lru_cache(maxsize=4)
def _load_cached(base: str | None) -> oh.HarmonyEncoding:
    name = oh.HarmonyEncodingName.HARMONY_GPT_OSS
    if base is None:
        try:
            if os.environ.get(_tok.ENCODINGS_BASE_ENV) == "":  # empty: treated as unset, as by load_tokenizer
                del os.environ[_tok.ENCODINGS_BASE_ENV]
                try:
                    return oh.load_harmony_encoding(name)
                finally:
                    os.environ[_tok.ENCODINGS_BASE_ENV] = ""
            return oh.load_harmony_encoding(name)
        except Exception as e:
            raise HarmonyLoadError(
                f"openai-harmony could not download o200k_base.tiktoken ({e}). When offline, set "
                f"{_tok.ENCODINGS_BASE_ENV} to a folder that holds {_tok.O200K_BASE_FILENAME} "
                f"(sha256 {_tok.O200K_BASE_SHA256})."
            ) from e
    path = os.path.join(base, _tok.O200K_BASE_FILENAME)
    if not os.path.isfile(path):
        raise HarmonyLoadError(
            f"{_tok.O200K_BASE_FILENAME} not found in {base!r}: openai-harmony reads "
            f"${_tok.ENCODINGS_BASE_ENV}/{_tok.O200K_BASE_FILENAME} (sha256 {_tok.O200K_BASE_SHA256})."
        )
    # openai-harmony (Rust) reads the variable from the process environment at load time.
    old = os.environ.get(_tok.ENCODINGS_BASE_ENV)
    os.environ[_tok.ENCODINGS_BASE_ENV] = base
    try:
        return oh.load_harmony_encoding(name)
    except Exception as e:
        raise HarmonyLoadError(f"openai-harmony could not load {path!r} (hash mismatch or bad file?): {e}") from e
    finally:
        if old is None:
            del os.environ[_tok.ENCODINGS_BASE_ENV]
        else:
            os.environ[_tok.ENCODINGS_BASE_ENV] = old


def load_harmony_encoding(encodings_base: str | os.PathLike | None = None) -> oh.HarmonyEncoding:
    """openai-harmony's ``HarmonyGptOss`` encoding, cached; ``encodings_base`` as for ``load_tokenizer``."""
    return _load_cached(_resolve_base(encodings_base))


def stop_token_ids() -> tuple[int, ...]:
    """Default stop tokens for generation: ``<|return|>``, ``<|endoftext|>``, ``<|call|>``."""
    return _tok.DEFAULT_STOP_TOKEN_IDS


MessageLike = Union[ChatMessage, Mapping[str, Any]]
ToolLike = Union[FunctionTool, Mapping[str, Any]]


def _as_message(m: MessageLike) -> ChatMessage:
    if isinstance(m, ChatMessage):
        return m
    if not isinstance(m, Mapping):
        raise TypeError(f"a message must be a ChatMessage or a dict, got {type(m).__name__}")
    known = {f.name for f in dataclasses.fields(ChatMessage)}
    unknown = set(m) - known
    if unknown:
        raise ValueError(f"unknown message keys {sorted(unknown)}; allowed: {sorted(known)}")
    if "role" not in m or "content" not in m:
        raise ValueError(f"a message needs 'role' and 'content': {dict(m)!r}")
    return ChatMessage(**m)


def _as_tool(t: ToolLike) -> oh.ToolDescription:
    if isinstance(t, Mapping):
        # Also accept the OpenAI chat-completions form {"type": "function", "function": {...}}.
        if t.get("type") == "function" and "function" in t:
            t = t["function"]
        t = FunctionTool(name=t["name"], description=t.get("description", ""), parameters=t.get("parameters"))
    if not isinstance(t, FunctionTool):
        raise TypeError(f"a tool must be a FunctionTool or a dict, got {type(t).__name__}")
    params = None if t.parameters is None else json.loads(json.dumps(t.parameters))
    return oh.ToolDescription.new(t.name, t.description, parameters=params)


def _to_harmony(m: ChatMessage) -> oh.Message:
    if not isinstance(m.content, str):
        raise TypeError(f"message content must be a str, got {type(m.content).__name__}")
    if m.role == "assistant":
        channel = m.channel or ("commentary" if m.recipient else "final")
        msg = oh.Message.from_role_and_content(oh.Role.ASSISTANT, m.content).with_channel(channel)
        if m.recipient:
            msg = msg.with_recipient(m.recipient)
    elif m.role == "user":
        msg = oh.Message.from_role_and_content(oh.Role.USER, m.content)
        if m.channel:
            msg = msg.with_channel(m.channel)
    elif m.role == "tool":
        if not m.name:
            raise ValueError("a tool message needs the tool's name, e.g. name='functions.get_weather'")
        msg = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, m.name), m.content)
        msg = msg.with_channel(m.channel or "commentary").with_recipient(m.recipient or "assistant")
    elif m.role in ("system", "developer"):
        raise ValueError(
            f"a {m.role!r} message is only allowed first in the conversation (it becomes the developer "
            f"instructions); use instructions= instead"
        )
    else:
        raise ValueError(f"unknown role {m.role!r}; expected one of user, assistant, tool, system, developer")
    if m.content_type:
        msg = msg.with_content_type(m.content_type)
    return msg


def _date_str(d: str | datetime.date | None) -> str | None:
    if d is None or isinstance(d, str):
        return d
    if isinstance(d, datetime.datetime):
        d = d.date()
    return d.isoformat()


def build_conversation(
    messages: Sequence[MessageLike],
    *,
    reasoning_effort: str = "medium",
    conversation_start_date: str | datetime.date | None = None,
    instructions: str | None = None,
    tools: Sequence[ToolLike] | None = None,
    model_identity: str | None = None,
    knowledge_cutoff: str | None = None,
    developer: bool = False,
    system_tools: Sequence[oh.ToolNamespaceConfig] | None = None,
) -> oh.Conversation:
    """The harmony ``Conversation``: a system message (model identity, knowledge cutoff, conversation start
    date, reasoning effort, channels), a developer message when there are instructions or tools, then
    ``messages`` (``developer``: a developer message even without instructions or tools). See
    :func:`render_prompt` for the arguments."""
    effort = reasoning_effort.value if isinstance(reasoning_effort, oh.ReasoningEffort) else reasoning_effort
    effort = effort.lower() if isinstance(effort, str) else effort
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    msgs = [_as_message(m) for m in messages]
    if msgs and msgs[0].role in ("system", "developer"):
        if instructions is not None:
            raise ValueError("give developer instructions either as instructions= or as a first system message")
        instructions = msgs[0].content
        msgs = msgs[1:]

    system = oh.SystemContent.new().with_reasoning_effort(_EFFORT[effort])
    date = _date_str(conversation_start_date)
    if date is not None:
        system = system.with_conversation_start_date(date)
    if model_identity is not None:
        system = system.with_model_identity(model_identity)
    if knowledge_cutoff is not None:
        system = system.with_knowledge_cutoff(knowledge_cutoff)
    for ns in system_tools or ():
        system = system.with_tools(ns)
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]

    if instructions is not None or tools or developer:
        dev = oh.DeveloperContent.new()
        if instructions is not None:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools([_as_tool(t) for t in tools])
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
    out.extend(_to_harmony(m) for m in msgs)
    return oh.Conversation.from_messages(out)


def render_prompt(
    messages: Sequence[MessageLike],
    *,
    reasoning_effort: str = "medium",
    conversation_start_date: str | datetime.date | None = None,
    instructions: str | None = None,
    tools: Sequence[ToolLike] | None = None,
    model_identity: str | None = None,
    knowledge_cutoff: str | None = None,
    auto_drop_analysis: bool = True,
    encodings_base: str | os.PathLike | None = None,
    response_format: ResponseFormat | None = None,
    system_tools: Sequence[oh.ToolNamespaceConfig] | None = None,
) -> list[int]:
    """Prompt token ids for the assistant's next turn (ends with ``<|start|>assistant``).

    messages: ChatMessage objects or dicts with the same keys (``role``, ``content``, optional ``channel``,
        ``recipient``, ``name``, ``content_type``).
    reasoning_effort: ``"low"``, ``"medium"`` (default) or ``"high"`` (any case, or a harmony ReasoningEffort).
    conversation_start_date: ``"YYYY-MM-DD"`` or a ``datetime.date``; None leaves it out.
    instructions: developer instructions (or give them as a first system/developer message).
    tools: function tools, as :class:`FunctionTool` or dicts ``{"name", "description", "parameters"}`` (also
        ``{"type": "function", "function": {...}}``); ``parameters`` is a JSON schema.
    model_identity / knowledge_cutoff: override harmony's defaults ("You are ChatGPT, ..." / "2024-06").
    auto_drop_analysis: drop earlier turns' analysis messages as harmony recommends.
    response_format: a :class:`ResponseFormat` written at the end of the developer message (the
        harmony spec's ``# Response Formats`` section; openai-harmony 0.0.8 has no API for it).
    system_tools: built-in tool namespaces for the system message's ``# Tools`` section (openai-harmony
        ``ToolNamespaceConfig``s, e.g. those of :mod:`gptoss_jax.tools`).
    """
    conv = build_conversation(
        messages,
        reasoning_effort=reasoning_effort,
        conversation_start_date=conversation_start_date,
        instructions=instructions,
        tools=tools,
        model_identity=model_identity,
        knowledge_cutoff=knowledge_cutoff,
        developer=response_format is not None,
        system_tools=system_tools,
    )
    enc = load_harmony_encoding(encodings_base)
    cfg = oh.RenderConversationConfig(auto_drop_analysis=auto_drop_analysis)
    ids = list(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT, cfg))
    if response_format is not None:
        ids = _append_to_developer(ids, response_format.section(), encodings_base)
    return ids


def _append_to_developer(ids: list[int], text: str, encodings_base) -> list[int]:
    """`text` appended (after a blank line) to the developer message's content, re-encoded whole
    (as harmony encodes a message's text), so the tokens are those of the longer message."""
    tok = _tok.load_tokenizer(encodings_base)
    head = [_tok.START] + tok.encode("developer") + [_tok.MESSAGE]
    start = next(i for i in range(len(ids)) if ids[i:i + len(head)] == head) + len(head)
    end = ids.index(_tok.END, start)
    content = tok.decode(ids[start:end])
    content = f"{content}\n\n{text}" if content else text
    return ids[:start] + tok.encode(content) + ids[end:]


def render_continuation(
    messages: Sequence[MessageLike], *, encodings_base: str | os.PathLike | None = None
) -> list[int]:
    """The tokens that follow a completion ending in a tool call (``<|call|>``): ``messages`` (the tools'
    answers, role ``"tool"``) then ``<|start|>assistant``, exactly as :func:`render_prompt` renders them
    inside a conversation, so that the prompt, the completion and these tokens are the conversation."""
    conv = oh.Conversation.from_messages([_to_harmony(_as_message(m)) for m in messages])
    return list(load_harmony_encoding(encodings_base).render_conversation_for_completion(conv, oh.Role.ASSISTANT))


def _from_harmony(m: oh.Message) -> ChatMessage:
    text = "".join(c.text for c in m.content if isinstance(c, oh.TextContent))
    return ChatMessage(
        role=m.author.role.value,
        content=text,
        channel=m.channel,
        recipient=m.recipient,
        name=m.author.name,
        content_type=m.content_type,
    )


def parse_completion(
    tokens: Sequence[int],
    *,
    strict: bool = False,
    stop_tokens: Sequence[int] | None = None,
    encodings_base: str | os.PathLike | None = None,
) -> ParsedCompletion:
    """Parse the assistant's completion tokens (the ids generated after :func:`render_prompt`'s prompt).

    Tokens after the first stop token (default ``<|return|>``, ``<|call|>``, ``<|endoftext|>``) are ignored.
    With ``strict=True`` malformed or header-truncated output raises ``ValueError``; otherwise the messages
    parsed so far are returned with ``error`` set.
    """
    stops = set(_tok.DEFAULT_STOP_TOKEN_IDS if stop_tokens is None else stop_tokens)
    toks = [int(t) for t in tokens]
    stop = None
    for i, t in enumerate(toks):
        if t in stops:
            stop = t
            toks = toks[: i + 1]
            break
    if stop == _tok.ENDOFTEXT:
        toks = toks[:-1]  # not part of the harmony format: ends the message like EOS

    enc = load_harmony_encoding(encodings_base)
    parser = oh.StreamableParser(enc, oh.Role.ASSISTANT, strict=strict)
    error = None
    try:
        for t in toks:
            parser.process(t)
        parser.process_eos()
    except oh.HarmonyError as e:
        if strict:
            raise ValueError(f"malformed harmony completion: {e}") from e
        error = str(e)
    return ParsedCompletion([_from_harmony(m) for m in parser.messages], stop, error)


def stream_deltas(tokens: Iterable[int], encodings_base: str | os.PathLike | None = None
                  ) -> Iterator[tuple[str | None, str]]:
    """Parse completion tokens as they arrive: yields (channel, text delta) for each piece of content."""
    parser = oh.StreamableParser(load_harmony_encoding(encodings_base), oh.Role.ASSISTANT)
    for tok in tokens:
        parser.process(int(tok))
        delta = parser.last_content_delta
        if delta:
            yield parser.current_channel, delta


# A harmony header is a channel, a recipient and a content type (about a dozen tokens); a longer one
# means the model is not speaking harmony (random or untrained weights): show its raw text instead.
MAX_HEADER_TOKENS = 64
_NOT_TOOLS = (None, "user", "all", "assistant")


@dataclass(frozen=True)
class Delta:
    """A piece of a completion. kind: ``"reasoning"`` (analysis channel), ``"content"`` (final or
    commentary text, or the raw text of output that is not harmony) or ``"tool_call"`` (arguments
    text of a call to ``recipient``). ``message`` numbers the messages of the completion (a new
    number starts a new message)."""

    kind: str
    text: str
    message: int
    recipient: str | None = None


class CompletionDecoder:
    """Completion tokens in, :class:`Delta` pieces out, as they arrive: the one reading of a
    completion that streaming and non-streaming replies share (so both give the same text).

    Parsing is not strict, and output that is not valid harmony (a malformed or overlong header, a
    token where a message must start) is never lost: from the message where it went wrong on, the
    raw text of the tokens is reported as ``"content"`` (``harmony=False``: all of it, as raw
    completions are). Stop tokens end the completion; ``<|return|>`` and ``<|call|>`` close the last
    message."""

    def __init__(self, encodings_base: str | os.PathLike | None = None, stop_tokens: Sequence[int] | None = None,
                 *, harmony: bool = True):
        self._enc = load_harmony_encoding(encodings_base)
        self._tok = _tok.load_tokenizer(encodings_base)
        self._parser = oh.StreamableParser(self._enc, oh.Role.ASSISTANT, strict=False)
        self._stops = frozenset(_tok.DEFAULT_STOP_TOKEN_IDS if stop_tokens is None else stop_tokens)
        self._since_message: list[int] = []  # tokens of the message being parsed
        self._emitted = ""  # its text reported so far
        self._message = 0
        self._raw = None  # the incremental UTF-8 decoder once the output is not harmony
        if not harmony:  # plain text from the start (raw completions)
            self._raw = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.done = False
        self.tool_calls: list[ToolCall] = []  # calls whose message closed
        self.error: str | None = None  # why the output was taken as raw text

    @property
    def raw(self) -> bool:
        return self._raw is not None

    def feed(self, token: int) -> list[Delta]:
        token = int(token)
        if self.done:
            return []
        if token in self._stops:
            self.done = True
            if token == _tok.ENDOFTEXT or self.raw:  # not harmony: ends the text like EOS
                return self._finish()
        if self.raw:
            return self._raw_text([token])
        self._since_message.append(token)
        out = []
        try:
            self._parser.process(token)
        except oh.HarmonyError as e:
            out = self._fall_back(str(e))
        else:
            state = self._parser.state
            delta = self._parser.last_content_delta
            if delta and state == oh.StreamState.CONTENT:
                out.append(self._delta(delta, self._parser.current_channel, self._parser.current_recipient))
            if state == oh.StreamState.EXPECT_START:
                out += self._close_message()
            elif state == oh.StreamState.HEADER and len(self._since_message) > MAX_HEADER_TOKENS:
                out = self._fall_back(f"a message header longer than {MAX_HEADER_TOKENS} tokens")
        if self.done:
            out += self._finish()
        return out

    def finish(self) -> list[Delta]:
        """The tokens ended (a length limit, or the caller's stop): flush what is pending. Idempotent."""
        self.done = True
        return self._finish()

    def _finish(self) -> list[Delta]:
        if self._parser is None:
            return []
        out = []
        if not self.raw:
            try:
                self._parser.process_eos()
            except oh.HarmonyError as e:  # the tokens ended inside a header: show them as text
                out += self._fall_back(str(e))
        out += self._raw_flush()
        self._parser = None
        return out

    def _delta(self, text: str, channel, recipient) -> Delta:
        self._emitted += text
        if recipient not in _NOT_TOOLS:
            return Delta("tool_call", text, self._message, recipient)
        return Delta("reasoning" if channel == "analysis" else "content", text, self._message)

    def _close_message(self) -> list[Delta]:
        """A message ended; the lenient parser may have taken text it never reported as a delta
        (a header closed by <|return|>): report the rest."""
        m = self._parser.messages[-1]
        text = "".join(c.text for c in m.content if isinstance(c, oh.TextContent))
        rest = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        out = [self._delta(rest, m.channel, m.recipient)] if rest else []
        if m.recipient not in _NOT_TOOLS:
            self.tool_calls.append(ToolCall(m.recipient, text, m.channel, m.content_type))
        self._since_message, self._emitted = [], ""
        self._message += 1
        return out

    def _fall_back(self, why: str) -> list[Delta]:
        """From the message being parsed on (only its header was read: nothing of it was reported),
        the output is raw text."""
        self.error = why
        self._raw = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending, self._since_message = self._since_message, []
        return self._raw_text([t for t in pending if t not in self._stops])

    def _raw_text(self, tokens) -> list[Delta]:
        text = self._raw.decode(b"".join(self._tok.decode_single_token_bytes(t) for t in tokens))
        return [Delta("content", text, self._message)] if text else []

    def _raw_flush(self) -> list[Delta]:
        if self._raw is None:
            return []
        text = self._raw.decode(b"", final=True)
        return [Delta("content", text, self._message)] if text else []
