"""Pieces shared by the Triton and Mosaic TPU kernels: epilogue and tiling choice."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def sigmoid(x):
  # explicit form: lowers on Triton, Mosaic and XLA alike
  return 1.0 / (1.0 + jnp.exp(-x))


def swiglu(gate, up, alpha: float, limit: float):
  """gpt-oss SwiGLU: gate clamped above only, up clipped both sides, (up + 1) * gate * sigmoid(alpha * gate)."""
  gate = jnp.minimum(gate, limit)
  up = jnp.clip(up, -limit, limit)
  return (up + 1.0) * (gate * sigmoid(alpha * gate))


def apply_epilogue(accs, biases, row_w, epilogue, alpha, limit):
  """accs: list of S f32 [bm, bn]; biases: list of S f32 [1, bn] or None; row_w f32 [bm, 1] or None."""
  ys = [a if b is None else a + b for a, b in zip(accs, biases)]
  if epilogue == "swiglu":
    y = swiglu(ys[0], ys[1], alpha, limit)
  else:
    y = ys[0]
  if row_w is not None:
    y = y * row_w
  return y


@dataclasses.dataclass(frozen=True)
class Tiling:
  bm: int  # rows per tile
  bn: int  # output columns per tile (per split)
  num_warps: int = 4  # Triton only
  num_stages: int = 2  # Triton only


def triton_tiling(m: int, splits: int) -> Tiling:
  """H100 tilings (see ROOFLINE.md). Every work item decodes its expert's [K, bn] weight tile
  once, so the decode (integer ALU) work is (#row tiles + #experts) x weights: decode (HBM-bound
  in principle) uses the smallest MMA-legal row tile (16) and narrow 64-column tiles (>= 1 CTA
  per SM); prefill uses 256-row tiles to amortise the decode over 256 rows; the column tile is
  sized for <= 146 registers (0 spills, 2 CTAs of 8 warps per SM fit in the register file)."""
  if m <= 256:
    return Tiling(bm=16, bn=64, num_warps=4, num_stages=3)
  if m <= 4096:
    return Tiling(bm=64, bn=64, num_warps=4, num_stages=3)
  return Tiling(bm=256, bn=32 if splits == 2 else 64, num_warps=8, num_stages=2)


def tpu_tiling(m: int, splits: int) -> Tiling:
  """TPU v5e/v6e/v7x tilings (see ROOFLINE.md): the whole K is resident in VMEM per grid step;
  decode streams 512-wide weight column blocks with 16-row tiles; prefill uses 512-row tiles so
  the VPU decode (~12 int32 ops per weight) is amortised over 512 MXU rows."""
  if m <= 256:
    return Tiling(bm=16, bn=512)
  if m <= 4096:
    return Tiling(bm=128, bn=512 if splits == 1 else 256)
  return Tiling(bm=512, bn=512 if splits == 1 else 256)


def round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def pad_rows(a, mp: int):
  if a.shape[0] == mp:
    return a
  return jnp.pad(a, ((0, mp - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))

