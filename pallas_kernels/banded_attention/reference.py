"""Pure-jnp reference of gpt-oss attention (sinks, exact sliding window, GQA).

Written from the formula, independently of the kernels: scores are materialised in float32,
the sink is appended as an extra softmax column whose value column is zero, and the visibility
mask is built from explicit integer positions.

Conventions (shared with the kernels):
  * query i of row b has position ``q_offset[b] + i``; key j has position j;
  * key j is visible to query at position p iff ``j <= p`` and ``j < kv_len[b]`` and, for a window
    W, ``p - W < j`` (W keys including the query itself);
  * a query row that sees no key and has no sink (sink == -inf) outputs zeros (the softmax
    would be 0/0).
"""
from __future__ import annotations

import jax.numpy as jnp


def _as_rows(x, b):
  x = jnp.asarray(x, jnp.int32)
  return jnp.broadcast_to(x, (b,)) if x.ndim == 0 else x


def attention_with_positions(q, k, v, sinks, qpos, kpos, kvalid, *, window=None, sm_scale=None,
                             return_lse=False):
  """Generic masked attention with sinks.

  q [B,T,N,H]; k, v [B,S,K,H]; sinks [N]; qpos [B,T] int; kpos [B,S] int; kvalid [B,S] bool.
  Returns out [B,T,N,H] in q.dtype (and lse [B,T,N] f32 including the sink if return_lse).
  """
  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  scale = H ** -0.5 if sm_scale is None else sm_scale
  qf = q.astype(jnp.float32).reshape(B, T, K, G, H)
  # invisible keys may hold garbage (unwritten cache slots, padding past kv_len): zero them so
  # that 0-probability * garbage cannot poison the result
  kf = jnp.where(kvalid[:, :, None, None], k.astype(jnp.float32), 0.0)
  vf = jnp.where(kvalid[:, :, None, None], v.astype(jnp.float32), 0.0)
  s = jnp.einsum("btkgh,bskh->bkgts", qf, kf, precision="highest") * scale  # [B,K,G,T,S]
  mask = (kpos[:, None, :] <= qpos[:, :, None]) & kvalid[:, None, :]
  if window is not None:
    mask &= kpos[:, None, :] > qpos[:, :, None] - window
  mask = mask[:, None, None]  # [B,1,1,T,S]
  s = jnp.where(mask, s, -jnp.inf)
  sink = jnp.asarray(sinks, jnp.float32).reshape(1, K, G, 1, 1)
  sink_col = jnp.broadcast_to(sink, s.shape[:-1] + (1,))
  logits = jnp.concatenate([s, sink_col], axis=-1)
  mx = jnp.max(logits, axis=-1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  e = jnp.exp(logits - mx)
  den = jnp.sum(e, axis=-1, keepdims=True)
  p = jnp.where(den > 0, e / jnp.where(den > 0, den, 1.0), 0.0)[..., :-1]
  o = jnp.einsum("bkgts,bskh->btkgh", p, vf, precision="highest")
  out = o.reshape(B, T, N, H).astype(q.dtype)
  if return_lse:
    lse = (mx + jnp.log(den))[..., 0]  # [B,K,G,T]
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, N)
    return out, lse
  return out


def attention_reference(q, k, v, sinks, *, window=None, q_offset=0, kv_len=None, sm_scale=None,
                        return_lse=False):
  """Prefill/causal reference. Same contract as ``banded_attention.attention``."""
  B, T = q.shape[:2]
  S = k.shape[1]
  q_offset = _as_rows(q_offset, B)
  kv_len = jnp.full((B,), S, jnp.int32) if kv_len is None else _as_rows(kv_len, B)
  qpos = q_offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  kpos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (B, S))
  kvalid = kpos < kv_len[:, None]
  return attention_with_positions(q, k, v, sinks, qpos, kpos, kvalid, window=window,
                                  sm_scale=sm_scale, return_lse=return_lse)


def decode_reference(q, k_new, v_new, k_cache, v_cache, sinks, cache_len, *, window=None,
                     sm_scale=None):
  """Decode reference. Same contract as ``banded_attention.decode_attention``.

  The position held by cache slot s is reconstructed explicitly: slot s holds the latest
  position p < cache_len with p % S_cache == s (contiguous caches: p == s); p < 0 means empty.
  """
  B, T = q.shape[:2]
  Sc = k_cache.shape[1]
  cache_len = _as_rows(cache_len, B)
  slot = jnp.arange(Sc, dtype=jnp.int32)[None]
  cl = cache_len[:, None]
  pos = cl - 1 - jnp.mod(cl - 1 - slot, Sc)  # [B,Sc]
  valid = (pos >= 0) & (pos < cl) & (pos >= cl - Sc)
  new_pos = cl + jnp.arange(T, dtype=jnp.int32)[None]
  kpos = jnp.concatenate([pos, new_pos], axis=1)
  kvalid = jnp.concatenate([valid, jnp.ones((B, T), bool)], axis=1)
  k = jnp.concatenate([k_cache.astype(k_new.dtype), k_new], axis=1)
  v = jnp.concatenate([v_cache.astype(v_new.dtype), v_new], axis=1)
  return attention_with_positions(q, k, v, sinks, new_pos, kpos, kvalid, window=window,
                                  sm_scale=sm_scale)
