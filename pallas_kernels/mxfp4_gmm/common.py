"""Pieces shared by the Triton and Mosaic TPU kernels: epilogue, tiling choice, cost estimate."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl


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


def gmm_cost_estimate(*, m: int, k: int, n: int, splits: int, num_experts: int, x_bytes: int,
                      weight_bytes: int, out_bytes: int, x_reads: int = 1, bias_bytes: int = 0,
                      other_bytes: int = 0, epilogue: str | None = None) -> pl.CostEstimate:
  """Static cost of one grouped-matmul `pallas_call` (the group sizes are traced, so bounds):

  * flops = 2 * M * K * N per split (the MXU / MMA work on the true K; the integer weight decode
    is not counted);
  * transcendentals = M * N for the SwiGLU epilogue (one exp per output, in the sigmoid), else 0;
  * bytes_accessed = the packed weights (int32 words + scale words, `weight_bytes` for all E
    experts) and bias of the experts that can be hit, min(E, M) of E (each is fetched once:
    column tiles are disjoint and consecutive work items of one expert keep its block) + x read
    `x_reads` times (once per column tile) + the output + `other_bytes` (row weights, group
    metadata).
  """
  touched = min(num_experts, max(m, 1))
  flops = 2 * m * k * n * splits
  trans = m * n if epilogue == "swiglu" else 0
  bytes_accessed = (x_reads * x_bytes + (weight_bytes + bias_bytes) * touched // num_experts
                    + out_bytes + other_bytes)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(trans),
                         bytes_accessed=int(bytes_accessed))
