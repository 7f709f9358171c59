"""Backend-independent pieces: band ranges, decode combine (split partials + new tokens +
sink), the flash-style backward used by the custom_vjp (recomputes probabilities from the saved
lse), and the static cost estimates attached to every ``pallas_call``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ..cost import nbytes


def kv_block_range(qoff, kvlen, t0, *, window, bq, bk, t_len):
  """[lo, hi) KV blocks holding keys visible to queries t0 .. t0+bq-1 (positions qoff + t), kvlen
  keys valid: the band max(0, p_lo - W + 1) .. min(p_hi, kvlen - 1). Scalar jnp; every backend."""
  p_lo = qoff + t0
  p_hi = qoff + jnp.minimum(t0 + bq, t_len) - 1
  k_lo = 0 if window is None else jnp.maximum(p_lo - window + 1, 0)
  k_hi = jnp.minimum(p_hi + 1, kvlen)  # exclusive
  return jax.lax.div(jnp.int32(k_lo), bk), jax.lax.div(k_hi + bk - 1, bk)  # non-negative: no floor


def q_block_range(qoff, kvlen, kb, *, window, bq, bk, t_len):
  """[lo, hi) q blocks holding queries that can see KV block kb: kb*bk <= p < kb*bk + bk - 1 + W
  (p = qoff + t), empty when the block starts past kvlen."""
  t_lo = jnp.maximum(kb * bk - qoff, 0)
  if window is None:
    t_hi = jnp.int32(t_len)
  else:
    t_hi = jnp.clip(kb * bk + bk - 1 + window - qoff, 0, t_len)
  t_hi = jnp.where(kb * bk < kvlen, t_hi, 0)
  t_lo = jnp.minimum(t_lo, t_hi)
  return jax.lax.div(t_lo, bq), jax.lax.div(t_hi + bq - 1, bq)


# --------------------------------------------------------------------------------------------
# Cost estimates (static: q_offset / kv_len / cache_len are traced, so a stated typical case)
# --------------------------------------------------------------------------------------------
# matmuls per visible (query head, key) pair: forward QK^T + PV; dq: QK^T, dO V^T, dS K;
# dk/dv: QK^T, dO V^T, P^T dO, dS^T Q. Each is 2 * H flops per pair.
MATMULS = {"forward": 2, "dq": 3, "dkdv": 4}


def prefill_pairs(t_len: int, s_len: int, window: int | None) -> int:
  """Visible (query, key) pairs per query head of a prefill call, for the usual layout where
  the T queries are the last T of the S key positions (q_offset = max(S - T, 0), kv_len = S):
  exact for a full prefill (T = S, q_offset 0) and a chunked-prefill continuation. Query at
  position p sees keys max(0, p - W + 1) .. min(p, S - 1)."""
  pos = max(s_len - t_len, 0) + np.arange(t_len, dtype=np.int64)
  hi = np.minimum(pos + 1, s_len)
  lo = 0 if window is None else np.maximum(pos - window + 1, 0)
  return int(np.maximum(hi - lo, 0).sum())


def prefill_keys_read(t_len: int, s_len: int, window: int | None) -> int:
  """Key positions any query of `prefill_pairs`' layout can see (the K/V rows the band reads)."""
  if window is None:
    return s_len
  return s_len - max(0, max(s_len - t_len, 0) - window + 1)


def decode_pairs(t_len: int, s_cache: int, window: int | None) -> int:
  """Visible (query, cached slot) pairs per query head of the decode partials with a full cache
  (cache_len >= S_cache, the steady state): new token t sees the cached positions
  > cache_len + t - W, i.e. W - 1 - t of them (at most S_cache), or all S_cache slots."""
  if window is None:
    return t_len * s_cache
  t = np.arange(t_len, dtype=np.int64)
  return int(np.clip(window - 1 - t, 0, s_cache).sum())


def decode_slots_read(s_cache: int, window: int | None) -> int:
  """Cache slots the decode partials read: all, or the window of a contiguous sliding cache."""
  return s_cache if window is None else min(s_cache, window)


def attention_cost_estimate(*, batch: int, q_heads: int, head_dim: int, pairs: int, kind: str,
                            operands=(), outputs=(), kv=(), kv_fraction: float = 1.0
                            ) -> pl.CostEstimate:
  """Cost of one attention ``pallas_call``: flops = 2 * H * (#matmuls of `kind`) per visible
  (query head, key) pair, summed over B * N heads; transcendentals = one exp per pair (the
  probabilities; the per-block rescale exps and the final log are O(rows), not counted);
  bytes_accessed = the operands and outputs as passed to / returned by the call, the K/V
  operands `kv` scaled by `kv_fraction` (the part of the sequence the band reads)."""
  flops = 2 * MATMULS[kind] * head_dim * batch * q_heads * pairs
  trans = batch * q_heads * pairs
  byts = nbytes(*operands) + nbytes(*outputs) + int(nbytes(*kv) * kv_fraction)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(trans), bytes_accessed=int(byts))


def prefill_cost(q, k, *, window, kind, operands=(), outputs=(), kv=()):
  """`attention_cost_estimate` of a prefill-side call (forward, dq or dk/dv): q [B,T,N,H],
  k [B,S,K,H] give the shapes; `kv` are the K/V-sized operands read only over the band."""
  B, T, N, H = q.shape
  S = k.shape[1]
  return attention_cost_estimate(
      batch=B, q_heads=N, head_dim=H, pairs=prefill_pairs(T, S, window), kind=kind,
      operands=operands, outputs=outputs, kv=kv,
      kv_fraction=prefill_keys_read(T, S, window) / max(S, 1))


def decode_cost(q, k_cache, *, window, operands=(), outputs=(), kv=()):
  """`attention_cost_estimate` of the decode-partials call (cache part only)."""
  B, T, N, H = q.shape
  Sc = k_cache.shape[1]
  return attention_cost_estimate(
      batch=B, q_heads=N, head_dim=H, pairs=decode_pairs(T, Sc, window), kind="forward",
      operands=operands, outputs=outputs, kv=kv,
      kv_fraction=decode_slots_read(Sc, window) / max(Sc, 1))


def combine_partials(q, k_new, v_new, sinks, acc, m, l, block_q, *, window, sm_scale):
  """Merge the cache partials (acc [B,K,P,R,H], m/l [B,K,P,R], rows r = t*G+g, t < block_q),
  the attention of the T new tokens to each other (causal, within the window) and the sink.
  Returns [B,T,N,H] in q.dtype."""
  B, T, N, H = q.shape
  K = k_new.shape[2]
  G = N // K
  P = acc.shape[2]
  acc = acc.reshape(B, K, P, block_q, G, H)[:, :, :, :T]
  m = m.reshape(B, K, P, block_q, G)[:, :, :, :T]
  l = l.reshape(B, K, P, block_q, G)[:, :, :, :T]
  # new tokens (tiny: T x T per head)
  q5 = q.reshape(B, T, K, G, H)
  s = jnp.einsum("btkgh,bukh->bktgu", q5, k_new,
                 preferred_element_type=jnp.float32) * sm_scale
  t = jnp.arange(T)
  vis = t[None, :] <= t[:, None]
  if window is not None:
    vis &= t[None, :] > t[:, None] - window
  s = jnp.where(vis[None, None, :, None, :], s, -jnp.inf)
  m_n = jnp.max(s, axis=-1)  # always finite: the diagonal is visible
  p_n = jnp.exp(s - m_n[..., None])
  l_n = jnp.sum(p_n, axis=-1)
  acc_n = jnp.einsum("bktgu,bukh->bktgh", p_n.astype(v_new.dtype), v_new,
                     preferred_element_type=jnp.float32)
  sink = jnp.asarray(sinks, jnp.float32).reshape(1, K, 1, G)
  M = jnp.maximum(jnp.max(m, axis=2), m_n)
  M = jnp.maximum(M, sink)
  w = jnp.exp(m - M[:, :, None])  # [B,K,P,T,G]
  w_n = jnp.exp(m_n - M)
  den = jnp.exp(sink - M) + jnp.sum(w * l, axis=2) + w_n * l_n
  num = jnp.sum(w[..., None] * acc, axis=2) + w_n[..., None] * acc_n
  o = num / den[..., None]  # [B,K,T,G,H]
  return jnp.transpose(o, (0, 2, 1, 3, 4)).reshape(B, T, N, H).astype(q.dtype)


def _visibility(B, T, S, q_offset, kv_len, window):
  qpos = q_offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None]  # [B,T]
  kpos = jnp.arange(S, dtype=jnp.int32)
  vis = (kpos[None, None] <= qpos[:, :, None]) & (kpos[None, None] < kv_len[:, None, None])
  if window is not None:
    vis &= kpos[None, None] > qpos[:, :, None] - window
  return vis  # [B,T,S]


def sink_grad(sinks, out, lse, do):
  """d sink_n = -sum_{b,t} p_sink[b,t,n] * delta[b,t,n], p_sink = exp(sink_n - lse),
  delta = rowsum(dO * O). (The sink is a softmax column whose value vector is zero.)"""
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  sink = jnp.asarray(sinks, jnp.float32)
  p_sink = jnp.where(jnp.isfinite(lse), jnp.exp(sink[None, None] - lse), 0.0)
  return (-jnp.sum(p_sink * delta, axis=(0, 1))).astype(jnp.asarray(sinks).dtype)


def backward_from_lse(q, k, v, sinks, out, lse, do, q_offset, kv_len, *, window, sm_scale,
                      q_chunk=512):
  """Gradients (dq, dk, dv, dsinks) from the saved forward output and lse (natural log, incl.
  the sink), FlashAttention-2 style: P = exp(S - lse), dP = dO V^T, dS = P (dP - delta),
  delta = rowsum(dO * O). The sink is a softmax column with a zero value vector, so
  d sink_n = -sum_{b,t} p_sink[b,t,n] * delta[b,t,n] with p_sink = exp(sink_n - lse).

  Computed in f32 jnp, chunked over queries (memory O(q_chunk * S * N) instead of O(T*S*N)).
  """
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  f32 = jnp.float32
  kf, vf = k.astype(f32), v.astype(f32)
  delta = jnp.sum(do.astype(f32) * out.astype(f32), axis=-1)  # [B,T,N]
  dsinks = sink_grad(sinks, out, lse, do)
  dq_chunks, dk, dv = [], jnp.zeros((B, S, K, H), f32), jnp.zeros((B, S, K, H), f32)
  for c0 in range(0, T, q_chunk):
    c1 = min(T, c0 + q_chunk)
    qc = q[:, c0:c1].astype(f32).reshape(B, c1 - c0, K, G, H)
    doc = do[:, c0:c1].astype(f32).reshape(B, c1 - c0, K, G, H)
    lc = lse[:, c0:c1].reshape(B, c1 - c0, K, G)
    dc = delta[:, c0:c1].reshape(B, c1 - c0, K, G)
    vis = _visibility(B, c1 - c0, S, q_offset + c0, kv_len, window)
    s = jnp.einsum("btkgh,bskh->btkgs", qc, kf, precision="highest") * sm_scale
    p = jnp.where(vis[:, :, None, None], jnp.exp(s - jnp.where(jnp.isfinite(lc), lc, 0.0)[..., None]),
                  0.0)
    dv += jnp.einsum("btkgs,btkgh->bskh", p, doc, precision="highest")
    dp = jnp.einsum("btkgh,bskh->btkgs", doc, vf, precision="highest")
    ds = p * (dp - dc[..., None]) * sm_scale
    dq_chunks.append(jnp.einsum("btkgs,bskh->btkgh", ds, kf, precision="highest"))
    dk += jnp.einsum("btkgs,btkgh->bskh", ds, qc, precision="highest")
  dq = jnp.concatenate(dq_chunks, axis=1).reshape(B, T, N, H)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dsinks
