"""Structured outputs and forced tool calls: grammar-constrained decoding, harmony-aware.

    from gptoss_jax import SamplingParams
    from gptoss_jax.structured import harmony_reply, final_json, function_call, tool_message

    SamplingParams(max_tokens=512, json_schema={...})              # reasoning, then JSON in the final channel
    g = harmony_reply(function_call("get_weather", params), max_tokens=256)
    SamplingParams(max_tokens=256, grammar=g)                       # a call to functions.get_weather

Grammars are llguidance's (lark syntax with special tokens and inline `%json` schemas; what vLLM
and SGLang use), compiled against our o200k_harmony tokenizer. `schema` bounds JSON schemas so that
every reply ends within the request's max_tokens for any weights; `grammar` wraps answers in
harmony messages; `matcher` computes the per-slot token masks the engine applies on the device.
See docs/structured.md.
"""

from .grammar import (Grammar, JsonBody, Message, RegexBody, Reply, TextBody, final_json, final_regex,
                      function_call, harmony_reply, raw_grammar, tool_message)
from .matcher import check_vocab, validate_grammar
from .schema import SchemaError, fit_schema, normalize_schema

__all__ = ["Grammar", "Reply", "Message", "JsonBody", "TextBody", "RegexBody", "SchemaError", "harmony_reply", "final_json",
           "final_regex", "function_call", "tool_message", "raw_grammar", "fit_schema", "normalize_schema",
           "request_grammar", "validate_grammar", "check_vocab"]


def request_grammar(params, vocab_size: int) -> Grammar | None:
    """The grammar a request's SamplingParams ask for (None: unconstrained), checked against the
    request's max_tokens and compiled; ValueError on a bad one."""
    asked = [k for k in ("json_schema", "regex", "grammar") if getattr(params, k) is not None]
    if not asked:
        if params.max_reasoning_tokens is not None:
            raise ValueError("max_reasoning_tokens applies to constrained requests (json_schema, regex, grammar)")
        return None
    if len(asked) > 1:
        raise ValueError(f"give one of json_schema, regex and grammar, got {asked}")
    check_vocab(vocab_size)
    if params.grammar is not None:
        g = params.grammar
        if isinstance(g, str):
            g = raw_grammar(g)
        elif isinstance(g, Reply):
            g = g.grammar(params.max_tokens)
        if not isinstance(g, Grammar):
            raise ValueError(f"grammar must be a structured.Grammar, a Reply or lark text, got {type(g).__name__}")
        if params.max_reasoning_tokens is not None:
            raise ValueError("max_reasoning_tokens is set when building the grammar (harmony_reply), not with it")
        if g.max_tokens is not None and g.max_tokens > params.max_tokens:
            raise ValueError(f"the grammar's replies take up to {g.max_tokens} tokens but max_tokens is "
                             f"{params.max_tokens}: build it with max_tokens={params.max_tokens}")
    else:
        answer = final_json(params.json_schema) if params.json_schema is not None else final_regex(params.regex)
        g = harmony_reply(answer, max_tokens=params.max_tokens, max_reasoning_tokens=params.max_reasoning_tokens)
    validate_grammar(g, vocab_size)
    return g
