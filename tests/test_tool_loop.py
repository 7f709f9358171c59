"""The built-in tool loop through the real server and the `openai` client: a scripted model (the real
engine, its sampled tokens replaced by known harmony calls and answers) calls python and the browser;
the server runs them (a real Jupyter kernel, a local corpus) and generates on.

References: openai-harmony's rendering of the whole conversation (each round's prompt), the corpus
files, the kernel processes (psutil: none left when the server stops)."""

from __future__ import annotations

import json

import httpx
import openai
import psutil
import pytest

from gptoss_jax.harmony import render_prompt
from gptoss_jax.server.protocol import ApiError, Limits, responses_job
from gptoss_jax.tokenizer import load_tokenizer
from gptoss_jax.tools import BrowserTool, LocalBackend, PythonTool, Toolbox

from helpers import checkpoint_fixtures, tiny_config
from test_server import NAME, REQUEST_TIMEOUT_S, ScriptedEngine, harmony, running
from test_tools import corpus

CFG = tiny_config(vocab_size=201088)
ENGINE = dict(max_seqs=2, max_len=1024, prefill_chunk=128)
TIMEOUT_S = 2.0  # the python tool's timeout here
CODE = [{"type": "code_interpreter", "container": {"type": "auto"}}]
WEB = [{"type": "web_search_preview"}]
ASK = dict(model=NAME, max_output_tokens=300, temperature=0, reasoning={"effort": "low"})

PY = harmony("<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant to=python<|channel|>analysis code"
             "<|message|>x = 6 * 7\nprint(x)<|call|>")
ANSWER = harmony("<|channel|>final<|message|>It is 42.<|return|>")


def py(code: str) -> list[int]:
    return harmony(f" to=python<|channel|>analysis code<|message|>{code}<|call|>")


def browse(fn: str, **args) -> list[int]:
    return harmony(f" to=browser.{fn}<|channel|>analysis code<|message|>{json.dumps(args)}<|call|>")


class RecordingEngine(ScriptedEngine):
    """Scripted, and keeps every prompt it was given (each round's)."""

    def __init__(self, model, **kw):
        super().__init__(model, [], **kw)
        self.prompts: list[list[int]] = []

    def add_request(self, prompt_token_ids, params=None, request_id=None):
        self.prompts.append([int(t) for t in prompt_token_ids])
        return super().add_request(prompt_token_ids, params, request_id)


def kernels() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


ckpt, model = checkpoint_fixtures(CFG, "tool-loop", seed=9)


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    before = kernels()
    engine = RecordingEngine(model, **ENGINE)
    box = Toolbox([PythonTool(timeout_s=TIMEOUT_S, interrupt_grace_s=2.0),
                   BrowserTool(LocalBackend(corpus(tmp_path_factory.mktemp("web"))))])
    with running(engine, box) as url:
        yield engine, box, url
    assert kernels() == before  # the server's shutdown stopped every kernel


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[2] + "/v1", api_key="x", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def script(served, *completions):
    engine = served[0]
    engine.scripts[:] = list(completions)
    return len(engine.prompts)


def test_python_call_then_answer(served, client):
    engine, box, _ = served
    n = script(served, PY, ANSWER)
    r = client.responses.create(input="What is 6 times 7?", tools=CODE, **ASK)
    assert [o.type for o in r.output] == ["reasoning", "code_interpreter_call", "message"]
    ci = r.output[1]
    assert (ci.code, ci.status, [o.logs for o in ci.outputs]) == ("x = 6 * 7\nprint(x)", "completed", ["42\n"])
    assert r.output_text == "It is 42." and r.status == "completed"
    # each round's prompt is harmony's rendering of the conversation so far
    user = [{"role": "user", "content": "What is 6 times 7?"}]
    said = [{"role": "assistant", "content": "Compute it.", "channel": "analysis"},
            {"role": "assistant", "content": "x = 6 * 7\nprint(x)", "channel": "analysis", "recipient": "python",
             "content_type": "code"},
            {"role": "tool", "name": "python", "content": "42\n", "channel": "analysis"}]
    tools = box.configs(["python"])
    first, second = engine.prompts[n:]
    assert first == render_prompt(user, reasoning_effort="low", system_tools=tools)
    assert second == render_prompt(user + said, reasoning_effort="low", system_tools=tools)
    assert r.usage.output_tokens == len(PY) + len(ANSWER)
    assert r.usage.input_tokens == len(second) - len(PY)  # the prompt and the tool's answer


def test_streamed_events_through_the_stream_helper(served, client):
    """The openai client's stream helper rebuilds the response from our events (their shapes are its)."""
    script(served, PY, ANSWER)
    with client.responses.stream(input="What is 6 times 7?", tools=CODE, **ASK) as st:
        events = list(st)
        final = st.get_final_response()
    kinds = [e.type for e in events]
    ci = [e.type for e in events if "code_interpreter" in e.type or
          (e.type.startswith("response.output_item") and e.item.type == "code_interpreter_call")]
    assert ci[:2] == ["response.output_item.added", "response.code_interpreter_call.in_progress"]
    assert ci[-4:] == ["response.code_interpreter_call_code.done", "response.code_interpreter_call.interpreting",
                       "response.code_interpreter_call.completed", "response.output_item.done"]
    assert set(ci[2:-4]) == {"response.code_interpreter_call_code.delta"}
    code = "".join(e.delta for e in events if e.type == "response.code_interpreter_call_code.delta")
    assert code == "x = 6 * 7\nprint(x)"
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [o.type for o in final.output] == ["reasoning", "code_interpreter_call", "message"]
    assert final.output[1].code == code and final.output[1].outputs[0].logs == "42\n"
    assert final.output_text == "It is 42."


def test_browser_search_open_and_cite(served, client):
    engine, box, _ = served
    n = script(served, browse("search", query="Eiffel Tower completed"), browse("open", id=0),
               harmony("<|channel|>final<|message|>It was finished in 1889 【1†L4】.<|return|>"))
    r = client.responses.create(input="When was the Eiffel Tower completed?", tools=WEB, **ASK)
    assert [o.type for o in r.output] == ["web_search_call", "web_search_call", "message"]
    search, opened, msg = r.output
    assert search.action.type == "search" and search.action.query == "Eiffel Tower completed"
    assert search.action.sources[0].url == "travel/paris.html" and search.status == "completed"
    assert opened.action.type == "open_page" and opened.action.url == "travel/paris.html"
    (cite,) = msg.content[0].annotations
    text = msg.content[0].text
    assert (cite.type, cite.url, cite.title) == ("url_citation", "travel/paris.html", "Paris guide")
    assert text[cite.start_index:cite.end_index] == "【1†L4】"
    # the page the model read at cursor 1 shows the cited line, as the third round's prompt holds it
    shown = load_tokenizer().decode(engine.prompts[n + 2])
    assert "[1] Paris guide (travel/paris.html)" in shown and "L4: The Eiffel Tower was completed in 1889." in shown
    assert "browser" in box.names


def test_failing_tools_answer_the_model_and_the_response_goes_on(served, client):
    box = served[1]
    opened = box.open_sessions()
    script(served, py("while True: pass"), browse("open", id="missing.md"), py("print(1 +"), ANSWER)
    r = client.responses.create(input="Try things.", tools=CODE + WEB, store=False, **ASK)
    assert [o.type for o in r.output] == ["code_interpreter_call", "web_search_call", "code_interpreter_call",
                                          "message"]
    loop, missing, syntax, _ = r.output
    assert loop.status == "failed" and f"timed out after {TIMEOUT_S:g} s" in loop.outputs[0].logs
    assert missing.status == "failed" and missing.action.url == "missing.md"
    assert syntax.status == "completed" and "SyntaxError" in syntax.outputs[0].logs
    assert r.output_text == "It is 42." and r.status == "completed"
    assert box.open_sessions() == opened  # not stored, so nobody can continue it: its sessions closed at once


def test_tool_call_limit(served, client):
    script(served, py("print(1)"), py("print(2)"), py("print(3)"))
    r = client.responses.create(input="Loop.", tools=CODE, max_tool_calls=1, **ASK)
    assert [(o.type, o.status) for o in r.output] == [("code_interpreter_call", "completed"),
                                                      ("code_interpreter_call", "failed"),
                                                      ("code_interpreter_call", "incomplete")]
    assert "limit of 1 tool calls" in r.output[1].outputs[0].logs
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_tool_calls"


def test_the_python_session_follows_previous_response_id(served, client):
    engine, box, _ = served
    script(served, py("x = 41"), ANSWER)
    first = client.responses.create(input="Set x.", tools=CODE, **ASK)
    n = script(served, py("print(x + 1)"), ANSWER)
    follow = client.responses.create(input="Use x.", tools=CODE, previous_response_id=first.id, **ASK)
    assert follow.output[0].outputs[0].logs == "42\n"  # the same kernel
    # the stored turn (its call, the tool's answer, the final message) comes back as harmony messages
    turn = [{"role": "user", "content": "Set x."},
            {"role": "assistant", "content": "x = 41", "channel": "analysis", "recipient": "python",
             "content_type": "code"},
            {"role": "tool", "name": "python", "content": "[no output]", "channel": "analysis"},
            {"role": "assistant", "content": "It is 42.", "channel": "final"},
            {"role": "user", "content": "Use x."}]
    assert engine.prompts[n] == render_prompt(turn, reasoning_effort="low", system_tools=box.configs(["python"]))


def test_forced_builtin_calls(served, client):
    """tool_choice forcing python or the browser: the first round's reply, sampled from random weights
    at temperature 1.0, is a complete call (constrained decoding); the tool runs, the next round answers."""
    for tools, choice, kind in ((CODE, {"type": "code_interpreter"}, "code_interpreter_call"),
                                (WEB, {"type": "web_search_preview"}, "web_search_call")):
        script(served, [], ANSWER)  # the first round samples (no script), the second answers
        r = client.responses.create(input="Go.", tools=tools, tool_choice=choice, model=NAME, max_output_tokens=48,
                                    temperature=1.0, extra_body={"max_reasoning_tokens": 0})
        assert [o.type for o in r.output] == [kind, "message"] and r.output_text == "It is 42.", r.output
        call = r.output[0]
        assert call.status in ("completed", "failed")
        if kind == "web_search_call":
            assert call.action.type == "search" and isinstance(call.action.query, str)


def test_bad_tool_requests(served, client):
    url = served[2]
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as h:
        for body, param in [
            ({"input": "x", "tools": CODE, "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
            ({"input": "x", "tools": CODE, "tool_choice": {"type": "code_interpreter"}, "max_output_tokens": 8},
             "tool_choice"),  # too few tokens for a forced call
            ({"input": "x", "tools": CODE, "max_tool_calls": 0}, "max_tool_calls"),
            ({"input": "x", "tools": CODE, "max_tool_calls": 1000}, "max_tool_calls"),
            ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {}}]},
             "input[0].action.type"),
        ]:
            r = h.post("/v1/responses", json={"model": NAME, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = h.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                                 "tools": CODE})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0]"  # built-ins are the client's there
    limits = Limits(2048, CFG.vocab_size, 0, 1)
    with pytest.raises(ApiError, match="gptoss-jax serve --tool python") as e:
        responses_job({"input": "x", "tools": CODE}, limits, None, toolbox=None)
    assert e.value.param == "tools[0]"


def test_a_builtin_call_that_does_not_end_the_round_is_abandoned():
    """A call closed by <|end|> instead of <|call|> (the model went on) never runs: a python item is
    marked incomplete, a web search one (never announced) is dropped, later items keep their index."""
    from gptoss_jax.harmony import Delta
    from gptoss_jax.server.tool_loop import ToolOutputItems

    route = {"python": "python", "browser.search": "browser"}.get
    items = ToolOutputItems(route, lambda text: [], "cntr_x")
    pieces = [Delta("tool_call", '{"query": "x"}', 0, "browser.search"), Delta("tool_call", "print(1)", 1, "python"),
              Delta("content", "done", 2)]
    events = [e for p in pieces for e in items.feed(p)] + items.settle()
    assert [(it["type"], it["status"]) for it in items.items] == [("code_interpreter_call", "incomplete"),
                                                                  ("message", "completed")]
    added = [d["output_index"] for k, d in events if k == "response.output_item.added"]
    done = [d["output_index"] for k, d in events if k == "response.output_item.done"]
    assert added == done == [0, 1]
