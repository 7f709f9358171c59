"""GPU variant: Pallas Triton backend (explicit ``pallas.triton.CompilerParams``).

Grid (B, K, NS, NQB): one program owns a block of BQ queries of one row and ALL G = N/K query
heads that share kv head h (rows r = t*G + g of one (BQ*G, H) tile), so every K/V row it loads
feeds G heads. It walks its share (one of NS splits) of the row's visible key range
[max(0, q_start + t0 - W + 1), q_start + min(t0 + BQ, n_new)) in blocks of BK logical
positions. Each block gathers its page ids from the block table (one entry per key position,
an L1-resident load) and then the K/V rows: position p lives at row p % S of page
block_tables[b, p // S], so the loads are one 2·H-byte contiguous row per key (vectorised
16-byte loads) and a block may straddle pages of any size S. Keys outside the range are
masked off the load: pages before the window start or past the last key are never touched.

MMA operands stay in the input dtype (bf16 -> bf16 MMA), softmax statistics are f32, exp2 with
log2(e) folded into the scale. Split 0 starts the running max / denominator at the sink
(m = sink, l = 1). With NS = 1 the program normalises and writes o directly (rows t >= n_new
exact zeros); with NS > 1 (flash-decoding: few rows x kv heads for 132 SMs) each split writes an
un-normalised partial (acc, m, l) that ``common.combine_partials`` merges in XLA.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..banded_attention.triton import dot, next_pow2, online_softmax_step
from . import common

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_NEG = -1e30  # finite floor of the running max: exp2(m_prev - m_new) stays NaN-free
SM_COUNT = 132  # H100 SXM


def tiling(t_len: int, groups: int, dtype) -> tuple[int, int, int]:
  """(BQ, BK, num_warps): BQ*G query rows per program, >= 16 (MMA minimum) and <= 128
  (registers; 32 for f32, which runs on FMA); BK = 128 keys per step for decode-sized tiles,
  64 (32 for f32) next to 128 rows."""
  f32 = jnp.dtype(dtype) == jnp.float32
  cap = 32 if f32 else 128
  bq = max(min(next_pow2(t_len), max(1, cap // groups)), max(1, 16 // groups))
  rows = bq * groups
  if f32:
    bk = 32
  else:
    bk = 128 if rows <= 32 else 64
  return bq, bk, 8 if rows >= 128 else 4


def default_splits(programs: int, span: int, block_k: int) -> int:
  """Flash-decoding splits of each program's key range: 1 when rows x kv heads x q blocks fill
  the SMs; else enough for ~2 waves, at most one per key block of the longest range `span`."""
  if programs >= SM_COUNT:
    return 1
  return max(1, min(pl.cdiv(span, block_k) + 1, pl.cdiv(2 * SM_COUNT, programs)))


def _kernel(qs_ref, nn_ref, bt_ref, q_ref, k_ref, v_ref, sink_ref, *out_refs, scale2, window,
            block_q, block_k, groups, t_len, page_size, max_pages, n_splits, finalize):
  sp, qb = pl.program_id(2), pl.program_id(3)
  bq, bk, g, S = block_q, block_k, groups, page_size
  rows = bq * g
  qs = qs_ref[0]
  nn = jnp.minimum(nn_ref[0], t_len)
  t0 = qb * bq
  t_idx = t0 + jnp.arange(bq, dtype=jnp.int32)
  t_ok = t_idx < nn
  q = plgpu.load(q_ref.at[pl.ds(t0, bq)], mask=t_ok[:, None, None], other=0.0)
  q = q.reshape(rows, q.shape[-1])
  row_t = jnp.broadcast_to(t_idx[:, None], (bq, g)).reshape(rows)
  row_ok = row_t < nn
  qpos = qs + row_t

  sink = plgpu.load(sink_ref).astype(jnp.float32) * LOG2E  # [G]
  sink = jnp.broadcast_to(sink[None, :], (bq, g)).reshape(rows)
  with_sink = (sink != -jnp.inf) & (sp == 0)
  m0 = jnp.where(with_sink, sink, _NEG)
  l0 = jnp.where(with_sink, 1.0, 0.0).astype(jnp.float32)
  acc0 = jnp.zeros((rows, q.shape[-1]), jnp.float32)

  k_lo, k_hi = common.key_range(qs, nn, t0, block_q=bq, window=window)
  k_hi = jnp.minimum(k_hi, max_pages * S)  # never index past the row's block table
  kb_lo = lax.div(k_lo, bk)
  kb_hi = lax.div(k_hi + bk - 1, bk)
  per = lax.div(kb_hi - kb_lo + n_splits - 1, n_splits)
  my_lo = jnp.minimum(kb_lo + sp * per, kb_hi)
  my_hi = jnp.minimum(my_lo + per, kb_hi)
  col = jnp.arange(q.shape[-1], dtype=jnp.int32)

  def body(kb, carry):
    kp = kb * bk + jnp.arange(bk, dtype=jnp.int32)
    kin = (kp >= k_lo) & (kp < k_hi)
    lp = lax.div(kp, S)
    phys = plgpu.load(bt_ref.at[lp], mask=kin, other=0)
    at = (phys[:, None], (kp - lp * S)[:, None], col[None, :])
    k = plgpu.load(k_ref.at[at], mask=kin[:, None], other=0.0)
    v = plgpu.load(v_ref.at[at], mask=kin[:, None], other=0.0)
    vis = (kp[None, :] <= qpos[:, None]) & kin[None, :] & row_ok[:, None]
    if window is not None:
      vis &= kp[None, :] > (qpos[:, None] - window)
    return online_softmax_step(q, k, v, vis, scale2, carry)

  acc, m, l = lax.fori_loop(my_lo, my_hi, body, (acc0, m0, l0))
  if finalize:
    (o_ref,) = out_refs
    ok = (l > 0) & row_ok
    o = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0)
    o = o.reshape(bq, g, o.shape[-1]).astype(o_ref.dtype)
    plgpu.store(o_ref.at[pl.ds(t0, bq)], o, mask=(t_idx < t_len)[:, None, None])
  else:
    acc_ref, m_ref, l_ref = out_refs
    acc_ref[...] = acc
    m_ref[...] = m * LN2
    l_ref[...] = l


def paged_attention(q, k_pages, v_pages, block_tables, q_start, n_new, sinks, *, window,
                    sm_scale, block_q=None, block_k=None, num_splits=None, num_warps=None,
                    num_stages=2, interpret=False):
  B, T, N, H = q.shape
  P, S, K, _ = k_pages.shape
  M = block_tables.shape[1]
  G = N // K
  for name, x in (("head dim H", H), ("GQA group N/K", G)):
    if x & (x - 1):
      raise ValueError(f"the Triton kernel needs a power-of-two {name}, got {x}")
  bq, bk, nw = tiling(T, G, q.dtype)
  bq, bk = block_q or bq, block_k or bk
  num_warps = num_warps or nw
  n_qb = pl.cdiv(T, bq)
  rows = bq * G
  if num_splits is None:
    num_splits = default_splits(B * K * n_qb, M * S if window is None else bq + window - 1, bk)
  finalize = num_splits == 1
  q5 = q.reshape(B, T, K, G, H)
  sink2 = jnp.asarray(sinks, jnp.float32).reshape(K, G)
  kernel = functools.partial(_kernel, scale2=sm_scale * LOG2E, window=window, block_q=bq,
                             block_k=bk, groups=G, t_len=T, page_size=S, max_pages=M,
                             n_splits=num_splits,
                             finalize=finalize)
  if finalize:
    out_shape = [jax.ShapeDtypeStruct((B, T, K, G, H), q.dtype)]
    out_specs = [pl.BlockSpec((None, T, None, G, H), lambda b, h, s, i: (b, 0, h, 0, 0))]
  else:
    out_shape = [jax.ShapeDtypeStruct((B, K, num_splits, n_qb * rows, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, num_splits, n_qb * rows), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, num_splits, n_qb * rows), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, rows, H), lambda b, h, s, i: (b, h, s, i, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, s, i: (b, h, s, i)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, s, i: (b, h, s, i))]
  cost = common.cost_estimate(q, k_pages, block_tables, window=window, block_q=bq,
                              operands=(q_start, n_new, block_tables, q5, sink2),
                              outputs=out_shape)
  outs = pl.pallas_call(
      kernel,
      grid=(B, K, num_splits, n_qb),
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, s, i: (b,)),
          pl.BlockSpec((1,), lambda b, h, s, i: (b,)),
          pl.BlockSpec((None, M), lambda b, h, s, i: (b, 0)),
          pl.BlockSpec((None, T, None, G, H), lambda b, h, s, i: (b, 0, h, 0, 0)),
          pl.BlockSpec((P, S, None, H), lambda b, h, s, i: (0, 0, h, 0)),
          pl.BlockSpec((P, S, None, H), lambda b, h, s, i: (0, 0, h, 0)),
          pl.BlockSpec((None, G), lambda b, h, s, i: (h, 0)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      cost_estimate=cost,
      name="paged_attention",
  )(q_start, n_new, block_tables, q5, k_pages, v_pages, sink2)
  if finalize:
    return outs[0].reshape(B, T, N, H)
  acc, m, l = outs
  return common.combine_partials(acc, m, l, n_new, t_len=T, groups=G).astype(q.dtype)
