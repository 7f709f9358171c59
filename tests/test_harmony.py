"""Harmony chat format: our rendering/parsing against openai-harmony's own and the documented format."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import openai_harmony as oh
import pytest

from gptoss_jax import harmony as H
from gptoss_jax import tokenizer as T

REPO = Path(__file__).resolve().parents[1]
VOCAB_DIR = REPO.parent / "shared" / "vocab"

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["location"],
}


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(VOCAB_DIR)


@pytest.fixture(scope="module")
def ref():
    """openai-harmony's encoding, loaded directly (not through gptoss_jax)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(VOCAB_DIR))
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _ref_render(ref, messages):
    conv = oh.Conversation.from_messages(messages)
    return ref.render_conversation_for_completion(conv, oh.Role.ASSISTANT)


def test_simple_prompt_matches_documented_format(tok, ref):
    ids = H.render_prompt(
        [{"role": "user", "content": "What is 2 + 2?"}],
        reasoning_effort="low",
        conversation_start_date="2025-08-05",
        encodings_base=VOCAB_DIR,
    )
    # The format of OpenAI's harmony guide, written out by hand.
    expected = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: low\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    )
    assert tok.decode(ids) == expected
    assert ids == tok.encode(expected, allowed_special="all")
    assert ids[-2:] == [T.START, tok.encode_single_token("assistant")]
    sysc = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.LOW).with_conversation_start_date(
        "2025-08-05"
    )
    assert ids == _ref_render(
        ref,
        [
            oh.Message.from_role_and_content(oh.Role.SYSTEM, sysc),
            oh.Message.from_role_and_content(oh.Role.USER, "What is 2 + 2?"),
        ],
    )


def test_tools_instructions_and_history_match_openai_harmony(tok, ref):
    ours = H.render_prompt(
        [
            H.ChatMessage("system", "Always respond in riddles"),
            H.ChatMessage("user", "What is the weather like in SF?"),
            H.ChatMessage("assistant", "Need to use function get_current_weather.", channel="analysis"),
            H.ChatMessage(
                "assistant",
                '{"location": "San Francisco"}',
                recipient="functions.get_current_weather",
                content_type="<|constrain|>json",
            ),
            H.ChatMessage("tool", '{"sunny": true, "temperature": 20}', name="functions.get_current_weather"),
        ],
        reasoning_effort="high",
        conversation_start_date=datetime.date(2025, 6, 28),
        tools=[
            H.FunctionTool(
                "get_current_weather", "Gets the current weather in the provided location.", WEATHER_SCHEMA
            ),
            {"type": "function", "function": {"name": "get_time", "description": "Current time."}},
        ],
        encodings_base=VOCAB_DIR,
    )
    sysc = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.HIGH).with_conversation_start_date(
        "2025-06-28"
    )
    dev = (
        oh.DeveloperContent.new()
        .with_instructions("Always respond in riddles")
        .with_function_tools(
            [
                oh.ToolDescription.new(
                    "get_current_weather",
                    "Gets the current weather in the provided location.",
                    parameters=WEATHER_SCHEMA,
                ),
                oh.ToolDescription.new("get_time", "Current time."),
            ]
        )
    )
    theirs = _ref_render(
        ref,
        [
            oh.Message.from_role_and_content(oh.Role.SYSTEM, sysc),
            oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev),
            oh.Message.from_role_and_content(oh.Role.USER, "What is the weather like in SF?"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Need to use function get_current_weather.")
            .with_channel("analysis"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"location": "San Francisco"}')
            .with_channel("commentary")
            .with_recipient("functions.get_current_weather")
            .with_content_type("<|constrain|>json"),
            oh.Message.from_author_and_content(
                oh.Author.new(oh.Role.TOOL, "functions.get_current_weather"), '{"sunny": true, "temperature": 20}'
            )
            .with_channel("commentary")
            .with_recipient("assistant"),
        ],
    )
    assert ours == theirs
    text = tok.decode(ours)
    assert tok.encode(text, allowed_special="all") == ours  # round trip through our tokenizer
    assert text == ref.decode(theirs)
    for piece in [
        "Reasoning: high",
        "Calls to these tools must go to the commentary channel: 'functions'.",
        "<|start|>developer<|message|># Instructions\n\nAlways respond in riddles",
        "type get_current_weather = (_: {",
        'format?: "celsius" | "fahrenheit", // default: celsius',
        "type get_time = () => any;",
        "<|start|>assistant to=functions.get_current_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"location": "San Francisco"}<|call|>',
        "<|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>",
    ]:
        assert piece in text, piece
    assert text.endswith("<|start|>assistant")


def test_multi_turn_drops_old_analysis_like_openai_harmony(tok, ref):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "User greets.", "channel": "analysis"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    ours = H.render_prompt(msgs, encodings_base=VOCAB_DIR)
    theirs = _ref_render(
        ref,
        [
            oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new()),
            oh.Message.from_role_and_content(oh.Role.USER, "Hi"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, "User greets.").with_channel("analysis"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Hello!").with_channel("final"),
            oh.Message.from_role_and_content(oh.Role.USER, "Bye"),
        ],
    )
    assert ours == theirs
    assert "User greets." not in tok.decode(ours)
    assert "Reasoning: medium" in tok.decode(ours)
    kept = H.render_prompt(msgs, auto_drop_analysis=False, encodings_base=VOCAB_DIR)
    assert "<|channel|>analysis<|message|>User greets.<|end|>" in tok.decode(kept)


def test_model_identity_cutoff_and_dict_equals_dataclass(tok):
    a = H.render_prompt(
        [{"role": "user", "content": "x"}],
        model_identity="You are a test model.",
        knowledge_cutoff="2030-01",
        instructions="Be terse.",
        encodings_base=VOCAB_DIR,
    )
    b = H.render_prompt(
        [H.ChatMessage("developer", "Be terse."), H.ChatMessage("user", "x")],
        model_identity="You are a test model.",
        knowledge_cutoff="2030-01",
        encodings_base=VOCAB_DIR,
    )
    assert a == b
    text = tok.decode(a)
    assert text.startswith("<|start|>system<|message|>You are a test model.\nKnowledge cutoff: 2030-01\n")
    assert "Current date" not in text


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="reasoning_effort"):
        H.render_prompt([{"role": "user", "content": "x"}], reasoning_effort="max")
    ids = H.render_prompt([{"role": "user", "content": "x"}], reasoning_effort="HIGH", encodings_base=VOCAB_DIR)
    assert ids == H.render_prompt(
        [{"role": "user", "content": "x"}], reasoning_effort=oh.ReasoningEffort.HIGH, encodings_base=VOCAB_DIR
    )
    with pytest.raises(ValueError, match="only allowed first"):
        H.render_prompt([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(ValueError, match="either"):
        H.render_prompt([{"role": "system", "content": "y"}], instructions="z")
    with pytest.raises(ValueError, match="tool's name"):
        H.render_prompt([{"role": "tool", "content": "{}"}])
    with pytest.raises(ValueError, match="unknown role"):
        H.render_prompt([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="unknown message keys"):
        H.render_prompt([{"role": "user", "content": "x", "tool_calls": []}])


def test_parse_analysis_and_final(tok):
    text = (
        "<|channel|>analysis<|message|>The user asks 2+2. Simple.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
    )
    out = H.parse_completion(tok.encode(text, allowed_special="all"), encodings_base=VOCAB_DIR)
    assert out.error is None and out.stop_token == T.RETURN
    assert [(m.role, m.channel, m.content) for m in out.messages] == [
        ("assistant", "analysis", "The user asks 2+2. Simple."),
        ("assistant", "final", "2 + 2 = 4."),
    ]
    assert out.analysis == "The user asks 2+2. Simple."
    assert out.final == "2 + 2 = 4."
    assert out.tool_calls == []


def test_parse_tool_call_and_ignore_after_stop(tok):
    text = (
        "<|channel|>analysis<|message|>Need the weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_current_weather <|constrain|>json"
        '<|message|>{"location": "Tokyo", "format": "celsius"}<|call|>'
        "<|start|>assistant<|channel|>final<|message|>garbage after the stop"
    )
    out = H.parse_completion(tok.encode(text, allowed_special="all"), encodings_base=VOCAB_DIR)
    assert out.stop_token == T.CALL and out.error is None
    assert out.final is None and out.analysis == "Need the weather."
    (call,) = out.tool_calls
    assert call.recipient == "functions.get_current_weather"
    assert call.namespace == "functions" and call.name == "get_current_weather"
    assert call.channel == "commentary" and call.content_type == "<|constrain|>json"
    assert call.json_arguments() == {"location": "Tokyo", "format": "celsius"}
    # Recipient in the header before the channel (the other placement the model uses).
    text2 = '<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{"a": 1}<|call|>'
    out2 = H.parse_completion(tok.encode(text2, allowed_special="all")[2:], encodings_base=VOCAB_DIR)
    assert [(c.recipient, c.content_type, c.json_arguments()) for c in out2.tool_calls] == [
        ("functions.f", "json", {"a": 1})
    ]


def test_parse_matches_openai_harmony_and_round_trips(tok, ref):
    msgs = [
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Thinking about émojis 😀 and 中文.")
        .with_channel("analysis"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, '{"q": "x"}')
        .with_channel("commentary")
        .with_recipient("functions.search")
        .with_content_type("<|constrain|>json"),
    ]
    toks = []
    for m in msgs:
        toks += ref.render(m)
    toks = toks[2:]  # drop the leading <|start|>assistant: the prompt ends with it
    ours = H.parse_completion(toks, encodings_base=VOCAB_DIR)
    theirs = ref.parse_messages_from_completion_tokens(toks, oh.Role.ASSISTANT)
    assert [(m.channel, m.recipient, m.content_type, m.content) for m in ours.messages] == [
        (m.channel, m.recipient, m.content_type, m.content[0].text) for m in theirs
    ]
    assert ours.messages[0].content == "Thinking about émojis 😀 and 中文."
    assert ours.stop_token == T.CALL


def test_parse_truncated_and_eos(tok):
    # Ran out of tokens inside a message: the partial content is kept.
    out = H.parse_completion(
        tok.encode("<|channel|>analysis<|message|>Let me think", allowed_special="all"), encodings_base=VOCAB_DIR
    )
    assert out.stop_token is None and out.error is None and out.analysis == "Let me think"
    # <|endoftext|> ends the completion and is not part of the content.
    out = H.parse_completion(
        tok.encode("<|channel|>final<|message|>Done<|endoftext|>", allowed_special="all"), encodings_base=VOCAB_DIR
    )
    assert out.stop_token == T.ENDOFTEXT and out.final == "Done"
    # Ran out inside a header: messages so far are kept, the error is reported (or raised when strict).
    toks = tok.encode("<|channel|>analysis<|message|>a<|end|><|start|>assist", allowed_special="all")
    out = H.parse_completion(toks, encodings_base=VOCAB_DIR)
    assert out.analysis == "a" and out.error and "header" in out.error
    with pytest.raises(ValueError, match="malformed"):
        H.parse_completion(toks, strict=True, encodings_base=VOCAB_DIR)


def test_stop_tokens_and_harmony_agree(ref):
    assert H.stop_token_ids() == (T.RETURN, T.ENDOFTEXT, T.CALL)
    assert set(ref.stop_tokens_for_assistant_actions()) == {T.RETURN, T.CALL}


def test_load_uses_env_var_and_errors_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(VOCAB_DIR))
    assert H.load_harmony_encoding() is H.load_harmony_encoding(VOCAB_DIR)
    with pytest.raises(H.HarmonyLoadError, match="o200k_base.tiktoken not found"):
        H.load_harmony_encoding(tmp_path)
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(VOCAB_DIR)
    # openai-harmony checks the hash of the file itself.
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray((VOCAB_DIR / "o200k_base.tiktoken").read_bytes())
    data[100] = ord("A") if data[100] != ord("A") else ord("B")
    (bad / "o200k_base.tiktoken").write_bytes(bytes(data))
    with pytest.raises(H.HarmonyLoadError, match="hash"):
        H.load_harmony_encoding(bad)
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(VOCAB_DIR)


def test_tool_call_json_from_render_then_parse(tok):
    # The assistant's own tool-call turn, rendered in a prompt, parses back to the same call.
    args = json.dumps({"location": "Paris"})
    ids = H.render_prompt(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": args, "recipient": "functions.get_weather",
             "content_type": "<|constrain|>json"},
        ],
        tools=[{"name": "get_weather", "description": "w", "parameters": WEATHER_SCHEMA}],
        encodings_base=VOCAB_DIR,
    )
    start = len(ids) - 1 - ids[::-1].index(T.START)  # the final <|start|>assistant
    prev = len(ids[:start]) - 1 - ids[:start][::-1].index(T.START)  # the tool-call message
    out = H.parse_completion(ids[prev + 2 : start], encodings_base=VOCAB_DIR)
    (call,) = out.tool_calls
    assert call.name == "get_weather" and call.json_arguments() == {"location": "Paris"}


# ---- CompletionDecoder: the one reading of a completion (CLI and server) ------------------------
def decode_all(tokens, **kw):
    d = H.CompletionDecoder(VOCAB_DIR, **kw)
    pieces = [p for t in tokens for p in d.feed(t)] + d.finish()
    return pieces, d


def joined(pieces, kind):
    return "".join(p.text for p in pieces if p.kind == kind)


def test_decoder_reads_reasoning_answer_and_tool_calls_as_openai_harmony(tok, ref):
    text = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"location": "Paris"}<|call|>')
    ids = tok.encode(text, allowed_special="all")
    pieces, d = decode_all(ids)
    msgs = ref.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)
    assert joined(pieces, "reasoning") == msgs[0].content[0].text
    assert joined(pieces, "tool_call") == msgs[1].content[0].text
    assert [(c.recipient, c.arguments) for c in d.tool_calls] == [(msgs[1].recipient, msgs[1].content[0].text)]
    assert {p.message for p in pieces if p.kind == "tool_call"} == {1} and d.error is None and d.done
    # fed one token at a time, or all at once: the same pieces
    ans = tok.encode("<|channel|>final<|message|>Sunny, 21 °C.<|return|>ignored", allowed_special="all")
    pieces, d = decode_all(ans)
    assert joined(pieces, "content") == "Sunny, 21 °C." and d.error is None


@pytest.mark.parametrize("text, why", [
    ("plain words, no header at all", "EOS while waiting for message header"),
    ("<|channel|>final<|message|>ok<|end|>then junk", "expecting start token"),
    (" ".join(map(str, range(100))), "header longer than"),
])
def test_decoder_shows_output_that_is_not_harmony_as_its_raw_text(tok, text, why):
    """Never dropped: from the message that went wrong on, the raw text (as tiktoken decodes it)."""
    ids = tok.encode(text, allowed_special="all")
    pieces, d = decode_all(ids)
    assert why in d.error
    good = "ok" if text.startswith("<|channel|>") else ""
    assert joined(pieces, "content") == good + tok.decode(ids)[len("<|channel|>final<|message|>ok<|end|>") if good else 0:]


def test_decoder_raw_mode_is_incremental_utf8(tok):
    ids = tok.encode("héllo wörld ✓ 日本語", allowed_special="all")
    pieces, d = decode_all(ids, harmony=False, stop_tokens=())
    assert joined(pieces, "content") == "héllo wörld ✓ 日本語" and all("\ufffd" not in p.text for p in pieces)


def test_stop_strings_are_cut_even_across_tokens(tok):
    """The server's reading: a stop string split over several deltas is never shown, in part or whole."""
    from gptoss_jax.engine import RequestOutput
    from gptoss_jax.server.present import Choice

    ids = tok.encode("<|channel|>final<|message|>one two three four<|return|>", allowed_special="all")
    for stop, want in ((["o thr"], "one tw"), (["four", "x"], "one two three "), (["nope"], "one two three four")):
        c = Choice(0, True, stop, tok)
        shown = []
        for t in ids:  # one token per engine output
            shown += c.feed(RequestOutput(0, [t]))
            if c.stopped:
                break
        shown += c.end()
        assert joined(shown, "content") == want == c.content, stop
        assert c.finish_reason == "stop"
