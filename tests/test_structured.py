"""Constrained decoding: bounded schemas, harmony grammars, the engine's masks.

The strongest check is random weights sampled at temperature 1.0: only the constraint can make the
replies right. References: `jsonschema` (validity), openai-harmony (the reply's messages), solo
`generate()` (unconstrained requests sharing a batch with constrained ones)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jsonschema
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax import Engine, SamplingParams
from gptoss_jax.harmony import parse_completion
from gptoss_jax.structured import (JsonBody, SchemaError, TextBody, final_json, final_regex, function_call,
                                   harmony_reply, tool_message)
from gptoss_jax.structured.matcher import Constraint, check_vocab, mask_words
from gptoss_jax.tokenizer import VOCAB_SIZE, load_tokenizer

from engine_helpers import run_schedule
from helpers import checkpoint_fixtures, subprocess_env, tiny_config

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CFG = tiny_config(vocab_size=VOCAB_SIZE)
# Sampling 201,088 logits at temperature 1 dominates a CPU step (threefry noise for every slot):
# the many-reply test fills 16 slots, the others use 4.
ENGINE = dict(max_seqs=4, max_len=160, prefill_chunk=128)

# Nested objects, arrays with maxItems, enums, bounded integers and numbers, booleans, strings with
# maxLength, required and optional fields, anyOf with null, and what a schema leaves open.
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city"]}}, "required": ["name", "address"]},
    "array": {"type": "object", "properties": {
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                   "minItems": 1, "maxItems": 4}}, "required": ["scores"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color"]},
    "numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "temp": {"type": "number", "minimum": -50, "maximum": 60, "multipleOf": 0.5}},
        "required": ["age", "ratio"]},
    "flags": {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 6},
        "bits": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}, "required": ["ok"]},
    "choice": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer", "minimum": -9, "maximum": 9},
                            {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
        "required": ["value", "tags"]},
    "open": {"type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"},
                                              "x": {"type": "number"}, "any": {}}, "required": ["text", "n", "x"]},
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city"]}

ckpt, model = checkpoint_fixtures(CFG, "structured", seed=3)


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


@pytest.fixture(scope="module")
def token_bytes(enc):
    """Bytes per token (specials: a large number, so the adversarial policy avoids them)."""
    return np.array([len(enc.decode_single_token_bytes(i)) if i < 199_998 else 1 << 20 for i in range(VOCAB_SIZE)])


def sample_reply(grammar, rng, token_bytes=None):
    """One reply from the grammar's masks alone: uniform over the allowed tokens, or (given
    token_bytes) adversarial, always among the shortest allowed tokens (the longest replies)."""
    c = Constraint(grammar, VOCAB_SIZE)
    row = np.zeros((1, mask_words(VOCAB_SIZE)), np.int32)
    out = []
    while not out or out[-1] not in grammar.end_tokens:
        assert len(out) < grammar.max_tokens, "the reply outgrew its bound"
        c.fill(row)
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB_SIZE])
        if token_bytes is not None:
            allowed = allowed[token_bytes[allowed] == token_bytes[allowed].min()]
        out.append(int(rng.choice(allowed)))
        c.advance(out[-1])
    return out


def check_json_reply(tokens, schema):
    p = parse_completion(tokens, strict=True)
    assert p.stop_token in (gj.tokenizer.RETURN,) and p.messages[-1].channel == "final", p
    jsonschema.validate(json.loads(p.final), schema)
    return p


# ---- the grammar alone (no model) ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_reply_validates_within_its_bound(name, token_bytes):
    """Uniform and adversarial (shortest-token) policies over the grammar's masks: each reply parses
    as harmony, validates, and takes at most the proven bound, which is at most max_tokens."""
    rng = np.random.default_rng(len(name))
    for max_tokens in (72, 200):
        g = harmony_reply(final_json(SCHEMAS[name]), max_tokens=max_tokens, max_reasoning_tokens=4)
        assert g.max_tokens <= max_tokens
        for policy in (None, token_bytes, token_bytes):
            check_json_reply(sample_reply(g, rng, policy), SCHEMAS[name])


def test_tool_calls_and_builtin_tool_messages_are_harmony(token_bytes):
    """Forced calls: one of two functions, the python tool (free text within its budget) and a
    browser call, in the headers openai-harmony parses as calls."""
    rng = np.random.default_rng(0)
    g = harmony_reply(function_call("get_weather", WEATHER), function_call("get_time"), max_tokens=80)
    seen = set()
    for policy in (None, None, token_bytes, None):
        p = parse_completion(sample_reply(g, rng, policy), strict=True)
        (call,) = p.tool_calls
        assert p.stop_token == gj.tokenizer.CALL and call.channel == "commentary"
        assert call.content_type == "<|constrain|>json" and call.namespace == "functions"
        jsonschema.validate(call.json_arguments(), WEATHER if call.name == "get_weather" else {"maxProperties": 0})
        seen.add(call.name)
    py = harmony_reply(tool_message("python"), max_tokens=40, max_reasoning_tokens=0)
    assert py.max_tokens <= 40 and "start: answer" in py.lark  # no reasoning: the call comes first
    (call,) = parse_completion(sample_reply(py, rng), strict=True).tool_calls
    assert (call.recipient, call.channel, call.content_type) == ("python", "analysis", "code")
    search = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 20}}, "required": ["query"]}
    br = harmony_reply(tool_message("browser.search", body=JsonBody(search)), max_tokens=60)
    (call,) = parse_completion(sample_reply(br, rng, token_bytes), strict=True).tool_calls
    assert (call.recipient, call.content_type) == ("browser.search", "code")
    jsonschema.validate(call.json_arguments(), search)
    text = harmony_reply(tool_message("python", body=TextBody(max_tokens=5)), max_tokens=200)
    assert "body0[max_tokens=5]" in text.lark


def test_regex_answers_and_the_reasoning_budget(token_bytes):
    rng = np.random.default_rng(1)
    g = harmony_reply(final_regex(r"[a-z]+-[0-9]{2}"), max_tokens=60, max_reasoning_tokens=6)
    for policy in (None, token_bytes):
        p = parse_completion(sample_reply(g, rng, policy), strict=True)
        assert len(p.analysis.encode()) <= 6 * 4 and re.fullmatch(r"[a-z]+-[0-9]{2}", p.final)
    # the default reasoning budget is half of max_tokens; it shrinks when the answer needs the room
    assert harmony_reply(final_json(SCHEMAS["enum"]), max_tokens=400).reasoning_tokens == 200
    small = harmony_reply(final_json(SCHEMAS["nested"]), max_tokens=70)
    assert 0 < small.reasoning_tokens < 35 and small.max_tokens <= 70


@pytest.mark.parametrize("schema, match", [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "patternProperties": {"x": {}}}, "patternProperties"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
    ({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {"kids": {
        "type": "array", "items": {"$ref": "#/$defs/node"}}}}}}, "recursive"),
    ({"$ref": "https://example.com/schema.json"}, "local"),
    ({"type": "strin"}, "unknown type"),
    (False, "no value is valid"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "required"),
])
def test_unsupported_schemas_are_refused_by_name(schema, match):
    with pytest.raises(SchemaError, match=match):
        harmony_reply(final_json(schema), max_tokens=500)


def test_a_budget_below_the_shortest_answer_is_refused():
    schema = {"type": "object", "properties": {k: {"type": "integer"} for k in "abcdefghij"},
              "required": list("abcdefghij")}
    with pytest.raises(SchemaError, match="raise max_tokens"):
        harmony_reply(final_json(schema), max_tokens=40)
    with pytest.raises(SchemaError, match="raise max_tokens"):  # an explicit reasoning budget is kept
        harmony_reply(final_json(SCHEMAS["enum"]), max_tokens=40, max_reasoning_tokens=30)
    g = harmony_reply(final_json(schema), max_tokens=90)  # fits: the reasoning shrank
    assert g.max_tokens <= 90


# ---- the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt(enc):
    """A short harmony prompt (one 16-token prefill chunk: eight prompts a step); what it says does
    not matter to random weights."""
    ids = enc.encode("<|start|>user<|message|>Answer in JSON.<|end|><|start|>assistant", allowed_special="all")
    assert len(ids) <= 16
    return ids


def constrained(schema, seed, max_tokens=64, reasoning=0):
    """Temperature 1.0; random weights never end the reasoning by choice, so it runs to its budget:
    most requests skip it (0) to keep the tests short, some reason for a few tokens."""
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, json_schema=schema,
                          max_reasoning_tokens=reasoning)


ENGINE_SCHEMAS = ("nested", "array", "enum", "numbers", "flags", "open")  # "choice": host-only above


@pytest.mark.slow  # 120 replies of 201,088-way sampling: about a minute on 2 CPU cores
def test_random_weights_give_valid_json_for_every_schema(model, prompt):
    """6 schemas x 20 replies sampled at temperature 1.0 from random weights: each parses and
    validates; none ends by length."""
    eng = Engine(model, **{**ENGINE, "max_seqs": 16})
    schedule = {}
    for i in range(20):
        for name in ENGINE_SCHEMAS:
            s = SCHEMAS[name]
            p = constrained(s, seed=i, max_tokens=80, reasoning=3 if i % 5 == 0 else 0)
            schedule.setdefault(i % 4, []).append((f"{name}.{i}", prompt, p))
    res = run_schedule(eng, schedule)
    for name in ENGINE_SCHEMAS:
        for i in range(20):
            r = res[f"{name}.{i}"]
            assert r["reason"] == "stop", (name, i, r["reason"])
            check_json_reply(r["tokens"], SCHEMAS[name])
    assert eng.stats["masks"] >= sum(len(res[k]["tokens"]) for k in res if k is not None) - 1
    assert eng.num_free_slots() == 16


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_unconstrained_requests_in_a_mixed_batch_equal_their_solo_tokens(model, prompt, decode_steps):
    """Greedy and seeded requests share the batch with constrained ones (the two-program path
    with all-allowed masks; one token a step even with decode_steps 4): each equals generate() alone."""
    free = {"g": (prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=())),
            "s": (prompt[:9], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, stop_token_ids=()))}
    eng = Engine(model, **ENGINE, decode_steps=decode_steps)
    res = run_schedule(eng, {0: [("c0", prompt, constrained(SCHEMAS["enum"], 1, reasoning=2)), ("g", *free["g"])],
                             1: [("s", *free["s"]), ("c1", prompt, constrained(SCHEMAS["numbers"], 2))]})
    for rid, (ids, p) in free.items():
        want = gj.generate(model, [ids], max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                           seed=p.seed, stop_tokens=(), prefill_chunk=ENGINE["prefill_chunk"])
        assert res[rid]["tokens"] == want.tokens[0].tolist(), rid
    check_json_reply(res["c0"]["tokens"], SCHEMAS["enum"])
    check_json_reply(res["c1"]["tokens"], SCHEMAS["numbers"])
    assert eng.stats["constrained_steps"] > 0


def test_constrained_and_unconstrained_mixes_never_recompile(model, prompt):
    """After one warm-up that meets both decode paths, new mixes (all constrained, none, half,
    new schemas and grammars) compile nothing."""
    compiled = []

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE:
            compiled.append(kw.get("fun_name", "?"))

    def mix(tag, kinds):
        reqs = []
        for i, k in enumerate(kinds):
            p = (SamplingParams(max_tokens=6, temperature=0.8, seed=i, stop_token_ids=()) if k is None else
                 constrained(SCHEMAS[k], i))
            reqs.append((f"{tag}{i}", prompt, p))
        return {0: reqs}

    eng = Engine(model, **ENGINE)
    run_schedule(eng, mix("w", ["enum", None]))
    run_schedule(eng, mix("v", [None]))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run_schedule(eng, mix("a", ["nested", "array", "choice"]))
        run_schedule(eng, mix("b", [None, None, "flags", None]))
        run_schedule(eng, mix("c", [None] * 3))
        g = harmony_reply(function_call("get_weather", WEATHER), max_tokens=80, max_reasoning_tokens=0)
        res = run_schedule(eng, {0: [("d", prompt, SamplingParams(max_tokens=80, temperature=1.0, grammar=g))]})
        assert compiled == [], compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    (call,) = parse_completion(res["d"]["tokens"], strict=True).tool_calls
    jsonschema.validate(call.json_arguments(), WEATHER)


def test_preempted_constrained_requests_resume_with_their_matcher(model, prompt):
    """A paged pool of 10 pages of 16 positions for 4 slots, 4 prompts of 71 tokens (different
    first tokens: no prefix shared): two requests fit, and their replies outgrow the pool, so
    constrained replies get preempted and resume
    (prompt + tokens so far recomputed, the next token masked by the matcher that consumed them and
    drawn with its own index): each equals the same request served without pressure and validates."""
    from gptoss_jax.kv import PagedCache

    reqs = {f"c{i}": ([100 + i] + prompt * 7, constrained(SCHEMAS[name], seed=20 + i))
            for i, name in enumerate(("nested", "array", "numbers", "flags"))}
    want = run_schedule(Engine(model, **ENGINE), {0: [(rid, *v) for rid, v in reqs.items()]})
    budget = PagedCache.budget(model, ENGINE["max_seqs"], ENGINE["max_len"], 10, page_size=16)
    eng = Engine(model, **ENGINE, page_size=16, kv_cache_bytes=budget)
    got = run_schedule(eng, {0: [(rid, *v) for rid, v in reqs.items()]})
    assert eng.stats["preemptions"] > 0, eng.stats
    for rid, (_, p) in reqs.items():
        assert got[rid]["tokens"] == want[rid]["tokens"], rid
        check_json_reply(got[rid]["tokens"], p.json_schema)


def test_bad_constraints_raise_and_generate_takes_a_schema(model, prompt):
    eng = Engine(model, **ENGINE)
    with pytest.raises(ValueError, match="uniqueItems"):
        eng.add_request(prompt, SamplingParams(max_tokens=64, json_schema={"type": "array", "uniqueItems": True}))
    with pytest.raises(ValueError, match="one of json_schema, regex and grammar"):
        eng.add_request(prompt, SamplingParams(max_tokens=64, json_schema={}, regex="a"))
    with pytest.raises(ValueError, match="build it with max_tokens"):
        eng.add_request(prompt, SamplingParams(max_tokens=20, grammar=harmony_reply(final_json({}), max_tokens=64)))
    with pytest.raises(ValueError, match="raise max_tokens"):
        eng.add_request(prompt, SamplingParams(max_tokens=12, json_schema=SCHEMAS["nested"]))
    with pytest.raises(ValueError, match="does not compile"):
        eng.add_request(prompt, SamplingParams(max_tokens=64, grammar="start: <|nonsense|>"))
    with pytest.raises(ValueError, match="vocabulary"):
        check_vocab(1000)
    out = gj.generate(model, [prompt, prompt[:9]], max_new_tokens=48, temperature=1.0, seed=3,
                      json_schema=SCHEMAS["flags"], max_reasoning_tokens=0)
    for b in range(2):
        check_json_reply(out.tokens[b, :out.lengths[b]].tolist(), SCHEMAS["flags"])


@pytest.mark.parametrize("schema, match", [
    ("{not json", "not valid JSON"),
    ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
    ('{"type": "object", "properties": {"a": {"type": "string", "minLength": 400}}, "required": ["a"]}',
     "raise max_tokens"),
])
def test_cli_checks_the_schema_before_loading(tmp_path, capsys, schema, match):
    from gptoss_jax import cli

    path = tmp_path / "schema.json"
    path.write_text(schema)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi", "--max-tokens", "64",
                  "--json-schema", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and err.count("\n") == 1, err


# ---- on a mesh ----------------------------------------------------------------------------------
def mixed_batch():
    """Constrained (greedy and sampled, one reasoning) and free requests sharing one batch."""
    ids = load_tokenizer().encode("<|start|>user<|message|>Answer in JSON.<|end|><|start|>assistant",
                                  allowed_special="all")
    return {0: [("nested", ids, SamplingParams(max_tokens=64, temperature=0.0, json_schema=SCHEMAS["nested"])),
                ("free", ids[:9], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=())),
                ("flags", ids, constrained(SCHEMAS["flags"], seed=4, reasoning=6))]}


def run_mixed_batch(model) -> dict:
    """{request id: tokens} of `mixed_batch` through an engine on `model` (and its mesh)."""
    res = run_schedule(Engine(model, **ENGINE), mixed_batch())
    return {rid: r["tokens"] for rid, r in res.items() if rid is not None}


def test_constrained_requests_on_a_mesh_equal_one_device(ckpt, model, tmp_path):
    """4 CPU devices (a subprocess), (data=2, model=2) meshes with Auto and Explicit axes: the masks
    meet the sharded logits; every request equals its one-device tokens, and the replies validate."""
    want = run_mixed_batch(model)
    out = str(tmp_path / "structured.json")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_checks.py")
    r = subprocess.run([sys.executable, script, "structured", ckpt, out], env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(out) as f:
        got = json.load(f)
    for kind in ("auto", "explicit"):
        assert got[kind] == want, kind
    for rid, schema in (("nested", SCHEMAS["nested"]), ("flags", SCHEMAS["flags"])):
        check_json_reply(want[rid], schema)
