"""Pure-jnp reference: exact dequantization (`pallas_kernels.mxfp4.dequantize`) + `jax.lax.ragged_dot`.

Works on checkpoint-layout weights (blocks [E, N, K/32, 16], scales [E, N, K/32], gate/up rows
interleaved for the "swiglu" epilogue), so it is independent of the kernel re-layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import mxfp4

from . import common


def row_group_ids(group_sizes, m: int):
  """[M] int32 group of each sorted row; rows past sum(group_sizes) get E (padding)."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def linear_reference(x, w_dense_ekn, group_sizes, bias_en=None, precision=None):
  """y[m] = x[m] @ W_g(m)^T + b_g(m) in f32; padding rows are 0. w_dense [E, N, K]."""
  m = x.shape[0]
  e = w_dense_ekn.shape[0]
  y = jax.lax.ragged_dot(x, jnp.swapaxes(w_dense_ekn, 1, 2), group_sizes.astype(jnp.int32),
                         precision=precision, preferred_element_type=jnp.float32)
  gid = row_group_ids(group_sizes, m)
  valid = (gid < e)[:, None]
  if bias_en is not None:
    y = y + jnp.take(bias_en.astype(jnp.float32), jnp.minimum(gid, e - 1), axis=0)
  return jnp.where(valid, y, 0.0)


def gmm_reference(x, blocks, scales, group_sizes, *, bias=None, epilogue=None, swiglu_alpha=None,
                  swiglu_limit=None, row_weights=None, out_dtype=None):
  """Reference for `gmm` on checkpoint-layout weights (gate/up interleaved when epilogue="swiglu")."""
  out_dtype = out_dtype or x.dtype
  w = mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), x.dtype)
  w = w.reshape(*w.shape[:2], -1)
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  y = linear_reference(x, w, group_sizes, bias, precision)
  if epilogue == "swiglu":
    y = common.swiglu(y[:, 0::2], y[:, 1::2], swiglu_alpha, swiglu_limit)
  elif epilogue is not None:
    raise ValueError(f"unknown epilogue {epilogue!r}")
  if row_weights is not None:
    y = y * row_weights.astype(jnp.float32)[:, None]
  return y.astype(out_dtype)
