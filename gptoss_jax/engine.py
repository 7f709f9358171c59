"""Serving engine: continuous batching over fixed decode slots, per-request sampling (vLLM's shape).

    eng = Engine(model, max_seqs=16, max_len=8192, prefill_chunk=512)
    rid = eng.add_request(prompt_ids, SamplingParams(max_tokens=256, temperature=0.7, seed=1))
    while eng.has_unfinished_requests():
        for out in eng.step():          # RequestOutput(request_id, new_token_ids, finished, ...)
            ...

Each `step()` frees the slots of aborted requests, admits waiting requests into free slots (FIFO),
runs at most `prefill_chunk` prompt tokens of chunked prefill (each chunk a [1, T] batch against its
slot's cache row, T a power-of-two bucket), then one decode step over all `max_seqs` slots (one
shape; slots that are not decoding write nothing). Sampling parameters, seeds, stop tokens and
lengths are traced per-slot arrays (`SlotState`), so nothing a request sets compiles.

RNG rule: request key = fold_in(key(seed), 0), its i-th token drawn with fold_in(request key, i):
`generate()` of that prompt alone with the same seed draws the same (its row 0 key is the same),
and no other request changes it. With temperature 0 the tokens are `generate()`'s.

Overlap (`overlap=True`): `step()` dispatches step n, then fetches and reports the tokens of step
n - 1 (already computed, or computing while the host works): the only device -> host transfer is
the sampled ids (and their logprobs). Stops and lengths are decided on the device too, so the
one-step lag costs no extra token, only a finished slot's reuse one step later.

Several processes: process 0 owns the queue (`add_request` / `abort_request` there only). Each step
it decides (new requests, aborts, admissions, prefill chunks) and broadcasts the decision
(`multihost_utils.broadcast_one_to_all`); every process executes the same decision, so all run the
same device programs. Call `step()` and `has_unfinished_requests()` on every process in lockstep.

The KV cache is paged by default (`kv.PagedCache`, `kv.PagePool`): full-attention layers in pages
named by block tables, admission when a prompt's pages are free, preemption (re-queued, recomputed
from prompt + generated tokens) when a decoding request finds none, prefix caching of prompt pages.
`paged=False` keeps one contiguous row per slot (`kv.SlotCache`). The device programs see the cache
only through `init`, `prefill`, `decode` (and, paged, `with_tables`, `restore`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import time
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .generate import MIN_BUCKET, STOP_SLOTS, next_pow2
from .kv import BlockTables, PagedCache, PagePool, SlotCache, free_device_bytes
from .model import GptOss
from .sampling import sample_rows, token_logprobs, validate_sampling
from .structured import Grammar, request_grammar
from .structured.matcher import Constraint, ConstraintError, MaskBatch, mask_words

FINISH_REASONS = ("stop", "length", "abort")
log = logging.getLogger("gptoss_jax.engine")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature / top_p None: the checkpoint's generation defaults; top_k None
    and top_p 1 turn the filters off; temperature 0 is greedy. stop_token_ids None: the checkpoint's
    stop tokens (() for none). logprobs: report the log-softmax of the raw logits at each token."""

    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    stop_token_ids: Sequence[int] | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # also the most likely tokens at each step (<= the engine's top_logprobs)
    # Constrained decoding (docs/structured.md), at most one of the three: the reply is harmony (an
    # optional analysis message of at most max_reasoning_tokens, default max_tokens // 2, then the
    # final message) whose answer validates against `json_schema` (a dict or JSON text) or fully
    # matches `regex`; or it follows `grammar` (a `structured.Grammar` from `harmony_reply`, e.g. a
    # forced tool call, or llguidance lark text). Replies end within max_tokens for any weights.
    json_schema: Any = None
    regex: str | None = None
    grammar: Any = None
    max_reasoning_tokens: int | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: Any
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    logprobs: list[float] | None = None  # one per new token when the request asked for them
    # per new token, the (token id, logprob) of the most likely tokens, when the request asked
    top_logprobs: list[list[tuple[int, float]]] | None = None


# ---------------------------------------------------------------------------------------------
# Device side: per-slot state, the slot cache, the jitted programs
# ---------------------------------------------------------------------------------------------
@flax.struct.dataclass
class SlotState:
    """Everything the decode step needs per slot, traced (changing a value never compiles)."""

    tok: jax.Array  # [B] int32, the last token (the next decode step's input)
    n_gen: jax.Array  # [B] int32, tokens generated so far (the index of the next draw)
    max_tokens: jax.Array  # [B] int32
    live: jax.Array  # [B] bool, decoding (false: free, prefilling, finished)
    temperature: jax.Array  # [B] float32 (0 on slots that are not live: a greedy batch skips the filters)
    top_p: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32 (0: off)
    key_data: jax.Array  # [B, 2] uint32, the request keys (fold_in(key(seed), 0))
    stop: jax.Array  # [B, S] int32, padded with -1

    @classmethod
    def zeros(cls, batch: int, n_stop: int, key_shape) -> dict:
        """Host (numpy) fields of an all-free state."""
        return dict(tok=np.zeros(batch, np.int32), n_gen=np.zeros(batch, np.int32),
                    max_tokens=np.zeros(batch, np.int32), live=np.zeros(batch, bool),
                    temperature=np.zeros(batch, np.float32), top_p=np.ones(batch, np.float32),
                    top_k=np.zeros(batch, np.int32), key_data=np.zeros((batch,) + key_shape, np.uint32),
                    stop=np.full((batch, n_stop), -1, np.int32))


@flax.struct.dataclass
class RequestArrays:
    """One request's sampling values ([1] each, [1, 2] key, [1, S] stops) for its first token."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    seed_key: jax.Array  # [1, 2] uint32, key_data(key(seed))
    stop: jax.Array
    max_tokens: jax.Array
    mask: jax.Array  # [1, ceil(V / 32)] int32, the tokens allowed first (-1: all)
    n_gen: jax.Array  # [1] int32, tokens the request already has (a preempted one resumes): the draw's index


def _set(a, slot, value):
    return a.at[slot].set(value.astype(a.dtype))


def _replicate(model: GptOss, x):
    """x replicated on every device of the mesh (inside jit): what the host reads back."""
    cm = model.runtime.compute_mesh
    return x if cm is None else jax.lax.with_sharding_constraint(x, NamedSharding(cm, P()))


def _slot_specs(model: GptOss, slots):
    return jax.tree.map(lambda a: model.runtime.spec(("batch",) + (None,) * (a.ndim - 1), a.shape), slots)


def apply_masks(logits_NV, masks_NW):
    """Logits with -inf where the packed masks (bit t % 32 of word t // 32: token t allowed) say
    no. An all-ones mask returns the logits unchanged, bit for bit."""
    N, V = logits_NV.shape
    bits = (masks_NW[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(N, -1)[:, :V].astype(bool)
    return jnp.where(allowed, logits_NV, jnp.asarray(-jnp.inf, logits_NV.dtype))


def _logprobs(logits_NV, tok_N, k: int):
    """(logprob of tok [N], the k best logprobs [N, k], their ids [N, k]) of the raw logits."""
    lp = token_logprobs(logits_NV, tok_N)
    if not k:
        return lp, jnp.zeros(lp.shape + (0,), jnp.float32), jnp.zeros(lp.shape + (0,), jnp.int32)
    top_v, top_i = jax.lax.top_k(jax.nn.log_softmax(logits_NV.astype(jnp.float32), axis=-1), k)
    return lp, top_v, top_i.astype(jnp.int32)


def _sample_first(logits_1V, req: RequestArrays, k: int):
    """Token n = req.n_gen of a request (0, or where a preempted one resumes): drawn with
    fold_in(request key, n), request key = fold_in(key(seed), 0)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(req.seed_key[0]), 0)
    draw = jax.random.fold_in(key, req.n_gen[0])[None]
    tok = sample_rows(apply_masks(logits_1V, req.mask), draw, temperature=req.temperature, top_p=req.top_p,
                      top_k=req.top_k)
    return tok, _logprobs(logits_1V, tok, k), jax.random.key_data(key)


@functools.partial(jax.jit, static_argnames=("graphdef", "kv", "first", "finish", "top_logprobs"),
                   donate_argnames=("cache", "slots"))
def prefill_chunk(graphdef, state, cache, slots: SlotState, slot, ids_1T, n_new_1, req: RequestArrays, *,
                  kv: SlotCache | PagedCache, first: bool, finish: bool, top_logprobs: int = 0):
    """One prompt chunk into `slot`; the last chunk (`finish`) also samples the request's first token
    and makes the slot live. Returns (cache, slots, (token [1], (logprob [1], top values [1, k],
    top ids [1, k])) replicated)."""
    model = nnx.merge(graphdef, state)

    def body(model, cache, slots, slot, ids_1T, n_new_1, req):
        logits, cache = kv.prefill(model, cache, slot, ids_1T, n_new_1, first=first)
        if not finish:
            z = jnp.zeros((1,), jnp.int32)
            return cache, slots, (z, (z.astype(jnp.float32), jnp.zeros((1, top_logprobs), jnp.float32),
                                      jnp.zeros((1, top_logprobs), jnp.int32)))
        tok, lp, key_data = _sample_first(logits, req, top_logprobs)
        n_gen = req.n_gen[0] + 1
        live = ~jnp.isin(tok[0], req.stop[0]) & (req.max_tokens[0] > n_gen)
        slots = slots.replace(
            tok=_set(slots.tok, slot, tok[0]), n_gen=_set(slots.n_gen, slot, n_gen),
            max_tokens=_set(slots.max_tokens, slot, req.max_tokens[0]), live=_set(slots.live, slot, live),
            temperature=_set(slots.temperature, slot, jnp.where(live, req.temperature[0], 0.0)),
            top_p=_set(slots.top_p, slot, req.top_p[0]), top_k=_set(slots.top_k, slot, req.top_k[0]),
            key_data=_set(slots.key_data, slot, key_data), stop=_set(slots.stop, slot, req.stop[0]))
        return cache, slots, (_replicate(model, tok), tuple(_replicate(model, x) for x in lp))

    specs = (model.runtime.cache_specs(cache), _slot_specs(model, slots), (P(), (P(), P(), P())))
    return model.within_runtime(body, specs, cache, slots, slot, ids_1T, n_new_1, req)


@functools.partial(jax.jit, static_argnames=("graphdef", "kv", "steps", "top_logprobs"),
                   donate_argnames=("cache", "slots"))
def decode_slots(graphdef, state, cache, slots: SlotState, *, kv: SlotCache | PagedCache, steps: int = 1,
                 top_logprobs: int = 0):
    """`steps` tokens for every live slot (one shape: [max_seqs]); stops and lengths end slots here.
    Returns (cache, slots, (tokens, emitted (the slot was live), logprobs, top values, top ids)
    replicated, [steps, B] each (the top ones [steps, B, top_logprobs])).
    steps > 1 runs them in one while_loop (stopping early once no slot is live): one dispatch and one
    read-back per `steps` tokens, work on the parameters hoisted out of the loop."""
    model = nnx.merge(graphdef, state)
    B = slots.tok.shape[0]

    def one(model, cache, slots):
        logits, cache = kv.decode(model, cache, slots.tok, slots.live.astype(jnp.int32))
        slots, out = _sample_step(logits, slots, top_logprobs)
        return cache, slots, out

    def body(model, cache, slots):
        if steps == 1:
            cache, slots, out = one(model, cache, slots)
            out = tuple(x[None] for x in out)
        else:
            K = (top_logprobs,)
            zeros = (jnp.zeros((steps, B), jnp.int32), jnp.zeros((steps, B), bool), jnp.zeros((steps, B), jnp.float32),
                     jnp.zeros((steps, B) + K, jnp.float32), jnp.zeros((steps, B) + K, jnp.int32))

            def loop_body(c):
                i, cache, slots, out = c
                cache, slots, new = one(model, cache, slots)
                return i + 1, cache, slots, tuple(o.at[i].set(n) for o, n in zip(out, new))

            _, cache, slots, out = jax.lax.while_loop(lambda c: (c[0] < steps) & jnp.any(c[2].live), loop_body,
                                                      (jnp.int32(0), cache, slots, zeros))
        return cache, slots, tuple(_replicate(model, x) for x in out)

    specs = (model.runtime.cache_specs(cache), _slot_specs(model, slots), (P(),) * 5)
    return model.within_runtime(body, specs, cache, slots)


def _sample_step(logits, slots: SlotState, top_logprobs: int, masks=None):
    """One token for every live slot from its logits [B, V] (masked when `masks` is given; the
    logprobs are the raw logits'); stops and lengths end slots. Returns (slots, (tok, emitted, lp,
    top values, top ids))."""
    live = slots.live
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(slots.key_data), slots.n_gen)
    drawn_from = logits if masks is None else apply_masks(logits, masks)
    tok = sample_rows(drawn_from, keys, temperature=slots.temperature, top_p=slots.top_p, top_k=slots.top_k)
    lp, top_v, top_i = _logprobs(logits, tok, top_logprobs)
    n_gen = slots.n_gen + live.astype(jnp.int32)
    still = live & ~jnp.any(tok[:, None] == slots.stop, axis=1) & (n_gen < slots.max_tokens)
    slots = slots.replace(tok=jnp.where(live, tok, slots.tok), n_gen=n_gen, live=still,
                          temperature=jnp.where(still, slots.temperature, 0.0))
    return slots, (tok, live, lp, top_v, top_i)


@functools.partial(jax.jit, static_argnames=("graphdef", "kv"), donate_argnames=("cache",))
def forward_slots(graphdef, state, cache, slots: SlotState, *, kv: SlotCache | PagedCache):
    """The forward half of a constrained decode step: (cache, logits [B, V]) for every live slot's
    last token; the logits stay on the device for `sample_slots`, which takes the host's masks."""
    model = nnx.merge(graphdef, state)
    B, V = slots.tok.shape[0], model.config.vocab_size

    def body(model, cache, slots):
        logits, cache = kv.decode(model, cache, slots.tok, slots.live.astype(jnp.int32))
        return cache, logits

    specs = (model.runtime.cache_specs(cache), model.runtime.logits_spec((B, V)))
    return model.within_runtime(body, specs, cache, slots)


@functools.partial(jax.jit, static_argnames=("graphdef", "top_logprobs"), donate_argnames=("slots",))
def sample_slots(graphdef, state, logits, slots: SlotState, masks, *, top_logprobs: int = 0):
    """The sampling half: one token per live slot from `logits` [B, V] masked by `masks`
    [B, ceil(V / 32)] int32 (-1 rows: unconstrained, the same tokens as `decode_slots`). Returns
    (slots, outputs as `decode_slots`' with steps = 1)."""
    model = nnx.merge(graphdef, state)

    def body(model, logits, slots, masks):
        slots, out = _sample_step(logits, slots, top_logprobs, masks)
        return slots, tuple(_replicate(model, x[None]) for x in out)

    specs = (_slot_specs(model, slots), (P(),) * 5)
    return model.within_runtime(body, specs, logits, slots, masks)


@functools.partial(jax.jit, donate_argnames=("slots",))
def _deactivate(slots: SlotState, slot):
    """The slot stops decoding (elementwise, so it runs on a mesh of any axis type)."""
    off = jnp.arange(slots.live.shape[0]) == slot
    return slots.replace(live=slots.live & ~off, temperature=jnp.where(off, 0.0, slots.temperature))


def lower_decode(model: GptOss, kv: SlotCache | PagedCache):
    """`decode_slots` lowered from abstract shapes (the model may be abstract, its parameters
    ShapeDtypeStructs with shardings): what `gptoss-jax aot --max-seqs` compiles for a target."""
    rt = model.runtime
    cache = jax.eval_shape(lambda: kv.zeros(model))
    key_shape = tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)
    slots = jax.eval_shape(lambda: SlotState(**SlotState.zeros(kv.max_seqs, STOP_SLOTS, key_shape)))
    if rt.mesh is not None:
        place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(rt.mesh, s))  # noqa: E731
        cache = jax.tree.map(place, cache, rt.cache_specs(cache))
        slots = jax.tree.map(place, slots, _slot_specs(model, slots))
    graphdef, state = nnx.split(model)
    return decode_slots.lower(graphdef, state, cache, slots, kv=kv)


# ---------------------------------------------------------------------------------------------
# Host side: requests, scheduling, the step loop
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Request:
    rid: Any
    prompt: np.ndarray  # [L] int32
    p: dict  # resolved sampling values (JSON-able: what process 0 broadcasts)
    seq: int  # arrival order
    state: str = "waiting"  # waiting | prefill | decode
    slot: int | None = None
    cursor: int = 0  # prompt tokens already prefilled
    n_out: int = 0
    out: list = dataclasses.field(default_factory=list)  # tokens reported (a preempted request recomputes them)
    kv_len: int = 0  # positions written once everything dispatched has run (paged: pages cover them)
    chunk: int = 0  # prefill chunk bucket, set at admission
    constraint: Any = None  # structured.matcher.Constraint of a constrained request

    @property
    def tokens(self) -> np.ndarray:
        """What its prefill covers: the prompt, and after a preemption the tokens generated so far."""
        return np.concatenate([self.prompt, np.asarray(self.out, np.int32)]) if self.out else self.prompt

    @property
    def cap(self) -> int:
        """Positions it ever writes: the prompt and every generated token but the last."""
        return len(self.prompt) + self.p["max_tokens"] - 1


def _merge_output(outs: dict, o: RequestOutput) -> None:
    """Add `o` to the step's outputs, appending to an earlier one of the same request."""
    prev = outs.setdefault(o.request_id, o)
    if prev is o:
        return
    prev.new_token_ids += o.new_token_ids
    for name in ("logprobs", "top_logprobs"):
        if getattr(o, name):
            setattr(prev, name, (getattr(prev, name) or []) + getattr(o, name))
    if o.finished:
        prev.finished, prev.finish_reason = True, o.finish_reason


def _aborted(r: _Request) -> RequestOutput:
    return RequestOutput(r.rid, [], True, "abort", [] if r.p["logprobs"] else None, [] if r.p["top_logprobs"] else None)


@dataclasses.dataclass
class _Dispatched:
    """What one step put on the device, to read back: first tokens of finished prefills, then the
    decode step's tokens for the slots that were decoding (rid per slot at dispatch)."""

    firsts: list = dataclasses.field(default_factory=list)  # (rid, tok [1], lp [1])
    decode: tuple | None = None  # (tok, emitted, lp), [steps, B] each
    decode_rids: tuple = ()


class Engine:
    """Continuous batching over `max_seqs` fixed slots (see the module docstring).

    max_len: positions per slot (prompt + max_tokens <= max_len); prefill_chunk: prompt tokens per
    step at most (chunks are power-of-two buckets up to it, as `generate`'s); max_stop_tokens: the
    per-slot stop list width (one compile for any list up to it); overlap: report step n - 1's tokens
    while step n runs (False: each step waits for its own tokens); decode_steps: tokens per slot and
    step (one device program; > 1 amortises the per-dispatch cost, admissions then happen every
    `decode_steps` tokens); top_logprobs: how many most likely tokens every step also reports (a
    static width, one compile; requests ask for up to it, 0 turns it off).

    The KV cache (docs/engine.md): paged (default) with `page_size` positions per page (None: 128),
    `kv_cache_bytes` per device for the pages and rings (None: every slot can reach `max_len`, the
    contiguous cache's capacity) or `kv_cache_fraction` of the device's free memory, and prefix
    caching of prompt pages (`prefix_caching`); `paged=False`: one contiguous `max_len` row per slot."""

    def __init__(self, model: GptOss, max_seqs: int = 16, max_len: int = 8192, prefill_chunk: int = 512, *,
                 max_stop_tokens: int | None = None, overlap: bool = True, decode_steps: int = 1,
                 top_logprobs: int = 0, paged: bool = True, page_size: int | None = None,
                 kv_cache_bytes: int | None = None, kv_cache_fraction: float | None = None,
                 prefix_caching: bool = True):
        cfg = model.config
        for name, v in (("max_seqs", max_seqs), ("max_len", max_len), ("prefill_chunk", prefill_chunk),
                        ("decode_steps", decode_steps)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(top_logprobs, (int, np.integer)) or isinstance(top_logprobs, bool) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be a non-negative integer, got {top_logprobs!r}")
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's context of {cfg.max_position_embeddings} tokens")
        self.model = model
        self.max_seqs, self.max_len = int(max_seqs), int(max_len)
        self.prefill_chunk = max(MIN_BUCKET, int(prefill_chunk))
        defaults = model.generation_defaults
        n_stop = max(STOP_SLOTS, len(defaults.stop_tokens)) if max_stop_tokens is None else int(max_stop_tokens)
        self.max_stop_tokens = -(-n_stop // STOP_SLOTS) * STOP_SLOTS
        self.overlap = bool(overlap)
        self.decode_steps = int(decode_steps)
        self.top_logprobs = min(int(top_logprobs), cfg.vocab_size)
        self._graphdef, self._state = nnx.split(model)
        self._key_shape = tuple(jax.random.key_data(jax.random.key(0)).shape)
        self._host_keys = _host_seed_keys_match()
        self._multi = jax.process_count() > 1
        self._source = jax.process_index() == 0
        self.kv, self.pages, self._tables = self._make_cache(paged, page_size, kv_cache_bytes, kv_cache_fraction,
                                                             prefix_caching)
        self._reset_device()
        self._requests: dict[Any, _Request] = {}  # unfinished, by id
        self._waiting: collections.deque = collections.deque()  # rids, FIFO
        self._slots: list = [None] * self.max_seqs  # rid per slot
        self._inbox: list = []  # ("add", rid, prompt, p) / ("abort", rid) since the last step
        self._outbox: list[RequestOutput] = []  # aborts to report
        self._to_release: list[int] = []  # slots to deactivate on the device
        self._pending: list[_Dispatched] = []
        self._next_id = 0
        self._seq = 0
        # steps, decode_steps (those with a live slot), decode_tokens, prefill_tokens, output_tokens;
        # constrained_steps (decode steps with a constrained slot), masks and mask_seconds (host time);
        # paged: preemptions, prefix_hit_tokens (prompt tokens a prefix hit skipped)
        self.stats = collections.Counter()
        self._masks = MaskBatch(self.max_seqs, cfg.vocab_size)

    def _make_cache(self, paged, page_size, kv_cache_bytes, kv_cache_fraction, prefix_caching):
        """(device cache, host page pool, host block tables): the pool and tables None unpaged."""
        if not paged:
            if page_size is not None or kv_cache_bytes is not None or kv_cache_fraction is not None:
                raise ValueError("page_size, kv_cache_bytes and kv_cache_fraction size the paged cache: "
                                 "they need paged=True")
            return SlotCache(self.max_seqs, self.max_len), None, None
        if kv_cache_fraction is not None:
            if kv_cache_bytes is not None:
                raise ValueError("give kv_cache_bytes or kv_cache_fraction, not both")
            kv_cache_bytes = free_device_bytes(kv_cache_fraction)
            if self._multi:  # every process must size the same pools: process 0's figure
                raw = np.frombuffer(np.int64(kv_cache_bytes).tobytes(), np.uint8)
                kv_cache_bytes = int(np.frombuffer(_broadcast(raw, self._source).tobytes(), np.int64)[0])
        kv = PagedCache.create(self.model, self.max_seqs, self.max_len, page_size=page_size,
                               kv_cache_bytes=kv_cache_bytes, prefix_caching=prefix_caching)
        return kv, PagePool(kv, prefix_caching), BlockTables(kv)

    # ---- public API ----------------------------------------------------------------------------
    def add_request(self, prompt_token_ids, params: SamplingParams | None = None, request_id=None):
        """Queue a request; returns its id. Bad input raises ValueError here (nothing is queued)."""
        if not self._source:
            raise RuntimeError("add requests on process 0: it owns the queue and broadcasts it")
        prompt, p = self._check_request(prompt_token_ids, params)
        if request_id is None:
            while self._in_use(self._next_id):
                self._next_id += 1
            request_id = self._next_id
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
            raise ValueError(f"request_id must be a str or an int, got {request_id!r}")
        if self._in_use(request_id):
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        self._inbox.append(("add", request_id, prompt.tolist(), p))
        return request_id

    def abort_request(self, request_id) -> None:
        """Abort a waiting or running request: its slot frees at the next step (before admissions),
        which reports it finished with reason "abort". Finished or unknown ids are ignored (as vLLM)."""
        if not self._source:
            raise RuntimeError("abort requests on process 0: it owns the queue and broadcasts it")
        if self._in_use(request_id):
            self._inbox.append(("abort", request_id))

    def _in_use(self, rid) -> bool:
        return rid in self._requests or any(e[0] == "add" and e[1] == rid for e in self._inbox)

    def has_unfinished_requests(self) -> bool:
        """Anything queued, running or not yet reported (on several processes: process 0's answer,
        broadcast, so call it on every process)."""
        busy = bool(self._inbox or self._requests or self._pending or self._outbox)
        if self._multi:
            busy = bool(_broadcast(np.array([busy], np.int32), self._source)[0])
        return busy

    def num_free_slots(self) -> int:
        return sum(s is None for s in self._slots)

    def step(self) -> list[RequestOutput]:
        """Admit, prefill (<= prefill_chunk prompt tokens), decode every live slot; returns the
        outputs reported this step (one per request with news)."""
        self.stats["steps"] += 1
        if self._source:
            journal, self._inbox = self._inbox, []
            self._apply(journal)
            plan = dict(journal=journal, **self._schedule())
        else:
            plan = None
        if self._multi:
            plan = _broadcast_plan(plan, self._source)
            if not self._source:
                self._apply(plan["journal"])
        return self._execute(plan)

    def check_request(self, prompt_token_ids, params: SamplingParams | None = None) -> None:
        """What `add_request` checks, without queuing: raises ValueError on bad input. Reads only
        settings fixed at construction, so another thread may call it while this one steps."""
        self._check_request(prompt_token_ids, params)

    def num_waiting_requests(self) -> int:
        """Requests queued for a slot (those added since the last step included)."""
        return len(self._waiting) + sum(e[0] == "add" for e in self._inbox)

    # ---- validation ----------------------------------------------------------------------------
    def _check_request(self, prompt_token_ids, params):
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt_token_ids)
        return prompt, self._resolve(params, len(prompt))

    def _check_prompt(self, prompt) -> np.ndarray:
        """Host-only checks (no device work, so nothing compiles per prompt length)."""
        arr = np.asarray(prompt)
        if arr.ndim != 1:
            raise ValueError(f"a prompt is one list of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError("the prompt is empty: a request needs at least one token")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {arr.dtype}")
        V = self.model.config.vocab_size
        bad = np.flatnonzero((arr < 0) | (arr >= V))
        if bad.size:
            raise ValueError(f"token id {int(arr[bad[0]])} at {int(bad[0])} is out of range [0, {V})")
        return arr.astype(np.int32)

    def _resolve(self, sp: SamplingParams, n_prompt: int) -> dict:
        d = self.model.generation_defaults
        if not isinstance(sp.max_tokens, (int, np.integer)) or isinstance(sp.max_tokens, bool) or sp.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {sp.max_tokens!r}")
        if n_prompt + sp.max_tokens > self.max_len:
            raise ValueError(f"prompt of {n_prompt} tokens + max_tokens {sp.max_tokens} exceeds the engine's "
                             f"max_len of {self.max_len}")
        temperature = d.temperature if sp.temperature is None else sp.temperature
        top_p = d.top_p if sp.top_p is None else sp.top_p
        validate_sampling(temperature, top_p, sp.top_k)
        if not isinstance(sp.seed, (int, np.integer)) or isinstance(sp.seed, bool):
            raise ValueError(f"seed must be an integer, got {sp.seed!r}")
        stops = np.asarray(d.stop_tokens if sp.stop_token_ids is None else sp.stop_token_ids).reshape(-1)
        if stops.size and stops.dtype.kind not in "iu":
            raise ValueError(f"stop_token_ids must be integers, got {sp.stop_token_ids!r}")
        stops = [int(t) for t in stops]
        V = self.model.config.vocab_size
        if any(t < 0 or t >= V for t in stops):
            raise ValueError(f"stop token ids must be in [0, {V}), got {list(stops)}")
        if len(stops) > self.max_stop_tokens:
            raise ValueError(f"{len(stops)} stop tokens: at most {self.max_stop_tokens} (Engine(max_stop_tokens=))")
        k = sp.top_logprobs
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= self.top_logprobs:
            raise ValueError(f"top_logprobs must be an integer in [0, {self.top_logprobs}] "
                             f"(Engine(top_logprobs=)), got {k!r}")
        grammar = request_grammar(sp, V)
        if grammar is not None:  # the reply ends at the grammar's end tokens
            stops += [t for t in grammar.end_tokens if t not in stops]
            if len(stops) > self.max_stop_tokens:
                raise ValueError(f"{len(stops)} stop tokens with the grammar's: at most {self.max_stop_tokens}")
        return dict(max_tokens=int(sp.max_tokens), temperature=float(temperature), top_p=float(top_p),
                    top_k=0 if sp.top_k is None else min(int(sp.top_k), V), seed=int(sp.seed), stops=stops,
                    logprobs=bool(sp.logprobs), top_logprobs=int(k),
                    grammar=None if grammar is None else grammar.to_json())

    def _chunk_bucket(self, n: int) -> int:
        """Chunk size for n tokens to prefill: generate's cut (the next power of two, at least 16, at
        most prefill_chunk), so a request without a prefix hit is chunked as generate() chunks it."""
        return min(max(MIN_BUCKET, next_pow2(n)), self.prefill_chunk)

    # ---- scheduling (host only, process 0 decides) --------------------------------------------
    def _apply(self, journal) -> None:
        """Register new requests and apply aborts (host state only; the device follows in _execute)."""
        for entry in journal:
            if entry[0] == "add":
                _, rid, prompt, p = entry
                self._requests[rid] = r = _Request(rid, np.asarray(prompt, np.int32), p, self._seq)
                if p.get("grammar") is not None:
                    r.constraint = Constraint(Grammar.from_json(p["grammar"]), self.model.config.vocab_size)
                self._seq += 1
                self._waiting.append(rid)
            else:
                r = self._requests.get(entry[1])
                if r is not None:
                    self._finish(r, "abort")
                    self._outbox.append(_aborted(r))

    def _schedule(self) -> dict:
        """FIFO admissions into free slots, then prompt chunks within the token budget (FIFO).

        Paged: first every decoding request gets the pages its next decode dispatch writes, oldest
        first, preempting the youngest running request of its shard while none are left (`preempt`);
        then a waiting request is admitted when a shard has the pages of its prompt and first decode
        step (after its prefix hit, `restore`), else it and those behind it wait; each chunk gets
        snapshot pages for the prompt pages it fills. `tables`: the block-table changes."""
        pages = self.pages
        preempt = self._grow_decoding() if pages is not None else []
        free = [s for s, rid in enumerate(self._slots) if rid is None or rid in preempt]
        admit, restore, starts = [], [], {}
        busy = self._in_flight() if pages is not None else set()
        for rid in self._waiting:
            if not free or rid in busy:  # a preempted request waits for its last tokens to come back
                break
            if pages is None:
                slot = free[0]
            else:
                r = self._requests[rid]
                got = pages.admit(rid, r.tokens, free, min(len(r.tokens) + self.decode_steps, r.cap))
                if got is None:
                    break
                slot, starts[rid], snaps = got
                if starts[rid]:
                    restore.append((rid, slot, starts[rid], snaps))
            free.remove(slot)
            admit.append((rid, slot))
        admitted = dict(admit)
        prefilling = sorted((r for r in self._requests.values()
                             if (r.state == "prefill" and r.rid not in preempt) or r.rid in admitted),
                            key=lambda r: r.seq)
        chunks, budget = [], self.prefill_chunk
        for r in prefilling:
            slot = admitted.get(r.rid, r.slot)
            start = starts.get(r.rid, r.cursor)
            chunk = self._chunk_bucket(len(r.tokens) - start) if r.rid in admitted else r.chunk
            n = min(chunk, len(r.tokens) - start)
            if n > budget and chunks:
                break
            chunks.append((r.rid, slot, start, n))
            budget -= n
            if pages is not None:
                pages.snapshot(r.rid, start, n)
        plan = dict(admit=admit, chunks=chunks)
        if pages is not None:
            plan.update(preempt=preempt, restore=restore, tables=pages.take_changes())
        return plan

    def _grow_decoding(self) -> list:
        """Pages for each decoding request's next dispatch (oldest first); a shard out of pages
        preempts its youngest running request, the needy one itself when it is the youngest.
        Returns the preempted ids, youngest first."""
        running = sorted((r for r in self._requests.values() if r.slot is not None), key=lambda r: r.seq)
        preempt = []
        for r in running:
            if r.state != "decode" or r.rid in preempt:
                continue
            shard = self.pages.shard_of(r.slot)
            while not self.pages.grow(r.rid, min(r.kv_len + self.decode_steps, r.cap)):
                victim = max((v for v in running if v.rid not in preempt and self.pages.shard_of(v.slot) == shard),
                             key=lambda v: v.seq)
                self.pages.release(victim.rid)
                preempt.append(victim.rid)
                if victim is r:
                    break
        return preempt

    def _in_flight(self) -> set:
        """Requests with tokens dispatched but not yet reported."""
        return {rid for d in self._pending for rid in [f[0] for f in d.firsts] + list(d.decode_rids)
                if rid is not None}

    def _finish(self, r: _Request, reason: str) -> None:
        if r.slot is not None:
            if self._slots[r.slot] == r.rid:
                self._slots[r.slot] = None
                self.kv.release(r.slot)
            if reason == "abort":
                self._to_release.append(r.slot)
        if self.pages is not None:
            self.pages.release(r.rid)
        if r.rid in self._waiting:
            self._waiting.remove(r.rid)
        del self._requests[r.rid]

    def _preempt(self, rid) -> None:
        """Back to the head of the queue (its pages went back in `_schedule`): its slot stops decoding
        and it recomputes prompt + generated tokens once admitted again."""
        r = self._requests[rid]
        self._slots[r.slot] = None
        self._to_release.append(r.slot)
        r.state, r.slot, r.cursor, r.kv_len = "waiting", None, 0, 0
        self._waiting.appendleft(rid)
        self.stats["preemptions"] += 1

    # ---- execution (every process, the same plan) ---------------------------------------------
    def _execute(self, plan) -> list[RequestOutput]:
        for rid in plan.get("preempt", ()):
            self._preempt(rid)
        for slot in self._to_release:  # aborted requests' slots stop decoding before anything else
            self._slots_state = _deactivate(self._slots_state, self._rep(np.int32(slot)))
        self._to_release = []
        for rid, slot in plan["admit"]:
            r = self._requests[rid]
            self._waiting.remove(rid)
            r.state, r.slot, r.chunk = "prefill", slot, self._chunk_bucket(len(r.tokens))
            self._slots[slot] = rid
        if self.pages is not None:
            self._update_tables(plan)
        now = _Dispatched()
        outs: dict[Any, RequestOutput] = {}
        try:
            for rid, slot, start, n in plan["chunks"]:
                self._run_chunk(self._requests[rid], start, n, now)
            decoding = tuple(rid if rid is not None and self._requests[rid].state == "decode" else None
                             for rid in self._slots)
            if any(self._requests[rid].constraint is not None for rid in decoding if rid is not None):
                self._run_constrained_decode(decoding, now, outs)
            elif any(rid is not None for rid in decoding):
                self._run_decode(decoding, now)
        except BaseException:
            self._outbox = list(outs.values()) + self._outbox  # what this step read is reported next step
            raise
        finally:
            dispatched = bool(now.firsts or now.decode)
            if dispatched:
                self._pending.append(now)
        # overlap: report what ran before this step's dispatch; otherwise wait for this step too
        ready = self._pending[:-1] if self.overlap and dispatched else self._pending
        self._pending = self._pending[len(ready):]
        self._collect(ready, outs)
        return list(outs.values())

    def _update_tables(self, plan) -> None:
        """The plan's block-table changes to the device, then the prefix hits' rings and lengths."""
        self._tables.apply(plan["tables"])
        if self._tables.dirty:
            self._cache = self.kv.with_tables(self.model, self._cache, self._tables.pages, self._tables.snaps)
            self._tables.dirty = False
        for rid, slot, start, snaps in plan["restore"]:
            self._cache = self.kv.restore(self.model, self._cache, self._rep(np.int32(slot)),
                                          self._rep(np.int32(start)), self._rep(np.asarray(snaps, np.int32)))
            r = self._requests[rid]
            r.cursor = r.kv_len = start
            r.chunk = self._chunk_bucket(len(r.tokens) - start)
            self.stats["prefix_hit_tokens"] += start

    def _run_chunk(self, r: _Request, start: int, n: int, now: _Dispatched) -> None:
        tokens = r.tokens
        T, finish = r.chunk, start + n == len(tokens)
        ids = np.zeros((1, T), np.int32)
        ids[0, :n] = tokens[start:start + n]
        req = self._request_arrays(r) if finish else self._dummy_request
        try:
            self._cache, self._slots_state, (tok, lp) = self._prefill_call(
                self._cache, self._slots_state, self._rep(np.int32(r.slot)), self._rep(ids),
                self._rep(np.array([n], np.int32)), req, first=start == 0, finish=finish)
        except BaseException:
            self._fail([r.rid])
            raise
        self.stats["prefill_tokens"] += n
        r.cursor = r.kv_len = start + n
        if self.pages is not None:
            self.pages.filled(r.rid, r.cursor)
        if finish:
            r.state = "decode"
            now.firsts.append((r.rid, tok, lp))

    def _prefill_call(self, cache, slots, slot, ids, n_new, req, *, first, finish):
        return prefill_chunk(self._graphdef, self._state, cache, slots, slot, ids, n_new, req, kv=self.kv,
                             first=first, finish=finish, top_logprobs=self.top_logprobs)

    def _run_decode(self, decoding: tuple, now: _Dispatched) -> None:
        try:
            self._cache, self._slots_state, out = self._decode_call(self._cache, self._slots_state)
        except BaseException:
            self._fail([rid for rid in decoding if rid is not None])
            raise
        now.decode, now.decode_rids = out, decoding
        self._advance_lengths(decoding, self.decode_steps)

    def _advance_lengths(self, decoding: tuple, steps: int) -> None:
        """A decode dispatch writes up to `steps` positions per decoding request (the pages'
        bookkeeping: they stop earlier only when they finish)."""
        for rid in decoding:
            if rid is not None:
                r = self._requests[rid]
                r.kv_len = min(r.kv_len + steps, r.cap)

    def _run_constrained_decode(self, decoding: tuple, now: _Dispatched, outs: dict) -> None:
        """A decode step with constrained slots: one token per slot, in two programs. The forward
        is dispatched first; while it runs, the host reads the tokens sampled so far (its input
        tokens), advances the matchers and computes the masks; then the sampling program takes
        them. Constrained slots thus decode one token per step whatever `decode_steps` says."""
        rids = [rid for rid in decoding if rid is not None]
        try:
            self._cache, logits = self._forward_call(self._cache, self._slots_state)
        except BaseException:
            self._fail(rids)
            raise
        self._advance_lengths(decoding, 1)
        firsts, now.firsts = now.firsts, []
        self._collect(self._pending + [_Dispatched(firsts=firsts)], outs)
        self._pending = []
        constraints = {s: self._requests[rid].constraint for s, rid in enumerate(decoding)
                       if rid in self._requests and self._requests[rid].constraint is not None}
        masks = self._timed_mask(lambda: self._masks.fill(constraints), len(constraints))
        try:
            # a copy: the host buffer is refilled next step, and a CPU device array may alias it
            self._slots_state, out = self._sample_call(logits, self._slots_state,
                                                       self.model.runtime.place_batch(masks.copy()))
        except BaseException:
            self._fail(rids)
            raise
        self.stats["constrained_steps"] += 1
        now.decode, now.decode_rids = out, decoding

    def _forward_call(self, cache, slots):
        return forward_slots(self._graphdef, self._state, cache, slots, kv=self.kv)

    def _sample_call(self, logits, slots, masks):
        return sample_slots(self._graphdef, self._state, logits, slots, masks, top_logprobs=self.top_logprobs)

    def _decode_call(self, cache, slots):
        return decode_slots(self._graphdef, self._state, cache, slots, kv=self.kv, steps=self.decode_steps,
                            top_logprobs=self.top_logprobs)

    def _fail(self, rids) -> None:
        """A dispatch raised: abort the requests whose state it may have left half-written (all of
        them when the donated buffers are gone), so no slot stays taken."""
        lost = any(a.is_deleted() for a in jax.tree.leaves((self._cache, self._slots_state)))
        if lost:
            rids = [r.rid for r in self._requests.values() if r.state != "waiting"]
            self._reset_device()
        for rid in rids:
            r = self._requests.get(rid)
            if r is not None:
                self._finish(r, "abort")
                self._outbox.append(_aborted(r))
        if lost:
            self._to_release = []

    def _collect(self, ready: list[_Dispatched], outs: dict) -> None:
        """Read the sampled ids back (one transfer) and add them to `outs` (after the outputs waiting
        in the outbox); finished requests free their slot, constrained ones advance their matcher."""
        for o in self._outbox:
            _merge_output(outs, o)
        self._outbox = []
        host = _to_host([([(tok, lp) for _, tok, lp in d.firsts], d.decode) for d in ready])
        for d, (firsts, dec) in zip(ready, host):
            for (rid, _, _), (tok, (lp, top_v, top_i)) in zip(d.firsts, firsts):
                self._emit(outs, rid, int(tok[0]), float(lp[0]), top_v[0], top_i[0])
            if dec is not None:
                for tok, emitted, lp, top_v, top_i in zip(*dec):  # [steps, B] each
                    self.stats["decode_steps"] += int(emitted.any())
                    self.stats["decode_tokens"] += int(emitted.sum())
                    for slot, rid in enumerate(d.decode_rids):
                        if rid is not None and emitted[slot]:
                            self._emit(outs, rid, int(tok[slot]), float(lp[slot]), top_v[slot], top_i[slot])

    def _emit(self, outs, rid, tok: int, lp: float, top_v, top_i) -> None:
        r = self._requests.get(rid)
        if r is None:  # aborted or failed meanwhile: its in-flight tokens are dropped
            return
        k = r.p["top_logprobs"]
        o = outs.setdefault(rid, RequestOutput(rid, [], False, None, [] if r.p["logprobs"] else None,
                                               [] if k else None))
        o.new_token_ids.append(tok)
        r.out.append(tok)
        if o.logprobs is not None:
            o.logprobs.append(lp)
        if k:
            o.top_logprobs.append([(int(i), float(v)) for i, v in zip(top_i[:k], top_v[:k])])
        r.n_out += 1
        self.stats["output_tokens"] += 1
        reason = "stop" if tok in r.p["stops"] else "length" if r.n_out >= r.p["max_tokens"] else None
        if r.constraint is not None:
            try:
                r.constraint.advance(tok)
            except ConstraintError:  # a bug (the mask allowed it): end the request, keep serving
                log.exception("request %s: constrained decoding failed", rid)
                reason = "abort"
        if reason:
            o.finished, o.finish_reason = True, reason
            self._finish(r, reason)

    # ---- device state and host arrays ---------------------------------------------------------
    def _reset_device(self) -> None:
        self._cache = self.kv.init(self.model)
        if self.pages is not None:
            self.pages.reset()
            self._tables = BlockTables(self.kv)
        host = SlotState.zeros(self.max_seqs, self.max_stop_tokens, self._key_shape)
        self._slots_state = SlotState(**{k: self.model.runtime.place_batch(v) for k, v in host.items()})
        self._dummy_request = self._request_arrays(None)

    def _rep(self, host):
        """A host array (the same on every process) as an input of the engine's programs."""
        rt = self.model.runtime
        if rt.mesh is None:
            return jnp.asarray(host)
        from .sharding import put_global
        return put_global(np.asarray(host), NamedSharding(rt.mesh, P()))

    def _request_arrays(self, r: _Request | None) -> RequestArrays:
        p = r.p if r is not None else dict(temperature=0.0, top_p=1.0, top_k=0, seed=0, stops=[], max_tokens=1)
        n_gen = 0 if r is None else len(r.out)
        if r is not None and r.constraint is not None:  # its matcher has consumed the tokens so far
            mask = self._timed_mask(r.constraint.initial_mask)
        else:
            mask = np.full((1, mask_words(self.model.config.vocab_size)), -1, np.int32)
        stop = np.full((1, self.max_stop_tokens), -1, np.int32)
        stop[0, :len(p["stops"])] = p["stops"]
        key = _seed_key(p["seed"], self._host_keys)
        return RequestArrays(temperature=self._rep(np.array([p["temperature"]], np.float32)),
                             top_p=self._rep(np.array([p["top_p"]], np.float32)),
                             top_k=self._rep(np.array([p["top_k"]], np.int32)),
                             seed_key=self._rep(key[None]), stop=self._rep(stop),
                             max_tokens=self._rep(np.array([p["max_tokens"]], np.int32)), mask=self._rep(mask),
                             n_gen=self._rep(np.array([n_gen], np.int32)))

    def _timed_mask(self, compute, n: int = 1):
        t0 = time.perf_counter()
        try:
            return compute()
        finally:
            self.stats["mask_seconds"] += time.perf_counter() - t0
            self.stats["masks"] += n


def generate_constrained(model: GptOss, input_ids, *, max_new_tokens: int, json_schema, max_reasoning_tokens=None,
                         temperature=None, top_p=None, top_k=None, seed: int = 0, stop_tokens=None,
                         return_logprobs: bool = False, prompt_lengths=None, prefill_chunk: int = 512):
    """`generate(..., json_schema=)`: every row a constrained request of one engine (row b with seed
    + b); returns a GenerationResult padded as `generate`'s."""
    from .generate import GenerationResult, prepare_prompts

    ids, lengths = prepare_prompts(input_ids, model.config.vocab_size, prompt_lengths)
    rows = [ids[b, :int(n)] for b, n in enumerate(lengths)]
    eng = Engine(model, max_seqs=len(rows), max_len=int(lengths.max()) + int(max_new_tokens),
                 prefill_chunk=prefill_chunk)
    for b, row in enumerate(rows):
        eng.add_request(row, SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            top_k=top_k, seed=seed + b, stop_token_ids=stop_tokens,
                                            logprobs=return_logprobs, json_schema=json_schema,
                                            max_reasoning_tokens=max_reasoning_tokens), request_id=b)
    toks, lps = [[] for _ in rows], [[] for _ in rows]
    while eng.has_unfinished_requests():
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
            lps[o.request_id] += o.logprobs or []
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None and cfg.pad_token_id < cfg.vocab_size else 0
    out = np.full((len(rows), max_new_tokens), pad, np.int32)
    lp = np.zeros((len(rows), max_new_tokens), np.float32)
    for b, t in enumerate(toks):
        out[b, :len(t)] = t
        lp[b, :len(lps[b])] = lps[b]
    return GenerationResult(tokens=out, lengths=np.array([len(t) for t in toks]),
                            logprobs=lp if return_logprobs else None)


# ---------------------------------------------------------------------------------------------
# Helpers: seeds, host transfers, the multi-process broadcast
# ---------------------------------------------------------------------------------------------
def _host_seed_keys_match() -> bool:
    """Whether key_data(key(seed)) is [seed >> 32 (x64) or 0, seed & 0xffffffff] (threefry), so the
    host builds request keys without a device round trip; otherwise they are computed by JAX."""
    seeds = (0, 1, 12345, 2 ** 32 - 1, 2 ** 33 + 7, -3)
    return all(np.array_equal(np.asarray(jax.random.key_data(jax.random.key(s))), _threefry_seed(s)) for s in seeds)


def _threefry_seed(seed: int) -> np.ndarray:
    hi = (seed >> 32) & 0xFFFFFFFF if jax.config.jax_enable_x64 else 0
    return np.array([hi, seed & 0xFFFFFFFF], np.uint32)


def _seed_key(seed: int, on_host: bool) -> np.ndarray:
    return _threefry_seed(seed) if on_host else np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)


def _host_value(x):
    if x is None:
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))  # replicated: every process holds all of it
    return np.asarray(x)


def _to_host(tree):
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    arrays = [x for x in leaves if isinstance(x, jax.Array) and x.is_fully_addressable]
    fetched = iter(jax.device_get(arrays))  # one transfer for the step's ids
    return jax.tree.unflatten(treedef, [next(fetched) if isinstance(x, jax.Array) and x.is_fully_addressable
                                        else _host_value(x) for x in leaves])


def _broadcast(x: np.ndarray, source: bool) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x, is_source=source))


HEADER_BYTES = 4096  # the usual step's decision fits: one broadcast


def _broadcast_plan(plan, source: bool) -> dict:
    """Process 0's decision to every process: a fixed 4 KiB buffer (length first), and a second,
    power-of-two sized broadcast only when it does not fit (few shapes: few compiles)."""
    buf = np.zeros(HEADER_BYTES, np.uint8)
    data = b""
    if source:
        data = json.dumps(plan, default=_json_default).encode()
        buf[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
        if len(data) <= HEADER_BYTES - 4:
            buf[4:4 + len(data)] = np.frombuffer(data, np.uint8)
    buf = _broadcast(buf, source)
    n = int(np.frombuffer(buf[:4].tobytes(), np.uint32)[0])
    if n <= HEADER_BYTES - 4:
        data = buf[4:4 + n].tobytes()
    else:
        big = np.zeros(next_pow2(n), np.uint8)
        if source:
            big[:n] = np.frombuffer(data, np.uint8)
        data = _broadcast(big, source)[:n].tobytes()
    plan = json.loads(data.decode())
    for k in ("admit", "chunks", "journal", "restore", "tables"):
        if k in plan:
            plan[k] = [tuple(e) for e in plan[k]]
    return plan


def _json_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(f"cannot broadcast {type(x).__name__}")


__all__ = ["Engine", "SamplingParams", "RequestOutput", "SlotCache", "SlotState", "prefill_chunk", "decode_slots",
           "forward_slots", "sample_slots", "apply_masks", "generate_constrained"]
