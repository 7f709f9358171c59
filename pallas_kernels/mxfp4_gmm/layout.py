"""Kernel-side MXFP4 layout: one-time re-layout (`prepare`) and the in-kernel decoder.

Checkpoint layout (see `pallas_kernels.mxfp4`): per expert e, W_e [N, K] is
  blocks [E, N, K/32, 16] uint8 (two e2m1 codes per byte, low nibble = even element),
  scales [E, N, K/32]     uint8 (E8M0 exponents).

Kernel layout (`MXFP4GmmWeights`), K padded to Kp = ceil(K/128)*128 with zero codes:
  wq [E, S, Kp/8, N] int32: K-chunk c (128 elements) owns word rows 16c..16c+15; nibble j
                            (bits 4j..4j+3) of word row 16c+r is element k = 128c + 16j + r.
                            So "plane" j of a chunk, (words >> 4j) & 15, is a [16, N] tile of
                            consecutive k (half an MX block): no lane shuffles, no gathers.
  ws [E, S, Kp/128, N] int32: byte b (bits 8b..8b+7) of row c is the E8M0 scale of MX block
                            4c + b (elements 128c + 32b .. +31); plane j uses byte j // 2.
  S = 1 for a plain projection, S = 2 for the gate/up projection: split 0 holds the gate rows
  (checkpoint rows 0, 2, 4, ...), split 1 the up rows (1, 3, 5, ...), i.e. de-interleaved, so
  one kernel tile computes gate_j and up_j for the same j and fuses the SwiGLU.
Both keep the checkpoint's 4.25 bits per weight (0.53125 B/element) plus the K padding
(2880 -> 2944, +2.2%). N is the output (lane) dimension, contiguous in memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mxfp4

CHUNK_K = 128  # K elements per chunk: 16 word rows x 8 nibbles
ROWS_PER_CHUNK = CHUNK_K // 8
PLANE_K = CHUNK_K // 8  # 16 consecutive k per nibble plane
FAST_SCALE_MIN, FAST_SCALE_MAX = 2, 252  # E8M0 range where decode_plane_fast is exact


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class MXFP4GmmWeights:
  """Prepared MXFP4 expert weights (see module docstring). `k`, `n` are the true sizes."""

  wq: jax.Array  # [E, S, Kp/8, N] int32
  ws: jax.Array  # [E, S, Kp/128, N] int32
  k: int
  n: int
  # True when every scale is in [2, 252] (all real checkpoints): the kernels then use the
  # 10-op `decode_plane_fast`, exact in that range; otherwise the general exact decoder.
  normal_scales: bool = False

  @property
  def num_experts(self) -> int:
    return self.wq.shape[0]

  @property
  def splits(self) -> int:
    return self.wq.shape[1]

  @property
  def k_padded(self) -> int:
    return self.wq.shape[2] * 8

  def tree_flatten(self):
    return (self.wq, self.ws), (self.k, self.n, self.normal_scales)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)


def _prepare_split(blocks, scales):
  """blocks [E, N, G, 16] uint8, scales [E, N, G] uint8 -> wq [E, Kp/8, N], ws [E, Kp/128, N]."""
  e, n, g, _ = blocks.shape
  k = g * mxfp4.BLOCK
  kp = -(-k // CHUNK_K) * CHUNK_K
  codes = mxfp4.unpack_nibbles(blocks).reshape(e, n, k)  # [E, N, K] int32 (0..15)
  codes = jnp.pad(codes, ((0, 0), (0, 0), (0, kp - k)))
  # [E, N, C, 8 (plane j), 16 (row r)] -> word [E, C, 16, N] = sum_j code << 4j
  codes = codes.reshape(e, n, kp // CHUNK_K, 8, PLANE_K)
  shifts = (4 * jnp.arange(8, dtype=jnp.uint32))[:, None]
  words = jnp.sum(codes.astype(jnp.uint32) << shifts, axis=3, dtype=jnp.uint32)  # [E,N,C,16]
  words = jax.lax.bitcast_convert_type(words, jnp.int32)
  wq = jnp.transpose(words, (0, 2, 3, 1)).reshape(e, kp // 8, n)
  sc = jnp.pad(scales.astype(jnp.uint32), ((0, 0), (0, 0), (0, kp // mxfp4.BLOCK - g)))
  sc = sc.reshape(e, n, kp // CHUNK_K, 4)
  sw = jnp.sum(sc << (8 * jnp.arange(4, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)
  ws = jnp.transpose(jax.lax.bitcast_convert_type(sw, jnp.int32), (0, 2, 1))
  return wq, ws


def prepare(blocks, scales, *, interleaved_glu: bool = False,
            assume_normal_scales: bool | None = None) -> MXFP4GmmWeights:
  """One-time re-layout of checkpoint MXFP4 expert weights for `gmm` (jit-able).

  blocks [E, N, K/32, 16] uint8, scales [E, N, K/32] uint8. With `interleaved_glu=True`
  (gpt-oss gate_up_proj: row 2j = gate_j, row 2j+1 = up_j) the rows are split into gate and
  up halves (S = 2) and `gmm(..., epilogue="swiglu")` must be used.
  `assume_normal_scales`: None -> checked on concrete scales (all in [2, 252] enables the fast
  decoder), False under tracing; True/False force it (True with out-of-range scales is wrong).
  """
  if assume_normal_scales is None:
    assume_normal_scales = False
    if not isinstance(scales, jax.core.Tracer):
      s = np.asarray(scales)
      assume_normal_scales = bool(s.size == 0 or (s.min() >= FAST_SCALE_MIN and s.max() <= FAST_SCALE_MAX))
  blocks = jnp.asarray(blocks)
  scales = jnp.asarray(scales)
  if blocks.ndim != 4 or blocks.shape[:3] != scales.shape or blocks.shape[3] != mxfp4.BYTES_PER_BLOCK:
    raise ValueError(f"bad MXFP4 shapes blocks {blocks.shape} scales {scales.shape}")
  if blocks.dtype != jnp.uint8 or scales.dtype != jnp.uint8:
    raise ValueError("MXFP4 blocks and scales must be uint8")
  e, n, g, _ = blocks.shape
  if interleaved_glu:
    if n % 2:
      raise ValueError(f"interleaved gate/up needs an even N, got {n}")
    parts = [_prepare_split(blocks[:, s::2], scales[:, s::2]) for s in (0, 1)]
    n_out = n // 2
  else:
    parts = [_prepare_split(blocks, scales)]
    n_out = n
  wq = jnp.stack([p[0] for p in parts], axis=1)
  ws = jnp.stack([p[1] for p in parts], axis=1)
  return MXFP4GmmWeights(wq=wq, ws=ws, k=g * mxfp4.BLOCK, n=n_out, normal_scales=bool(assume_normal_scales))


def _unprepare_split(wq, ws, k: int):
  """Inverse of `_prepare_split`: wq [E, Kp/8, N], ws [E, Kp/128, N] -> blocks [E, N, K/32, 16], scales."""
  e, r, n = wq.shape
  c = r // ROWS_PER_CHUNK
  words = jax.lax.bitcast_convert_type(wq, jnp.uint32).reshape(e, c, 1, PLANE_K, n)
  codes = (words >> (4 * jnp.arange(8, dtype=jnp.uint32))[:, None, None]) & 15  # [E, C, 8, 16, N]
  codes = jnp.transpose(codes, (0, 4, 1, 2, 3)).reshape(e, n, c * CHUNK_K)[:, :, :k]
  codes = codes.reshape(e, n, k // mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK, 2)
  blocks = (codes[..., 0] | (codes[..., 1] << 4)).astype(jnp.uint8)
  sw = jax.lax.bitcast_convert_type(ws, jnp.uint32)  # [E, C, N]
  sc = (sw[..., None] >> (8 * jnp.arange(4, dtype=jnp.uint32))) & 255  # [E, C, N, 4]
  scales = jnp.transpose(sc, (0, 2, 1, 3)).reshape(e, n, c * 4)[:, :, : k // mxfp4.BLOCK]
  return blocks, scales.astype(jnp.uint8)


def unprepare(w: MXFP4GmmWeights):
  """Prepared weights -> checkpoint (blocks [E, N, K/32, 16], scales [E, N, K/32]) uint8, exactly;
  the gate/up splits are re-interleaved (row 2j = gate_j, 2j+1 = up_j)."""
  parts = [_unprepare_split(w.wq[:, s], w.ws[:, s], w.k) for s in range(w.splits)]
  if w.splits == 1:
    return parts[0]
  e, n = w.num_experts, w.n
  blocks = jnp.stack([p[0] for p in parts], axis=2).reshape(e, 2 * n, *parts[0][0].shape[2:])
  scales = jnp.stack([p[1] for p in parts], axis=2).reshape(e, 2 * n, parts[0][1].shape[2])
  return blocks, scales


def prepare_bias(bias, *, interleaved_glu: bool = False):
  """bias [E, N] -> [E, S, N] matching `prepare` (de-interleaved for the gate/up projection)."""
  bias = jnp.asarray(bias)
  if interleaved_glu:
    return jnp.stack([bias[:, 0::2], bias[:, 1::2]], axis=1)
  return bias[:, None, :]


# ----------------------------------------------------------------------------------------------
# Decoder: the arithmetic of `pallas_kernels.mxfp4.e2m1_times_pow2_bits`, on int32 (widened before any
# shift: no uint8/uint32 vector ops), usable in jnp, Pallas TPU (Mosaic) and Pallas Triton.


def e2m1_bits_i32(code, scale):
  """int32 float32-bit-pattern of FP4(code) * 2**(scale - 127); code 0..15, scale 0..254 (int32)."""
  sign = (code >> 3) & 1
  e = (code >> 1) & 3
  m = code & 1
  normal_e = e > 0
  q = jnp.where(normal_e, m + 2, m)
  x = jnp.where(normal_e, e - 2, -1) + scale - mxfp4.SCALE_BIAS
  big = (q >= 2).astype(jnp.int32)
  lead = x + big
  biased = lead + 127
  mant_bit = (q == 3).astype(jnp.int32)
  normal = (jnp.minimum(biased, 255) << 23) | jnp.where(biased >= 255, 0, mant_bit << 22)
  subnormal = q << jnp.minimum(jnp.maximum(x + 149, 0), 31)
  bits = jnp.where(q == 0, 0, jnp.where(lead >= -126, normal, subnormal))
  return bits | (sign << 31)


def decode_plane(words, scale_word, j: int, dtype, fast: bool = False):
  """Plane j of a chunk: words [R, N] int32, scale_word [1, N] int32 -> [R, N] `dtype` weights.

  bf16 keeps the top 16 bits (like `mxfp4.dequantize`): mask, bitcast to f32, then the cast is exact.
  """
  if fast:
    return decode_plane_fast(words, scale_word, j, dtype)
  code = (words >> (4 * j)) & 15
  scale = (scale_word >> (8 * (j // 2))) & 255
  bits = e2m1_bits_i32(code, scale)
  if jnp.dtype(dtype) == jnp.bfloat16:
    bits = bits & jnp.int32(-65536)
  w = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return w if jnp.dtype(dtype) == jnp.float32 else w.astype(dtype)


def decode_plane_fast(words, scale_word, j: int, dtype):
  """Same result as `decode_plane` for scales in [2, 252], in ~10 int32 ops per element.

  With t = code & 7 = (e1 e0 m): a normal e2m1 (t >= 2) times 2**(s-127) has f32 exponent field
  e + s - 1 and mantissa msb m, i.e. bits (t << 22) + ((s - 1) << 23); the subnormal t = 1
  (0.5 * 2**(s-127)) is (s - 1) << 23; t = 0 is +-0. Only the top 10 bits can be set, so the
  bf16 cast is exact. The per-column term (s - 1) << 23 is computed once per [1, N] row.
  """
  sh = 4 * j
  s1 = (((scale_word >> (8 * (j // 2))) & 255) - 1) << 23  # [1, N]
  t22 = ((words << (22 - sh)) if sh <= 22 else (words >> (sh - 22))) & (7 << 22)
  sign = (words << (28 - sh)) & jnp.int32(-(2**31))
  mag = jnp.where(t22 >= (2 << 22), t22 + s1, jnp.where(t22 == (1 << 22), s1, 0))
  w = jax.lax.bitcast_convert_type(mag | sign, jnp.float32)
  return w if jnp.dtype(dtype) == jnp.float32 else w.astype(dtype)


def dequantize_prepared(w: MXFP4GmmWeights, dtype=jnp.float32):
  """Prepared weights -> dense [E, S, N, K] (true K), via the kernel decoder (jnp)."""
  e, s, r, n = w.wq.shape
  c = r // ROWS_PER_CHUNK
  words = w.wq.reshape(e, s, c, 1, ROWS_PER_CHUNK, n)
  j = jnp.arange(8, dtype=jnp.int32)[:, None, None]
  code = (words >> (4 * j)) & 15  # [E,S,C,8,16,N]
  scale = (w.ws[:, :, :, None, None, :] >> (8 * (j // 2))) & 255
  bits = e2m1_bits_i32(code, scale)
  if jnp.dtype(dtype) == jnp.bfloat16:
    bits = bits & jnp.int32(-65536)
  dense = jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)
  dense = dense.reshape(e, s, c * CHUNK_K, n)[:, :, : w.k]
  return jnp.swapaxes(dense, -1, -2)


def group_metadata(group_sizes, m: int, tm: int):
  """Work list for a grouped matmul over m rows (multiple of tm) in tiles of tm rows.

  An extra group E covers the padding rows past sum(group_sizes) (the kernels write zeros
  there), so every row of the output is written by exactly one (group, tile) work item.
  Returns (group_offsets [E+2], group_ids [W], m_tile_ids [W], num_work) with the static
  W = m/tm + E (upper bound); items past num_work repeat the last item (idempotent).
  """
  from jax.experimental.pallas.ops.tpu.megablox.gmm import make_group_metadata

  group_sizes = group_sizes.astype(jnp.int32)
  pad = jnp.int32(m) - jnp.sum(group_sizes)
  ext = jnp.concatenate([group_sizes, pad[None]])
  (offsets, gids, tids), num = make_group_metadata(
      group_sizes=ext, m=m, tm=tm, start_group=jnp.int32(0),
      num_nonzero_groups=ext.shape[0], visit_empty_groups=False)
  return offsets.astype(jnp.int32), gids.astype(jnp.int32), tids.astype(jnp.int32), num.astype(jnp.int32)


