"""Dispatch by backend and `jax.custom_vjp` (gradients w.r.t. x, bias and row weights)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..impl import Impl, resolve
from ..scheduling import zeros_after
from . import common, layout, reference

CPU_DEFAULT_IMPL = Impl.MOSAIC_INTERPRET  # impl="auto" off GPU/TPU: the Mosaic body, interpreted
IMPLS = tuple(m.value for m in Impl)


class _Cfg(NamedTuple):
  impl: Impl
  epilogue: str | None
  alpha: float
  limit: float
  out_dtype: str


def resolve_impl(impl: str | Impl = Impl.AUTO) -> Impl:
  """`impl` resolved for this package (AUTO off GPU/TPU -> `CPU_DEFAULT_IMPL`)."""
  return resolve(impl, cpu_default=CPU_DEFAULT_IMPL)


def _dense(w: layout.MXFP4GmmWeights, dtype, after):
  """[E, S, N, K] dense weights, decoded one expert at a time into a buffer created once `after` (a
  value of this call) exists. All at once, the decoder's int32 intermediates (4 bytes a weight) stayed
  alive on XLA:TPU in a backward pass (gpt-oss-20b: 12 GB of temporaries for a LoRA step); an
  unanchored output buffer is allocated at the program's start for every layer by XLA:GPU."""
  e, s, _, n = w.wq.shape
  (out,) = zeros_after(after, ((e, s, n, w.k), dtype))

  def one(i, out):
    wi = layout.MXFP4GmmWeights(jax.lax.dynamic_slice_in_dim(w.wq, i, 1), jax.lax.dynamic_slice_in_dim(w.ws, i, 1),
                                w.k, w.n, w.normal_scales)
    return jax.lax.dynamic_update_slice_in_dim(out, layout.dequantize_prepared(wi, dtype), i, 0)

  return jax.lax.fori_loop(0, e, one, out)


def _linear_parts(x, w, group_sizes, bias, after):
  """Pre-epilogue f32 outputs per split via dequantize + ragged_dot (reference math)."""
  wd = _dense(w, x.dtype, after)
  prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  return [reference.linear_reference(x, wd[:, s], group_sizes, None if bias is None else bias[:, s], prec)
          for s in range(w.splits)], wd


def _epilogue_fn(cfg: _Cfg):
  def f(zs, rw):
    return common.apply_epilogue(zs, [None] * len(zs), None if rw is None else rw[:, None],
                                 cfg.epilogue, cfg.alpha, cfg.limit)
  return f


def _forward(cfg: _Cfg, x, w, group_sizes, bias, row_weights):
  out_dtype = jnp.dtype(cfg.out_dtype)
  kw = dict(epilogue=cfg.epilogue, alpha=cfg.alpha, limit=cfg.limit, out_dtype=out_dtype)
  if cfg.impl.body is Impl.TRITON:
    from .triton import gmm_triton
    return gmm_triton(x, w, group_sizes, bias, row_weights, interpret=cfg.impl.interpret, **kw)
  if cfg.impl.body is Impl.MOSAIC:
    from .tpu import gmm_tpu
    return gmm_tpu(x, w, group_sizes, bias, row_weights, interpret=cfg.impl.interpret, **kw)
  zs, _ = _linear_parts(x, w, group_sizes, bias, after=x)
  rw = None if row_weights is None else row_weights.astype(jnp.float32)
  return _epilogue_fn(cfg)(zs, rw).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg, x, w, group_sizes, bias, row_weights):
  return _forward(cfg, x, w, group_sizes, bias, row_weights)


def _gmm_fwd(cfg, x, w, group_sizes, bias, row_weights):
  return _forward(cfg, x, w, group_sizes, bias, row_weights), (x, w, group_sizes, bias, row_weights)


def _zeros_like_int(a):
  return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _gmm_bwd(cfg, res, dy):
  """Backward on dequantized weights (recomputes the pre-epilogue activations, no kernel)."""
  x, w, group_sizes, bias, row_weights = res
  m = x.shape[0]
  e = w.num_experts
  zs, wd = _linear_parts(x, w, group_sizes, bias, after=dy)
  rw = None if row_weights is None else row_weights.astype(jnp.float32)
  _, vjp = jax.vjp(_epilogue_fn(cfg), zs, rw)
  dzs, drw = vjp(dy.astype(jnp.float32))
  gs = group_sizes.astype(jnp.int32)
  gid = reference.row_group_ids(gs, m)
  valid = (gid < e)[:, None]
  dx = jnp.zeros(x.shape, jnp.float32)
  prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  for s, dz in enumerate(dzs):
    dz = jnp.where(valid, dz, 0.0)
    dzs[s] = dz
    dx = dx + jax.lax.ragged_dot(dz.astype(x.dtype), wd[:, s], gs, precision=prec,
                                 preferred_element_type=jnp.float32)
  dbias = None
  if bias is not None:
    db = jnp.stack([jax.ops.segment_sum(dz, gid, num_segments=e + 1)[:e] for dz in dzs], axis=1)
    dbias = db.astype(bias.dtype)
  if row_weights is not None:
    drw = drw.astype(row_weights.dtype)
  dw = jax.tree.map(_zeros_like_int, w)
  return dx.astype(x.dtype), dw, _zeros_like_int(group_sizes), dbias, drw


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(x, w: layout.MXFP4GmmWeights, group_sizes, *, bias=None, epilogue=None, swiglu_alpha=None,
        swiglu_limit=None, row_weights=None, out_dtype=None, impl: str | Impl = Impl.AUTO):
  """Grouped MXFP4 matmul, see the package docstring."""
  impl = resolve_impl(impl)  # first: a bad impl name fails before any shape check
  if not isinstance(w, layout.MXFP4GmmWeights):
    raise TypeError("w must come from mxfp4_gmm.prepare(...)")
  if x.ndim != 2 or x.shape[1] != w.k:
    raise ValueError(f"x must be [M, {w.k}], got {x.shape}")
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x must be bf16 or f32, got {x.dtype}")
  if group_sizes.shape != (w.num_experts,):
    raise ValueError(f"group_sizes must be [{w.num_experts}], got {group_sizes.shape}")
  if epilogue not in (None, "swiglu"):
    raise ValueError(f"unknown epilogue {epilogue!r}")
  if (epilogue == "swiglu") != (w.splits == 2):
    raise ValueError("epilogue='swiglu' needs weights prepared with interleaved_glu=True and vice versa")
  if epilogue == "swiglu":
    if swiglu_alpha is None or swiglu_limit is None:
      raise ValueError("swiglu needs swiglu_alpha and swiglu_limit")
    alpha, limit = float(swiglu_alpha), float(swiglu_limit)
  else:
    alpha, limit = 1.0, 0.0
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.ndim == 2:  # checkpoint layout [E, N_ckpt]
      bias = layout.prepare_bias(bias, interleaved_glu=w.splits == 2)
    if bias.shape != (w.num_experts, w.splits, w.n):
      raise ValueError(f"bias must be [E, {w.splits * w.n}] or [E, {w.splits}, {w.n}], got {bias.shape}")
  if row_weights is not None and row_weights.shape != (x.shape[0],):
    raise ValueError(f"row_weights must be [{x.shape[0]}], got {row_weights.shape}")
  cfg = _Cfg(impl, epilogue, alpha, limit, jnp.dtype(out_dtype or x.dtype).name)
  return _gmm(cfg, x, w, group_sizes.astype(jnp.int32), bias, row_weights)
