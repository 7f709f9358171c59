"""Backend-independent pieces of the paged attention kernels: argument checks, the page / key
range a block of queries can see, the merge of split partials (Triton decode) and the static
cost estimates attached to every ``pallas_call``."""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..cost import nbytes


def check_args(q, k_pages, v_pages, block_tables, q_start, n_new, sinks, window, sm_scale):
  """ValueError naming the bad input, else None (shapes are static: checked at trace time)."""
  if q.ndim != 4:
    raise ValueError(f"q_BTNH must be [B, T, N, H], got shape {q.shape}")
  B, T, N, H = q.shape
  if k_pages.ndim != 4:
    raise ValueError(f"k_pages_PSKH must be [P, S, K, H], got shape {k_pages.shape}")
  P, S, K, Hk = k_pages.shape
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"v_pages_PSKH shape {v_pages.shape} != k_pages_PSKH shape {k_pages.shape}")
  if v_pages.dtype != k_pages.dtype:
    raise ValueError(f"v_pages_PSKH dtype {v_pages.dtype} != k_pages_PSKH dtype {k_pages.dtype}")
  if Hk != H:
    raise ValueError(f"head dim of k_pages_PSKH ({Hk}) != head dim of q_BTNH ({H})")
  if K < 1 or N % K:
    raise ValueError(f"q heads N={N} must be a multiple of kv heads K={K} (GQA)")
  if block_tables.ndim != 2 or block_tables.shape[0] != B:
    raise ValueError(f"block_tables_BM must be [B={B}, M], got shape {block_tables.shape}")
  if not jnp.issubdtype(block_tables.dtype, jnp.integer):
    raise ValueError(f"block_tables_BM must be integer, got {block_tables.dtype}")
  for name, x in (("q_start_B", q_start), ("n_new_B", n_new)):
    if x.shape != (B,) or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer [B={B}] array, got {x.dtype}{list(x.shape)}")
  if sinks.shape != (N,):
    raise ValueError(f"sinks_N must be [N={N}], got shape {sinks.shape}")
  if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
    raise ValueError(f"window must be None or a positive int, got {window!r}")
  if not isinstance(sm_scale, numbers.Real) or isinstance(sm_scale, bool):
    raise ValueError(f"sm_scale must be a static real number, got {type(sm_scale).__name__}")
  if P < 1 or S < 1 or block_tables.shape[1] < 1:
    raise ValueError(f"empty page pool or block table: k_pages {k_pages.shape}, "
                     f"block_tables {block_tables.shape}")


def key_range(q_start, n_new, t0, *, block_q, window):
  """[k_lo, k_hi) key positions visible to the valid queries t0 .. min(t0 + block_q, n_new) - 1
  of one row (query t at position q_start + t): k_lo = max(0, q_start + t0 - W + 1) (0 without
  a window), k_hi = q_start + min(t0 + block_q, n_new); empty (k_lo = k_hi) when the block holds
  no valid query. Scalar jnp (every backend)."""
  t_hi = jnp.minimum(t0 + block_q, n_new)
  k_hi = q_start + t_hi
  k_lo = jnp.int32(0) if window is None else jnp.maximum(q_start + t0 - window + 1, 0)
  k_lo = jnp.minimum(k_lo, k_hi)
  return jnp.where(t_hi > t0, k_lo, 0), jnp.where(t_hi > t0, k_hi, 0)


def page_range(q_start, n_new, t0, *, block_q, window, page_size, max_pages):
  """[pg_lo, pg_hi) logical pages (block-table columns) holding `key_range`, clipped to the
  block table's M columns; empty for a block without valid queries."""
  k_lo, k_hi = key_range(q_start, n_new, t0, block_q=block_q, window=window)
  pg_lo = jax.lax.div(k_lo, page_size)
  pg_hi = jnp.minimum(jax.lax.div(k_hi + page_size - 1, page_size), max_pages)
  pg_hi = jnp.where(k_hi > k_lo, pg_hi, pg_lo)
  return jnp.minimum(pg_lo, pg_hi), pg_hi


def max_pages_spanned(block_q: int, window: int | None, page_size: int, max_pages: int) -> int:
  """Static bound on the pages a block of `block_q` consecutive queries reads: a window of W
  keys per query spans block_q + W - 1 positions, i.e. at most ceil((block_q + W - 2) / S) + 1
  pages (decode, block_q = 1: ceil((W - 1) / S) + 1 <= ceil(W / S) + 1); all M without a window."""
  if window is None:
    return max_pages
  span = block_q + window - 1
  return min(max_pages, -(-(span - 1) // page_size) + 1)


def combine_partials(acc, m, l, n_new, *, t_len, groups):
  """Merge the split partials of the Triton kernel: acc [B,K,NS,Tp*G,H], m/l [B,K,NS,Tp*G]
  (natural-log running max, denominator; the sink is already in split 0). Rows r = t*G + g;
  rows t >= n_new[b] and rows without any key or sink come out as exact zeros.
  Returns [B, T, K*G, H] float32."""
  B, K, NS, R, H = acc.shape
  G = groups
  M = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - M)  # splits that saw nothing have m = -1e30, l = 0: weight 0 or 1, l = 0
  den = jnp.sum(w * l, axis=2)
  num = jnp.sum(w[..., None] * acc, axis=2)
  o = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
  o = o.reshape(B, K, R // G, G, H)[:, :, :t_len]
  valid = jnp.arange(t_len)[None, :] < n_new[:, None]  # [B, T]
  o = jnp.where(valid[:, None, :, None, None], o, 0.0)
  return jnp.transpose(o, (0, 2, 1, 3, 4)).reshape(B, t_len, K * G, H)


# --------------------------------------------------------------------------------------------
# Cost estimates (static: q_start / n_new / block tables are traced, so a stated typical case)
# --------------------------------------------------------------------------------------------
def typical_pairs(t_len: int, max_pages: int, page_size: int, window: int | None) -> int:
  """Visible (query, key) pairs per query head and row in the stated typical case: the row's T
  queries are the last T positions of a full block table (q_start = M*S - T, all n_new = T);
  query at position p sees min(p + 1, W) keys."""
  L = max_pages * page_size
  first = max(L - t_len, 0)
  return sum(min(p + 1, window or (p + 1)) for p in range(first, first + min(t_len, L)))


def typical_keys_read(t_len: int, max_pages: int, page_size: int, window: int | None,
                      block_q: int) -> int:
  """Key slots one row's K (or V) reads in the typical case: each q block reads whole pages of
  its band (the band of the T queries without a window: every page)."""
  L = max_pages * page_size
  first = max(L - t_len, 0)
  total = 0
  for t0 in range(0, t_len, block_q):
    p_lo, p_hi = first + t0, min(first + min(t0 + block_q, t_len), L) - 1
    k_lo = 0 if window is None else max(p_lo - window + 1, 0)
    total += (p_hi // page_size + 1 - k_lo // page_size) * page_size
  return total


def cost_estimate(q, k_pages, block_tables, *, window, block_q, operands=(), outputs=()
                  ) -> pl.CostEstimate:
  """`pl.CostEstimate` of one paged-attention call in the typical case (`typical_pairs`):
  flops = 2 matmuls (QK^T, PV) x 2 H per visible (query head, key) pair over B * N heads;
  transcendentals = one exp per pair; bytes_accessed = the operands and outputs as passed to /
  returned by the call plus the K and V pages read (`typical_keys_read` slots of K heads x H
  per row, each of K and V)."""
  B, T, N, H = q.shape
  _, S, K, _ = k_pages.shape
  M = block_tables.shape[1]
  pairs = typical_pairs(T, M, S, window)
  page_bytes = S * K * H * jnp.dtype(k_pages.dtype).itemsize
  kv = 2 * B * typical_keys_read(T, M, S, window, block_q) // S * page_bytes
  return pl.CostEstimate(flops=int(2 * 2 * H * B * N * pairs), transcendentals=int(B * N * pairs),
                         bytes_accessed=int(nbytes(*operands) + nbytes(*outputs) + kv))
