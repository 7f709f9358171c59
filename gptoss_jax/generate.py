"""Generation: bucketed, chunked jit prefill into the KV cache, then an on-device decode loop.

The decode loop is one `lax.while_loop` (no host round trip per token); `generate_stream` runs the
same step from the host to yield tokens as they come. Batch rows may have different prompt lengths
(right-padded): every row keeps its own positions and cache length.

Nothing a request sets recompiles: the sampling parameters are per-row traced arrays
(`SamplingState`), and the decode loop's static length is `decode_bucket(max_new_tokens)` (a power of
two) with the loop stopping at the traced count. Compiles happen per prompt-chunk and cache-size
bucket only. `prefill_step` and `decode_step` are the public single steps (used by `aot`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import GptOss, KVCache, check_token_ids
from .sampling import sample_rows, token_logprobs, validate_sampling

MIN_BUCKET = 16


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, N] int32; after a row stops, the pad id
    lengths: np.ndarray  # [B] tokens generated per row, its stop token included
    logprobs: np.ndarray | None = None  # [B, N] log-softmax of the raw logits at the chosen tokens


STOP_SLOTS = 8  # stop-token lists are padded to a multiple of this: one compile for the usual lengths


@flax.struct.dataclass
class SamplingState:
    """Per-row sampling parameters, traced inside the jitted steps: changing any of them never
    recompiles. temperature 0 is greedy, top_p 1 and top_k 0 turn the filters off; `key_data` holds
    the rows' PRNG keys as raw uint32 data (a plain array, placed like any other row array; step i
    draws with fold_in(key, i)); `stop_tokens` is padded with -1."""

    temperature: jax.Array  # [B] float32
    top_p: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    key_data: jax.Array  # [B, 2] uint32 (jax.random.key_data of the rows' keys)
    stop_tokens: jax.Array  # [S] int32
    pad_id: jax.Array  # [] int32

    @classmethod
    def create(cls, batch: int, *, temperature, top_p, top_k, seed: int, stop_tokens, pad_id: int) -> "SamplingState":
        """The same settings for every row; row b draws from fold_in(key(seed), b)."""
        stops = list(stop_tokens) or [-1]
        stops += [-1] * (-len(stops) % STOP_SLOTS)
        rows = jnp.arange(batch, dtype=jnp.uint32)
        return cls(temperature=jnp.full((batch,), temperature, jnp.float32),
                   top_p=jnp.full((batch,), top_p, jnp.float32),
                   top_k=jnp.full((batch,), 0 if top_k is None else top_k, jnp.int32),
                   key_data=jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), rows)),
                   stop_tokens=jnp.asarray(stops, jnp.int32), pad_id=jnp.asarray(pad_id, jnp.int32))


def next_pow2(n: int) -> int:
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


def decode_bucket(max_new_tokens: int) -> int:
    """Static length of the decode loop: max_new_tokens rounded up to a power of two (>= MIN_BUCKET),
    so the values of one bucket share a compile (the loop stops at the traced count)."""
    return max(MIN_BUCKET, next_pow2(max_new_tokens))


def _pick(logits_BV, s: SamplingState, i):
    keys = jax.vmap(jax.random.fold_in, (0, None))(jax.random.wrap_key_data(s.key_data), i)
    tok = sample_rows(logits_BV, keys, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    return tok, token_logprobs(logits_BV, tok)


def _is_stop(tok, s: SamplingState):
    return jnp.isin(tok, s.stop_tokens)


def _rows_spec(model: GptOss, batch: int, ndim: int = 1):
    return model.runtime.spec(("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1))


def _step(model: GptOss, cache, tok_B, done_B, s: SamplingState, i):
    """One decode step: feed the last token of each row, sample the next."""
    B = tok_B.shape[0]
    logits, cache = model.forward_cached(tok_B[:, None], cache, jnp.ones((B,), jnp.int32),
                                         logits_at_B=jnp.zeros((B,), jnp.int32))
    new, lp = _pick(logits, s, i)
    return jnp.where(done_B, s.pad_id, new), lp, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill_first(graphdef, state, ids_BT, n_new_B, last_B, max_len: int):
    model = nnx.merge(graphdef, state)
    cache = model.runtime.constrain_cache(KVCache.init(model.config, ids_BT.shape[0], max_len, model.dtype))
    return model.forward_cached(ids_BT, cache, n_new_B, cache_empty=True, logits_at_B=last_B)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_step(graphdef, state, ids_BT, cache, n_new_B, last_B):
    """One prefill chunk into a non-empty cache: (logits [B, V] at each row's `last_B`, cache)."""
    model = nnx.merge(graphdef, state)
    return model.forward_cached(ids_BT, cache, n_new_B, logits_at_B=last_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _decode_loop(graphdef, state, cache, logits0_BV, s: SamplingState, n_steps, steps: int):
    """Up to `n_steps` (traced) tokens per row in one while_loop over a [B, steps] buffer."""
    model = nnx.merge(graphdef, state)
    B = logits0_BV.shape[0]

    def loop(model, cache, logits0_BV, s, n_steps):
        tok, lp = _pick(logits0_BV, s, 0)
        tokens = jnp.full((B, steps), s.pad_id, jnp.int32).at[:, 0].set(tok)
        lps = jnp.zeros((B, steps), jnp.float32).at[:, 0].set(lp)
        carry = (jnp.int32(1), cache, tok, tokens, lps, _is_stop(tok, s), jnp.ones((B,), jnp.int32))

        def cond(c):
            return (c[0] < n_steps) & ~jnp.all(c[5])

        def body(c):
            i, cache, tok, tokens, lps, done, lengths = c
            new, lp, cache = _step(model, cache, tok, done, s, i)
            lengths = lengths + (~done).astype(jnp.int32)
            return (i + 1, cache, new, tokens.at[:, i].set(new), lps.at[:, i].set(lp),
                    done | _is_stop(new, s), lengths)

        _, _, _, tokens, lps, _, lengths = jax.lax.while_loop(cond, body, carry)
        return tokens, lps, lengths

    specs = (_rows_spec(model, B, 2), _rows_spec(model, B, 2), _rows_spec(model, B))
    return model.within_runtime(loop, specs, cache, logits0_BV, s, n_steps)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef, state, cache, tok_B, done_B, s: SamplingState, i):
    """One decode step for every row: (next token [B] (pad once done), its logprob [B], cache)."""
    model = nnx.merge(graphdef, state)
    B = tok_B.shape[0]
    specs = (_rows_spec(model, B), _rows_spec(model, B), model.runtime.cache_specs(cache))
    return model.within_runtime(_step, specs, cache, tok_B, done_B, s, i)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _pick_first(graphdef, state, logits_BV, s: SamplingState):
    model = nnx.merge(graphdef, state)
    B = logits_BV.shape[0]
    return model.within_runtime(lambda _, logits, s: _pick(logits, s, 0), (_rows_spec(model, B),) * 2,
                                logits_BV, s)


def _setup(model: GptOss, input_ids, max_new_tokens, temperature, top_p, top_k, seed, stop_tokens, prompt_lengths,
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
    s = SamplingState.create(len(ids), temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_tokens=stops, pad_id=int(pad))
    s = s.replace(**{f: model.runtime.place_batch(getattr(s, f)) for f in ("temperature", "top_p", "top_k", "key_data")})
    # the cache holds the whole decode bucket, so max_new_tokens values of one bucket share a compile
    max_len = min(max(next_pow2(longest + decode_bucket(max_new_tokens)), 64), cfg.max_position_embeddings)
    return ids, lengths, s, max_len, max(MIN_BUCKET, int(prefill_chunk))


def _prefill(model: GptOss, graphdef, state, ids, lengths, max_len, chunk):
    """Bucketed (power-of-two, chunk-capped) prefill; returns (cache, logits at each row's last token).
    Host arrays enter as global arrays (`Runtime.place_batch`), so this runs on several processes too."""
    B, longest = ids.shape
    T = min(max(MIN_BUCKET, next_pow2(longest)), chunk)
    n_chunks = -(-longest // T)
    padded = np.zeros((B, n_chunks * T), np.int32)
    padded[:, :longest] = ids
    put = model.runtime.place_batch
    cache = last_logits = None
    for c in range(n_chunks):
        n_new = put(np.clip(lengths - c * T, 0, T).astype(np.int32))
        last = put(np.clip(lengths - c * T - 1, 0, T - 1).astype(np.int32))
        chunk_ids = put(padded[:, c * T:(c + 1) * T])
        if cache is None:
            logits, cache = _prefill_first(graphdef, state, chunk_ids, n_new, last, max_len)
        else:
            logits, cache = prefill_step(graphdef, state, chunk_ids, cache, n_new, last)
        ends_here = (lengths > c * T) & (lengths <= (c + 1) * T)
        last_logits = logits if last_logits is None else _select_rows(put(ends_here), logits, last_logits)
    return cache, last_logits


@jax.jit
def _select_rows(take_B, new_BV, old_BV):
    return jnp.where(take_B[:, None], new_BV, old_BV)


def generate(model: GptOss, input_ids, *, max_new_tokens: int, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, return_logprobs: bool = False, prompt_lengths=None,
             prefill_chunk: int = 512, json_schema=None, max_reasoning_tokens: int | None = None) -> GenerationResult:
    """Sample up to `max_new_tokens` per row. temperature 0 is greedy; defaults (temperature, top_p, stop
    tokens) come from the checkpoint's generation_config.json. `input_ids`: a [B, T] array (with optional
    `prompt_lengths` for right-padded rows) or a list of token lists of different lengths.

    `json_schema`: the rows are harmony prompts (`harmony.render_prompt`) and each reply is harmony
    whose final answer validates against the schema (an analysis message of at most
    `max_reasoning_tokens` first, default half of max_new_tokens); it runs on the serving engine,
    which applies the grammar's token masks (row b samples with seed + b), see docs/structured.md."""
    if json_schema is not None or max_reasoning_tokens is not None:
        from .engine import generate_constrained  # per-token host masks: the engine's loop, not this one

        return generate_constrained(model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, seed=seed, stop_tokens=stop_tokens,
                                    return_logprobs=return_logprobs, prompt_lengths=prompt_lengths,
                                    prefill_chunk=prefill_chunk, json_schema=json_schema,
                                    max_reasoning_tokens=max_reasoning_tokens)
    ids, lengths, s, max_len, chunk = _setup(model, input_ids, max_new_tokens, temperature, top_p, top_k, seed,
                                             stop_tokens, prompt_lengths, prefill_chunk)
    graphdef, state = nnx.split(model)
    cache, logits0 = _prefill(model, graphdef, state, ids, lengths, max_len, chunk)
    tokens, lps, n = _decode_loop(graphdef, state, cache, logits0, s, np.int32(max_new_tokens),
                                  decode_bucket(max_new_tokens))
    n_out = int(max_new_tokens)
    return GenerationResult(tokens=np.asarray(tokens)[:, :n_out], lengths=np.asarray(n),
                            logprobs=np.asarray(lps)[:, :n_out] if return_logprobs else None)


def generate_stream(model: GptOss, input_ids, *, max_new_tokens: int, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, seed: int = 0,
                    stop_tokens: Sequence[int] | None = None, prompt_lengths=None,
                    prefill_chunk: int = 512) -> Iterator[np.ndarray]:
    """Like `generate`, yielding the next token of every row ([B] int32) as soon as it is sampled;
    rows that have stopped yield the pad id. Same seed, same tokens as `generate`."""
    ids, lengths, s, max_len, chunk = _setup(model, input_ids, max_new_tokens, temperature, top_p, top_k, seed,
                                             stop_tokens, prompt_lengths, prefill_chunk)
    graphdef, state = nnx.split(model)
    cache, logits0 = _prefill(model, graphdef, state, ids, lengths, max_len, chunk)
    tok, _ = _pick_first(graphdef, state, logits0, s)
    done = _is_stop(tok, s)
    yield np.asarray(tok)
    for i in range(1, max_new_tokens):
        if bool(jnp.all(done)):
            return
        tok, _, cache = decode_step(graphdef, state, cache, tok, done, s, jnp.int32(i))
        yield np.asarray(tok)
        done = done | _is_stop(tok, s)
