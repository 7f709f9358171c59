"""TPU variant: Pallas Mosaic TPU kernel, block tables through scalar prefetch.

Grid (B, NQ): one program per row and block of BQ queries, holding all K kv heads; q is folded
per kv head to [B, K, Tp*G, H] (rows r = t*G + g) so one program's (BQ*G, H) tile per kv head
carries every query head that shares it, and each K/V page DMA'd into VMEM feeds all G heads.

q_start, n_new, the block table (flattened to [B*M]: a 2-D SMEM array pads its minor dim to 128
words) and the sinks are scalar-prefetched into SMEM. The page pools stay in HBM
(``memory_space=pl.ANY``); the kernel walks the row's visible pages [pg_lo, pg_hi) (window start
to last key, ``common.page_range``) in steps of R pages with a dynamic-length ``fori_loop`` and
double-buffered manual DMAs: step j + 1's pages are in flight while step j is computed. Only
pages of the range are copied (a copy per page, started and waited under the same
``pl.when``), so pages outside [window start, last key] and unused block-table entries are
never read, and a row without valid queries costs no DMA at all; no grid step exists for
pages past a row's length (the work follows the real lengths, not M).

Each step runs the flash-attention recurrence over its R*S keys for every kv head (statically
unrolled): MMA operands in the input dtype (bf16 on the MXU), running max / denominator /
accumulator in f32 VMEM scratch initialised with the sink (m = sink, l = 1). Keys past the
block's last query position (the page tail, stale buffer slots) are masked and their V rows
zeroed; rows t >= n_new come out as exact zeros.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..banded_attention.tpu import online_softmax_update
from . import common

_NEG = -1e30
ROWS_PER_BLOCK = 512  # folded query rows per program and kv head for chunks (T > 1), bf16
# scoped VMEM asked for chunk programs: above v5e's 16 MiB default (v6e / tpu7x: 32 MiB), well
# under the physical 128 / 128 / 64 MiB
CHUNK_VMEM_LIMIT = 32 << 20


def tiling(t_len: int, groups: int, page_size: int, window: int | None, max_pages: int,
           dtype) -> tuple[int, int, int | None]:
  """(BQ, R, vmem_limit_bytes). BQ queries per program: all T when T*G <= 512 (256 for f32),
  else a multiple of 8 (the folded row block stays sublane aligned); 512 rows per kv head give
  the chunk path 256 flop per (lane-padded) HBM byte of K/V, near v5e's ridge point. R pages per
  DMA step: ~512 keys for decode-sized row blocks (<= 64 rows), ~256 otherwise, half for f32
  pages, at most the pages one block can see. VMEM: a (S, 8, 64) bf16 page occupies (16, 128)
  tiles; minimum scoped VMEM measured on v5e at gpt-oss shapes (bf16, K = 8, H = 64): decode
  12.2 MiB (the 16 MiB default applies), 512-row chunks 21.3 MiB (CHUNK_VMEM_LIMIT)."""
  f32 = jnp.dtype(dtype).itemsize >= 4
  rows_cap = ROWS_PER_BLOCK // 2 if f32 else ROWS_PER_BLOCK
  if t_len * groups <= rows_cap:
    bq = t_len
  else:
    bq = max(8, rows_cap // groups // 8 * 8)
  decode = bq * groups <= 64
  keys = 512 if decode else 256
  if f32:  # the HIGHEST-precision (multi-pass) MXU temporaries
    keys //= 2
  r = max(1, min(keys // page_size, common.max_pages_spanned(bq, window, page_size, max_pages)))
  return bq, r, None if decode else CHUNK_VMEM_LIMIT


def _kernel(qs_ref, nn_ref, bt_ref, sink_ref, q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sems,
            m_sc, l_sc, acc_sc, flow_sc, *, scale, window, block_q, groups, n_kv_heads, t_len,
            page_size, pages_per_step, max_pages):
  b, i = pl.program_id(0), pl.program_id(1)
  n_rows, n_qblocks = pl.num_programs(0), pl.num_programs(1)
  g, S, R = groups, page_size, pages_per_step
  rows = block_q * g

  def block(bb, ii):
    """(q_start, valid queries, first page, end page, DMA steps) of program (bb, ii)."""
    qs, nn = qs_ref[bb], jnp.minimum(nn_ref[bb], t_len)
    pg_lo, pg_hi = common.page_range(qs, nn, ii * block_q, block_q=block_q, window=window,
                                     page_size=S, max_pages=max_pages)
    return qs, nn, pg_lo, pg_hi, lax.div(pg_hi - pg_lo + R - 1, R)

  def copies(bb, pg_lo, pg_hi, step, slot):
    """(in range, K copy, V copy) of each of the R pages of `step` into buffer `slot`."""
    out = []
    for r in range(R):
      lp = pg_lo + step * R + r
      phys = bt_ref[bb * max_pages + jnp.clip(lp, 0, jnp.maximum(pg_hi - 1, 0))]
      dst = pl.ds(r * S, S)
      out.append((lp < pg_hi,
                  pltpu.make_async_copy(k_hbm.at[phys], kbuf.at[slot, dst], sems.at[0, slot]),
                  pltpu.make_async_copy(v_hbm.at[phys], vbuf.at[slot, dst], sems.at[1, slot])))
    return out

  def dma(op, bb, pg_lo, pg_hi, step, slot):
    """Start (op="start") or wait for (op="wait") the in-range copies of a step: both under
    the same condition, so every started copy is waited exactly once."""
    for ok, kc, vc in copies(bb, pg_lo, pg_hi, step, slot):
      @pl.when(ok)
      def _():
        getattr(kc, op)()
        getattr(vc, op)()

  qs, nn, pg_lo, pg_hi, n_steps = block(b, i)
  t0 = i * block_q
  k_lo, k_hi = common.key_range(qs, nn, t0, block_q=block_q, window=window)
  # the next program in grid order (programs run in order: both grid axes are "arbitrary");
  # its first step is started under this program's last one, so the DMA queue never drains
  last_i = i == n_qblocks - 1
  nb = jnp.where(last_i, b + 1, b)
  ni = jnp.where(last_i, 0, i + 1)
  has_next = nb < n_rows
  nb = jnp.minimum(nb, n_rows - 1)
  _, _, npg_lo, npg_hi, n_next = block(nb, ni)
  n_next = jnp.where(has_next, n_next, 0)

  # flow_sc (SMEM): [0] = 1 if the previous program started this one's first step, [1] = the
  # buffer slot of this program's first step
  @pl.when((b == 0) & (i == 0))
  def _():
    flow_sc[0] = 0
    flow_sc[1] = 0

  prefetched = flow_sc[0] == 1
  first_slot = flow_sc[1]

  r_idx = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  row_t = t0 + lax.div(r_idx, g)
  row_ok = row_t < nn
  qpos = qs + row_t
  g_idx = lax.rem(r_idx, g)
  for h in range(n_kv_heads):
    sink = jnp.full((rows, 1), -jnp.inf, jnp.float32)
    for gg in range(g):
      sink = jnp.where(g_idx == gg, sink_ref[h * g + gg], sink)
    no_sink = sink == -jnp.inf
    m_sc[h] = jnp.where(no_sink, _NEG, sink)
    l_sc[h] = jnp.where(no_sink, 0.0, 1.0)
  acc_sc[...] = jnp.zeros_like(acc_sc)

  @pl.when((n_steps > 0) & jnp.logical_not(prefetched))
  def _():
    dma("start", b, pg_lo, pg_hi, 0, first_slot)

  def body(step, carry):
    slot = lax.rem(first_slot + step, 2)

    @pl.when(step + 1 < n_steps)
    def _():
      dma("start", b, pg_lo, pg_hi, step + 1, 1 - slot)

    @pl.when((step + 1 == n_steps) & (n_next > 0))
    def _():
      dma("start", nb, npg_lo, npg_hi, 0, 1 - slot)

    dma("wait", b, pg_lo, pg_hi, step, slot)
    base = (pg_lo + step * R) * S
    kpos = base + lax.broadcasted_iota(jnp.int32, (1, R * S), 1)
    vis = (kpos <= qpos) & row_ok
    if window is not None:
      vis &= kpos > qpos - window
    kcol = base + lax.broadcasted_iota(jnp.int32, (R * S, 1), 0)
    # slots outside [k_lo, k_hi) (the first page before the window, the last page's tail,
    # stale slots of a partial step) are never trusted: V zeroed (0 * NaN guard)
    v_ok = (kcol >= k_lo) & (kcol < k_hi)
    online_softmax_update(q_ref, kbuf.at[slot], vbuf.at[slot], vis, v_ok, scale, m_sc, l_sc,
                           acc_sc, n_kv_heads)
    return carry

  lax.fori_loop(0, n_steps, body, 0)
  flow_sc[0] = jnp.where((n_steps > 0) & (n_next > 0), 1, 0)
  flow_sc[1] = lax.rem(first_slot + n_steps, 2)
  l = l_sc[...]
  ok = (l > 0) & row_ok
  o_ref[...] = jnp.where(ok, acc_sc[...] / jnp.where(ok, l, 1.0), 0.0).astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, block_tables, q_start, n_new, sinks, *, window,
                    sm_scale, block_q=None, pages_per_step=None, vmem_limit_bytes=None,
                    interpret=False):
  B, T, N, H = q.shape
  P, S, K, _ = k_pages.shape
  M = block_tables.shape[1]
  G = N // K
  bq, r, vmem = tiling(T, G, S, window, M, k_pages.dtype)
  bq, r = block_q or bq, pages_per_step or r
  vmem_limit_bytes = vmem_limit_bytes or vmem
  nq = pl.cdiv(T, bq)
  tp = nq * bq
  rows = bq * G
  qf = q.reshape(B, T, K, G, H)
  if tp != T:
    qf = jnp.pad(qf, ((0, 0), (0, tp - T), (0, 0), (0, 0), (0, 0)))
  qf = jnp.transpose(qf, (0, 2, 1, 3, 4)).reshape(B, K, tp * G, H)
  bt_flat = block_tables.astype(jnp.int32).reshape(B * M)
  sinks = jnp.asarray(sinks, jnp.float32)
  kernel = functools.partial(_kernel, scale=sm_scale, window=window, block_q=bq, groups=G,
                             n_kv_heads=K, t_len=T, page_size=S, pages_per_step=r, max_pages=M)
  out_shape = jax.ShapeDtypeStruct((B, K, tp * G, H), q.dtype)
  cost = common.cost_estimate(q, k_pages, block_tables, window=window, block_q=bq,
                              operands=(q_start, n_new, bt_flat, sinks, qf), outputs=(out_shape,))
  if interpret:  # the TPU interpreter simulates the DMAs and semaphores
    interpret = pltpu.InterpretParams(dma_execution_mode="eager")
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(B, nq),
          in_specs=[
              pl.BlockSpec((None, K, rows, H), lambda b, i, *_: (b, 0, i, 0)),
              pl.BlockSpec(memory_space=pl.ANY),
              pl.BlockSpec(memory_space=pl.ANY),
          ],
          out_specs=pl.BlockSpec((None, K, rows, H), lambda b, i, *_: (b, 0, i, 0)),
          scratch_shapes=[pltpu.VMEM((2, r * S, K, H), k_pages.dtype),
                          pltpu.VMEM((2, r * S, K, H), v_pages.dtype),
                          pltpu.SemaphoreType.DMA((2, 2)),
                          pltpu.VMEM((K, rows, 1), jnp.float32),
                          pltpu.VMEM((K, rows, 1), jnp.float32),
                          pltpu.VMEM((K, rows, H), jnp.float32),
                          pltpu.SMEM((2,), jnp.int32)],
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("arbitrary", "arbitrary"),
          vmem_limit_bytes=vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=cost,
      name="paged_attention_tpu",
  )(q_start, n_new, bt_flat, sinks, qf, k_pages, v_pages)
  out = out.reshape(B, K, tp, G, H)[:, :, :T]
  return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(B, T, N, H)
