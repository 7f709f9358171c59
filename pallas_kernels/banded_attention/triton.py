"""GPU variant: Pallas Triton backend (explicit ``pallas.triton.CompilerParams``).

Prefill kernel: grid (q blocks, B, K). One program owns BQ query positions of ALL G = N/K query
heads that share kv head h (rows r = t * G + g of a (BQ*G, H) tile), so every K/V tile it loads
feeds G heads (K/V read once per kv head per q block). The program loops only over the KV
blocks that intersect its band [p_lo - W + 1, min(p_hi, kv_len - 1)]. MMA operands are the input
dtype (bf16 -> bf16 MMA), statistics are f32, softmax uses exp2 with log2(e) folded into the
scale. The sink initialises the running max/denominator (m = sink, l = 1).

Decode kernel (split-K / flash-decoding): grid (B, K, n_split); each program scans its share of
the cache slots that can be visible and writes an un-normalised partial (acc, m, l) without the
sink; ``common.combine_partials`` merges the partials, the new tokens and the sink.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import common

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_NEG = -1e30  # finite floor for the running max (keeps exp2(m_prev - m_new) NaN-free)


def next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def dot(a, b, **kw):
  # f32 inputs: true f32 MMA operands (no tf32); bf16 inputs: bf16 MMA, f32 accumulation
  if a.dtype == jnp.float32 or b.dtype == jnp.float32:
    kw["allow_tf32"] = False
  return plgpu.dot(a, b, **kw)


def online_softmax_step(q, k, v, vis, scale2, carry):
  """One key block of the base-2 online softmax (shared with the paged kernel): the scores of `q`
  against `k` scaled by `scale2` (sm_scale * log2 e), hidden where not `vis` [rows, bk], folded
  into the running (acc, m, l)."""
  acc, m, l = carry
  s = jnp.where(vis, dot(q, k, trans_b=True) * scale2, -jnp.inf)  # f32 [rows, bk]
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l = l * alpha + jnp.sum(p, axis=1)
  acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
  return acc, m_new, l


def _fold_rows(x, bq, g):
  # (BQ, G) -> (BQ*G,) row vector, rows r = t*G + g
  return x.reshape(bq * g)


# --------------------------------------------------------------------------------------------
# Prefill forward
# --------------------------------------------------------------------------------------------
def _prefill_kernel(qoff_ref, kvlen_ref, q_ref, k_ref, v_ref, sink_ref, o_ref, *lse_ref,
                    scale2, window, block_q, block_k, groups, t_len, s_len):
  qi = pl.program_id(0)
  bq, bk, g = block_q, block_k, groups
  rows = bq * g
  t0 = qi * bq
  qoff = qoff_ref[0]
  kvlen = jnp.minimum(kvlen_ref[0], s_len)

  t_idx = t0 + jnp.arange(bq, dtype=jnp.int32)
  t_ok = t_idx < t_len
  q = plgpu.load(q_ref.at[pl.ds(t0, bq)], mask=t_ok[:, None, None], other=0.0)
  q = q.reshape(rows, q.shape[-1])
  qpos = qoff + _fold_rows(jnp.broadcast_to(t_idx[:, None], (bq, g)), bq, g)  # [rows]

  sink = plgpu.load(sink_ref).astype(jnp.float32) * LOG2E  # [G]
  sink = _fold_rows(jnp.broadcast_to(sink[None, :], (bq, g)), bq, g)
  no_sink = sink == -jnp.inf
  m0 = jnp.where(no_sink, _NEG, sink)
  l0 = jnp.where(no_sink, 0.0, 1.0).astype(jnp.float32)
  acc0 = jnp.zeros((rows, q.shape[-1]), jnp.float32)

  kb_lo, kb_hi = common.kv_block_range(qoff, kvlen, t0, window=window, bq=bq, bk=bk, t_len=t_len)

  def body(kb, carry):
    kpos = kb * bk + jnp.arange(bk, dtype=jnp.int32)
    kin = kpos < kvlen
    k = plgpu.load(k_ref.at[pl.ds(kb * bk, bk)], mask=kin[:, None], other=0.0)
    v = plgpu.load(v_ref.at[pl.ds(kb * bk, bk)], mask=kin[:, None], other=0.0)
    vis = (kpos[None, :] <= qpos[:, None]) & kin[None, :]
    if window is not None:
      vis &= kpos[None, :] > (qpos[:, None] - window)
    return online_softmax_step(q, k, v, vis, scale2, carry)

  acc, m, l = lax.fori_loop(kb_lo, kb_hi, body, (acc0, m0, l0))
  l_safe = jnp.where(l > 0, l, 1.0)
  o = acc / l_safe[:, None]
  o = o.reshape(bq, g, o.shape[-1]).astype(o_ref.dtype)
  plgpu.store(o_ref.at[pl.ds(t0, bq)], o, mask=t_ok[:, None, None])
  if not lse_ref:
    return
  lse = jnp.where(l > 0, (m + jnp.log2(l_safe)) * LN2, -jnp.inf).reshape(bq, g)
  plgpu.store(lse_ref[0].at[pl.ds(t0, bq)], lse, mask=t_ok[:, None])


def prefill_forward(q, k, v, sinks, q_offset, kv_len, *, window, sm_scale, block_q=None,
                    block_k=64, num_warps=None, num_stages=2, return_lse=True,
                    interpret=False):
  """Returns (out [B,T,N,H] q.dtype, lse [B,T,N] f32 natural log incl. sink, or None)."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  f32 = q.dtype == jnp.float32
  if block_q is None:  # f32 runs on FMA (no tf32): smaller tiles keep it spill-free
    block_q = max(1, (32 if f32 else 128) // G)
    block_q = max(min(block_q, next_pow2(T)), max(1, 16 // G))
  if f32:
    block_k = min(block_k, 32)
  rows = block_q * G
  block_k = max(16, min(block_k, next_pow2(S)))
  if num_warps is None:
    num_warps = 8 if rows >= 128 else 4
  nq = pl.cdiv(T, block_q)
  q5 = q.reshape(B, T, K, G, H)
  sink2 = jnp.asarray(sinks, jnp.float32).reshape(K, G)
  kernel = functools.partial(_prefill_kernel, scale2=sm_scale * LOG2E, window=window,
                             block_q=block_q, block_k=block_k, groups=G, t_len=T, s_len=S)
  out_shape = [jax.ShapeDtypeStruct((B, T, K, G, H), q.dtype),
               jax.ShapeDtypeStruct((B, T, K, G), jnp.float32)][:2 if return_lse else 1]
  cost = common.prefill_cost(q, k, window=window, kind="forward",
                             operands=(q_offset, kv_len, q5, sink2), outputs=out_shape, kv=(k, v))
  outs = pl.pallas_call(
      kernel,
      grid=(nq, B, K),
      in_specs=[
          pl.BlockSpec((1,), lambda i, b, h: (b,)),
          pl.BlockSpec((1,), lambda i, b, h: (b,)),
          pl.BlockSpec((None, T, None, G, H), lambda i, b, h: (b, 0, h, 0, 0)),
          pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, G), lambda i, b, h: (h, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, T, None, G, H), lambda i, b, h: (b, 0, h, 0, 0)),
          pl.BlockSpec((None, T, None, G), lambda i, b, h: (b, 0, h, 0)),
      ][:2 if return_lse else 1],
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      cost_estimate=cost,
      name="banded_attention_prefill",
  )(q_offset, kv_len, q5, k, v, sink2)
  out = outs[0].reshape(B, T, N, H)
  return out, (outs[1].reshape(B, T, N) if return_lse else None)


# --------------------------------------------------------------------------------------------
# Decode: split-K partials over the cache
# --------------------------------------------------------------------------------------------
def _decode_kernel(clen_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale2, window,
                   block_q, block_k, groups, t_len, s_cache, blocks_per_split):
  sp, qb = pl.program_id(2), pl.program_id(3)
  bq, bk, g = block_q, block_k, groups
  rows = bq * g
  clen = clen_ref[0]
  t_idx = qb * bq + jnp.arange(bq, dtype=jnp.int32)
  t_ok = t_idx < t_len
  q = plgpu.load(q_ref.at[pl.ds(0, bq)], mask=t_ok[:, None, None], other=0.0)
  q = q.reshape(rows, q.shape[-1])
  qpos = clen + _fold_rows(jnp.broadcast_to(t_idx[:, None], (bq, g)), bq, g)

  n_valid = jnp.minimum(clen, s_cache)  # number of filled slots
  wrapped = clen > s_cache
  if window is None:
    s_lo = jnp.int32(0)
  else:
    s_lo = jnp.where(wrapped, 0, jnp.maximum(clen - window + 1, 0))
  s_hi = n_valid  # exclusive (slots >= n_valid are empty)
  kb_lo = jnp.maximum(s_lo // bk, sp * blocks_per_split)
  kb_hi = jnp.minimum(lax.div(s_hi + bk - 1, bk), (sp + 1) * blocks_per_split)

  def body(kb, carry):
    slot = kb * bk + jnp.arange(bk, dtype=jnp.int32)
    sin = slot < n_valid
    k = plgpu.load(k_ref.at[pl.ds(kb * bk, bk)], mask=sin[:, None], other=0.0)
    v = plgpu.load(v_ref.at[pl.ds(kb * bk, bk)], mask=sin[:, None], other=0.0)
    pos = clen - 1 - lax.rem(clen - 1 - slot + s_cache, s_cache)
    vis = (sin & (pos >= 0))[None, :]
    if window is not None:
      vis = vis & (pos[None, :] > qpos[:, None] - window)
    return online_softmax_step(q, k, v, vis, scale2, carry)

  acc0 = jnp.zeros((rows, q.shape[-1]), jnp.float32)
  m0 = jnp.full((rows,), _NEG, jnp.float32)
  l0 = jnp.zeros((rows,), jnp.float32)
  acc, m, l = lax.fori_loop(kb_lo, kb_hi, body, (acc0, m0, l0))
  acc_ref[...] = acc
  m_ref[...] = m * LN2
  l_ref[...] = l


def decode_partials(q, k_cache, v_cache, cache_len, *, window, sm_scale, block_k=64,
                    num_splits=None, num_warps=4, num_stages=2, interpret=False):
  """Partials over the cache only. Returns acc [B,K,P,R,H], m [B,K,P,R], l [B,K,P,R] (f32,
  natural-log m, rows r = t*G + g for t < block_q; rows with t >= T are padding)."""
  B, T, N, H = q.shape
  Sc, K = k_cache.shape[1], k_cache.shape[2]
  G = N // K
  # query rows per program: >= 16 (MMA minimum), <= 128 (registers); chunked prefill with
  # T*G > 128 gets a q-block grid axis
  block_q = max(min(next_pow2(T), max(1, 128 // G)), max(1, 16 // G))
  n_qb = pl.cdiv(T, block_q)
  rows = block_q * G
  block_k = max(16, min(block_k, next_pow2(Sc)))
  n_blocks = pl.cdiv(Sc, block_k)
  if num_splits is None:
    num_splits = max(1, min(n_blocks, pl.cdiv(264, B * K)))  # ~2 waves on 132 SMs
  bps = pl.cdiv(n_blocks, num_splits)
  num_splits = pl.cdiv(n_blocks, bps)
  q5 = q.reshape(B, T, K, G, H)
  if n_qb * block_q != T:
    q5 = jnp.pad(q5, ((0, 0), (0, n_qb * block_q - T), (0, 0), (0, 0), (0, 0)))
  kernel = functools.partial(_decode_kernel, scale2=sm_scale * LOG2E, window=window,
                             block_q=block_q, block_k=block_k, groups=G, t_len=T, s_cache=Sc,
                             blocks_per_split=bps)
  out_shape = [jax.ShapeDtypeStruct((B, K, num_splits, n_qb * rows, H), jnp.float32),
               jax.ShapeDtypeStruct((B, K, num_splits, n_qb * rows), jnp.float32),
               jax.ShapeDtypeStruct((B, K, num_splits, n_qb * rows), jnp.float32)]
  cost = common.decode_cost(q, k_cache, window=window, operands=(cache_len, q5), outputs=out_shape,
                            kv=(k_cache, v_cache))
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(B, K, num_splits, n_qb),
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, s, i: (b,)),
          pl.BlockSpec((None, block_q, None, G, H), lambda b, h, s, i: (b, i, h, 0, 0)),
          pl.BlockSpec((None, Sc, None, H), lambda b, h, s, i: (b, 0, h, 0)),
          pl.BlockSpec((None, Sc, None, H), lambda b, h, s, i: (b, 0, h, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, H), lambda b, h, s, i: (b, h, s, i, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s, i: (b, h, s, i)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s, i: (b, h, s, i)),
      ],
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      cost_estimate=cost,
      name="banded_attention_decode",
  )(cache_len, q5, k_cache, v_cache)
  return acc, m, l, n_qb * block_q


# --------------------------------------------------------------------------------------------
# Prefill backward (FlashAttention-2 style, recomputes P from the saved lse)
# --------------------------------------------------------------------------------------------
def _bwd_rows(ref, t0, bq, g, t_ok):
  x = plgpu.load(ref.at[pl.ds(t0, bq)], mask=t_ok[:, None, None], other=0.0)
  return x.reshape(bq * g, x.shape[-1])


def _bwd_stats(lse_ref, delta_ref, t0, bq, g, t_ok):
  lse = plgpu.load(lse_ref.at[pl.ds(t0, bq)], mask=t_ok[:, None], other=0.0).reshape(bq * g)
  lse = jnp.where(lse == -jnp.inf, 0.0, lse) * LOG2E  # rows without keys/sink have P = 0
  delta = plgpu.load(delta_ref.at[pl.ds(t0, bq)], mask=t_ok[:, None], other=0.0)
  return lse, delta.reshape(bq * g)


def _dkdv_kernel(qoff_ref, kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, scale, window, block_q, block_k, groups, t_len, s_len):
  kb = pl.program_id(0)
  bq, bk, g = block_q, block_k, groups
  qoff = qoff_ref[0]
  kvlen = jnp.minimum(kvlen_ref[0], s_len)
  kpos = kb * bk + jnp.arange(bk, dtype=jnp.int32)
  kin = kpos < kvlen
  k = plgpu.load(k_ref.at[pl.ds(kb * bk, bk)], mask=kin[:, None], other=0.0)
  v = plgpu.load(v_ref.at[pl.ds(kb * bk, bk)], mask=kin[:, None], other=0.0)
  qb_lo, qb_hi = common.q_block_range(qoff, kvlen, kb, window=window, bq=bq, bk=bk, t_len=t_len)
  scale2 = scale * LOG2E

  def body(qb, carry):
    dk, dv = carry
    t0 = qb * bq
    t_idx = t0 + jnp.arange(bq, dtype=jnp.int32)
    t_ok = t_idx < t_len
    q = _bwd_rows(q_ref, t0, bq, g, t_ok)
    do = _bwd_rows(do_ref, t0, bq, g, t_ok)
    lse2, delta = _bwd_stats(lse_ref, delta_ref, t0, bq, g, t_ok)
    qpos = qoff + jnp.broadcast_to(t_idx[:, None], (bq, g)).reshape(bq * g)
    vis = (kpos[None, :] <= qpos[:, None]) & kin[None, :]
    if window is not None:
      vis &= kpos[None, :] > (qpos[:, None] - window)
    s = dot(q, k, trans_b=True) * scale2
    p = jnp.where(vis, jnp.exp2(s - lse2[:, None]), 0.0)  # [rows, bk]
    dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
    dp = dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  hd = k.shape[-1]
  zeros = jnp.zeros((bk, hd), jnp.float32)
  dk, dv = lax.fori_loop(qb_lo, qb_hi, body, (zeros, zeros))
  plgpu.store(dk_ref.at[pl.ds(kb * bk, bk)], (dk * scale).astype(dk_ref.dtype),
              mask=(kpos < s_len)[:, None])
  plgpu.store(dv_ref.at[pl.ds(kb * bk, bk)], dv.astype(dv_ref.dtype),
              mask=(kpos < s_len)[:, None])


def _dq_kernel(qoff_ref, kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, window, block_q, block_k, groups, t_len, s_len):
  qi = pl.program_id(0)
  bq, bk, g = block_q, block_k, groups
  rows = bq * g
  t0 = qi * bq
  qoff = qoff_ref[0]
  kvlen = jnp.minimum(kvlen_ref[0], s_len)
  t_idx = t0 + jnp.arange(bq, dtype=jnp.int32)
  t_ok = t_idx < t_len
  q = _bwd_rows(q_ref, t0, bq, g, t_ok)
  do = _bwd_rows(do_ref, t0, bq, g, t_ok)
  lse2, delta = _bwd_stats(lse_ref, delta_ref, t0, bq, g, t_ok)
  qpos = qoff + jnp.broadcast_to(t_idx[:, None], (bq, g)).reshape(rows)
  kb_lo, kb_hi = common.kv_block_range(qoff, kvlen, t0, window=window, bq=bq, bk=bk, t_len=t_len)
  scale2 = scale * LOG2E

  def body(kb, dq):
    kpos = kb * bk + jnp.arange(bk, dtype=jnp.int32)
    kin = kpos < kvlen
    k = plgpu.load(k_ref.at[pl.ds(kb * bk, bk)], mask=kin[:, None], other=0.0)
    v = plgpu.load(v_ref.at[pl.ds(kb * bk, bk)], mask=kin[:, None], other=0.0)
    vis = (kpos[None, :] <= qpos[:, None]) & kin[None, :]
    if window is not None:
      vis &= kpos[None, :] > (qpos[:, None] - window)
    s = dot(q, k, trans_b=True) * scale2
    p = jnp.where(vis, jnp.exp2(s - lse2[:, None]), 0.0)
    dp = dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(kb_lo, kb_hi, body,
                     jnp.zeros((rows, q.shape[-1]), jnp.float32))
  dq = (dq * scale).reshape(bq, g, dq.shape[-1]).astype(dq_ref.dtype)
  plgpu.store(dq_ref.at[pl.ds(t0, bq)], dq, mask=t_ok[:, None, None])


def prefill_backward(q, k, v, out, lse, do, q_offset, kv_len, *, window, sm_scale, block_q=None,
                     block_k=64, num_warps=None, num_stages=2, interpret=False):
  """dq, dk, dv (sinks' gradient is computed by the caller from lse and delta)."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  if block_q is None:
    block_q = max(min(max(1, 64 // G), next_pow2(T)), max(1, 16 // G))
  block_k = max(16, min(block_k, next_pow2(S)))
  if num_warps is None:
    num_warps = 4
  q5, do5 = q.reshape(B, T, K, G, H), do.reshape(B, T, K, G, H)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  lse4, delta4 = lse.reshape(B, T, K, G), delta.reshape(B, T, K, G)
  static = dict(scale=sm_scale, window=window, block_q=block_q, block_k=block_k, groups=G,
                t_len=T, s_len=S)
  specs = lambda: [
      pl.BlockSpec((1,), lambda i, b, h: (b,)),
      pl.BlockSpec((1,), lambda i, b, h: (b,)),
      pl.BlockSpec((None, T, None, G, H), lambda i, b, h: (b, 0, h, 0, 0)),
      pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, T, None, G, H), lambda i, b, h: (b, 0, h, 0, 0)),
      pl.BlockSpec((None, T, None, G), lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, T, None, G), lambda i, b, h: (b, 0, h, 0)),
  ]
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  args = (q_offset, kv_len, q5, k, v, do5, lse4, delta4)
  rows_in = (q_offset, kv_len, q5, do5, lse4, delta4)  # every operand but k, v (read over the band)
  dkdv_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  dq_shape = jax.ShapeDtypeStruct((B, T, K, G, H), q.dtype)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, **static),
      grid=(pl.cdiv(S, block_k), B, K),
      in_specs=specs(),
      out_specs=[pl.BlockSpec((None, S, None, H), lambda i, b, h: (b, 0, h, 0))] * 2,
      out_shape=dkdv_shape,
      compiler_params=params, interpret=interpret, name="banded_attention_bwd_dkdv",
      cost_estimate=common.prefill_cost(q, k, window=window, kind="dkdv", operands=rows_in,
                                        outputs=dkdv_shape, kv=(k, v)),
  )(*args)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid=(pl.cdiv(T, block_q), B, K),
      in_specs=specs(),
      out_specs=pl.BlockSpec((None, T, None, G, H), lambda i, b, h: (b, 0, h, 0, 0)),
      out_shape=dq_shape,
      compiler_params=params, interpret=interpret, name="banded_attention_bwd_dq",
      cost_estimate=common.prefill_cost(q, k, window=window, kind="dq", operands=rows_in,
                                        outputs=(dq_shape,), kv=(k, v)),
  )(*args)
  return dq.reshape(B, T, N, H), dk, dv
