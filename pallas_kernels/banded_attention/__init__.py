"""Banded attention for gpt-oss: attention sinks, exact sliding window, GQA folded.

Public API
----------
``attention(q, k, v, sinks, *, window=None, q_offset=0, kv_len=None, sm_scale=None, impl="auto")``
    Prefill / causal attention. q [B,T,N,H] (RoPE applied), k, v [B,S,K,H], sinks [N] (f32; -inf =
    no sink). Query i of row b has position q_offset[b] + i (q_offset: int or int32 [B]); key j has
    position j. Key j is visible iff j <= qpos, j < kv_len[b] (default S) and, if window=W,
    j > qpos - W (W keys including self). Output [B,T,N,H] in q.dtype. Differentiable w.r.t. q,
    k, v and sinks (``jax.custom_vjp``).

``decode_attention(q, k_new, v_new, k_cache, v_cache, sinks, cache_len, *, window=None,
                   sm_scale=None, impl="auto")``
    q [B,T,N,H] for T >= 1 new tokens, k_new/v_new [B,T,K,H] for the same tokens, k_cache/v_cache
    [B,S_cache,K,H] BEFORE these tokens are written, cache_len int32 [B] = positions already
    cached per row. Query t of row b has position cache_len[b] + t and sees cached positions p with
    max(0, qpos - W + 1, cache_len[b] - S_cache) <= p < cache_len[b] plus new tokens t' <= t
    (within the window). Cache layout: full-attention layers contiguous (position p at slot p,
    S_cache = max_len); sliding layers a ring of S_cache = W slots (position p at slot p % W). The
    caller writes k_new/v_new afterwards (slot p, resp. p % W).

impl: "auto" (GPU -> "triton", TPU -> "mosaic", otherwise "interpret"), "triton", "mosaic",
"interpret" (Triton-style kernel, Pallas interpreter), "interpret_mosaic" (TPU kernel,
Pallas interpreter), "reference" (pure jnp, materialises the scores).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import common, reference
from . import triton as _triton

__all__ = ["attention", "decode_attention", "attention_reference", "decode_reference"]

attention_reference = reference.attention_reference
decode_reference = reference.decode_reference

_IMPLS = ("auto", "triton", "mosaic", "interpret", "interpret_mosaic", "reference")


def _resolve(impl):
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  return {"gpu": "triton", "cuda": "triton", "tpu": "mosaic"}.get(backend, "interpret")


def _rows(x, b):
  x = jnp.asarray(x, jnp.int32)
  return jnp.broadcast_to(x, (b,)) if x.ndim == 0 else x


def _check_window(window):
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"window must be None or a positive int, got {window!r}")


def _forward(q, k, v, sinks, q_offset, kv_len, window, sm_scale, impl, return_lse=True):
  if impl in ("triton", "interpret"):
    return _triton.prefill_forward(q, k, v, sinks, q_offset, kv_len, window=window,
                                   sm_scale=sm_scale, return_lse=return_lse,
                                   interpret=impl == "interpret")
  if impl in ("mosaic", "interpret_mosaic"):
    from . import tpu as _tpu
    return _tpu.prefill_forward(q, k, v, sinks, q_offset, kv_len, window=window,
                                sm_scale=sm_scale, return_lse=return_lse,
                                interpret=impl == "interpret_mosaic")
  return reference.attention_reference(q, k, v, sinks, window=window, q_offset=q_offset,
                                       kv_len=kv_len, sm_scale=sm_scale, return_lse=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, sinks, q_offset, kv_len, window, sm_scale, impl):
  return _forward(q, k, v, sinks, q_offset, kv_len, window, sm_scale, impl, return_lse=False)[0]


def _attention_fwd(q, k, v, sinks, q_offset, kv_len, window, sm_scale, impl):
  out, lse = _forward(q, k, v, sinks, q_offset, kv_len, window, sm_scale, impl)
  return out, (q, k, v, sinks, q_offset, kv_len, out, lse)


def _attention_bwd(window, sm_scale, impl, res, do):
  q, k, v, sinks, q_offset, kv_len, out, lse = res
  if impl in ("triton", "interpret"):
    dq, dk, dv = _triton.prefill_backward(q, k, v, out, lse, do, q_offset, kv_len, window=window,
                                          sm_scale=sm_scale, interpret=impl == "interpret")
    dsinks = common.sink_grad(sinks, out, lse, do)
    return dq, dk, dv, dsinks, None, None
  if impl in ("mosaic", "interpret_mosaic"):
    from . import tpu as _tpu
    dq, dk, dv = _tpu.prefill_backward(q, k, v, out, lse, do, q_offset, kv_len, window=window,
                                       sm_scale=sm_scale, interpret=impl == "interpret_mosaic")
    dsinks = common.sink_grad(sinks, out, lse, do)
    return dq, dk, dv, dsinks, None, None
  dq, dk, dv, dsinks = common.backward_from_lse(q, k, v, sinks, out, lse, do, q_offset, kv_len,
                                                window=window, sm_scale=sm_scale)
  return dq, dk, dv, dsinks, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, sinks, *, window=None, q_offset=0, kv_len=None, sm_scale=None,
              impl="auto"):
  """Prefill/causal attention with sinks; see the module docstring."""
  _check_window(window)
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if N % K or v.shape != k.shape or k.shape[0] != B or k.shape[3] != H:
    raise ValueError(f"bad shapes q={q.shape} k={k.shape} v={v.shape}")
  impl = _resolve(impl)
  sm_scale = float(H ** -0.5 if sm_scale is None else sm_scale)
  q_offset = _rows(q_offset, B)
  kv_len = jnp.full((B,), S, jnp.int32) if kv_len is None else _rows(kv_len, B)
  sinks = jnp.asarray(sinks, jnp.float32)
  return _attention(q, k, v, sinks, q_offset, kv_len, window, sm_scale, impl)


def decode_attention(q, k_new, v_new, k_cache, v_cache, sinks, cache_len, *, window=None,
                     sm_scale=None, impl="auto"):
  """Decode / chunked-prefill attention against a KV cache; see the module docstring."""
  _check_window(window)
  B, T, N, H = q.shape
  K = k_new.shape[2]
  if k_new.shape != (B, T, K, H) or v_new.shape != k_new.shape or k_cache.shape[0] != B or \
      k_cache.shape[2:] != (K, H) or v_cache.shape != k_cache.shape or N % K:
    raise ValueError(f"bad shapes q={q.shape} k_new={k_new.shape} k_cache={k_cache.shape}")
  impl = _resolve(impl)
  sm_scale = float(H ** -0.5 if sm_scale is None else sm_scale)
  cache_len = _rows(cache_len, B)
  sinks = jnp.asarray(sinks, jnp.float32)
  if impl == "reference":
    return reference.decode_reference(q, k_new, v_new, k_cache, v_cache, sinks, cache_len,
                                      window=window, sm_scale=sm_scale)
  if impl in ("triton", "interpret"):
    acc, m, l, bq = _triton.decode_partials(q, k_cache, v_cache, cache_len, window=window,
                                            sm_scale=sm_scale, interpret=impl == "interpret")
  else:
    from . import tpu as _tpu
    acc, m, l, bq = _tpu.decode_partials(q, k_cache, v_cache, cache_len, window=window,
                                         sm_scale=sm_scale,
                                         interpret=impl == "interpret_mosaic")
  return common.combine_partials(q, k_new, v_new, sinks, acc, m, l, bq, window=window,
                                 sm_scale=sm_scale)
