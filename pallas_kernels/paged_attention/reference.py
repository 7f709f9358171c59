"""Pure-jnp paged attention: gather each row's pages into contiguous K/V, then the masked
softmax with the sink in the denominator. Same signature and contract as
``paged_attention.paged_attention``; also the engine's XLA path.

Numerics follow ``gptoss_jax.layers.attention_xla`` (scores and P·V with f32 accumulation on
the input dtype, probabilities cast to the V dtype before P·V, f32 softmax statistics), so a
paged cache and a contiguous cache give the same values up to summation order.

Rows gather ``n_pages`` block-table columns starting at ``first_page``: every column without a
window; with a window only the ``common.max_pages_spanned`` columns that can hold visible keys,
starting at the page of the row's first visible key (memory and work O(W), not O(M*S)).
"""
from __future__ import annotations

import jax.numpy as jnp

from . import common


def paged_attention(q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B,
                    sinks_N, *, window: int | None, sm_scale: float):
  B, T, N, H = q_BTNH.shape
  P, S, K, _ = k_pages_PSKH.shape
  M = block_tables_BM.shape[1]
  G = N // K
  q_start_B = q_start_B.astype(jnp.int32)
  n_new_B = n_new_B.astype(jnp.int32)
  n_pages = common.max_pages_spanned(T, window, S, M)
  # [k_lo, k_hi): the keys any valid query of the row sees (empty for a row without queries)
  k_lo_B, k_hi_B = common.key_range(q_start_B, n_new_B, 0, block_q=T, window=window)
  # first gathered column: the page of k_lo, moved left where needed so that n_pages fit in M
  first_B = jnp.clip(k_lo_B // S, 0, M - n_pages)
  cols_BJ = first_B[:, None] + jnp.arange(n_pages, dtype=jnp.int32)[None]
  pages_BJ = jnp.take_along_axis(block_tables_BM.astype(jnp.int32), cols_BJ, axis=1)
  pages_BJ = jnp.clip(pages_BJ, 0, P - 1)  # entries past the used pages are masked below
  L = n_pages * S
  k_BLKH = k_pages_PSKH[pages_BJ].reshape(B, L, K, H)
  v_BLKH = v_pages_PSKH[pages_BJ].reshape(B, L, K, H)
  kpos_BL = (cols_BJ[:, :, None] * S + jnp.arange(S, dtype=jnp.int32)).reshape(B, L)
  qpos_BT = q_start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
  valid_BT = jnp.arange(T)[None] < n_new_B[:, None]
  mask_BTL = (kpos_BL[:, None] <= qpos_BT[:, :, None]) & valid_BT[:, :, None]
  if window is not None:
    mask_BTL &= kpos_BL[:, None] > qpos_BT[:, :, None] - window
  # gathered slots outside [k_lo, k_hi) may be garbage (NaN): zero what no query sees
  seen_BL = (kpos_BL >= k_lo_B[:, None]) & (kpos_BL < k_hi_B[:, None])
  k_BLKH = jnp.where(seen_BL[:, :, None, None], k_BLKH, jnp.zeros((), k_BLKH.dtype))
  v_BLKH = jnp.where(seen_BL[:, :, None, None], v_BLKH, jnp.zeros((), v_BLKH.dtype))

  q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
  s_BKGTL = jnp.einsum("BTKGH,BLKH->BKGTL", q_BTKGH, k_BLKH,
                       preferred_element_type=jnp.float32) * sm_scale
  s_BKGTL = jnp.where(mask_BTL[:, None, None], s_BKGTL, -jnp.inf)
  sink_KG = jnp.asarray(sinks_N, jnp.float32).reshape(K, G)[None, :, :, None]  # [1, K, G, 1]
  m = jnp.maximum(jnp.max(s_BKGTL, axis=-1), sink_KG)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # no visible key and no sink: p = 0 below
  p = jnp.exp(s_BKGTL - m[..., None])
  den = jnp.sum(p, axis=-1) + jnp.exp(sink_KG - m)
  o_BKGTH = jnp.einsum("BKGTL,BLKH->BKGTH", p.astype(v_BLKH.dtype), v_BLKH,
                       preferred_element_type=jnp.float32)
  o_BKGTH = jnp.where(den[..., None] > 0, o_BKGTH / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
  o_BTNH = o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
  return jnp.where(valid_BT[:, :, None, None], o_BTNH, 0.0).astype(q_BTNH.dtype)
