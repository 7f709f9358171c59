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

impl (``pallas_kernels.impl.Impl`` or its string value, one vocabulary for every kernel package):
"auto" (GPU -> "triton", TPU -> "mosaic", otherwise ``CPU_DEFAULT_IMPL`` = "triton_interpret"),
"triton", "mosaic", "triton_interpret" / "mosaic_interpret" (that kernel body under the Pallas
interpreter), "reference" (pure jnp, materialises the scores). ``resolve_impl(impl)`` returns the
``Impl`` these functions would run here.

Every ``pallas_call`` (prefill forward, decode partials, dq and dk/dv backward; Triton and
Mosaic) carries a ``pl.CostEstimate`` (``common.attention_cost_estimate``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..impl import Impl, resolve
from . import common, reference
from . import triton as _triton

__all__ = ["CPU_DEFAULT_IMPL", "Impl", "attention", "decode_attention", "attention_reference",
           "decode_reference", "resolve_impl"]

attention_reference = reference.attention_reference
decode_reference = reference.decode_reference

CPU_DEFAULT_IMPL = Impl.TRITON_INTERPRET  # impl="auto" off GPU/TPU: the Triton body, interpreted


def resolve_impl(impl: str | Impl = Impl.AUTO) -> Impl:
  """`impl` resolved for this package (AUTO off GPU/TPU -> `CPU_DEFAULT_IMPL`)."""
  return resolve(impl, cpu_default=CPU_DEFAULT_IMPL)


def _kernels(impl: Impl):
  """The kernel module of a resolved non-reference impl (triton.py or tpu.py)."""
  if impl.body is Impl.TRITON:
    return _triton
  from . import tpu as _tpu
  return _tpu


def _rows(x, b):
  x = jnp.asarray(x, jnp.int32)
  return jnp.broadcast_to(x, (b,)) if x.ndim == 0 else x


def _check_window(window):
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"window must be None or a positive int, got {window!r}")


def _forward(q, k, v, sinks, q_offset, kv_len, window, sm_scale, impl: Impl, return_lse=True):
  if impl.body is not Impl.REFERENCE:
    return _kernels(impl).prefill_forward(q, k, v, sinks, q_offset, kv_len, window=window,
                                          sm_scale=sm_scale, return_lse=return_lse,
                                          interpret=impl.interpret)
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
  if impl.body is not Impl.REFERENCE:
    dq, dk, dv = _kernels(impl).prefill_backward(q, k, v, out, lse, do, q_offset, kv_len,
                                                 window=window, sm_scale=sm_scale,
                                                 interpret=impl.interpret)
    dsinks = common.sink_grad(sinks, out, lse, do)
    return dq, dk, dv, dsinks, None, None
  dq, dk, dv, dsinks = common.backward_from_lse(q, k, v, sinks, out, lse, do, q_offset, kv_len,
                                                window=window, sm_scale=sm_scale)
  return dq, dk, dv, dsinks, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, sinks, *, window=None, q_offset=0, kv_len=None, sm_scale=None,
              impl: str | Impl = Impl.AUTO):
  """Prefill/causal attention with sinks; see the module docstring."""
  impl = resolve_impl(impl)
  _check_window(window)
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  if N % K or v.shape != k.shape or k.shape[0] != B or k.shape[3] != H:
    raise ValueError(f"bad shapes q={q.shape} k={k.shape} v={v.shape}")
  sm_scale = float(H ** -0.5 if sm_scale is None else sm_scale)
  q_offset = _rows(q_offset, B)
  kv_len = jnp.full((B,), S, jnp.int32) if kv_len is None else _rows(kv_len, B)
  sinks = jnp.asarray(sinks, jnp.float32)
  return _attention(q, k, v, sinks, q_offset, kv_len, window, sm_scale, impl)


def decode_attention(q, k_new, v_new, k_cache, v_cache, sinks, cache_len, *, window=None,
                     sm_scale=None, impl: str | Impl = Impl.AUTO):
  """Decode / chunked-prefill attention against a KV cache; see the module docstring."""
  impl = resolve_impl(impl)
  _check_window(window)
  B, T, N, H = q.shape
  K = k_new.shape[2]
  if k_new.shape != (B, T, K, H) or v_new.shape != k_new.shape or k_cache.shape[0] != B or \
      k_cache.shape[2:] != (K, H) or v_cache.shape != k_cache.shape or N % K:
    raise ValueError(f"bad shapes q={q.shape} k_new={k_new.shape} k_cache={k_cache.shape}")
  sm_scale = float(H ** -0.5 if sm_scale is None else sm_scale)
  cache_len = _rows(cache_len, B)
  sinks = jnp.asarray(sinks, jnp.float32)
  if impl.body is Impl.REFERENCE:
    return reference.decode_reference(q, k_new, v_new, k_cache, v_cache, sinks, cache_len,
                                      window=window, sm_scale=sm_scale)
  acc, m, l, bq = _kernels(impl).decode_partials(q, k_cache, v_cache, cache_len, window=window,
                                                 sm_scale=sm_scale, interpret=impl.interpret)
  return common.combine_partials(q, k_new, v_new, sinks, acc, m, l, bq, window=window,
                                 sm_scale=sm_scale)
