"""`gptoss-jax serve`: the OpenAI API over HTTP on 127.0.0.1, tested with the official `openai` client
and httpx against a real uvicorn serving a small random checkpoint (the real o200k_harmony vocabulary).

References: generate() on the same prompt alone (tokens), tiktoken (text), openai-harmony (prompts)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import uvicorn

from gptoss_jax import Engine, generate
from gptoss_jax.harmony import render_prompt, stop_token_ids
from gptoss_jax.server import ServerConfig, create_app
from gptoss_jax.server.run import bind, warm_up
from gptoss_jax.tokenizer import load_tokenizer

from helpers import REPO, checkpoint_fixtures, subprocess_env, tiny_config

CFG = tiny_config(vocab_size=201088)
ENGINE = dict(max_seqs=4, max_len=256, prefill_chunk=64, top_logprobs=5)
NAME = "tiny-gpt-oss"
REQUEST_TIMEOUT_S = 120  # every request of these tests is bounded
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@contextlib.contextmanager
def running(engine, toolbox=None, **cfg):
    """A uvicorn serving `engine` (and `toolbox`'s built-in tools) on a free 127.0.0.1 port, in a thread;
    stopped on exit."""
    app = create_app(engine, ServerConfig(NAME, **cfg), toolbox)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


ckpt, model = checkpoint_fixtures(CFG, "serve", seed=5)


@pytest.fixture(scope="module")
def url(model):
    engine = Engine(model, **ENGINE)
    warm_up(engine)
    with running(engine, max_waiting=8) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def solo_tokens(model, prompt, n, stops=stop_token_ids()):
    """generate() greedy on the prompt alone, cut after the first stop token."""
    r = generate(model, [prompt], max_new_tokens=n, temperature=0.0, stop_tokens=stops, prefill_chunk=64)
    return r.tokens[0, :int(r.lengths[0])].tolist()


def raw_text(tokens, stops=stop_token_ids()):
    return load_tokenizer().decode([t for t in tokens if t not in stops])


# ---- endpoints ---------------------------------------------------------------------------------
def test_health_models_and_metrics(url, client):
    assert httpx.get(url + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    client.completions.create(model=NAME, prompt="hello", max_tokens=3, temperature=0)
    text = httpx.get(url + "/metrics").text
    for name in ("gptoss:num_requests_running", "gptoss:num_requests_waiting", "gptoss:slot_usage_perc",
                 "gptoss:prompt_tokens_total", "gptoss:generation_tokens_total",
                 "gptoss:time_to_first_token_seconds_bucket", "gptoss:inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert metric(url, "gptoss:generation_tokens_total") >= 3
    assert metric(url, "gptoss:time_to_first_token_seconds_count") >= 1


def test_chat_equals_generate_and_streaming_equals_whole(client, model):
    """A random model does not speak harmony: its reply is the raw text of generate()'s tokens, in
    `content`, never empty; the stream says the same, and usage counts the tokens."""
    prompt = render_prompt(USER, reasoning_effort="low")
    toks = solo_tokens(model, prompt, 24)
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=24, temperature=0,
                                       reasoning_effort="low", logprobs=True, top_logprobs=3)
    c = r.choices[0]
    assert c.message.content == raw_text(toks) and c.message.content
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(toks))
    assert c.finish_reason == ("length" if len(toks) == 24 else "stop")
    lp = c.logprobs.content
    assert [bytes(x.bytes) for x in lp] == [load_tokenizer().decode_single_token_bytes(t) for t in toks]
    assert all(x.top_logprobs[0].logprob >= x.logprob - 1e-6 and len(x.top_logprobs) == 3 for x in lp)

    chunks = list(client.chat.completions.create(model=NAME, messages=USER, max_tokens=24, temperature=0,
                                                 reasoning_effort="low", stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [c.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(toks) and not chunks[-1].choices


def test_sampled_stream_equals_whole_for_a_seed(client):
    kw = dict(model=NAME, messages=USER, max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(**kw, stream=True))
    assert streamed == whole
    assert client.chat.completions.create(**{**kw, "seed": 8}).choices[0].message.content != whole


def test_eight_concurrent_greedy_requests_each_equal_their_solo_result(client, model):
    """8 requests on 4 slots (the rest queue): each equals generate() on its prompt alone."""
    prompts = [[{"role": "user", "content": "word " * (3 * i + 1)}] for i in range(8)]
    lengths = [8 + 3 * i for i in range(8)]

    def ask(i):
        return client.chat.completions.create(model=NAME, messages=prompts[i], max_tokens=lengths[i], temperature=0,
                                              reasoning_effort="low").choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8), timeout=REQUEST_TIMEOUT_S))
    for i in range(8):
        toks = solo_tokens(model, render_prompt(prompts[i], reasoning_effort="low"), lengths[i])
        assert got[i] == raw_text(toks), i


def test_completions_raw_prompt_text_and_token_ids(client, model):
    enc = load_tokenizer()
    ids = enc.encode("The capital of France is")
    stops = model.generation_defaults.stop_tokens
    toks = solo_tokens(model, ids, 10, stops)
    for prompt in ("The capital of France is", ids):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
        assert r.choices[0].text == raw_text(toks, stops)
        assert r.usage.prompt_tokens == len(ids) and len(r.choices[0].logprobs.tokens) == len(toks)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=NAME, prompt=ids, max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == raw_text(toks, stops)
    two = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0.8, seed=3, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens >= 2


def test_stop_strings_cut_the_text(client, model):
    ids = load_tokenizer().encode("Once upon a time")
    full = client.completions.create(model=NAME, prompt=ids, max_tokens=20, temperature=0).choices[0].text
    stop = full[5:8]
    cut = full[:full.find(stop)]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=20, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=NAME, prompt=ids, max_tokens=20, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == cut


def test_responses_whole_stream_and_previous_response(client, url):
    kw = dict(model=NAME, input="Say hi", max_output_tokens=12, temperature=0, reasoning={"effort": "low"})
    r = client.responses.create(**kw)
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.usage.output_tokens <= 12
    with client.responses.stream(**kw) as st:
        kinds = [ev.type for ev in st]
        final = st.get_final_response()
    assert final.output_text == r.output_text
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for k in ("response.output_item.added", "response.output_text.delta", "response.output_item.done"):
        assert k in kinds
    follow = client.responses.create(model=NAME, input="And again", previous_response_id=r.id, max_output_tokens=4)
    # the earlier turn is in the prompt: its input, its output, then the new input
    alone = client.responses.create(model=NAME, input="And again", max_output_tokens=4)
    assert follow.usage.input_tokens > alone.usage.input_tokens + r.usage.output_tokens // 2
    assert httpx.get(f"{url}/v1/responses/{r.id}").json()["id"] == r.id


# ---- tool calls: a scripted completion ---------------------------------------------------------
class ScriptedEngine(Engine):
    """The real engine, whose sampled tokens are replaced by scripted ones (one script per request,
    in order): harmony parsing of known completions, end to end over HTTP."""

    def __init__(self, model, scripts, **kw):
        super().__init__(model, **kw)
        self.scripts = list(scripts)
        self._script = {}

    def _emit(self, outs, rid, tok, lp, top_v, top_i):
        r = self._requests.get(rid)
        if r is not None:
            if rid not in self._script:
                self._script[rid] = self.scripts.pop(0) if self.scripts else []
            script = self._script[rid]
            tok = script[r.n_out] if r.n_out < len(script) else tok
        super()._emit(outs, rid, tok, lp, top_v, top_i)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city", "days"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}
TWO_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
             {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": TIME}}]


def json_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def harmony(text):
    return load_tokenizer().encode(text, allowed_special="all")


CALL = harmony("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
               'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')
ANSWER = harmony("<|channel|>final<|message|>It is sunny in Paris.<|return|>")


def test_tool_call_round_trip(model):
    engine = ScriptedEngine(model, [CALL, ANSWER, CALL, CALL, ANSWER], **ENGINE)
    with running(engine) as u:
        c = openai.OpenAI(base_url=u + "/v1", api_key="x", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        r = c.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, max_tokens=60)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert m.reasoning_content == "Need the weather."
        (call,) = m.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        history = USER + [m.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
        r2 = c.chat.completions.create(model=NAME, messages=history, tools=TOOLS, max_tokens=60)
        assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"
        # the prompt is harmony's rendering of the whole exchange (tool call and result included)
        want = render_prompt(USER + [
            {"role": "assistant", "content": "Need the weather.", "channel": "analysis"},
            {"role": "assistant", "content": '{"city": "Paris"}', "channel": "commentary",
             "recipient": "functions.get_weather", "content_type": "<|constrain|>json"},
            {"role": "tool", "name": "functions.get_weather", "content": '{"sky": "sunny"}'}],
            tools=[t["function"] for t in TOOLS])
        assert r2.usage.prompt_tokens == len(want)

        # streamed: the first tool-call delta names the call, the rest carry its arguments
        chunks = list(c.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, max_tokens=60, stream=True))
        calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        assert calls[0].function.name == "get_weather" and calls[0].id
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
        assert "".join(ch.choices[0].delta.reasoning_content or "" for ch in chunks
                       if hasattr(ch.choices[0].delta, "reasoning_content")) == "Need the weather."
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # Responses: reasoning and function_call items, then the output round-trips
        tools = [{"type": "function", **TOOLS[0]["function"]}]
        resp = c.responses.create(model=NAME, input="Weather in Paris?", tools=tools, max_output_tokens=60)
        assert [o.type for o in resp.output] == ["reasoning", "function_call"]
        fc = resp.output[1]
        assert fc.name == "get_weather" and json.loads(fc.arguments) == {"city": "Paris"}
        nxt = c.responses.create(model=NAME, previous_response_id=resp.id, tools=tools, max_output_tokens=60,
                                 input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}])
        assert nxt.output_text == "It is sunny in Paris."


# ---- structured outputs and forced tool calls (random weights: only the constraint makes them right)
def test_structured_outputs_validate_whole_and_streamed(client):
    """Chat `response_format` json_schema (whole and streamed: the same text for a seed), json_object,
    and Responses `text.format`, sampled at temperature 1.0: the answers validate."""
    kw = dict(model=NAME, messages=USER, max_tokens=64, temperature=1.0, seed=3,
              response_format=json_format(WEATHER), extra_body={"max_reasoning_tokens": 2})
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "stop" and not c.message.tool_calls
    jsonschema.validate(json.loads(c.message.content), WEATHER)
    streamed = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == c.message.content
    r = client.chat.completions.create(**{**kw, "seed": 4, "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    resp = client.responses.create(model=NAME, input="Weather?", max_output_tokens=64, temperature=1.0,
                                   text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER}},
                                   extra_body={"max_reasoning_tokens": 0})
    assert resp.status == "completed" and resp.text.format.type == "json_schema"
    jsonschema.validate(json.loads(resp.output_text), WEATHER)


def test_forced_tool_calls_validate(client):
    """tool_choice "required" (one of two tools) and a named function, at temperature 1.0: a call
    whose arguments validate against that tool's parameters; finish_reason tool_calls."""
    for seed in range(3):
        r = client.chat.completions.create(model=NAME, messages=USER, tools=TWO_TOOLS, tool_choice="required",
                                           max_tokens=80, temperature=1.0, seed=seed,
                                           extra_body={"max_reasoning_tokens": 0})
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER if call.function.name == "get_weather"
                            else TIME)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=NAME, messages=USER, tools=TWO_TOOLS, tool_choice=named, max_tokens=80,
                                       temperature=1.0, seed=9, extra_body={"max_reasoning_tokens": 3})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), TIME)
    tools = [{"type": "function", **t["function"]} for t in TWO_TOOLS]
    resp = client.responses.create(model=NAME, input="Time?", tools=tools, max_output_tokens=80, temperature=1.0,
                                   tool_choice={"type": "function", "name": "get_weather"},
                                   extra_body={"max_reasoning_tokens": 0})
    (fc,) = [o for o in resp.output if o.type == "function_call"]
    assert fc.name == "get_weather"
    jsonschema.validate(json.loads(fc.arguments), WEATHER)


# ---- errors --------------------------------------------------------------------------------------
CHAT = {"model": NAME, "messages": USER, "max_tokens": 4}
ERRORS = [  # (path, body or raw bytes, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "seed": 1.5}, 400, "seed"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "max"}, 400, "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     400, "response_format.json_schema.name"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 64, "response_format": json_format(
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True})}, 400, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 64, "response_format": json_format({"$ref": "#/$defs/x"})}, 400,
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": json_format(WEATHER)}, 400,  # max_tokens 4: too few
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "max_reasoning_tokens": 3}, 400, "max_reasoning_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 64, "tool_choice": "required", "tools": [{"type": "function",
     "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]}, 400, "tools[0]"),
    ("/v1/responses", {"model": NAME, "input": "x", "text": {"format": {"type": "json_schema", "name": "n",
     "schema": {"type": "object", "patternProperties": {"a": {}}}}}}, 400, "text.format.schema"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "web_search"}]}, 400, "tools[0]"),
    ("/v1/chat/completions", {**CHAT, "messages": USER + [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
     400, "messages[1].tool_call_id"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 10 ** 7]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/responses", {"model": NAME, "input": []}, 400, "input"),
    ("/v1/responses", {"model": NAME, "input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ("/v1/responses", {"model": NAME, "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     400, "input[0].call_id"),
    ("/v1/no/such/route", {}, 404, None),
]


def test_every_bad_request_gets_its_status_and_the_server_serves_on(url, client):
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as h:
        for path, body, status, param in ERRORS:
            r = h.post(path, content=body) if isinstance(body, bytes) else h.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
            assert err["param"] == param, (body, err)
        assert h.get("/v1/responses/resp_nope").status_code == 404
        assert h.get("/v1/models/other").status_code == 404
        r = h.get("/v1/chat/completions")  # wrong method: OpenAI's shape too, never FastAPI's
        assert r.status_code == 405 and "error" in r.json()
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * (9 << 20)}]}
        assert h.post("/v1/chat/completions", json=big).status_code == 413
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 400}])
    r = client.chat.completions.create(model=NAME, messages=USER, max_tokens=3, temperature=0)
    assert r.choices[0].message.content is not None


# ---- slots: disconnect, queue bound, API key ------------------------------------------------------
def metric(url, name, **labels):
    """A sample of the Prometheus text at /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {"model_name": NAME, **labels}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in fam.samples:
            if sample.name == name and sample.labels == want:
                return sample.value
    return 0.0


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_disconnect_frees_the_slot_and_a_full_queue_gets_503_and_api_key(model):
    engine = Engine(model, max_seqs=2, max_len=2048, prefill_chunk=64)
    with running(engine, max_waiting=0, api_key="s3cret") as u:
        auth = {"Authorization": "Bearer s3cret"}
        long = {"model": NAME, "prompt": "hi", "max_tokens": 2000, "stream": True}  # busy until aborted
        with httpx.Client(base_url=u, timeout=REQUEST_TIMEOUT_S) as h:
            # API key: /v1 needs it, /health and /metrics do not
            assert h.post("/v1/completions", json={"model": NAME, "prompt": "hi"}).status_code == 401
            assert h.post("/v1/completions", json={"model": NAME, "prompt": "hi"},
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200
            bad_key = openai.OpenAI(base_url=u + "/v1", api_key="wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad_key.models.list()

            aborted = metric(u, "gptoss:request_success_total", finished_reason="abort")
            streams = [h.stream("POST", "/v1/completions", json=long, headers=auth) for _ in range(2)]
            responses = [s.__enter__() for s in streams]
            for r in responses:  # both hold a slot and stream
                assert r.status_code == 200 and next(r.iter_lines())
            busy = h.post("/v1/completions", json={**long, "stream": False}, headers=auth)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
            for s in streams:  # the clients leave mid-stream
                s.__exit__(None, None, None)
            wait_for(lambda: metric(u, "gptoss:request_success_total", finished_reason="abort") == aborted + 2)
            wait_for(lambda: engine.num_free_slots() == 2)
            ok = openai.OpenAI(base_url=u + "/v1", api_key="s3cret", max_retries=0, timeout=REQUEST_TIMEOUT_S)
            assert ok.completions.create(model=NAME, prompt="hi", max_tokens=2).choices[0].text is not None


# ---- the command ------------------------------------------------------------------------------------
def test_the_serve_command_starts_quietly_and_serves(ckpt, model):
    from gptoss_jax.kv import PagedCache

    kv_gb = 0.0005  # the paged KV budget: the startup line says how many tokens it holds
    cmd = [sys.executable, "-m", "gptoss_jax.cli", "serve", "--model", ckpt, "--port", "0", "--max-seqs", "2",
           "--max-len", "128", "--prefill-chunk", "32", "--dtype", "float32", "--kernels", "xla",
           "--kv-cache-gb", str(kv_gb)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        while not any("listening on" in ln for ln in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines) + proc.stderr.read()
            lines.append(proc.stderr.readline())
        base = re.search(r"listening on (http://127\.0\.0\.1:\d+)", lines[-1]).group(1)
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        r = c.chat.completions.create(model=os.path.basename(ckpt), messages=USER, max_tokens=4)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        try:
            rest = proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            rest = proc.communicate()[1]
    log = "".join(lines) + rest
    assert [ln.split()[0] for ln in lines if ln.strip()] == ["loading", "compiling", "listening"], log
    tokens = PagedCache.create(model, 2, 128, kv_cache_bytes=int(kv_gb * 1e9)).tokens_per_device()
    assert f"KV cache {tokens} tokens per device" in log, log
    assert "Traceback" not in log
    assert re.search(r"prompt=\d+ completion=\d+ ttft=", log), log  # one line per request


@pytest.mark.parametrize("args, match", [(["--max-seqs", "0"], "--max-seqs must be >= 1"),
                                         (["--max-waiting", "-1"], "--max-waiting must be >= 0"),
                                         (["--port", "70000"], "--port must be in"),
                                         (["--kv-cache-gb", "0"], "--kv-cache-gb must be a positive number"),
                                         (["--max-len", str(CFG.max_position_embeddings + 1)], "exceeds the model's context")])
def test_bad_serve_options_are_one_line_errors(ckpt, capsys, args, match):
    from gptoss_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", ckpt, "--port", "0", "--kernels", "xla", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err
