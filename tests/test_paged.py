"""The engine's paged KV cache: the XLA paged attention against an independent softmax, the host
page pool (prefix hashing, sharing, LRU eviction, waiting), greedy and seeded requests through a
pool too small for all slots (preemption), prefix reuse across a 1,000-token prompt (logits equal
without the hit), eviction under pressure, no recompiles, budgets, and the deviceless aot plan."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.engine import Engine, SamplingParams
from gptoss_jax.generate import generate
from gptoss_jax.kv import PagedCache, PagePool, page_hashes
from gptoss_jax.ops import PallasPagedAttention, XlaPagedAttention

from engine_helpers import prompt, run_schedule
from helpers import checkpoint_fixtures, tiny_config

CFG = tiny_config(num_key_value_heads=4)  # window 16, layers (sliding, full, sliding), as test_engine
V = CFG.vocab_size
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"

ckpt, model = checkpoint_fixtures(CFG, "paged", seed=13, num_shards=2)

_SOLO = {}


def solo(model, ids, max_tokens, chunk, **kw):
    """generate() on the prompt alone: (tokens, logprobs); the engine's reference."""
    key = (id(model), tuple(ids), max_tokens, chunk, tuple(sorted(kw.items())))
    if key not in _SOLO:
        r = generate(model, [ids], max_new_tokens=max_tokens, stop_tokens=(), return_logprobs=True,
                     prefill_chunk=chunk, **kw)
        n = int(r.lengths[0])
        _SOLO[key] = (r.tokens[0, :n].tolist(), r.logprobs[0, :n])
    return _SOLO[key]


# ---- the XLA paged attention --------------------------------------------------------------------
def softmax_reference(q, k_seq, v_seq, sinks, q_start, n_new, window, sm_scale):
    """One row, float64: query t at q_start + t over keys 0..q_start + n_new - 1 (contiguous),
    one sink logit per head in the denominator; rows t >= n_new are 0."""
    T, N, H = q.shape
    K = k_seq.shape[1]
    out = np.zeros((T, N, H))
    for t in range(n_new):
        i = q_start + t
        keys = [j for j in range(q_start + n_new) if j <= i and (window is None or j > i - window)]
        for n in range(N):
            kv = n // (N // K)
            s = np.array([q[t, n] @ k_seq[j, kv] for j in keys]) * sm_scale
            m = max(s.max(), sinks[n])
            p = np.exp(s - m)
            out[t, n] = (p @ v_seq[keys, kv]) / (p.sum() + np.exp(sinks[n] - m))
    return out


@pytest.mark.parametrize("op", [XlaPagedAttention(), PallasPagedAttention()], ids=["xla", "pallas"])
@pytest.mark.parametrize("S,window,T", [(4, None, 5), (8, 6, 3), (16, None, 1), (4, 16, 9)])
def test_paged_attention_ops_match_an_independent_softmax(op, S, window, T):
    """Both engine ops (the XLA gather; the Pallas kernel, in interpret mode here) on rows at lengths
    that cross page and window boundaries, pages scattered and shared between rows, GQA (8 q heads
    on 2 kv heads), invalid query rows 0; the pages are read back through the tables by hand."""
    rng = np.random.default_rng(S * 100 + T)
    B, N, K, H, M, P = 3, 8, 2, 16, 6, 20
    q_start = np.array([0, 5, M * S - T - 2], np.int32)
    n_new = np.array([T, max(1, T - 2), T], np.int32)
    tables = np.stack([rng.permutation(P)[:M] for _ in range(B)]).astype(np.int32)
    tables[1, 0] = tables[0, 0]  # a page shared by two rows (a prefix hit)
    k_pages, v_pages = rng.normal(size=(2, P, S, K, H)).astype(np.float32)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    sinks = rng.normal(size=(N,)).astype(np.float32)
    got = np.asarray(op(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables),
                        jnp.asarray(q_start), jnp.asarray(n_new), jnp.asarray(sinks), window=window, sm_scale=0.25))
    for b in range(B):
        L = q_start[b] + n_new[b]
        k_seq = np.stack([k_pages[tables[b, p // S], p % S] for p in range(L)])
        v_seq = np.stack([v_pages[tables[b, p // S], p % S] for p in range(L)])
        want = softmax_reference(q[b], k_seq, v_seq, sinks, q_start[b], n_new[b], window, 0.25)
        np.testing.assert_allclose(got[b], want, atol=2e-5, rtol=1e-4)
        assert not got[b, n_new[b]:].any()


# ---- the host page pool -------------------------------------------------------------------------
def pool(model, pages, S=4, max_seqs=2, max_len=32, prefix_caching=True):
    kv = PagedCache.create(model, max_seqs, max_len, page_size=S, prefix_caching=prefix_caching,
                           kv_cache_bytes=PagedCache.budget(model, max_seqs, max_len, pages, page_size=S,
                                                            prefix_caching=prefix_caching))
    assert kv.layout.pages_per_shard == pages
    return PagePool(kv, prefix_caching)


def test_page_hashes_chain_over_the_prefix():
    a = np.arange(20)
    b = a.copy()
    b[1] = 99  # differs in page 0: every later page differs too
    ha, hb = page_hashes(a, 4, 5), page_hashes(b, 4, 5)
    assert len(set(ha)) == 5 and all(x != y for x, y in zip(ha, hb))
    c = a.copy()
    c[13] = 99  # page 3 on
    assert page_hashes(c, 4, 5)[:3] == ha[:3] and page_hashes(c, 4, 5)[3] != ha[3]


def test_page_pool_shares_prefixes_evicts_lru_tail_first_and_makes_requests_wait(model):
    """S = 4, window 16 (restores read 4 snapshot pages). A 20-token prompt registers 5 pages and 5
    snapshots; a second prompt with the same 16-token head hits 4 pages (the 5th differs), shares
    them (reference counts); freed cached pages are evicted least recently used first, a request's
    tail before its head; a prompt whose pages are not there waits (None)."""
    p = pool(model, pages=16)
    sh = p._shards[0]
    a = np.arange(20)
    slot, hit, _ = p.admit("a", a, [0, 1], 21)  # 20 prompt positions + 1 decode: 6 pages
    assert (slot, hit) == (0, 0)
    p.snapshot("a", 0, 16)  # the first chunk: pages 0..3 get snapshot pages
    p.filled("a", 16)
    p.snapshot("a", 16, 4)
    p.filled("a", 20)
    assert len(sh.cached) == 5 and all(e.snap is not None for e in sh.cached.values())
    assert sh.available() == 16 - 6 - 5 + 5  # 6 held pages, 5 snapshots (cached, evictable)
    b = np.concatenate([a[:16], [7, 7, 7, 7, 7]])
    slot, hit, snaps = p.admit("b", b, [1], 22)
    assert (slot, hit) == (1, 16) and p.held_by("b")[:4] == p.held_by("a")[:4]
    assert snaps == [sh.cached[n].snap for n in page_hashes(a, 4, 4)]
    assert p.stats["hit_pages"] == 4
    p.release("a")
    assert all(sh.refs[q] == 1 for q in p.held_by("b")[:4])  # shared pages still held by b
    # a's own pages 4 and 5: page 4 is cached (evictable, with its snapshot), page 5 went back free
    assert p.held_by("a") == [] and len(sh.free) == 16 - 6 - 5 - 2 + 1
    # pressure: c takes every free page, then evicts the LRU (the oldest cached pages nobody holds)
    free_before = len(sh.free)
    c = np.arange(100, 100 + 4 * (free_before + 1))
    slot, hit, _ = p.admit("c", c, [0], len(c))
    assert hit == 0 and p.stats["evicted_pages"] == 1
    p.release("b")
    assert p.admit("d", np.arange(60), [0, 1], 60) is None  # 15 pages: not there, d waits
    assert p.stats["evicted_pages"] == 1


def test_page_pool_without_prefix_caching_frees_everything(model):
    p = pool(model, pages=8, prefix_caching=False)
    slot, hit, _ = p.admit("a", np.arange(20), [0], 21)
    p.snapshot("a", 0, 20)
    p.filled("a", 20)
    assert hit == 0 and p.cached_pages() == 0 and p.free_pages() == 2
    p.release("a")
    assert p.free_pages() == 8 and p.admit("b", np.arange(20), [0], 21)[1] == 0


def test_paged_budget_errors_name_the_knob(model):
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(model, max_seqs=2, max_len=128, page_size=8, kv_cache_bytes=1000)
    with pytest.raises(ValueError, match="page_size"):
        Engine(model, max_seqs=2, max_len=128, page_size=0)
    with pytest.raises(ValueError, match="paged=True"):
        Engine(model, max_seqs=2, max_len=128, paged=False, kv_cache_bytes=10 ** 6)
    with pytest.raises(ValueError, match="memory statistics"):
        Engine(model, max_seqs=2, max_len=128, kv_cache_fraction=0.5)  # CPU devices report none


# ---- a pool too small for all slots: preemption ------------------------------------------------
SMALL = dict(max_seqs=8, max_len=128, prefill_chunk=32, page_size=8)  # 16 pages per max_len sequence
SMALL_PAGES = 24  # per device: 8 slots at max_len would need 128


def mixed_requests():
    """32 requests, prompts 17..96 tokens (one prefill bucket: few compiles), max_tokens 1..16,
    every 4th sampled (seeded), 4 arriving per step: {rid: (prompt, params, arrival step)}."""
    rng = np.random.default_rng(5)
    out = {}
    for i in range(32):
        n = int(rng.integers(17, 97))
        m = int(rng.integers(1, 17))
        kw = dict(temperature=0.9, top_p=0.9, seed=i) if i % 4 == 3 else dict(temperature=0.0)
        out[f"m{i}"] = (prompt(V, n, seed=300 + i), SamplingParams(max_tokens=m, stop_token_ids=(), **kw), i // 4)
    return out


def test_32_requests_through_a_too_small_pool_equal_their_solo_runs(model):
    """8 slots, 24 pages of 8 positions (a fifth of what 8 slots of 128 positions need): requests
    wait for pages, decoding requests that run out preempt the youngest (recomputed later from
    prompt + generated tokens); every greedy and every seeded request equals generate() on its
    prompt alone, with 1 or 4 decode steps per dispatch, and every page comes back."""
    reqs = mixed_requests()
    kv_bytes = PagedCache.budget(model, SMALL["max_seqs"], SMALL["max_len"], SMALL_PAGES, page_size=8)
    sched = {}
    for rid, (ids, p, at) in reqs.items():
        sched.setdefault(at, []).append((rid, ids, p))
    # one decode step per dispatch with the host one step behind; 4 per dispatch (4 positions of
    # pages a step), each step waiting for its own tokens
    for overlap, steps in ((True, 1), (False, 4)):
        eng = Engine(model, **SMALL, kv_cache_bytes=kv_bytes, overlap=overlap, decode_steps=steps)
        assert eng.kv.layout.pages_per_shard == SMALL_PAGES
        res = run_schedule(eng, sched)
        for rid, (ids, p, _) in reqs.items():
            kw = dict(temperature=p.temperature, top_p=p.top_p, seed=p.seed)
            assert res[rid]["tokens"] == solo(model, ids, p.max_tokens, SMALL["prefill_chunk"], **kw)[0], (steps, rid)
            assert res[rid]["reason"] == "length"
        assert eng.stats["preemptions"] > 0, (steps, eng.stats)
        assert eng.pages.free_pages() == SMALL_PAGES and not eng.pages._held
        assert eng.num_free_slots() == SMALL["max_seqs"]


# ---- prefix caching ------------------------------------------------------------------------------
PREFIX = dict(max_seqs=2, max_len=1088, prefill_chunk=128, page_size=8, top_logprobs=V)  # full log-softmax
PREFIX_PAGES = 300  # per device: two 1,040-position requests (130 pages each) and a few snapshots
SHARED = prompt(V, 1003, seed=500)  # 125 full pages and 3 tokens


@pytest.fixture(scope="module")
def prefix_run(model):
    """One engine: A (shared prefix + 17 tokens) runs; B (shared prefix + 9 others) arrives while A
    decodes and reuses A's pages; B2 (another 9) reuses them with a compile listener on; then a
    1,000-token stranger needs most of the pool (evictions), then C (shared prefix + 12 others)."""
    kv_bytes = PagedCache.budget(model, PREFIX["max_seqs"], PREFIX["max_len"], PREFIX_PAGES, page_size=8)
    eng = Engine(model, **PREFIX, kv_cache_bytes=kv_bytes)
    greedy = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(), logprobs=True, top_logprobs=V)
    a, b, c = (SHARED + prompt(V, n, seed=510 + n) for n in (17, 9, 12))
    b2 = SHARED + prompt(V, 9, seed=530)
    out = dict(eng=eng, a=a, b=b, b2=b2, c=c)
    res = run_schedule(eng, {0: [("a", a, greedy)], 12: [("b", b, greedy)]})  # A's prefill: 8 steps
    out["ab"], out["ab_stats"] = res, dict(eng.stats, **eng.pages.stats)
    compiled = []

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE:
            compiled.append(kw.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out["b2_res"] = run_schedule(eng, {0: [("b2", b2, greedy)]})
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    out["b2_stats"], out["compiled"] = dict(eng.stats, **eng.pages.stats), compiled
    strangers = {0: [("x0", prompt(V, 1000, seed=520), greedy)]}
    out["x"] = run_schedule(eng, strangers)
    out["x_stats"] = dict(eng.stats, **eng.pages.stats)
    out["c_res"] = run_schedule(eng, {0: [("c", c, greedy)]})
    out["c_stats"] = dict(eng.stats, **eng.pages.stats)
    return out


def full_log_softmax(model, ids, tokens, width=1040):
    """log-softmax of one full forward pass (no cache) at the positions that chose `tokens` (the
    sequence right-padded to `width`: one compile, causal logits unchanged)."""
    seq = np.zeros((1, width), np.int32)
    seq[0, :len(ids) + len(tokens) - 1] = ids + tokens[:-1]
    logits = model(seq)[0, len(ids) - 1:len(ids) - 1 + len(tokens)]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def all_logprobs(r) -> np.ndarray:
    """[tokens, V] from the engine's top_logprobs (every token, as V = top_logprobs)."""
    out = np.zeros((len(r["top"]), V))
    for i, pairs in enumerate(r["top"]):
        ids, vals = zip(*pairs)
        out[i, list(ids)] = vals
    return out


def test_a_shared_1000_token_prefix_reuses_pages_with_the_same_logits(model, prefix_run):
    """B shares A's first 1,003 tokens: it reuses 125 pages (1,000 positions, counted; the 3 others
    are recomputed with its own tokens, as its last prompt token always is), its sliding-layer
    rings rebuilt from 2 snapshot pages (page 8 < window 16), while A still decodes (shared pages,
    two slots). B's tokens equal generate() alone and its full log-softmax at every step equals one
    full forward pass of its sequence: the hit changes nothing."""
    r, st = prefix_run["ab"], prefix_run["ab_stats"]
    assert st["hit_pages"] == 125 and st["prefix_hit_tokens"] == 1000
    assert st["prefill_tokens"] == len(prefix_run["a"]) + len(prefix_run["b"]) - 1000
    assert r["a"]["last_step"] > r["b"]["first_step"]  # A was still running when B arrived
    for rid in "ab":
        ids = prefix_run[rid]
        assert r[rid]["tokens"] == solo(model, ids, 12, PREFIX["prefill_chunk"], temperature=0.0)[0], rid
        want = full_log_softmax(model, ids, r[rid]["tokens"])
        np.testing.assert_allclose(all_logprobs(r[rid]), want, atol=2e-4)


def test_a_prefix_hit_compiles_nothing(model, prefix_run):
    """B2, another request on the same prefix after B: the same programs (block tables, the hit's
    length and snapshot pages, lengths are traced values), no compile; its answer exact."""
    assert prefix_run["compiled"] == [], prefix_run["compiled"]
    assert prefix_run["b2_stats"]["prefix_hit_tokens"] - prefix_run["ab_stats"]["prefix_hit_tokens"] == 1000
    r = prefix_run["b2_res"]["b2"]
    assert r["tokens"] == solo(model, prefix_run["b2"], 12, PREFIX["prefill_chunk"], temperature=0.0)[0]


def test_eviction_under_pressure_keeps_answers_exact(model, prefix_run):
    """A 1,000-token stranger (its 126 pages, 125 snapshots) needs more pages than are free: cached
    pages nobody holds are evicted, least recently used first, a released request's tail before its
    head, each page just after its snapshot. So C, sharing A's prefix, still finds its head (with the
    snapshot at its end) and recomputes the rest, equal to generate() alone and to the full forward
    pass; every page comes back."""
    x, xs, cs = prefix_run["x"], prefix_run["x_stats"], prefix_run["c_stats"]
    assert xs["evicted_pages"] - prefix_run["b2_stats"].get("evicted_pages", 0) > 100
    ids = prompt(V, 1000, seed=520)
    assert x["x0"]["tokens"] == solo(model, ids, 12, PREFIX["prefill_chunk"], temperature=0.0)[0]
    hit = cs["prefix_hit_tokens"] - xs["prefix_hit_tokens"]
    assert 0 < hit < 1000 and hit % 8 == 0, hit
    c, r = prefix_run["c"], prefix_run["c_res"]["c"]
    assert r["tokens"] == solo(model, c, 12, PREFIX["prefill_chunk"], temperature=0.0)[0]
    np.testing.assert_allclose(all_logprobs(r), full_log_softmax(model, c, r["tokens"]), atol=2e-4)
    eng = prefix_run["eng"]
    assert eng.pages.free_pages() == PREFIX_PAGES and not eng.pages._held


# ---- the deviceless plan (gptoss-jax aot --max-seqs N --kv-cache-gb G) -----------------------------
@pytest.mark.aot
@pytest.mark.parametrize("target,kernels", [("h100", "xla"), ("tpu-v5e", "pallas")])
def test_aot_reports_the_tokens_a_kv_budget_holds_per_device(tmp_path, target, kernels):
    """The engine's decode step over a paged cache of 0.05 GB per device compiles for 2 devices with
    the slots and pages split over data (XLA on H100; on TPU v5e the Pallas paged kernel, per page
    shard); 2 layers of 20b (one full, one sliding; bf16, 8 kv heads of 64): a page of 128 positions
    is 256 KiB (k and v; the full layer's pool, which also holds the sliding layer's snapshots), the
    4 rings of a device 1 MiB, so (5e7 - 2^20) // 2^18 = 186 pages, 23,808 tokens per device; the
    compiled arguments hold them."""
    from gptoss_jax import aot
    from gptoss_jax.config import preset
    from gptoss_jax.model import abstract_model, count_params

    cfg = preset("gpt-oss-20b").replace(num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    p = aot.plan(target, str(path), mesh_shape=dict(data=2), batch=1, max_len=1024, max_seqs=8, kv_cache_gb=0.05,
                 programs=("engine_decode",), kernels=kernels)
    text = aot.format_plan(p)
    print(text)
    k = p["paged_kv"]
    assert (k["page_size"], k["pages_per_device"], k["tokens_per_device"]) == (128, 186, 23808)
    assert k["slots_per_device"] == 4 and k["max_len_sequences_per_device"] == 23
    assert "23808 tokens per device" in text
    params = count_params(abstract_model(cfg, kernel_layout=kernels == "pallas"))[1]
    kv = 186 * 2 ** 18 + 2 ** 20
    lanes = 2 if target.startswith("tpu") else 1  # TPU lays the 64-wide head dim out in 128 lanes
    args = p["programs"]["engine_decode"]["argument_bytes"]
    assert params + kv <= args < params + lanes * kv + 2 ** 22  # + block tables, slot state (, tiling)
    with pytest.raises(ValueError, match="kv_cache_gb"):
        aot.plan(target, str(path), max_len=1024, kv_cache_gb=0.05, programs=("engine_decode",))
