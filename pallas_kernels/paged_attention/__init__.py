"""Paged attention for gpt-oss: K/V read from a pool of fixed-size pages through a block table,
with attention sinks, the exact sliding window and GQA folded. Decode (T = 1) and chunks of
T > 1 queries after cached pages (chunked prefill) share one kernel per backend.

Public API
----------
``paged_attention(q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B,
sinks_N, *, window, sm_scale, impl="auto") -> o_BTNH`` (dtype of q)

* pages ``k_pages, v_pages [P, S, K, H]`` (P pages in the pool, page size S) ALREADY hold the new
  tokens' K/V; position p of row b is row ``p % S`` of page ``block_tables_BM[b, p // S]``
  (``block_tables [B, M]`` int, M = max pages per row);
* query t of row b has position ``q_start_B[b] + t`` and is valid for ``t < n_new_B[b]``;
  invalid query rows return exact zeros; row b's keys are positions
  ``0 .. q_start_B[b] + n_new_B[b] - 1``;
* a query at position i sees keys j with ``i - window < j <= i`` (``window=None``: ``j <= i``);
* ``sinks_N`` (f32; ``-inf`` = no sink): one logit per query head in the softmax denominator
  only; GQA: N = K*G, query head n reads kv head n // G; f32 softmax statistics;
* block-table entries outside a row's visible pages [window start, last key] may hold any
  in-range page index and are never read.

``reference.paged_attention`` (same signature without ``impl``) is the pure-jnp version (gathers
pages): the tests' reference and the engine's XLA path.

impl (``pallas_kernels.impl.Impl`` or its string value): "auto" (GPU -> "triton", TPU ->
"mosaic", otherwise ``CPU_DEFAULT_IMPL`` = "triton_interpret"), "triton", "mosaic",
"triton_interpret" / "mosaic_interpret", "reference". ``resolve_impl(impl)`` returns the ``Impl``
that would run here. Forward only (serving).
"""
from __future__ import annotations

import jax.numpy as jnp

from ..impl import Impl, resolve
from . import common, reference
from . import triton as _triton

__all__ = ["CPU_DEFAULT_IMPL", "DEFAULT_PAGE_SIZE", "Impl", "paged_attention", "reference",
           "resolve_impl"]

CPU_DEFAULT_IMPL = Impl.TRITON_INTERPRET  # impl="auto" off GPU/TPU: the Triton body, interpreted

# 128 tokens per page: one Triton key block and one MXU-wide step per page; the gpt-oss window
# (128) is exactly one page, so a sliding decode reads at most 2 pages. Any S >= 1 works.
DEFAULT_PAGE_SIZE = 128


def resolve_impl(impl: str | Impl = Impl.AUTO) -> Impl:
  """`impl` resolved for this package (AUTO off GPU/TPU -> `CPU_DEFAULT_IMPL`)."""
  return resolve(impl, cpu_default=CPU_DEFAULT_IMPL)


def paged_attention(q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B,
                    sinks_N, *, window: int | None, sm_scale: float, impl: str | Impl = Impl.AUTO):
  """Attention of q over the paged K/V; see the module docstring."""
  impl = resolve_impl(impl)
  q_start_B = jnp.asarray(q_start_B)
  n_new_B = jnp.asarray(n_new_B)
  block_tables_BM = jnp.asarray(block_tables_BM)
  sinks_N = jnp.asarray(sinks_N)
  common.check_args(q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B,
                    sinks_N, window, sm_scale)
  args = (q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM.astype(jnp.int32),
          q_start_B.astype(jnp.int32), n_new_B.astype(jnp.int32), sinks_N.astype(jnp.float32))
  sm_scale = float(sm_scale)
  if impl.body is Impl.REFERENCE:
    return reference.paged_attention(*args, window=window, sm_scale=sm_scale)
  if impl.body is Impl.TRITON:
    return _triton.paged_attention(*args, window=window, sm_scale=sm_scale,
                                   interpret=impl.interpret)
  from . import tpu as _tpu
  return _tpu.paged_attention(*args, window=window, sm_scale=sm_scale, interpret=impl.interpret)
