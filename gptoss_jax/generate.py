"""Generation: bucketed, chunked jit prefill into the KV cache, then an on-device decode loop.

The decode loop is one `lax.while_loop` (no host round trip per token); `generate_stream` runs the
same step from the host to yield tokens as they come. Batch rows may have different prompt lengths
(right-padded): every row keeps its own positions and cache length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import GptOss, KVCache, check_token_ids
from .sampling import sample, token_logprobs, validate_sampling

MIN_BUCKET = 16


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, N] int32; after a row stops, the pad id
    lengths: np.ndarray  # [B] tokens generated per row, its stop token included
    logprobs: np.ndarray | None = None  # [B, N] log-softmax of the raw logits at the chosen tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int | None
    stop_tokens: tuple[int, ...]
    pad_id: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _int_row(r, what: str) -> np.ndarray:
    """One prompt as a 1-D integer array; floats and bools are refused, not truncated."""
    a = np.asarray(r)
    if a.size == 0:
        raise ValueError(f"{what} is empty: every row needs at least one token")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer token ids, got {a.dtype} values")
    if a.ndim != 1:
        raise ValueError(f"{what} must be a flat list of token ids, got shape {a.shape}")
    return a


def prepare_prompts(input_ids, vocab_size: int, prompt_lengths=None) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows (lists / 1-D arrays) or a [B, T] array -> (right-padded ids, lengths).
    `prompt_lengths` (with a [B, T] array only): one length per row, each in [1, T]."""
    if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths goes with a [batch, tokens] array; a list of token lists "
                             "gives each row's length itself")
        rows = [_int_row(r, f"prompt {b}") for b, r in enumerate(input_ids)]
    else:
        arr = np.asarray(input_ids)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens] or a list of token lists, got shape {arr.shape}")
        if arr.size:
            _int_row(arr.reshape(-1), "input_ids")
        if prompt_lengths is None:
            lens = np.full(arr.shape[0], arr.shape[1])
        else:
            lens = np.asarray(prompt_lengths)
            if lens.dtype.kind not in "iu" or lens.shape != (arr.shape[0],):
                raise ValueError(f"prompt_lengths must be {arr.shape[0]} integers (one per row), got "
                                 f"{lens.dtype} of shape {lens.shape}")
            bad = (lens < 1) | (lens > arr.shape[1])
            if bad.any():
                b = int(np.argmax(bad))
                raise ValueError(f"prompt_lengths[{b}] = {int(lens[b])} is not in [1, {arr.shape[1]}] "
                                 "(the row's tokens)")
        rows = [arr[b, :int(n)] for b, n in enumerate(lens)]
    if not rows:
        raise ValueError("input_ids holds no prompt")
    lengths = np.array([len(r) for r in rows], np.int32)
    if (lengths == 0).any():
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty: every row needs at least one token")
    ids = np.zeros((len(rows), int(lengths.max())), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    check_token_ids(ids, vocab_size)
    return ids.astype(np.int32), lengths


def _pick(logits_BV, key, i, s: Sampling):
    tok = sample(logits_BV, jax.random.fold_in(key, i), temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    return tok, token_logprobs(logits_BV, tok)


def _is_stop(tok, s: Sampling):
    return jnp.isin(tok, jnp.asarray(s.stop_tokens or (-1,), jnp.int32))


def _step(model: GptOss, cache, tok_B, done_B, key, i, s: Sampling):
    """One decode step: feed the last token of each row, sample the next."""
    B = tok_B.shape[0]
    logits, cache = model.forward_cached(tok_B[:, None], cache, jnp.ones((B,), jnp.int32),
                                         logits_at_B=jnp.zeros((B,), jnp.int32))
    new, lp = _pick(logits, key, i, s)
    return jnp.where(done_B, s.pad_id, new), lp, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill_first(graphdef, state, ids_BT, n_new_B, last_B, max_len: int):
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.config, ids_BT.shape[0], max_len, model.dtype)
    if getattr(model, "mesh", None) is not None:
        from .sharding import constrain_cache
        cache = constrain_cache(cache, model.mesh, model.sharding_rules)
    return model.forward_cached(ids_BT, cache, n_new_B, cache_empty=True, logits_at_B=last_B)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill_next(graphdef, state, ids_BT, cache, n_new_B, last_B):
    model = nnx.merge(graphdef, state)
    return model.forward_cached(ids_BT, cache, n_new_B, logits_at_B=last_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "s"))
def _decode_loop(graphdef, state, cache, logits0_BV, key, steps: int, s: Sampling):
    model = nnx.merge(graphdef, state)
    B = logits0_BV.shape[0]
    tok, lp = _pick(logits0_BV, key, 0, s)
    tokens = jnp.full((B, steps), s.pad_id, jnp.int32).at[:, 0].set(tok)
    lps = jnp.zeros((B, steps), jnp.float32).at[:, 0].set(lp)
    carry = (jnp.int32(1), cache, tok, tokens, lps, _is_stop(tok, s), jnp.ones((B,), jnp.int32))

    def cond(c):
        return (c[0] < steps) & ~jnp.all(c[5])

    def body(c):
        i, cache, tok, tokens, lps, done, lengths = c
        new, lp, cache = _step(model, cache, tok, done, key, i, s)
        lengths = lengths + (~done).astype(jnp.int32)
        return (i + 1, cache, new, tokens.at[:, i].set(new), lps.at[:, i].set(lp),
                done | _is_stop(new, s), lengths)

    _, _, _, tokens, lps, _, lengths = jax.lax.while_loop(cond, body, carry)
    return tokens, lps, lengths


@functools.partial(jax.jit, static_argnames=("graphdef", "s"), donate_argnames=("cache",))
def _decode_one(graphdef, state, cache, tok_B, done_B, key, i, s: Sampling):
    return _step(nnx.merge(graphdef, state), cache, tok_B, done_B, key, i, s)


@functools.partial(jax.jit, static_argnames=("s",))
def _pick_first(logits_BV, key, s: Sampling):
    return _pick(logits_BV, key, 0, s)


def _setup(model: GptOss, input_ids, max_new_tokens, temperature, top_p, top_k, stop_tokens, prompt_lengths,
           prefill_chunk):
    cfg = model.config
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    defaults = model.generation_defaults
    temperature = defaults.temperature if temperature is None else temperature
    top_p = defaults.top_p if top_p is None else top_p
    validate_sampling(temperature, top_p, top_k)
    ids, lengths = prepare_prompts(input_ids, cfg.vocab_size, prompt_lengths)
    longest = int(lengths.max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"context of {cfg.max_position_embeddings} tokens")
    stops = defaults.stop_tokens if stop_tokens is None else tuple(int(t) for t in stop_tokens)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None and cfg.pad_token_id < cfg.vocab_size else 0
    s = Sampling(float(temperature), float(top_p), None if top_k is None else int(top_k), stops, int(pad))
    max_len = min(max(_next_pow2(longest + max_new_tokens), 64), cfg.max_position_embeddings)
    return ids, lengths, s, max_len, max(MIN_BUCKET, int(prefill_chunk))


def _prefill(graphdef, state, ids, lengths, max_len, chunk):
    """Bucketed (power-of-two, chunk-capped) prefill; returns (cache, logits at each row's last token)."""
    B, longest = ids.shape
    T = min(max(MIN_BUCKET, _next_pow2(longest)), chunk)
    n_chunks = -(-longest // T)
    padded = np.zeros((B, n_chunks * T), np.int32)
    padded[:, :longest] = ids
    cache = last_logits = None
    for c in range(n_chunks):
        n_new = jnp.asarray(np.clip(lengths - c * T, 0, T).astype(np.int32))
        last = jnp.asarray(np.clip(lengths - c * T - 1, 0, T - 1).astype(np.int32))
        chunk_ids = jnp.asarray(padded[:, c * T:(c + 1) * T])
        if cache is None:
            logits, cache = _prefill_first(graphdef, state, chunk_ids, n_new, last, max_len)
        else:
            logits, cache = _prefill_next(graphdef, state, chunk_ids, cache, n_new, last)
        ends_here = jnp.asarray((lengths > c * T) & (lengths <= (c + 1) * T))[:, None]
        last_logits = logits if last_logits is None else jnp.where(ends_here, logits, last_logits)
    return cache, last_logits


def generate(model: GptOss, input_ids, *, max_new_tokens: int, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, return_logprobs: bool = False, prompt_lengths=None,
             prefill_chunk: int = 512) -> GenerationResult:
    """Sample up to `max_new_tokens` per row. temperature 0 is greedy; defaults (temperature, top_p, stop
    tokens) come from the checkpoint's generation_config.json. `input_ids`: a [B, T] array (with optional
    `prompt_lengths` for right-padded rows) or a list of token lists of different lengths."""
    ids, lengths, s, max_len, chunk = _setup(model, input_ids, max_new_tokens, temperature, top_p, top_k,
                                             stop_tokens, prompt_lengths, prefill_chunk)
    graphdef, state = nnx.split(model)
    cache, logits0 = _prefill(graphdef, state, ids, lengths, max_len, chunk)
    tokens, lps, n = _decode_loop(graphdef, state, cache, logits0, jax.random.key(seed), int(max_new_tokens), s)
    return GenerationResult(tokens=np.asarray(tokens), lengths=np.asarray(n),
                            logprobs=np.asarray(lps) if return_logprobs else None)


def generate_stream(model: GptOss, input_ids, *, max_new_tokens: int, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, seed: int = 0,
                    stop_tokens: Sequence[int] | None = None, prompt_lengths=None,
                    prefill_chunk: int = 512) -> Iterator[np.ndarray]:
    """Like `generate`, yielding the next token of every row ([B] int32) as soon as it is sampled;
    rows that have stopped yield the pad id. Same seed, same tokens as `generate`."""
    ids, lengths, s, max_len, chunk = _setup(model, input_ids, max_new_tokens, temperature, top_p, top_k,
                                             stop_tokens, prompt_lengths, prefill_chunk)
    graphdef, state = nnx.split(model)
    cache, logits0 = _prefill(graphdef, state, ids, lengths, max_len, chunk)
    key = jax.random.key(seed)
    tok, _ = _pick_first(logits0, key, s)
    done = _is_stop(tok, s)
    yield np.asarray(tok)
    for i in range(1, max_new_tokens):
        if bool(jnp.all(done)):
            return
        tok, _, cache = _decode_one(graphdef, state, cache, tok, done, key, jnp.int32(i), s)
        yield np.asarray(tok)
        done = done | _is_stop(tok, s)
