"""GPU variant: Pallas on the Triton backend (explicit `plgpu.CompilerParams`).

Grid (work item, column tile). A work item is one (group, 16/128-row tile) pair from
`layout.group_metadata`; every output row belongs to exactly one work item (padding rows to a
virtual group E that stores zeros), so stores are row-masked and no init pass is needed.
Per K-chunk of 128 the kernel loads a [16, bn] int32 word tile per split, decodes its 8 nibble
planes ([16, bn] each, consecutive k) with integer ops into bf16/f32 and issues 8 MMAs of K=16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..cost import nbytes
from . import common, layout


def _kernel(go_ref, gi_ref, mt_ref, nw_ref, x_ref, wq_ref, ws_ref, *rest, bm, bn, splits, k, n,
            num_experts, epilogue, alpha, limit, has_bias, has_rw, fast):
  rest = list(rest)
  b_ref = rest.pop(0) if has_bias else None
  rw_ref = rest.pop(0) if has_rw else None
  (o_ref,) = rest
  i = pl.program_id(0)
  nt = pl.program_id(1)
  n_chunks = wq_ref.shape[2] // layout.ROWS_PER_CHUNK
  cdt = x_ref.dtype
  # f32 compute: true f32 products (Triton's DEFAULT would be tf32); bf16: native bf16 MMA
  prec = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None

  @pl.when(i < nw_ref[0])
  def _():
    g = gi_ref[i]
    t = mt_ref[i]
    rows = t * bm + jnp.arange(bm, dtype=jnp.int32)
    row_ok = (rows >= go_ref[g]) & (rows < go_ref[g + 1])
    cols = nt * bn + jnp.arange(bn, dtype=jnp.int32)
    col_ok = cols < n
    o_view = o_ref.at[pl.ds(t * bm, bm), pl.ds(nt * bn, bn)]
    mask = row_ok[:, None] & col_ok[None, :]

    @pl.when(g >= num_experts)
    def _pad():
      plgpu.store(o_view, jnp.zeros((bm, bn), o_ref.dtype), mask=mask)

    @pl.when(g < num_experts)
    def _compute():
      def body(c, accs):
        new = []
        for s in range(splits):
          words = plgpu.load(wq_ref.at[g, jnp.int32(s), pl.ds(c * layout.ROWS_PER_CHUNK, layout.ROWS_PER_CHUNK),
                                       pl.ds(nt * bn, bn)], mask=col_ok[None, :], other=0)
          sw = plgpu.load(ws_ref.at[g, jnp.int32(s), c, pl.ds(nt * bn, bn)], mask=col_ok, other=0)[None, :]
          acc = accs[s]
          for j in range(8):
            k0 = c * layout.CHUNK_K + j * layout.PLANE_K
            kk = k0 + jnp.arange(layout.PLANE_K, dtype=jnp.int32)
            xj = plgpu.load(x_ref.at[pl.ds(t * bm, bm), pl.ds(k0, layout.PLANE_K)],
                            mask=(kk < k)[None, :], other=0)
            wj = layout.decode_plane(words, sw, j, cdt, fast)
            acc = acc + jnp.dot(xj, wj, precision=prec, preferred_element_type=jnp.float32)
          new.append(acc)
        return tuple(new)

      accs = jax.lax.fori_loop(0, n_chunks, body,
                               tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(splits)))
      biases = [None] * splits
      if has_bias:
        biases = [plgpu.load(b_ref.at[g, jnp.int32(s), pl.ds(nt * bn, bn)], mask=col_ok, other=0)
                  .astype(jnp.float32)[None, :] for s in range(splits)]
      rw = None
      if has_rw:
        rw = plgpu.load(rw_ref.at[pl.ds(t * bm, bm)]).astype(jnp.float32)[:, None]
      y = common.apply_epilogue(list(accs), biases, rw, epilogue, alpha, limit)
      plgpu.store(o_view, y.astype(o_ref.dtype), mask=mask)


def gmm_triton(x, w: layout.MXFP4GmmWeights, group_sizes, bias=None, row_weights=None, *,
               epilogue=None, alpha=1.0, limit=0.0, out_dtype, tiling: common.Tiling | None = None,
               interpret=False):
  """x [M, K] (bf16/f32), w prepared, bias [E, S, N] or None, row_weights [M] or None -> [M, N]."""
  m = x.shape[0]
  tiling = tiling or common.triton_tiling(m, w.splits)
  bm, bn = tiling.bm, tiling.bn
  mp = common.round_up(max(m, 1), bm)
  xp = common.pad_rows(x, mp)
  go, gi, mt, num = layout.group_metadata(group_sizes, mp, bm)
  args = [go, gi, mt, num[None], xp, w.wq, w.ws]
  if bias is not None:
    args.append(bias)
  rw = None
  if row_weights is not None:
    rw = common.pad_rows(row_weights.astype(jnp.float32), mp)
    args.append(rw)
  kernel = functools.partial(
      _kernel, bm=bm, bn=bn, splits=w.splits, k=w.k, n=w.n, num_experts=w.num_experts,
      epilogue=epilogue, alpha=alpha, limit=limit, has_bias=bias is not None,
      has_rw=row_weights is not None, fast=w.normal_scales)
  grid = (gi.shape[0], pl.cdiv(w.n, bn))
  out_shape = jax.ShapeDtypeStruct((mp, w.n), out_dtype)
  cost = common.gmm_cost_estimate(
      m=m, k=w.k, n=w.n, splits=w.splits, num_experts=w.num_experts, x_bytes=nbytes(xp),
      weight_bytes=nbytes(w.wq, w.ws), bias_bytes=nbytes(bias),
      out_bytes=nbytes(out_shape), x_reads=grid[1], epilogue=epilogue,
      other_bytes=nbytes(go, gi, mt, num, rw))
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=interpret,
      cost_estimate=cost,
      name="mxfp4_gmm_triton",
  )(*args)
  return out[:m]
