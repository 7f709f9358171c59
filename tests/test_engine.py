"""Serving engine: continuous batching equals solo generate(), per-request sampling, no recompiles,
abort, bad input, failing steps, the Pallas path, a mesh and two processes, the deviceless compile."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax import load_model
from gptoss_jax.engine import Engine, SamplingParams
from gptoss_jax.generate import generate

from engine_helpers import PREFIX_HEAD, greedy_schedule, prefix_requests, prompt, run_schedule, sampled_requests
from helpers import checkpoint_fixtures, run_two_processes, subprocess_env, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = tiny_config(num_key_value_heads=4)  # window 16; 4 kv heads split over model=2 in the mesh runs
ENGINE = dict(max_seqs=4, max_len=128, prefill_chunk=32)
CHUNK = ENGINE["prefill_chunk"]
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


ckpt, model = checkpoint_fixtures(CFG, "engine", seed=13, num_shards=2)


_SOLO = {}


def solo(model, ids, max_tokens, **kw):
    """generate() on the prompt alone (cached per setting): the engine's reference."""
    key = (id(model), tuple(ids), max_tokens, tuple(sorted(kw.items())))
    if key not in _SOLO:
        r = generate(model, [ids], max_new_tokens=max_tokens, stop_tokens=kw.pop("stop_tokens", ()),
                     return_logprobs=True, prefill_chunk=CHUNK, **kw)
        n = int(r.lengths[0])
        _SOLO[key] = (r.tokens[0, :n].tolist(), r.logprobs[0, :n])
    return _SOLO[key]


def sampling_kwargs(p: SamplingParams) -> dict:
    return dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed)


# ---- exactness ---------------------------------------------------------------------------------
def test_staggered_greedy_requests_equal_solo_generate(model):
    """12 greedy requests of 1..48 prompt tokens (one or two prefill chunks, past the window), added
    at staggered steps into 4 slots: each equals generate() on its prompt alone, with or without
    the host/device overlap, one or 4 decode steps per dispatch, and slots are reused as requests
    finish."""
    schedule, reqs = greedy_schedule(CFG.vocab_size)
    results = {}
    for overlap, k in ((True, 1), (False, 1), (True, 4)):
        eng = Engine(model, overlap=overlap, decode_steps=k, **ENGINE)
        results[overlap, k] = run_schedule(eng, schedule)
        assert eng.num_free_slots() == ENGINE["max_seqs"]
    for overlap, res in results.items():
        assert res[None]["max_busy"] == ENGINE["max_seqs"]  # the batch was full at some point
        for rid, (ids, m) in reqs.items():
            want, want_lp = solo(model, ids, m, temperature=0.0)
            assert res[rid]["tokens"] == want, (overlap, rid)
            assert res[rid]["reason"] == "length"
            np.testing.assert_allclose(res[rid]["logprobs"], want_lp, atol=1e-4)
    # requests arrived while others ran and finished at different steps
    res = results[True, 1]
    assert len({res[r]["first_step"] for r in reqs}) > 5 and len({res[r]["last_step"] for r in reqs}) > 5


def test_sampled_requests_depend_only_on_their_seed(model):
    """Sampled requests equal generate() of their prompt alone with the same seed and settings, and
    do not change with the companions in the batch or the step they arrive at."""
    sampled = sampled_requests(CFG.vocab_size)
    greedy_sched, _ = greedy_schedule(CFG.vocab_size)
    # alone, one after another in a one-slot engine; and mixed into the greedy stream at other steps
    alone = run_schedule(Engine(model, **{**ENGINE, "max_seqs": 1}), {0: [(r, *v) for r, v in sampled.items()]})
    mixed_sched = {k: list(v) for k, v in greedy_sched.items()}
    for i, (rid, v) in enumerate(sampled.items()):
        mixed_sched.setdefault(1 + 3 * i, []).append((rid, *v))
    mixed = run_schedule(Engine(model, **ENGINE), mixed_sched)
    for rid, (ids, p) in sampled.items():
        want, want_lp = solo(model, ids, p.max_tokens, **sampling_kwargs(p))
        assert alone[rid]["tokens"] == want, rid
        assert mixed[rid]["tokens"] == want, rid
        np.testing.assert_allclose(mixed[rid]["logprobs"], want_lp, atol=1e-4)
    # another seed draws other tokens
    ids, p = sampled["s0"]
    other = run_schedule(Engine(model, **ENGINE), {0: [("x", ids, dataclasses.replace(p, seed=99))]})
    assert other["x"]["tokens"] != mixed["s0"]["tokens"]


def test_stop_tokens_finish_a_request(model, monkeypatch):
    ids = prompt(CFG.vocab_size, 20, seed=6)
    free, _ = solo(model, ids, 12, temperature=0.0)
    stop = free[4]
    first = free.index(stop)
    eng = Engine(model, **ENGINE)
    res = run_schedule(eng, {0: [("a", ids, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[7, stop]))]})
    assert res["a"]["tokens"] == free[:first + 1] and res["a"]["reason"] == "stop"
    # no stop_token_ids: the checkpoint's stop tokens
    monkeypatch.setattr(model, "generation_defaults",
                        dataclasses.replace(model.generation_defaults, stop_tokens=(stop,)))
    res = run_schedule(eng, {0: [("b", ids, SamplingParams(max_tokens=12, temperature=0))]})
    assert res["b"]["tokens"] == free[:first + 1] and res["b"]["reason"] == "stop"


# ---- one compile set ---------------------------------------------------------------------------
def test_sampling_settings_never_recompile(model):
    """After one warm-up stream that meets every prefill variant, 5 sampling settings (temperature,
    top-p, top-k, seed, stop tokens, max_tokens, logprobs), a new engine and new prompt lengths of
    the same buckets compile nothing."""
    compiled = []

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE:
            compiled.append(kw.get("fun_name", "?"))

    warm = {0: [(f"w{i}", prompt(CFG.vocab_size, n, seed=i), SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8,
                                                                             top_k=3, seed=9))
                for i, n in enumerate((5, 21, 44, 70))]}  # chunk buckets 16, 32; 1, 2 and 3 chunks
    settings = [dict(temperature=0.7, top_p=0.9, top_k=None, seed=1, stop_token_ids=None),
                dict(temperature=1.3, top_p=1.0, top_k=5, seed=2, stop_token_ids=[3, 4, 5]),
                dict(temperature=0.0, top_p=1.0, top_k=None, seed=0, stop_token_ids=()),
                dict(temperature=0.5, top_p=0.5, top_k=50, seed=3, stop_token_ids=[1] * 8, logprobs=True),
                dict(temperature=1.0, top_p=0.95, top_k=1, seed=2 ** 40 + 7, stop_token_ids=[2])]
    eng = Engine(model, **ENGINE)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run_schedule(eng, warm)
        assert compiled, "the listener saw no compile at all"
        n_warm = len(compiled)
        for k, s in enumerate(settings):
            sched = {j: [(f"r{k}.{j}", prompt(CFG.vocab_size, n, seed=10 * k + j),
                          SamplingParams(max_tokens=m, **s))]
                     for j, (n, m) in enumerate(((9, 7), (30, 12), (60, 5), (3, 16)))}
            run_schedule(eng, sched)
        run_schedule(Engine(model, **ENGINE), {0: [("new", prompt(CFG.vocab_size, 11, seed=1),
                                                    SamplingParams(max_tokens=4, **settings[0]))]})
        assert compiled[n_warm:] == [], compiled[n_warm:]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ---- abort, bad input, failing steps ------------------------------------------------------------
def test_abort_frees_the_slot(model):
    a, b, c, d = (prompt(CFG.vocab_size, n, seed=40 + n) for n in (10, 25, 18, 7))
    greedy = lambda m: SamplingParams(max_tokens=m, temperature=0, stop_token_ids=())  # noqa: E731
    eng = Engine(model, **{**ENGINE, "max_seqs": 2})
    eng.add_request(a, greedy(16), request_id="a")
    eng.add_request(b, greedy(12), request_id="b")
    eng.add_request(c, greedy(9), request_id="c")
    got = {}
    for _ in range(3):
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert eng.num_free_slots() == 0 and "c" not in got  # c waits for a slot
    eng.abort_request("a")
    eng.add_request(d, greedy(5), request_id="d")
    eng.abort_request("d")  # aborted while waiting: never admitted
    outs = {o.request_id: o for o in eng.step()}
    assert outs["a"].finished and outs["a"].finish_reason == "abort" and outs["a"].new_token_ids == []
    assert outs["d"].finish_reason == "abort"
    assert eng._slots.count("c") == 1  # a's slot went to c in the same step
    res = run_schedule(eng, {})
    got["b"] += outs["b"].new_token_ids
    assert got["b"] + res["b"]["tokens"] == solo(model, b, 12, temperature=0.0)[0]
    assert res["c"]["tokens"] == solo(model, c, 9, temperature=0.0)[0]  # in a reused slot
    assert "a" not in res and "d" not in res and eng.num_free_slots() == 2
    eng.abort_request("b")  # finished: ignored, as unknown ids are
    eng.abort_request("nope")
    assert eng.step() == [] and not eng.has_unfinished_requests()
    eng.add_request(b, greedy(2), request_id="b")  # a finished request's id may be used again
    assert run_schedule(eng, {})["b"]["tokens"] == solo(model, b, 12, temperature=0.0)[0][:2]


V = CFG.vocab_size
BAD = [
    ([], {}, "empty"),
    ([[1, 2]], {}, "one list"),
    ([1, V], {}, "out of range"),
    ([-1, 3], {}, "out of range"),
    ([1.5, 2.0], {}, "integers"),
    (list(range(100)), dict(max_tokens=40), "exceeds the engine's max_len"),
    ([1], dict(max_tokens=0), "max_tokens"),
    ([1], dict(max_tokens=2.5), "max_tokens"),
    ([1], dict(temperature=-0.5), "temperature"),
    ([1], dict(temperature=float("nan")), "temperature"),
    ([1], dict(top_p=0.0), "top_p"),
    ([1], dict(top_p=1.5), "top_p"),
    ([1], dict(top_k=0), "top_k"),
    ([1], dict(seed="x"), "seed"),
    ([1], dict(stop_token_ids=[V]), "stop token"),
    ([1], dict(stop_token_ids=list(range(9))), "at most 8"),
]


def test_top_logprobs_are_the_best_tokens_of_the_raw_logits(model):
    """Engine(top_logprobs=5): each token also reports the 5 most likely (id, logprob) pairs, the
    log-softmax of the model's logits at that position (here from one full forward pass)."""
    ids = prompt(CFG.vocab_size, 20, seed=9)
    eng = Engine(model, **ENGINE, top_logprobs=5)
    p = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(), logprobs=True, top_logprobs=3)
    eng.check_request(ids, p)  # checks only: nothing queued
    assert eng.num_waiting_requests() == 0
    eng.add_request(ids, p, request_id="t")
    assert eng.num_waiting_requests() == 1
    toks, tops = [], []
    while eng.has_unfinished_requests():
        for o in eng.step():
            toks += o.new_token_ids
            tops += o.top_logprobs
    assert toks == solo(model, ids, 6, temperature=0.0)[0] and len(tops) == 6
    seq = np.asarray([ids + toks[:-1]], np.int32)
    lp = np.asarray(jax.nn.log_softmax(model(seq)[0, len(ids) - 1:], axis=-1))
    for i, top in enumerate(tops):
        want = np.argsort(-lp[i])[:3]
        assert [t for t, _ in top] == want.tolist() and top[0][0] == toks[i]
        np.testing.assert_allclose([v for _, v in top], lp[i][want], atol=1e-4)
    with pytest.raises(ValueError, match="top_logprobs"):
        eng.add_request(ids, SamplingParams(max_tokens=2, top_logprobs=6))


def test_bad_input_raises_and_the_engine_keeps_serving(model):
    ids = prompt(CFG.vocab_size, 15, seed=3)
    eng = Engine(model, **ENGINE)
    eng.add_request(ids, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=()), request_id="ok")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], SamplingParams(max_tokens=2), request_id="ok")
    got = [t for o in eng.step() + eng.step() for t in o.new_token_ids]
    for bad_prompt, kw, match in BAD:
        with pytest.raises(ValueError, match=match):
            eng.add_request(bad_prompt, SamplingParams(**{"max_tokens": 4, **kw}))
        got += [t for o in eng.step() for t in o.new_token_ids]
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request([1], SamplingParams(max_tokens=2), request_id=1.5)
    with pytest.raises(ValueError, match="max_len"):
        Engine(model, max_seqs=2, max_len=CFG.max_position_embeddings + 1)
    res = run_schedule(eng, {})
    assert got + res.get("ok", {"tokens": []})["tokens"] == solo(model, ids, 10, temperature=0.0)[0]
    assert eng.num_free_slots() == ENGINE["max_seqs"] and not eng.has_unfinished_requests()


def test_a_step_that_raises_leaves_no_slot_leaked(model, monkeypatch):
    """A failing prefill aborts its request only; a failing decode aborts the decoding requests (all
    of them, with a fresh cache, when the donated buffers are gone); the engine serves on."""
    p = [prompt(CFG.vocab_size, n, seed=70 + n) for n in (12, 20, 9, 30)]
    greedy = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=())
    eng = Engine(model, **ENGINE)
    real_prefill, real_decode = eng._prefill_call, eng._decode_call

    def prefill_fails_for_slot_of(rid):
        def f(cache, slots, slot, *a, **kw):
            if eng._slots[int(np.asarray(slot))] == rid:
                raise RuntimeError("injected prefill failure")
            return real_prefill(cache, slots, slot, *a, **kw)
        return f

    eng.add_request(p[0], greedy, request_id="a")
    eng.add_request(p[1], greedy, request_id="b")
    monkeypatch.setattr(eng, "_prefill_call", prefill_fails_for_slot_of("b"))
    with pytest.raises(RuntimeError, match="injected prefill"):
        eng.step()
    monkeypatch.setattr(eng, "_prefill_call", real_prefill)
    assert eng._slots.count(None) == ENGINE["max_seqs"] - 1  # only a holds a slot
    res = run_schedule(eng, {})
    assert res["b"]["reason"] == "abort" and res["b"]["tokens"] == []
    assert res["a"]["tokens"] == solo(model, p[0], 8, temperature=0.0)[0]

    # decode raises before it ran (buffers intact), then after it consumed the donated cache
    def decode_fails(after_donation):
        def f(cache, slots):
            if after_donation:
                real_decode(cache, slots)
            raise RuntimeError("injected decode failure")
        return f

    for after in (False, True):
        eng.add_request(p[2], greedy, request_id=f"c{after}")
        eng.step()
        monkeypatch.setattr(eng, "_decode_call", decode_fails(after))
        with pytest.raises(RuntimeError, match="injected decode"):
            eng.step()
        monkeypatch.setattr(eng, "_decode_call", real_decode)
        assert eng.num_free_slots() == ENGINE["max_seqs"]
        eng.add_request(p[3], greedy, request_id=f"d{after}")
        res = run_schedule(eng, {})
        assert res[f"c{after}"]["reason"] == "abort"
        assert res[f"d{after}"]["tokens"] == solo(model, p[3], 8, temperature=0.0)[0]


def test_the_decision_broadcast_round_trips_small_and_large_plans():
    """What process 0 broadcasts each step (in one process the broadcast is the identity): a plan in
    the fixed 4 KiB buffer, and one that needs the second, power-of-two sized broadcast."""
    from gptoss_jax.engine import HEADER_BYTES, _broadcast_plan

    p = dict(max_tokens=4, temperature=0.7, top_p=0.9, top_k=0, seed=2 ** 40, stops=[1, 2], logprobs=False, chunk=16)
    for n in (10, 3 * HEADER_BYTES):
        plan = dict(journal=[("add", "r", list(range(n)), p), ("abort", 7)], admit=[("r", 0)], chunks=[("r", 0, 0, 10)])
        assert _broadcast_plan(plan, True) == plan


# ---- kernels -----------------------------------------------------------------------------------
def test_pallas_engine_matches_xla(model, ckpt):
    """kernels="pallas" (interpret mode here): banded attention (prefill kernel for first chunks,
    decode kernel with per-slot lengths for later chunks and decode steps) and the MXFP4 grouped
    matmul give the XLA engine's greedy tokens and logprobs, requests staggered in 2 slots."""
    pallas = load_model(ckpt, dtype="float32", kernels="pallas", progress=False)
    cfg = dict(max_seqs=2, max_len=64, prefill_chunk=16)
    greedy = lambda m: SamplingParams(max_tokens=m, temperature=0, stop_token_ids=(), logprobs=True)  # noqa: E731
    sched = {0: [("a", prompt(V, 20, seed=1), greedy(6)), ("b", prompt(V, 7, seed=2), greedy(4))],
             2: [("c", prompt(V, 35, seed=3), greedy(5))]}
    ref = run_schedule(Engine(model, **cfg), sched)
    got = run_schedule(Engine(pallas, **cfg), sched)
    for rid in "abc":
        assert got[rid]["tokens"] == ref[rid]["tokens"], rid
        np.testing.assert_allclose(got[rid]["logprobs"], ref[rid]["logprobs"], atol=1e-4)


# ---- a mesh and two processes (subprocesses: jax starts with the CPU device count set) ---------
SCRIPT = os.path.join(HERE, "engine_checks.py")


def _expected(model) -> dict:
    """What every engine run of engine_checks.py must produce: the solo generate() tokens."""
    _, reqs = greedy_schedule(CFG.vocab_size)
    want = {rid: solo(model, ids, m, temperature=0.0)[0] for rid, (ids, m) in reqs.items()}
    for rid, (ids, p) in sampled_requests(CFG.vocab_size).items():
        want[rid] = solo(model, ids, p.max_tokens, **sampling_kwargs(p))[0]
    for rid, (ids, p) in prefix_requests(CFG.vocab_size).items():
        want[rid] = solo(model, ids, p.max_tokens, temperature=0.0)[0]
    return want


@pytest.fixture(scope="module")
def mesh_run(ckpt, tmp_path_factory):
    """One process, 4 CPU devices: the engine on a (data=2, expert=1, model=2) mesh, Auto and Explicit."""
    out = str(tmp_path_factory.mktemp("engine_mesh") / "mesh.json")
    r = subprocess.run([sys.executable, SCRIPT, "mesh", ckpt, out], env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_engine_on_a_mesh_shards_slots_over_data_and_equals_solo_generate(model, mesh_run):
    want = _expected(model)
    for kind in ("auto", "explicit"):
        run = mesh_run[kind]
        assert run["cache_spec"] == ["data", None, "model", None], run["cache_spec"]  # [slots, S, K, H]
        assert run["slot_spec"] == ["data"], run["slot_spec"]
        for rid, tokens in want.items():
            assert run["tokens"][rid] == tokens, (kind, rid)


def test_paged_engine_on_a_mesh_preempts_and_reuses_prefixes(mesh_run):
    """The mesh runs' paged cache (5 pages of 32 per data shard): some request was preempted and
    the second prefix request reused the first one's pages (its 64-position head; a page of 32 is
    larger than the window 16, so one snapshot page restores its rings), all equal to solo above."""
    for kind in ("auto", "explicit"):
        run = mesh_run[kind]
        assert run["pages_per_shard"] == 5
        assert run["stats"]["preemptions"] > 0, run["stats"]
        assert run["stats"]["prefix_hit_tokens"] >= PREFIX_HEAD // 32 * 32, run["stats"]


def test_two_process_engine_matches_one_process(model, ckpt, mesh_run, tmp_path):
    """2 processes x 2 CPU devices (gloo), the same mesh over the 4 global devices: process 0 queues
    and schedules, both execute its broadcast decisions; both report what one process does."""
    out = str(tmp_path / "host")
    run_two_processes(SCRIPT, "host", [ckpt, out], timeout=600)
    runs = []
    for i in range(2):
        with open(f"{out}.{i}.json") as f:
            runs.append(json.load(f))
    assert runs[0]["tokens"] == runs[1]["tokens"]  # every process reports the same outputs
    assert runs[0]["stats"] == runs[1]["stats"] == mesh_run["auto"]["stats"]  # the same preemptions and hits
    assert runs[0]["tokens"] == mesh_run["auto"]["tokens"]  # = one process on the same mesh
    assert runs[0]["tokens"] == _expected(model)  # = solo generate() on one device
    assert runs[0]["process_count"] == 2 and runs[0]["devices"] == 4


# ---- deviceless compile (gptoss-jax aot --max-seqs) ----------------------------------------------
@pytest.mark.aot
@pytest.mark.parametrize("target", ["h100", "tpu-v5e"])
def test_engine_decode_compiles_deviceless(target, tmp_path):
    """The engine's decode step through the Pallas kernels (banded-attention decode with per-slot
    lengths, MXFP4 grouped matmul) compiles for H100 and TPU v5e from abstract shapes (2 layers of
    20b, 8 slots of 1024 positions); its arguments are the parameters plus 8 cache rows."""
    from gptoss_jax import aot
    from gptoss_jax.model import abstract_model, count_params

    cfg = gj.preset("gpt-oss-20b").replace(num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    p = aot.plan(target, str(path), devices=1, batch=1, max_len=1024, max_seqs=8, programs=("engine_decode",),
                 kernels="pallas")
    print(aot.format_plan(p))
    params = count_params(abstract_model(cfg, kernel_layout=True))[1]
    kv_row = 2 * (1024 + cfg.sliding_window) * cfg.num_key_value_heads * cfg.head_dim * 2  # k+v, bf16, 2 layers
    args = p["programs"]["engine_decode"]["argument_bytes"]
    assert params + 8 * kv_row <= args  # + lengths and the slot state (bytes)
    # TPU lays the 64-wide head dim out in 128 lanes: up to twice the cache there, plus parameter tiling
    assert args < params + 8 * kv_row * (2 if target.startswith("tpu") else 1) + 2 ** 22
    assert p["fits"] and p["kernels"] == "pallas"
