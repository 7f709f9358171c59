"""TPU variant: Pallas Mosaic TPU kernels.

Prefill: grid (B, K, q blocks, band kv steps). q is folded per kv head in the wrapper to
[B, K, T*G, H] (rows r = t*G + g) so one program's (R = BQ*G, H) tile holds every query head that
shares kv head h; each K/V tile DMA'd into VMEM feeds all G heads. The kv grid axis only spans
the band: step j maps (through the scalar-prefetched q_offset / kv_len) to kv block
kb_lo + j, clamped to the last block of the band, so out-of-band steps repeat the previous block
index (Pallas skips the DMA) and their compute is skipped with pl.when. K/V are read in their
native [B, S, K, H] layout with (BK, H) blocks of one kv head. Sinks, q_offset and kv_len live in
SMEM (scalar prefetch). Running max / denominator / accumulator are f32 VMEM scratch; MMA operands
stay in the input dtype (bf16 on the MXU).

Decode: grid (B, K, cache blocks), same structure over the cache slots that can be visible
(ring buffers: all W slots; contiguous caches: [cache_len - W + 1, cache_len) or
[0, cache_len)); writes one un-normalised partial per (b, h) that ``common.combine_partials``
merges with the new tokens and the sink.

Backward: a dQ kernel (same band walk as the forward) and a dK/dV kernel (grid over kv blocks,
clamped walk over the q blocks whose queries can see the block), from the saved lse.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import common

_NEG = -1e30


def _div(x, g):
  return (x >> (g.bit_length() - 1)) if g & (g - 1) == 0 else x // g


def _mod(x, g):
  return (x & (g - 1)) if g & (g - 1) == 0 else x % g


def _mm(a, b, dims):
  """MXU matmul with f32 accumulation. The precision is explicit: a global
  `jax_default_matmul_precision="highest"` would otherwise ask Mosaic for an fp32 contraction of
  bf16 operands, which it rejects ("Bad lhs type")."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def online_softmax_update(q_ref, k_ref, v_ref, vis, v_ok, scale, m_sc, l_sc, acc_sc, n_heads_kv):
  """One KV block of the flash-attention recurrence for every kv head h (its q heads are the rows of
  q_ref[h]): masked logits, running max / denominator / accumulator in VMEM scratch."""
  for h in range(n_heads_kv):
    s = _mm(q_ref[h], k_ref[:, h, :], (((1,), (1,)), ((), ()))) * scale
    s = jnp.where(vis, s, -jnp.inf)
    v = v_ref[:, h, :]
    v = jnp.where(v_ok, v, jnp.zeros_like(v))
    m_prev = m_sc[h]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_sc[h] = l_sc[h] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[h] = acc_sc[h] * alpha + _mm(p.astype(v.dtype), v, (((1,), (0,)), ((), ())))
    m_sc[h] = m_new


def _prefill_band(b, i, qoff_ref, kvlen_ref, *, window, bq, bk, t_len, s_len):
  return common.kv_block_range(qoff_ref[b], jnp.minimum(kvlen_ref[b], s_len), i * bq, window=window, bq=bq,
                               bk=bk, t_len=t_len)


def _q_block_rows(b, i, qoff_ref, kvlen_ref, *, window, bq, bk, groups, t_len, s_len):
  """Row-side setup of q block i of row b: its KV band, the valid key count, and per folded row
  r = t*G + g (a (rows, 1) iota) its query position."""
  kb_lo, kb_hi = _prefill_band(b, i, qoff_ref, kvlen_ref, window=window, bq=bq, bk=bk, t_len=t_len,
                               s_len=s_len)
  r = lax.broadcasted_iota(jnp.int32, (bq * groups, 1), 0)
  return kb_lo, kb_hi, jnp.minimum(kvlen_ref[b], s_len), r, qoff_ref[b] + i * bq + _div(r, groups)


def _visible(kb, bk, qpos, kvlen, window):
  """(rows, bk) mask of KV block kb for (rows, 1) query positions: key j visible iff j <= qpos,
  j < kvlen and (sliding) j > qpos - W."""
  kpos = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  vis = (kpos <= qpos) & (kpos < kvlen)
  if window is not None:
    vis &= kpos > qpos - window
  return vis


def _kv_block(kb_lo, kb_hi, j, n_blocks):
  blk = jnp.minimum(kb_lo + j, jnp.maximum(kb_hi - 1, kb_lo))
  return jnp.clip(blk, 0, n_blocks - 1)


def _prefill_kernel(qoff_ref, kvlen_ref, sink_ref, q_ref, k_ref, v_ref, o_ref, *refs, scale, window, bq, bk, groups, n_heads_kv, t_len,
                    s_len, n_kv):
  lse_ref, (m_sc, l_sc, acc_sc) = (refs[0] if len(refs) == 4 else None), refs[-3:]
  b, i, j = (pl.program_id(a) for a in range(3))
  g = groups
  kb_lo, kb_hi, kvlen, r, qpos = _q_block_rows(b, i, qoff_ref, kvlen_ref, window=window, bq=bq, bk=bk,
                                               groups=g, t_len=t_len, s_len=s_len)

  @pl.when(j == 0)
  def _init():
    gr = _mod(r, g)
    for h in range(n_heads_kv):
      sink = jnp.full(r.shape, -jnp.inf, jnp.float32)
      for gg in range(g):
        sink = jnp.where(gr == gg, sink_ref[h * g + gg], sink)
      no_sink = sink == -jnp.inf
      m_sc[h] = jnp.where(no_sink, _NEG, sink)
      l_sc[h] = jnp.where(no_sink, 0.0, 1.0)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  kb = kb_lo + j

  @pl.when(kb < kb_hi)
  def _step():
    vis = _visible(kb, bk, qpos, kvlen, window)
    kcol = kb * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    # every q head sharing kv head h is a row of q_ref[h]; rows past kv_len (or the padded edge
    # block) may hold garbage: their V rows are zeroed (0 * NaN guard)
    online_softmax_update(q_ref, k_ref, v_ref, vis, kcol < kvlen, scale, m_sc, l_sc, acc_sc, n_heads_kv)

  @pl.when(j == n_kv - 1)
  def _fin():
    l = l_sc[...]
    ok = l > 0
    l_safe = jnp.where(ok, l, 1.0)
    o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
    if lse_ref is not None:
      lse_ref[...] = jnp.where(ok, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def prefill_forward(q, k, v, sinks, q_offset, kv_len, *, window, sm_scale, block_q=None,
                    block_k=128, vmem_limit_bytes=None, return_lse=True, interpret=False):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  if block_q is None:  # 512 rows per kv head; 256 when the (lane-padded) lse is also written
    block_q = max(8, (256 if return_lse else 512) // G)
  block_q = min(block_q, -(-T // 8) * 8)
  rows = block_q * G
  block_k = min(block_k, -(-S // 8) * 8)
  nq = pl.cdiv(T, block_q)
  tp = nq * block_q
  n_blocks = pl.cdiv(S, block_k)
  if window is None:
    n_kv = n_blocks
  else:
    n_kv = min(n_blocks, pl.cdiv(block_q + window - 1, block_k) + 1)
  qf = q.reshape(B, T, K, G, H)
  if tp != T:
    qf = jnp.pad(qf, ((0, 0), (0, tp - T), (0, 0), (0, 0), (0, 0)))
  qf = jnp.transpose(qf, (0, 2, 1, 3, 4)).reshape(B, K, tp * G, H)
  band = functools.partial(_prefill_band, window=window, bq=block_q, bk=block_k, t_len=T,
                           s_len=S)

  def kv_map(b, i, j, qoff_ref, kvlen_ref, sink_ref):
    lo, hi = band(b, i, qoff_ref, kvlen_ref)
    return (b, _kv_block(lo, hi, j, n_blocks), 0, 0)

  kernel = functools.partial(_prefill_kernel, scale=sm_scale, window=window, bq=block_q,
                             bk=block_k, groups=G, n_heads_kv=K, t_len=T, s_len=S,
                             n_kv=n_kv)
  out_shape = [jax.ShapeDtypeStruct((B, K, tp * G, H), q.dtype),
               jax.ShapeDtypeStruct((B, K, tp * G, 1), jnp.float32)][:2 if return_lse else 1]
  sinks = jnp.asarray(sinks, jnp.float32)
  cost = common.prefill_cost(q, k, window=window, kind="forward",
                             operands=(q_offset, kv_len, sinks, qf), outputs=out_shape, kv=(k, v))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(B, nq, n_kv),
          in_specs=[
              pl.BlockSpec((None, K, rows, H), lambda b, i, j, *_: (b, 0, i, 0)),
              pl.BlockSpec((None, block_k, K, H), kv_map),
              pl.BlockSpec((None, block_k, K, H), kv_map),
          ],
          out_specs=[
              pl.BlockSpec((None, K, rows, H), lambda b, i, j, *_: (b, 0, i, 0)),
              pl.BlockSpec((None, K, rows, 1), lambda b, i, j, *_: (b, 0, i, 0)),
          ][:2 if return_lse else 1],
          scratch_shapes=[pltpu.VMEM((K, rows, 1), jnp.float32),
                          pltpu.VMEM((K, rows, 1), jnp.float32),
                          pltpu.VMEM((K, rows, H), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=cost,
      name="banded_attention_prefill_tpu",
  )(q_offset, kv_len, sinks, qf, k, v)
  out, lse = (outs[0], outs[1]) if return_lse else (outs[0], None)
  out = out.reshape(B, K, tp, G, H)[:, :, :T]
  out = jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(B, T, N, H)
  if lse is None:
    return out, None
  lse = lse.reshape(B, K, tp, G)[:, :, :T]
  lse = jnp.transpose(lse, (0, 2, 1, 3)).reshape(B, T, N)
  return out, lse


# --------------------------------------------------------------------------------------------
# Decode partials
# --------------------------------------------------------------------------------------------
def _decode_band(b, clen_ref, *, window, bk, s_cache):
  clen = clen_ref[b]
  n_valid = jnp.minimum(clen, s_cache)
  if window is None:
    s_lo = 0
  else:
    s_lo = jnp.where(clen > s_cache, 0, jnp.maximum(clen - window + 1, 0))
  return lax.div(jnp.int32(s_lo), bk), lax.div(n_valid + bk - 1, bk)


def _decode_kernel(clen_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, m_sc, l_sc, acc_sc, *,
                   scale, window, t_len, bk, groups, n_heads_kv, s_cache, n_kv):
  b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # row, query block, KV block
  g = groups
  rows = t_len * g  # t_len: new tokens per query block
  clen = clen_ref[b]
  kb_lo, kb_hi = _decode_band(b, clen_ref, window=window, bk=bk, s_cache=s_cache)
  n_valid = jnp.minimum(clen, s_cache)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, _NEG)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  kb = kb_lo + j

  @pl.when(kb < kb_hi)
  def _step():
    slot = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    pos = clen - 1 - lax.rem(clen - 1 - slot + s_cache, s_cache)
    vis = (slot < n_valid) & (pos >= 0)
    if window is not None:
      r = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
      qpos = clen + i * t_len + _div(r, g)
      vis = vis & (pos > qpos - window)
    kcol = kb * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    online_softmax_update(q_ref, k_ref, v_ref, vis, kcol < n_valid, scale, m_sc, l_sc, acc_sc, n_heads_kv)

  @pl.when(j == n_kv - 1)
  def _fin():
    acc_ref[...] = acc_sc[...]
    m_ref[...] = m_sc[...]
    l_ref[...] = l_sc[...]


# Query rows (new tokens x q heads per kv head) per grid step. A whole 512-token prefill chunk in one
# block (4096 rows at G = 8: f32 accumulators, lane-padded (rows, 1) statistics, double buffering)
# needs 131 MiB of VMEM, more than a v5e / v6e core has (128 MiB); 256 rows stay near 16 MiB.
DECODE_BLOCK_ROWS = 256


def decode_partials(q, k_cache, v_cache, cache_len, *, window, sm_scale, block_k=512,
                    block_rows=DECODE_BLOCK_ROWS, vmem_limit_bytes=None, interpret=False):
  B, T, N, H = q.shape
  Sc, K = k_cache.shape[1], k_cache.shape[2]
  G = N // K
  bt = min(T, max(1, block_rows // G))  # new tokens per query block
  n_q = pl.cdiv(T, bt)
  tp = n_q * bt
  rows = bt * G
  block_k = min(block_k, -(-Sc // 8) * 8)
  n_blocks = pl.cdiv(Sc, block_k)
  n_kv = n_blocks
  if window is not None and Sc > window:  # contiguous cache of a sliding layer: band only
    n_kv = min(n_blocks, pl.cdiv(window - 1, block_k) + 1)
  qf = jnp.transpose(q.reshape(B, T, K, G, H), (0, 2, 1, 3, 4))
  qf = jnp.pad(qf, ((0, 0), (0, 0), (0, tp - T), (0, 0), (0, 0))).reshape(B, K, tp * G, H)
  band = functools.partial(_decode_band, window=window, bk=block_k, s_cache=Sc)

  def kv_map(b, i, j, clen_ref):
    lo, hi = band(b, clen_ref)
    return (b, _kv_block(lo, hi, j, n_blocks), 0, 0)

  kernel = functools.partial(_decode_kernel, scale=sm_scale, window=window, t_len=bt,
                             bk=block_k, groups=G, n_heads_kv=K, s_cache=Sc, n_kv=n_kv)
  out_shape = [jax.ShapeDtypeStruct((B, K, tp * G, H), jnp.float32),
               jax.ShapeDtypeStruct((B, K, tp * G, 1), jnp.float32),
               jax.ShapeDtypeStruct((B, K, tp * G, 1), jnp.float32)]
  cost = common.decode_cost(q, k_cache, window=window, operands=(cache_len, qf), outputs=out_shape,
                            kv=(k_cache, v_cache))
  acc, m, l = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, n_q, n_kv),
          in_specs=[
              pl.BlockSpec((None, K, rows, H), lambda b, i, j, *_: (b, 0, i, 0)),
              pl.BlockSpec((None, block_k, K, H), kv_map),
              pl.BlockSpec((None, block_k, K, H), kv_map),
          ],
          out_specs=[
              pl.BlockSpec((None, K, rows, H), lambda b, i, j, *_: (b, 0, i, 0)),
              pl.BlockSpec((None, K, rows, 1), lambda b, i, j, *_: (b, 0, i, 0)),
              pl.BlockSpec((None, K, rows, 1), lambda b, i, j, *_: (b, 0, i, 0)),
          ],
          scratch_shapes=[pltpu.VMEM((K, rows, 1), jnp.float32),
                          pltpu.VMEM((K, rows, 1), jnp.float32),
                          pltpu.VMEM((K, rows, H), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=cost,
      name="banded_attention_decode_tpu",
  )(cache_len, qf, k_cache, v_cache)
  n = T * G  # the padded query rows (past T) are dropped
  return (acc[:, :, :n].reshape(B, K, 1, n, H), m[:, :, :n].reshape(B, K, 1, n), l[:, :, :n].reshape(B, K, 1, n), T)


# --------------------------------------------------------------------------------------------
# Prefill backward (FlashAttention-2 style from the saved lse; all kv heads per grid step)
# --------------------------------------------------------------------------------------------
def _fold(x, B, T, tp, K, G):
  """[B,T,K*G,...] -> [B,K,tp*G,...] (rows t*G+g, zero-padded to tp positions)."""
  tail = x.shape[3:]
  x = x.reshape((B, T, K, G) + tail)
  if tp != T:
    x = jnp.pad(x, [(0, 0), (0, tp - T)] + [(0, 0)] * (2 + len(tail)))
  x = jnp.transpose(x, (0, 2, 1, 3) + tuple(range(4, 4 + len(tail))))
  return x.reshape((B, K, tp * G) + tail)


def _bwd_tile(h, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, vis, kok, scale):
  q, do = q_ref[h], do_ref[h]
  lse = lse_ref[h]
  lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows without keys and sink: P = 0 below
  k = jnp.where(kok, k_ref[:, h, :], jnp.zeros((), k_ref.dtype))
  v = jnp.where(kok, v_ref[:, h, :], jnp.zeros((), v_ref.dtype))
  s = _mm(q, k, (((1,), (1,)), ((), ()))) * scale
  p = jnp.where(vis, jnp.exp(s - lse), 0.0)
  dp = _mm(do, v, (((1,), (1,)), ((), ())))
  ds = jnp.where(vis, p * (dp - delta_ref[h]), 0.0)
  return q, do, k, p, ds


def _dq_kernel(qoff_ref, kvlen_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref,
               dq_sc, *, scale, window, bq, bk, groups, n_heads_kv, t_len, s_len, n_kv):
  b, i, j = (pl.program_id(a) for a in range(3))
  g = groups
  kb_lo, kb_hi, kvlen, r, qpos = _q_block_rows(b, i, qoff_ref, kvlen_ref, window=window, bq=bq, bk=bk,
                                               groups=g, t_len=t_len, s_len=s_len)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros_like(dq_sc)

  kb = kb_lo + j

  @pl.when(kb < kb_hi)
  def _step():
    vis = _visible(kb, bk, qpos, kvlen, window)
    kok = (kb * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) < kvlen
    for h in range(n_heads_kv):
      _, _, k, _, ds = _bwd_tile(h, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, vis, kok,
                                 scale)
      dq_sc[h] += _mm(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())))

  @pl.when(j == n_kv - 1)
  def _fin():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _q_band(b, kb, qoff_ref, kvlen_ref, *, window, bq, bk, t_len, s_len):
  return common.q_block_range(qoff_ref[b], jnp.minimum(kvlen_ref[b], s_len), kb, window=window, bq=bq, bk=bk,
                              t_len=t_len)


def _dkdv_kernel(qoff_ref, kvlen_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref,
                 dv_ref, dk_sc, dv_sc, *, scale, window, bq, bk, groups, n_heads_kv, t_len,
                 s_len, n_q):
  b, kb, j = (pl.program_id(a) for a in range(3))
  g = groups
  rows = bq * g
  qb_lo, qb_hi = _q_band(b, kb, qoff_ref, kvlen_ref, window=window, bq=bq, bk=bk, t_len=t_len,
                         s_len=s_len)
  kvlen = jnp.minimum(kvlen_ref[b], s_len)

  @pl.when(j == 0)
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  qb = qb_lo + j

  @pl.when(qb < qb_hi)
  def _step():
    r = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    t = qb * bq + _div(r, g)
    qpos = qoff_ref[b] + t
    vis = _visible(kb, bk, qpos, kvlen, window) & (t < t_len)
    kok = (kb * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) < kvlen
    for h in range(n_heads_kv):
      q, do, _, p, ds = _bwd_tile(h, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, vis, kok,
                                  scale)
      dv_sc[h] += _mm(p.astype(do.dtype), do, (((0,), (0,)), ((), ())))
      dk_sc[h] += _mm(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())))

  @pl.when(j == n_q - 1)
  def _fin():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def prefill_backward(q, k, v, out, lse, do, q_offset, kv_len, *, window, sm_scale, block_q=None,
                     block_k=128, vmem_limit_bytes=None, interpret=False):
  """dq, dk, dv of the prefill kernel (the sink gradient is computed by the caller)."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  if block_q is None:
    block_q = max(8, 256 // G)
  block_q = min(block_q, -(-T // 8) * 8)
  rows = block_q * G
  block_k = min(block_k, -(-S // 8) * 8)
  nq, nk = pl.cdiv(T, block_q), pl.cdiv(S, block_k)
  tp = nq * block_q
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  qf, dof = _fold(q, B, T, tp, K, G), _fold(do, B, T, tp, K, G)
  lsef = _fold(lse[..., None], B, T, tp, K, G)
  deltaf = _fold(delta[..., None], B, T, tp, K, G)
  static = dict(scale=sm_scale, window=window, bq=block_q, bk=block_k, groups=G,
                n_heads_kv=K, t_len=T, s_len=S)
  rows_in = (q_offset, kv_len, qf, dof, lsef, deltaf)  # every operand but k, v (band reads)
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=vmem_limit_bytes)
  scratch_rows = [pltpu.VMEM((K, rows, H), jnp.float32)]

  # dq: grid over q blocks, kv band steps (same band / clamping as the forward)
  n_kv = nk if window is None else min(nk, pl.cdiv(block_q + window - 1, block_k) + 1)
  band = functools.partial(_prefill_band, window=window, bq=block_q, bk=block_k, t_len=T,
                           s_len=S)

  def kv_map(b, i, j, qoff_ref, kvlen_ref):
    lo, hi = band(b, i, qoff_ref, kvlen_ref)
    return (b, _kv_block(lo, hi, j, nk), 0, 0)

  row_spec = lambda w: pl.BlockSpec((None, K, rows, w), lambda b, i, j, *_: (b, 0, i, 0))
  dq_shape = jax.ShapeDtypeStruct(qf.shape, q.dtype)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, n_kv=n_kv, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(B, nq, n_kv),
          in_specs=[row_spec(H), row_spec(H), row_spec(1), row_spec(1),
                    pl.BlockSpec((None, block_k, K, H), kv_map),
                    pl.BlockSpec((None, block_k, K, H), kv_map)],
          out_specs=row_spec(H), scratch_shapes=scratch_rows),
      out_shape=dq_shape,
      compiler_params=params, interpret=interpret, name="banded_attention_bwd_dq_tpu",
      cost_estimate=common.prefill_cost(q, k, window=window, kind="dq", operands=rows_in,
                                        outputs=(dq_shape,), kv=(k, v)),
  )(q_offset, kv_len, qf, dof, lsef, deltaf, k, v)
  dq = jnp.transpose(dq.reshape(B, K, tp, G, H)[:, :, :T], (0, 2, 1, 3, 4)).reshape(B, T, N, H)

  # dk, dv: grid over kv blocks, steps over the q blocks whose queries can see the kv block
  n_q = nq if window is None else min(nq, pl.cdiv(block_k + window - 1, block_q) + 1)
  qband = functools.partial(_q_band, window=window, bq=block_q, bk=block_k, t_len=T, s_len=S)

  def q_map(b, kb, j, qoff_ref, kvlen_ref):
    lo, hi = qband(b, kb, qoff_ref, kvlen_ref)
    return (b, 0, _kv_block(lo, hi, j, nq), 0)

  kv_spec = pl.BlockSpec((None, block_k, K, H), lambda b, kb, j, *_: (b, kb, 0, 0))
  dkdv_shape = [jax.ShapeDtypeStruct((B, K, nk * block_k, H), k.dtype),
                jax.ShapeDtypeStruct((B, K, nk * block_k, H), v.dtype)]
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, n_q=n_q, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(B, nk, n_q),
          in_specs=[pl.BlockSpec((None, K, rows, H), q_map),
                    pl.BlockSpec((None, K, rows, H), q_map),
                    pl.BlockSpec((None, K, rows, 1), q_map),
                    pl.BlockSpec((None, K, rows, 1), q_map),
                    kv_spec, kv_spec],
          out_specs=[pl.BlockSpec((None, K, block_k, H), lambda b, kb, j, *_: (b, 0, kb, 0))] * 2,
          scratch_shapes=[pltpu.VMEM((K, block_k, H), jnp.float32)] * 2),
      out_shape=dkdv_shape,
      compiler_params=params, interpret=interpret, name="banded_attention_bwd_dkdv_tpu",
      cost_estimate=common.prefill_cost(q, k, window=window, kind="dkdv", operands=rows_in,
                                        outputs=dkdv_shape, kv=(k, v)),
  )(q_offset, kv_len, qf, dof, lsef, deltaf, k, v)
  unfold = lambda x: jnp.transpose(x[:, :, :S], (0, 2, 1, 3))
  return dq, unfold(dk), unfold(dv)
