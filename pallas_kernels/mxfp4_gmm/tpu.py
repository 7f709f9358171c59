"""TPU variant: Pallas on Mosaic TPU, megablox-style grouped matmul with scalar-prefetched metadata.

Grid (column tile n, work item i); work items come from `layout.group_metadata` (scalar
prefetch), consecutive items of one row tile revisit the same output block, each writing only
its rows (`where`), padding rows (virtual group E) get zeros; grid steps past the real number of
items (the grid is sized by the static bound M/bm + E) do nothing and keep the same block
indices, so they cost neither DMA nor compute. Per grid step the whole (padded)
K of one expert's [Kp/8, bn] int32 word block sits in VMEM; the kernel walks K in 128-chunks:
decodes 8 nibble planes ([16, bn], consecutive k) with int32 VPU ops, stacks them into a
[128, bn] bf16/f32 tile and feeds one MXU dot [bm, 128] x [128, bn] into an f32 accumulator.
The weight index map of the padding group repeats expert E-1, so no extra weight DMA happens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..cost import nbytes
from . import common, layout

VMEM_LIMIT_BYTES = 48 * 1024 * 1024


def _kernel(go_ref, gi_ref, mt_ref, nw_ref, x_ref, wq_ref, ws_ref, *rest, bm, bn, splits, num_experts,
            epilogue, alpha, limit, has_bias, has_rw, fast):
  rest = list(rest)
  b_ref = rest.pop(0) if has_bias else None
  rw_ref = rest.pop(0) if has_rw else None
  o_ref, acc_ref = rest
  i = pl.program_id(1)
  g = gi_ref[i]
  t = mt_ref[i]
  rows = t * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  row_ok = (rows >= go_ref[g]) & (rows < go_ref[g + 1])
  n_chunks = wq_ref.shape[1] // layout.ROWS_PER_CHUNK
  cdt = x_ref.dtype
  # f32 compute: true f32 products; bf16: native bf16 MXU (explicit, whatever the global default)
  prec = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else jax.lax.Precision.DEFAULT

  active = i < nw_ref[0]  # items past the real work list (static grid bound) are skipped

  @pl.when(active & (g >= num_experts))
  def _pad():
    o_ref[...] = jnp.where(row_ok, jnp.zeros(o_ref.shape, o_ref.dtype), o_ref[...])

  @pl.when(active & (g < num_experts))
  def _compute():
    for s in range(splits):
      acc_ref[s] = jnp.zeros((bm, bn), jnp.float32)

    k = x_ref.shape[1]  # true K (x is not padded); the last chunk may be partial (K % 32 == 0)

    def chunk(c, width, xc):
      for s in range(splits):
        r0 = c * layout.ROWS_PER_CHUNK
        if not isinstance(c, int):
          r0 = pl.multiple_of(r0, layout.ROWS_PER_CHUNK)
        words = wq_ref[s, pl.ds(r0, layout.ROWS_PER_CHUNK), :]
        sw = ws_ref[s, pl.ds(c, 1), :]
        wt = jnp.concatenate([layout.decode_plane(words, sw, j, cdt, fast)
                              for j in range(width // layout.PLANE_K)], axis=0)
        acc_ref[s] += jnp.dot(xc, wt, precision=prec, preferred_element_type=jnp.float32)

    full = k // layout.CHUNK_K

    if full:
      @pl.loop(0, full)
      def _(c):
        c0 = pl.multiple_of(c * layout.CHUNK_K, layout.CHUNK_K)
        chunk(c, layout.CHUNK_K, x_ref[:, pl.ds(c0, layout.CHUNK_K)])

    if full < n_chunks:  # static tail chunk of K % 128 columns
      width = k - full * layout.CHUNK_K
      chunk(full, width, x_ref[:, full * layout.CHUNK_K:k])

    biases = [None] * splits
    if has_bias:
      biases = [b_ref[s:s + 1, :].astype(jnp.float32) for s in range(splits)]
    rw = rw_ref[...].astype(jnp.float32) if has_rw else None
    y = common.apply_epilogue([acc_ref[s] for s in range(splits)], biases, rw, epilogue, alpha, limit)
    o_ref[...] = jnp.where(row_ok, y.astype(o_ref.dtype), o_ref[...])


def gmm_tpu(x, w: layout.MXFP4GmmWeights, group_sizes, bias=None, row_weights=None, *,
            epilogue=None, alpha=1.0, limit=0.0, out_dtype, tiling: common.Tiling | None = None,
            interpret=False):
  """x [M, K], w prepared, bias [E, S, N] or None, row_weights [M] or None -> [M, N]."""
  m = x.shape[0]
  tiling = tiling or common.tpu_tiling(m, w.splits)
  bm, bn = tiling.bm, tiling.bn
  e, s_, kr, n = w.wq.shape
  kp = kr * 8
  mp = common.round_up(max(m, 1), bm)
  xp = common.pad_rows(x, mp)
  go, gi, mt, num = layout.group_metadata(group_sizes, mp, bm)
  bn = n if n <= bn else bn  # full-dim block for narrow N, else a multiple of 128

  def widx(nt, i, go_, gi_, mt_, nw_):
    return (jnp.minimum(gi_[i], e - 1), 0, 0, nt)

  in_specs = [
      pl.BlockSpec((bm, w.k), lambda nt, i, go_, gi_, mt_, nw_: (mt_[i], 0)),
      pl.BlockSpec((None, s_, kr, bn), widx),
      pl.BlockSpec((None, s_, kp // layout.CHUNK_K, bn), widx),
  ]
  args = [xp, w.wq, w.ws]
  if bias is not None:
    in_specs.append(pl.BlockSpec((None, s_, bn), lambda nt, i, go_, gi_, mt_, nw_: (jnp.minimum(gi_[i], e - 1), 0, nt)))
    args.append(bias)
  rw = None
  if row_weights is not None:
    in_specs.append(pl.BlockSpec((bm, 1), lambda nt, i, go_, gi_, mt_, nw_: (mt_[i], 0)))
    rw = common.pad_rows(row_weights.astype(jnp.float32), mp)[:, None]
    args.append(rw)
  kernel = functools.partial(
      _kernel, bm=bm, bn=bn, splits=s_, num_experts=e, epilogue=epilogue, alpha=alpha,
      limit=limit, has_bias=bias is not None, has_rw=row_weights is not None, fast=w.normal_scales)
  grid = (pl.cdiv(n, bn), gi.shape[0])
  out_shape = jax.ShapeDtypeStruct((mp, n), out_dtype)
  cost = common.gmm_cost_estimate(
      m=m, k=w.k, n=n, splits=s_, num_experts=e, x_bytes=nbytes(xp),
      weight_bytes=nbytes(w.wq, w.ws), bias_bytes=nbytes(bias),
      out_bytes=nbytes(out_shape), x_reads=grid[0], epilogue=epilogue,
      other_bytes=nbytes(go, gi, mt, num, rw))
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          in_specs=in_specs,
          out_specs=pl.BlockSpec((bm, bn), lambda nt, i, go_, gi_, mt_, nw_: (mt_[i], nt)),
          grid=grid,
          scratch_shapes=[pltpu.VMEM((s_, bm, bn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT_BYTES),
      interpret=interpret,
      cost_estimate=cost,
      name="mxfp4_gmm_tpu",
  )(go, gi, mt, num[None], *args)
  return out[:m]


def vmem_bytes(m: int, k_padded: int, n: int, splits: int, x_itemsize: int, out_itemsize: int,
               tiling: common.Tiling | None = None) -> int:
  """Static VMEM footprint of one grid step (double-buffered blocks + scratch)."""
  tiling = tiling or common.tpu_tiling(m, splits)
  bm, bn = tiling.bm, min(tiling.bn, n)
  x_blk = bm * k_padded * x_itemsize  # upper bound (the x block is [bm, K])
  w_blk = splits * (k_padded // 8) * bn * 4
  s_blk = splits * common.round_up(k_padded // layout.CHUNK_K, 8) * bn * 4
  b_blk = splits * 8 * bn * 4
  rw_blk = bm * 128 * 4
  o_blk = bm * bn * out_itemsize
  return 2 * (x_blk + w_blk + s_blk + b_blk + rw_blk + o_blk) + splits * bm * bn * 4
