"""Generation: cached decoding vs full forwards and transformers, batching, sampling, errors, CLI."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from gptoss_jax import load_model, write_random_checkpoint
from gptoss_jax.generate import generate, generate_stream
from gptoss_jax.model import KVCache

from helpers import REPO, checkpoint_fixtures, hf_reference, random_ids, tiny_config

CFG = tiny_config()  # window 16: prompts of 40 tokens wrap the ring buffer


ckpt, model = checkpoint_fixtures(CFG, "gen", seed=11, num_shards=2)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sliding_layers_hold_a_ring_of_window_slots(model):
    cache = KVCache.init(CFG, 2, 256, np.float32)
    for i, kind in enumerate(CFG.layer_types):
        assert cache.k[i].shape[1] == (CFG.sliding_window if kind == "sliding_attention" else 256)


def test_greedy_cache_equals_full_forward_argmax(model):
    """One uncached forward over prompt + generated tokens gives every step's logits (causality)."""
    ids = random_ids(CFG, 1, 40, seed=3)
    n = 24
    out = generate(model, ids, max_new_tokens=n, temperature=0, return_logprobs=True, stop_tokens=())
    full = np.asarray(model(np.concatenate([ids, out.tokens], axis=1)))[0, ids.shape[1] - 1:-1]  # [n, V]
    np.testing.assert_array_equal(out.tokens[0], full.argmax(-1))
    np.testing.assert_allclose(out.logprobs[0], log_softmax(full)[np.arange(n), full.argmax(-1)], atol=1e-4)


def test_greedy_equals_transformers_generate(model, ckpt):
    ref = hf_reference(ckpt)
    ids = random_ids(CFG, 1, 40, seed=5)
    n = 24
    with torch.no_grad():
        hf = ref.generate(torch.from_numpy(ids.astype(np.int64)), max_new_tokens=n, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    hf_tokens = hf.sequences[0, ids.shape[1]:].numpy()
    hf_lp = np.array([log_softmax(l[0].float().numpy())[t] for l, t in zip(hf.logits, hf_tokens)])
    out = generate(model, ids, max_new_tokens=n, temperature=0, return_logprobs=True, stop_tokens=())
    np.testing.assert_array_equal(out.tokens[0], hf_tokens)
    np.testing.assert_allclose(out.logprobs[0], hf_lp, atol=1e-3)


def test_pallas_generation_matches_xla(model, ckpt):
    """kernels="pallas": prefill (chunked, so later chunks go through the decode kernel against the
    ring buffer) and decode give the XLA path's greedy tokens and logprobs, rows of different lengths."""
    pallas = load_model(ckpt, dtype="float32", kernels="pallas", progress=False)
    rows = [list(random_ids(CFG, 1, n, seed=n)[0]) for n in (40, 23)]
    ref = generate(model, rows, max_new_tokens=20, temperature=0, return_logprobs=True, stop_tokens=())
    for chunk in (512, 16):
        out = generate(pallas, rows, max_new_tokens=20, temperature=0, return_logprobs=True, stop_tokens=(),
                       prefill_chunk=chunk)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)


def test_rows_of_different_lengths_match_each_row_alone(model):
    rows = [list(random_ids(CFG, 1, n, seed=n)[0]) for n in (5, 37, 21)]
    together = generate(model, rows, max_new_tokens=10, temperature=0)
    for b, row in enumerate(rows):
        alone = generate(model, [row], max_new_tokens=10, temperature=0)
        np.testing.assert_array_equal(alone.tokens[0], together.tokens[b])


def test_chunked_prefill_and_streaming_match(model):
    ids = random_ids(CFG, 2, 45, seed=9)
    ref = generate(model, ids, max_new_tokens=12, temperature=0.8, seed=4)
    chunked = generate(model, ids, max_new_tokens=12, temperature=0.8, seed=4, prefill_chunk=16)
    streamed = np.stack(list(generate_stream(model, ids, max_new_tokens=12, temperature=0.8, seed=4)), axis=1)
    np.testing.assert_array_equal(chunked.tokens, ref.tokens)
    np.testing.assert_array_equal(streamed, ref.tokens)


def test_seed_reproducible_and_varies(model):
    ids = random_ids(CFG, 1, 20, seed=1)
    a = generate(model, ids, max_new_tokens=16, seed=123)
    b = generate(model, ids, max_new_tokens=16, seed=123)
    c = generate(model, ids, max_new_tokens=16, seed=124)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def first_token_logits(model, prompt):
    return np.asarray(model(np.array([prompt])))[0, -1]


def test_sampling_follows_the_model_distribution(model):
    """Chi-square of 4000 first tokens against softmax(logits / T) (one prompt, a batch of rows);
    tokens ranked by probability are pooled into bins of >= 40 expected draws."""
    from scipy import stats

    n, T = 4000, 0.5
    prompt = list(random_ids(CFG, 1, 12, seed=2)[0])
    p = np.exp(log_softmax(first_token_logits(model, prompt).astype(np.float64) / T))
    out = generate(model, [prompt] * n, max_new_tokens=1, temperature=T, seed=0)
    counts = np.bincount(out.tokens[:, 0], minlength=CFG.vocab_size)
    order = np.argsort(-p)
    bins = np.minimum(np.floor(np.cumsum(p[order]) * n / 40).astype(int), int(n / 40) - 1)
    obs = np.bincount(bins, weights=counts[order])
    exp = np.bincount(bins, weights=p[order]) * n
    assert len(obs) >= 50
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # and the test has power: a distribution at another temperature is rejected
    q = np.exp(log_softmax(first_token_logits(model, prompt).astype(np.float64) / (2 * T)))
    assert stats.chisquare(obs, np.bincount(bins, weights=q[order]) * n).pvalue < 1e-3


def test_top_k_and_top_p_keep_exactly_the_right_tokens(model):
    prompt = list(random_ids(CFG, 1, 12, seed=2)[0])
    logits = first_token_logits(model, prompt)
    order = np.argsort(-logits)
    out = generate(model, [prompt] * 500, max_new_tokens=1, temperature=5.0, top_k=3, seed=1)
    assert set(out.tokens[:, 0]) == set(order[:3])
    p = np.exp(log_softmax(logits / 5.0))[order]
    n_keep = int(np.searchsorted(np.cumsum(p), 0.05) + 1)  # smallest prefix with mass >= 0.05
    out = generate(model, [prompt] * 500, max_new_tokens=1, temperature=5.0, top_p=0.05, seed=1)
    assert set(out.tokens[:, 0]) <= set(order[:n_keep]) and len(set(out.tokens[:, 0])) > 1


def test_stop_tokens_end_a_row(model):
    ids = random_ids(CFG, 1, 20, seed=6)
    free = generate(model, ids, max_new_tokens=12, temperature=0, stop_tokens=())
    stop = int(free.tokens[0, 3])
    first = int(np.argmax(free.tokens[0] == stop))
    out = generate(model, ids, max_new_tokens=12, temperature=0, stop_tokens=[stop])
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert (out.tokens[0, first + 1:] == 0).all()  # pad id (tiny config has none in vocab: 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=[[]]), "empty"),
    (dict(input_ids=[[1, 2]], max_new_tokens=CFG.max_position_embeddings), "exceeds the model's context"),
    (dict(input_ids=[[1, CFG.vocab_size]]), "out of range"),
    (dict(input_ids=[[1, -1]]), "out of range"),
    (dict(input_ids=[[1]], temperature=-0.5), "temperature"),
    (dict(input_ids=[[1]], top_p=0.0), "top_p"),
    (dict(input_ids=[[1]], top_p=1.5), "top_p"),
    (dict(input_ids=[[1]], max_new_tokens=0), "max_new_tokens"),
])
def test_bad_input_is_a_clear_error(model, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, kwargs.pop("input_ids"), **kwargs)


@pytest.fixture(scope="module")
def full_vocab_ckpt(tmp_path_factory):
    cfg = tiny_config(vocab_size=201088, pad_token_id=199999, eos_token_id=200002, num_hidden_layers=2,
                      layer_types=("sliding_attention", "full_attention"))
    path = str(tmp_path_factory.mktemp("cli") / "hf")
    write_random_checkpoint(cfg, path, progress=False)
    return path


def run_cli(*args, stdin=""):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "gptoss_jax.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_cli_generate_raw_matches_the_api(full_vocab_ckpt):
    from gptoss_jax.tokenizer import load_tokenizer

    r = run_cli("generate", "--model", full_vocab_ckpt, "--prompt", "Hello world", "--raw", "--max-tokens", "6",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    enc = load_tokenizer()
    m = load_model(full_vocab_ckpt, dtype="bfloat16", kernels="xla", progress=False)
    want = generate(m, [enc.encode("Hello world")], max_new_tokens=6, temperature=0)
    toks = [t for t in want.tokens[0][:want.lengths[0]] if t not in m.generation_defaults.stop_tokens]
    assert r.stdout.strip() == enc.decode(toks).strip()


def test_cli_generate_shows_a_random_model_its_raw_text(full_vocab_ckpt):
    """A random model does not speak harmony: the reply is its raw text (it used to print nothing)."""
    from gptoss_jax.harmony import render_prompt
    from gptoss_jax.tokenizer import load_tokenizer

    r = run_cli("generate", "--model", full_vocab_ckpt, "--prompt", "Hello world", "--max-tokens", "6",
                "--temperature", "0", "--reasoning-effort", "low")
    assert r.returncode == 0, r.stderr
    m = load_model(full_vocab_ckpt, dtype="bfloat16", kernels="xla", progress=False)
    prompt = render_prompt([{"role": "user", "content": "Hello world"}], reasoning_effort="low")
    want = generate(m, [prompt], max_new_tokens=6, temperature=0)
    toks = [t for t in want.tokens[0][:want.lengths[0]] if t not in m.generation_defaults.stop_tokens]
    text = load_tokenizer().decode(toks)
    assert text.strip() and r.stdout.strip() == text.strip()
    assert "not valid harmony" in r.stderr


def test_cli_chat_runs_turns(full_vocab_ckpt):
    r = run_cli("chat", "--model", full_vocab_ckpt, "--max-tokens", "4", "--reasoning-effort", "low",
                stdin="hi\nhow are you\n\n")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.split("gpt-oss> ")[1:]
    assert len(replies) == 2 and all(reply.strip() for reply in replies)


def test_cli_reports_bad_model_path():
    r = run_cli("generate", "--model", "/no/such/model", "--prompt", "x")
    assert r.returncode != 0 and "no such folder" in r.stderr


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def test_sampling_settings_and_lengths_in_a_bucket_never_recompile(model):
    """temperature / top-p / top-k / seed are traced per-row arrays, and max_new_tokens values of one
    bucket share the decode loop: after the first call, 5 settings x 3 lengths compile nothing."""
    compiled = []

    def listener(event, duration, **kw):
        if event == BACKEND_COMPILE:
            compiled.append(kw.get("fun_name", "?"))

    ids = random_ids(CFG, 2, 20, seed=8)
    settings = [dict(temperature=0.7, top_p=0.9, top_k=None, seed=1), dict(temperature=1.3, top_p=1.0, top_k=5, seed=2),
                dict(temperature=0.0, top_p=1.0, top_k=None, seed=0), dict(temperature=0.5, top_p=0.5, top_k=50, seed=3),
                dict(temperature=1.0, top_p=0.95, top_k=1, seed=4)]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        generate(model, ids, max_new_tokens=20, temperature=0.9, top_p=0.8, top_k=3, seed=9)  # warm-up
        generate_stream_tokens = list(generate_stream(model, ids, max_new_tokens=20, temperature=0.9, seed=9))
        assert compiled, "the listener saw no compile at all"
        n_warm = len(compiled)
        outs = []
        for s in settings:
            for n in (17, 24, 32):  # one bucket (32)
                outs.append(generate(model, ids, max_new_tokens=n, **s))
                list(generate_stream(model, ids, max_new_tokens=n, **s))
        assert compiled[n_warm:] == [], compiled[n_warm:]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(generate_stream_tokens) == 20
    assert all(o.tokens.shape == (2, n) for o, n in zip(outs, [17, 24, 32] * 5))
    # one bucket, traced lengths: the greedy runs of 17 / 24 / 32 tokens are prefixes of each other
    g17, g24, g32 = outs[6:9]
    assert np.array_equal(g32.tokens[:, :17], g17.tokens) and np.array_equal(g32.tokens[:, :24], g24.tokens)
    assert list(g17.lengths) == [17, 17] and list(g32.lengths) == [32, 32]
