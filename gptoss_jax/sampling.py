"""Token sampling from logits ``[B, V]``: temperature, top-k, top-p (nucleus); pure JAX, jit-able, no host sync.

Order of operations (as in Hugging Face transformers and vLLM): the logits are divided by the temperature,
top-k keeps the ``k`` highest, top-p then keeps the smallest prefix of those, highest probability first, whose
probability (softmax of the temperature-scaled logits, renormalised over the top-k set) sums to at least
``p``; the token is drawn from the softmax over the kept set. The highest-probability token is always kept.
Ties are broken deterministically: among equal logits the lower token id ranks first (so a boundary tie keeps
exactly ``k`` tokens, the lowest ids). ``temperature == 0`` is greedy decoding: exactly ``argmax(logits)``
(lowest id on ties), whatever top-k/top-p say.

The parameters may be Python numbers (filters that are off then cost nothing), NumPy values, or JAX arrays of
shape ``[]`` or ``[B]`` (per-row values, possibly traced under jit). All but JAX arrays are validated on every
call; call :func:`validate_sampling` on the host for JAX-array values. ``top_k=None`` and ``top_p=1.0`` turn
the filters off. With ``top_p < 1`` and no static ``top_k`` the whole vocabulary is sorted; a ``top_k`` (a
Python int) restricts the sort to ``k`` candidates.

Log-probabilities for reporting come from the raw model logits (:func:`token_logprobs`), not the filtered ones.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["validate_seed", "validate_sampling", "filter_logits", "sample", "sample_rows", "greedy", "token_logprobs"]


def _is_real(x) -> bool:
    return isinstance(x, (numbers.Real, np.floating, np.integer)) and not isinstance(x, (bool, np.bool_))


def validate_seed(seed, name: str = "seed") -> int:
    """A seed `jax.random.key` takes: an integer in [-2**63, 2**63) (ValueError otherwise)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (numbers.Integral, np.integer)) or \
            not -2**63 <= int(seed) < 2**63:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**63), got {seed!r}")
    return int(seed)


def validate_sampling(temperature=1.0, top_p=1.0, top_k=None) -> None:
    """Raise ValueError unless ``temperature >= 0`` (finite), ``0 < top_p <= 1`` and ``top_k`` is None or an
    integer ``>= 1``. Numbers or array-likes (checked elementwise) are accepted."""

    def values(name, x, integer=False):
        if _is_real(x):
            return np.asarray([x])
        try:
            arr = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} must be a number, got {x!r}") from e
        ok_kind = arr.dtype.kind in ("i", "u") if integer else arr.dtype.kind in ("i", "u", "f")
        if not ok_kind or arr.size == 0:
            raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {x!r}")
        return arr.reshape(-1)

    t = values("temperature", temperature)
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    p = values("top_p", top_p)
    if not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
        raise ValueError(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {top_p!r}")
    if top_k is not None:
        if _is_real(top_k) and not isinstance(top_k, (numbers.Integral, np.integer)):
            if not float(top_k).is_integer():
                raise ValueError(f"top_k must be an integer >= 1 (None disables it), got {top_k!r}")
            top_k = int(top_k)
        k = values("top_k", top_k, integer=True)
        if np.any(k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (None disables it), got {top_k!r}")


def _host_values(*xs) -> bool:
    """True when no parameter is a JAX array (those may be traced): host values are validated."""
    return not any(isinstance(x, jax.Array) for x in xs)


def _per_row(x, dtype) -> jax.Array:
    """A scalar or [B] parameter as an array broadcastable against [B, V]."""
    a = jnp.asarray(x, dtype)
    if a.ndim == 0:
        return a
    if a.ndim != 1:
        raise ValueError(f"sampling parameters must be scalars or [B] arrays, got shape {a.shape}")
    return a[:, None]


def _keep_mask(x: jax.Array, top_k, top_p) -> jax.Array:
    """Boolean [B, V]: the tokens kept by top-k then top-p on scaled logits ``x``."""
    b, v = x.shape
    k_static = top_k is None or _is_real(top_k)
    if k_static and top_k is not None and int(top_k) < v:
        # Only the k best can survive: partial sort (lax.top_k ranks equal values lowest index first).
        vals, idx = jax.lax.top_k(x, int(top_k))
        keep = jnp.ones(vals.shape, bool)
    else:
        idx = jnp.argsort(-x, axis=-1, stable=True)  # descending; ties: lowest id first
        vals = jnp.take_along_axis(x, idx, axis=-1)
        keep = jnp.ones(vals.shape, bool)
        if not k_static:
            keep = keep & (jnp.arange(v)[None, :] < _per_row(top_k, jnp.int32))
    if not (_is_real(top_p) and float(top_p) >= 1.0):
        probs = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)  # mass ranked above
        keep = keep & (before < _per_row(top_p, jnp.float32))
        keep = keep.at[:, 0].set(True)  # the top token, whatever a (traced, unvalidated) p says
    rows = jnp.arange(b)[:, None]
    return jnp.zeros((b, v), bool).at[rows, idx].set(keep)


def filter_logits(logits: jax.Array, *, temperature=1.0, top_p=1.0, top_k=None) -> jax.Array:
    """Float32 ``logits / temperature`` with ``-inf`` outside the kept set; sampling from their softmax is
    what :func:`sample` does. ``temperature == 0`` keeps only the argmax (its logit set to 0)."""
    if _host_values(temperature, top_p, top_k):
        validate_sampling(temperature, top_p, top_k)
    x = logits.astype(jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {x.shape}")
    t = _per_row(temperature, jnp.float32)
    greedy_rows = t == 0
    scaled = x / jnp.where(greedy_rows, 1.0, t)
    if top_k is None and _is_real(top_p) and float(top_p) >= 1.0:
        out = scaled
    else:
        out = jnp.where(_keep_mask(scaled, top_k, top_p), scaled, -jnp.inf)
    if _is_real(temperature) and float(temperature) > 0:
        return out
    one_hot = jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=bool)
    greedy_out = jnp.where(one_hot, 0.0, -jnp.inf)
    return jnp.where(greedy_rows, greedy_out, out)


def greedy(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis, int32 (lowest id on ties)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array | None, *, temperature=1.0, top_p=1.0, top_k=None) -> jax.Array:
    """Draw one token id per row of ``logits`` [B, V]; returns int32 [B].

    ``temperature == 0`` returns exactly ``argmax(logits)`` (``key`` may then be None when the temperature is
    a Python number). Same ``key`` and inputs give the same tokens.
    """
    if _is_real(temperature) and float(temperature) == 0:
        if _host_values(top_p, top_k):
            validate_sampling(temperature, top_p, top_k)
        return greedy(logits)
    if key is None:
        raise ValueError("sample() needs a PRNG key unless temperature == 0")
    masked = filter_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    drawn = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
    if _is_real(temperature):
        return drawn
    return jnp.where(_per_row(temperature, jnp.float32).reshape(-1) == 0, greedy(logits), drawn)


def sample_rows(logits: jax.Array, keys: jax.Array, *, temperature: jax.Array, top_p: jax.Array,
                top_k: jax.Array) -> jax.Array:
    """One token per row of ``logits`` [B, V] with per-row (traced) parameters, int32 [B].

    ``temperature`` [B] (0: that row is greedy, exactly ``argmax``), ``top_p`` [B] (1: off), ``top_k`` [B]
    (0 or >= V: off), ``keys`` [B] one PRNG key per row (a row's draw does not depend on the others).
    Validate host values with :func:`validate_sampling`. The filters and the draw are skipped (``lax.cond``)
    when no row needs them, so a greedy or unfiltered batch pays no vocabulary sort.
    """
    v = logits.shape[-1]
    greedy_tok = greedy(logits)

    def draw(_):
        k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
        p = jnp.where(top_p < 1, top_p, 2.0)  # 2: keeps the whole tail, whatever the float rounding
        t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
        masked = jax.lax.cond(jnp.any((k < v) | (p < 1)),
                              lambda: filter_logits(logits, temperature=temperature, top_p=p, top_k=k),
                              lambda: logits.astype(jnp.float32) / t)
        drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
        return jnp.where(temperature == 0, greedy_tok, drawn)

    return jax.lax.cond(jnp.all(temperature == 0), lambda _: greedy_tok, draw, None)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits)[b, tokens[b]]`` in float32: logits [..., V], tokens [...] -> [...].

    Use the raw model logits (not :func:`filter_logits`'s) to report the model's log-probabilities."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)[..., 0]

