"""OpenAI request bodies -> what the engine runs: prompt tokens, one SamplingParams per choice, and
how to read the output. Every bad field raises `ApiError` naming it (400), in OpenAI's error shape.

Bodies are read by hand, not by pydantic models: clients send many fields we ignore (`user`,
`metadata`, ...), and each refusal must name its field with OpenAI's wording, never a 422.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..engine import SamplingParams
from ..harmony import REASONING_EFFORTS, ChatMessage, FunctionTool, ResponseFormat, render_prompt, stop_token_ids
from ..structured import (JsonBody, Message, Reply, SchemaError, TextBody, final_json, function_call,
                          normalize_schema, tool_message, validate_grammar)
from ..tools import Toolbox

# OpenAI's limits: up to 4 stop sequences, 20 top logprobs (chat) and 5 (completions).
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETIONS = 5
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# A seed for requests without one (OpenAI samples afresh each time): any 31-bit value.
_SEED_BITS = 31
FUNCTIONS = "functions."


class ApiError(Exception):
    """An error reply: HTTP `status` and OpenAI's {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 500: "internal_server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


# ---- fields -------------------------------------------------------------------------------------
class Fields:
    """Typed reads of a JSON object's fields, each refusal naming the field."""

    def __init__(self, body: Any, where: str = ""):
        if not isinstance(body, dict):
            raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
        self.body, self.where = body, where

    def name(self, key: str) -> str:
        return f"{self.where}{key}"

    def get(self, key: str, default=None):
        v = self.body.get(key)
        return default if v is None else v

    def bool(self, key: str, default: bool = False) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise bad(f"'{self.name(key)}' must be a boolean, got {v!r}", self.name(key))
        return v

    def int(self, key: str, default=None, lo: int | None = None, hi: int | None = None):
        v = self.get(key, default)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(f"'{self.name(key)}' must be an integer, got {v!r}", self.name(key))
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise bad(f"'{self.name(key)}' must be {rng}, got {v}", self.name(key))
        return v

    def float(self, key: str, default=None, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False):
        v = self.get(key, default)
        if v is None:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise bad(f"'{self.name(key)}' must be a number, got {v!r}", self.name(key))
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise bad(f"'{self.name(key)}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", self.name(key))
        return float(v)

    def str(self, key: str, default=None, choices=None):
        v = self.get(key, default)
        if v is None:
            return None
        if not isinstance(v, str):
            raise bad(f"'{self.name(key)}' must be a string, got {v!r}", self.name(key))
        if choices is not None and v not in choices:
            raise bad(f"'{self.name(key)}' must be one of {list(choices)}, got {v!r}", self.name(key))
        return v

    def list(self, key: str, default=None):
        v = self.get(key, default)
        if v is not None and not isinstance(v, list):
            raise bad(f"'{self.name(key)}' must be an array, got {type(v).__name__}", self.name(key))
        return v

    def obj(self, key: str) -> "Fields":
        v = self.get(key, {})
        if not isinstance(v, dict):
            raise bad(f"'{self.name(key)}' must be an object, got {type(v).__name__}", self.name(key))
        return Fields(v, f"{self.name(key)}.")


def text_of(content, param: str, allowed=("text", "input_text", "output_text")) -> str:
    """A message content: a string, or a list of text parts (other parts: 400)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
                continue
            if not isinstance(part, dict) or part.get("type") not in allowed or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"'{param}[{i}]': only text content is supported, got {kind!r}", f"{param}[{i}]")
            out.append(part["text"])
        return "".join(out)
    raise bad(f"'{param}' must be a string or a list of text parts", param)


# ---- what a request runs --------------------------------------------------------------------------
@dataclass
class Job:
    """A parsed request: the prompt, one SamplingParams per choice, how to read and report output."""

    prompt: list[int]
    params: list[SamplingParams]
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    harmony: bool = True  # read the output as harmony (chat, responses) or as raw text (completions)
    logprobs: bool = False
    top_logprobs: int = 0
    extra: dict = field(default_factory=dict)  # endpoint-specific (tools, response store, ...)


@dataclass(frozen=True)
class Limits:
    """What the engine behind the server allows."""

    max_len: int
    vocab_size: int
    max_top_logprobs: int
    max_n: int


def sampling(f: Fields, prompt_len: int, limits: Limits, max_keys: tuple[str, ...], *, n: int = 1,
             stops: tuple[int, ...] | None, logprobs: bool = False, top_logprobs: int = 0) -> list[SamplingParams]:
    """The shared sampling fields -> one SamplingParams per choice (choice i uses seed + i)."""
    for key in ("frequency_penalty", "presence_penalty"):
        if f.float(key, 0.0, -2.0, 2.0):
            raise bad(f"'{key}' is not supported (only 0)", key)
    if f.get("logit_bias"):
        raise bad("'logit_bias' is not supported", "logit_bias")
    max_tokens, used = None, max_keys[0]
    for key in max_keys:
        v = f.int(key, lo=1)
        if v is not None:
            max_tokens, used = v, key
    room = limits.max_len - prompt_len
    if room < 1:
        raise bad(f"This model's maximum context length is {limits.max_len} tokens. However, your prompt has "
                  f"{prompt_len} tokens.", "messages", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise bad(f"This model's maximum context length is {limits.max_len} tokens. However, you requested "
                  f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                  f"completion). Please reduce the prompt or '{used}'.", used, "context_length_exceeded")
    temperature = f.float("temperature", None, 0.0, 2.0)
    top_p = f.float("top_p", None, 0.0, 1.0, lo_open=True)
    seed = f.int("seed")
    if seed is None:
        seed = secrets.randbits(_SEED_BITS)
    return [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + i,
                           stop_token_ids=stops, logprobs=logprobs, top_logprobs=top_logprobs) for i in range(n)]


def stop_strings(f: Fields) -> list[str]:
    stop = f.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise bad(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}", "stop")
    return stop


def streaming(f: Fields) -> tuple[bool, bool]:
    stream = f.bool("stream")
    opts = f.obj("stream_options")
    return stream, opts.bool("include_usage") if stream else False


def function_tools(f: Fields, key: str = "tools", flat: bool = False, skip: Collection[str] = ()) -> list[FunctionTool]:
    """Function tools: chat's {"type": "function", "function": {...}} or (flat) the Responses form; tools
    whose type is in `skip` are read elsewhere (the built-in ones)."""
    out = []
    for i, t in enumerate(f.list(key, [])):
        where = f"{key}[{i}]"
        if isinstance(t, dict) and t.get("type") in skip:
            continue
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else t
            raise bad(f"'{where}': only function tools are supported, got type {kind!r}", where)
        spec = Fields(t if flat else t.get("function"), f"{where}." if flat else f"{where}.function.")
        name = spec.str("name")
        if not name:
            raise bad(f"'{spec.name('name')}' is required", spec.name("name"))
        params = spec.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad(f"'{spec.name('parameters')}' must be a JSON schema object", spec.name("parameters"))
        out.append(FunctionTool(name, spec.str("description", ""), params))
    return out


def tool_choice(f: Fields, tools: list[FunctionTool], flat: bool = False
                ) -> tuple[list[FunctionTool], list[FunctionTool] | None]:
    """(tools in the prompt, tools one of which the reply must call or None): "auto" (default),
    "none" (the tools are left out of the prompt), "required" (a call to one of them) or a named
    function (chat: {"type": "function", "function": {"name"}}, Responses: {"type": "function", "name"})."""
    choice = f.get("tool_choice", "auto")
    if choice == "none":
        return [], None
    if choice == "auto":
        return tools, None
    if choice == "required":
        if not tools:
            raise bad("'tool_choice' \"required\" needs at least one tool in 'tools'", "tool_choice")
        return tools, tools
    if isinstance(choice, dict) and choice.get("type") == "function":
        spec = choice if flat else choice.get("function")
        name = spec.get("name") if isinstance(spec, dict) else None
        named = [t for t in tools if t.name == name]
        if not named:
            raise bad(f"'tool_choice' names the function {name!r}, which is not in 'tools'", "tool_choice")
        return tools, named
    raise bad("'tool_choice' must be \"auto\", \"none\", \"required\" or a named function", "tool_choice")


@dataclass(frozen=True)
class OutputFormat:
    """A requested structured output: the schema the answer must match, the developer message's
    section (None for json_object), and the request field it came from (for errors)."""

    schema: dict
    section: ResponseFormat | None
    param: str
    echo: dict  # as the request gave it (the Responses object repeats it)


def output_format(fmt: Fields) -> OutputFormat | None:
    """Chat's `response_format` or Responses' `text.format`: {"type": "text" | "json_object" |
    "json_schema", ...}; chat nests name / schema / description / strict under "json_schema"."""
    kind = fmt.str("type", "text", ("text", "json_object", "json_schema"))
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat({"type": "object"}, None, fmt.name("type"), dict(fmt.body))
    spec = fmt.obj("json_schema") if "json_schema" in fmt.body else fmt
    name = spec.str("name")
    if not name:
        raise bad(f"'{spec.name('name')}' is required", spec.name("name"))
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise bad(f"'{spec.name('schema')}' must be a JSON schema object", spec.name("schema"))
    spec.bool("strict")
    try:
        normalize_schema(schema)
    except SchemaError as e:
        raise bad(str(e), spec.name("schema")) from e
    return OutputFormat(schema, ResponseFormat(name, schema, spec.str("description")), spec.name("schema"),
                        dict(fmt.body))


def constrain(params: list[SamplingParams], fmt: OutputFormat | None, tools: list[FunctionTool],
              forced: list[FunctionTool] | None, max_reasoning: int | None, tool_param: str,
              vocab_size: int, builtins: list[Message] = ()) -> list[SamplingParams]:
    """The params with the reply's grammar: a call to one of `forced`, or (with a format) the
    final answer in it or a call to one of `tools` or `builtins` (the declared built-in tools'
    calls). Unconstrained when neither is asked. The grammar is checked at the request's max_tokens
    (a 400 here) and travels as a `Reply`, built anew for each engine request (tool rounds)."""
    if forced is None and fmt is None:
        if max_reasoning is not None:
            raise bad("'max_reasoning_tokens' applies to constrained replies (response_format, tool_choice "
                      "\"required\" or a named function)", "max_reasoning_tokens")
        return params
    calls = []
    for i, t in enumerate(tools):
        try:
            if t.parameters is not None:
                normalize_schema(t.parameters)
            calls.append(function_call(t.name, t.parameters))
        except ValueError as e:
            raise bad(f"tool {t.name!r}: {e}", f"{tool_param}[{i}]") from e
    if forced is not None:
        msgs = [calls[tools.index(t)] for t in forced]
    else:
        msgs = [final_json(fmt.schema), *calls, *builtins]
    param = fmt.param if fmt is not None and forced is None else "tool_choice"
    reply = Reply(tuple(msgs), max_reasoning)
    try:
        validate_grammar(reply.grammar(params[0].max_tokens), vocab_size)
    except ValueError as e:
        raise bad(str(e), param) from e
    return [dataclasses.replace(p, grammar=reply) for p in params]


# Responses API built-in tool types -> the harmony tool that serves them (gptoss_jax.tools)
BUILTIN_TOOL_TYPES = {"code_interpreter": "python", "web_search": "browser", "web_search_preview": "browser",
                      "web_search_2025_08_26": "browser", "web_search_preview_2025_03_11": "browser"}


def builtin_tools(f: Fields, toolbox: Toolbox | None) -> list[str]:
    """The built-in tools a Responses request declares (in `tools`), each enabled on this server."""
    names = []
    for i, t in enumerate(f.list("tools", [])):
        kind = t.get("type") if isinstance(t, dict) else None
        name = BUILTIN_TOOL_TYPES.get(kind)
        if name is None:
            continue
        if toolbox is None or name not in toolbox.names:
            raise bad(f"'tools[{i}]': {kind!r} needs the server's {name} tool (gptoss-jax serve --tool {name})",
                      f"tools[{i}]")
        if name not in names:
            names.append(name)
    return names


def builtin_calls(toolbox: Toolbox, names, functions=None, code_tokens: int | None = None) -> list[Message]:
    """Harmony call messages to built-in tools (analysis channel, content type `code`, as gpt-oss
    calls them): python's code as free text (at most `code_tokens`, default what the budget leaves),
    a browser function's JSON arguments valid for its parameters (`functions`: which, default all)."""
    out = []
    for name in names:
        ns = toolbox.tools[name].namespace_config()
        if not ns.tools:  # python: one recipient, code
            out.append(tool_message(ns.name, body=TextBody(code_tokens)))
        for t in ns.tools:
            if functions is None or t.name in functions:
                out.append(tool_message(f"{ns.name}.{t.name}", body=JsonBody(t.parameters or {"type": "object"})))
    return out


def builtin_choice(f: Fields, names: list[str]) -> str | None:
    """The built-in tool that `tool_choice` forces ({"type": "code_interpreter"}, {"type": "web_search_preview"}), or None."""
    choice = f.get("tool_choice")
    if not isinstance(choice, dict) or choice.get("type") not in BUILTIN_TOOL_TYPES:
        return None
    name = BUILTIN_TOOL_TYPES[choice["type"]]
    if name not in names:
        raise bad(f"'tool_choice' forces {choice['type']!r}, which 'tools' does not declare", "tool_choice")
    return name


def render(messages: list[ChatMessage], *, effort: str, tools, instructions=None, param="messages",
           system_tools=None, fmt: OutputFormat | None = None) -> list[int]:
    try:
        return render_prompt(messages, reasoning_effort=effort, tools=tools or None, instructions=instructions,
                             system_tools=system_tools, response_format=None if fmt is None else fmt.section)
    except (ValueError, TypeError) as e:
        raise bad(str(e), param) from e


# ---- chat completions ---------------------------------------------------------------------------
def chat_messages(f: Fields) -> list[ChatMessage]:
    """OpenAI chat messages -> harmony messages: assistant reasoning and tool calls, and tool results
    (named after the call they answer) round-trip."""
    raw = f.list("messages")
    if not raw:
        raise bad("'messages' must be a non-empty array", "messages")
    out, call_names = [], {}
    for i, m in enumerate(raw):
        mf = Fields(m, f"messages[{i}].")
        role = mf.str("role", choices=("system", "developer", "user", "assistant", "tool"))
        if role is None:
            raise bad(f"'messages[{i}].role' is required", f"messages[{i}].role")
        text = text_of(m.get("content"), f"messages[{i}].content")
        if role in ("system", "developer"):
            if out and all(m.role in ("system", "developer") for m in out):  # leading ones: one text
                out[-1] = ChatMessage(out[-1].role, out[-1].content + "\n\n" + text)
            else:
                out.append(ChatMessage(role, text))
        elif role == "user":
            out.append(ChatMessage("user", text))
        elif role == "assistant":
            reasoning = mf.str("reasoning_content") or mf.str("reasoning")
            if reasoning:
                out.append(ChatMessage("assistant", reasoning, channel="analysis"))
            calls = mf.list("tool_calls", [])
            if text:
                out.append(ChatMessage("assistant", text, channel="commentary" if calls else "final"))
            for j, c in enumerate(calls):
                cf = Fields(c, f"messages[{i}].tool_calls[{j}].")
                fn = cf.obj("function")
                name = fn.str("name")
                if not name:
                    raise bad(f"'{fn.name('name')}' is required", fn.name("name"))
                args = fn.get("arguments", "{}")
                args = args if isinstance(args, str) else json.dumps(args)
                call_names[cf.str("id", "")] = name
                out.append(ChatMessage("assistant", args, channel="commentary", recipient=FUNCTIONS + name,
                                       content_type="<|constrain|>json"))
        else:
            call_id = mf.str("tool_call_id", "")
            name = call_names.get(call_id) or mf.str("name")
            if not name:
                raise bad(f"'messages[{i}].tool_call_id' {call_id!r} answers no earlier assistant tool call",
                          f"messages[{i}].tool_call_id")
            out.append(ChatMessage("tool", text, name=FUNCTIONS + name))
    return out


def chat_job(body: Any, limits: Limits) -> Job:
    f = Fields(body)
    messages = chat_messages(f)
    tools, forced = tool_choice(f, function_tools(f))
    fmt = output_format(f.obj("response_format"))
    effort = f.str("reasoning_effort", "medium", REASONING_EFFORTS)
    prompt = render(messages, effort=effort, tools=tools, fmt=fmt)
    n = f.int("n", 1, 1, limits.max_n)
    logprobs = f.bool("logprobs")
    top = f.int("top_logprobs", 0, 0, min(MAX_TOP_LOGPROBS_CHAT, limits.max_top_logprobs))
    if top and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params = sampling(f, len(prompt), limits, ("max_tokens", "max_completion_tokens"), n=n,
                      stops=stop_token_ids(), logprobs=logprobs, top_logprobs=top)
    params = constrain(params, fmt, tools, forced, f.int("max_reasoning_tokens", None, 0), "tools",
                       limits.vocab_size)
    stream, usage = streaming(f)
    return Job(prompt, params, stream, usage, stop_strings(f), True, logprobs, top)


# ---- completions ------------------------------------------------------------------------------------
def completion_job(body: Any, limits: Limits, encode) -> Job:
    f = Fields(body)
    prompt = f.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad_ids = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad_ids:
            raise bad(f"'prompt': token id {bad_ids[0]} is out of range [0, {limits.vocab_size})", "prompt")
    else:
        raise bad("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
    if not ids:
        raise bad("'prompt' is empty", "prompt")
    if f.bool("echo"):
        raise bad("'echo' is not supported", "echo")
    if f.get("suffix"):
        raise bad("'suffix' is not supported", "suffix")
    n = f.int("n", 1, 1, limits.max_n)
    if f.int("best_of", n, 1) != n:
        raise bad("'best_of' is not supported (it must equal 'n')", "best_of")
    top = f.int("logprobs", None, 0, min(MAX_LOGPROBS_COMPLETIONS, limits.max_top_logprobs))
    params = sampling(f, len(ids), limits, ("max_tokens",), n=n, stops=None, logprobs=top is not None,
                      top_logprobs=top or 0)
    if f.get("max_tokens") is None:  # OpenAI's completions default
        params = [dataclasses.replace(p, max_tokens=min(COMPLETIONS_DEFAULT_MAX_TOKENS, p.max_tokens))
                  for p in params]
    stream, usage = streaming(f)
    return Job(ids, params, stream, usage, stop_strings(f), False, top is not None, top or 0)


# ---- responses ---------------------------------------------------------------------------------------
BUILTIN_CALL_ITEMS = ("code_interpreter_call", "web_search_call")
# an earlier web_search_call's output, kept with the stored items (never shown by the API)
TOOL_OUTPUT_KEY = "_output"
_WEB_ACTIONS = {"search": ("search", "query"), "open_page": ("open", "url"), "find_in_page": ("find", "pattern")}


def response_items(f: Fields, key: str = "input") -> list[dict]:
    """`input` as a list of items (a string is one user message); each checked."""
    v = f.get(key)
    if isinstance(v, str):
        return [{"type": "message", "role": "user", "content": v}]
    if not isinstance(v, list) or not v:
        raise bad(f"'{key}' must be a string or a non-empty array of items", key)
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            raise bad(f"'{key}[{i}]' must be an object", f"{key}[{i}]")
        kind = item.get("type", "message")
        if kind not in ("message", "function_call", "function_call_output", "reasoning", *BUILTIN_CALL_ITEMS):
            raise bad(f"'{key}[{i}].type' {kind!r} is not supported", f"{key}[{i}].type")
    return v


def builtin_call_messages(item: dict, f: Fields) -> list[ChatMessage]:
    """A code_interpreter_call or web_search_call item -> the harmony call and the tool's answer."""
    if item["type"] == "code_interpreter_call":
        outputs = f.list("outputs", [])
        logs = "".join(o.get("logs", "") for o in outputs if isinstance(o, dict))
        return [ChatMessage("assistant", f.str("code", ""), channel="analysis", recipient="python", content_type="code"),
                ChatMessage("tool", logs, channel="analysis", name="python")]
    action = f.obj("action")
    kind = action.str("type", choices=tuple(_WEB_ACTIONS))
    if kind is None:
        raise bad(f"'{action.name('type')}' is required", action.name("type"))
    fn, key = _WEB_ACTIONS[kind]
    args = {"id" if key == "url" else key: action.str(key, "")}
    output = item.get(TOOL_OUTPUT_KEY) or "(the output of this call was not kept)"
    return [ChatMessage("assistant", json.dumps(args), channel="analysis", recipient=f"browser.{fn}",
                        content_type="code"),
            ChatMessage("tool", output, channel="analysis", name=f"browser.{fn}")]


def items_to_messages(items: list[dict], param: str = "input") -> list[ChatMessage]:
    out, call_names = [], {}
    for i, item in enumerate(items):
        f = Fields(item, f"{param}[{i}].")
        kind = item.get("type", "message")
        if kind == "message":
            role = f.str("role", choices=("system", "developer", "user", "assistant"))
            if role is None:
                raise bad(f"'{f.name('role')}' is required", f.name("role"))
            text = text_of(item.get("content"), f.name("content"))
            if role in ("system", "developer") and out:
                raise bad(f"'{f.name('role')}': a {role} message must come first", f.name("role"))
            out.append(ChatMessage(role, text, channel="final" if role == "assistant" else None))
        elif kind == "reasoning":
            parts = item.get("content") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            if text:
                out.append(ChatMessage("assistant", text, channel="analysis"))
        elif kind in BUILTIN_CALL_ITEMS:
            out += builtin_call_messages(item, f)
        elif kind == "function_call":
            name, args = f.str("name"), f.get("arguments", "{}")
            if not name:
                raise bad(f"'{f.name('name')}' is required", f.name("name"))
            call_names[f.str("call_id", "")] = name
            out.append(ChatMessage("assistant", args if isinstance(args, str) else json.dumps(args),
                                   channel="commentary", recipient=FUNCTIONS + name, content_type="<|constrain|>json"))
        else:
            call_id = f.str("call_id", "")
            if call_id not in call_names:
                raise bad(f"'{f.name('call_id')}' {call_id!r} answers no earlier function_call", f.name("call_id"))
            output = item.get("output", "")
            out.append(ChatMessage("tool", output if isinstance(output, str) else json.dumps(output),
                                   name=FUNCTIONS + call_names[call_id]))
    return out


def responses_job(body: Any, limits: Limits, previous: list[dict] | None, toolbox: Toolbox | None = None) -> Job:
    """`previous`: the stored items (input and output) of `previous_response_id`, or None; `toolbox`:
    the server's built-in tools (declared in `tools` as code_interpreter / web_search)."""
    f = Fields(body)
    items = (previous or []) + response_items(f)
    messages = items_to_messages(items)
    instructions = f.str("instructions")
    if instructions is not None and messages and messages[0].role in ("system", "developer"):
        messages[0] = ChatMessage(messages[0].role, instructions + "\n\n" + messages[0].content)
        instructions = None
    builtin = builtin_tools(f, toolbox)
    forced_builtin = builtin_choice(f, builtin)
    tools, forced = function_tools(f, flat=True, skip=BUILTIN_TOOL_TYPES), None
    if forced_builtin is None:  # a forced built-in call is not a function tool_choice
        tools, forced = tool_choice(f, tools, flat=True)
    if f.get("tool_choice") == "none":
        builtin = []
    max_calls = f.int("max_tool_calls", toolbox.max_tool_calls, 1, toolbox.max_tool_calls) if builtin else 0
    fmt = output_format(f.obj("text").obj("format"))
    effort = f.obj("reasoning").str("effort", "medium", REASONING_EFFORTS)
    prompt = render(messages, effort=effort, tools=tools, instructions=instructions, param="input",
                    system_tools=toolbox.configs(builtin) if builtin else None, fmt=fmt)
    params = sampling(f, len(prompt), limits, ("max_output_tokens",), stops=stop_token_ids())
    reasoning = f.int("max_reasoning_tokens", None, 0)  # a forced built-in call's too (tool_loop.force_builtin)
    params = constrain(params, fmt, tools, forced, None if forced_builtin and fmt is None else reasoning, "tools",
                       limits.vocab_size, builtin_calls(toolbox, builtin) if builtin else [])
    stream, _ = streaming(f)
    extra = dict(items=items, effort=effort, store=f.bool("store", True), instructions=f.str("instructions"),
                 tools=[t for t in f.list("tools", [])], tool_choice=f.get("tool_choice", "auto"),
                 previous_response_id=f.str("previous_response_id"), max_output_tokens=f.int("max_output_tokens"),
                 temperature=f.float("temperature"), top_p=f.float("top_p"), builtin=builtin,
                 forced_builtin=forced_builtin, max_tool_calls=max_calls, max_reasoning_tokens=reasoning,
                 text_format={"type": "text"} if fmt is None else fmt.echo)
    return Job(prompt, params, stream, False, [], True, extra=extra)
