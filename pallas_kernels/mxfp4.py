"""MXFP4 (OCP microscaling FP4) as stored in the gpt-oss checkpoints.

Layout of one quantized matrix W [N, K] (per expert):
  blocks [N, K/32, 16] uint8: 32 e2m1 codes per block, two per byte, the LOW nibble
                              holding the even element and the HIGH nibble the odd one;
  scales [N, K/32]     uint8: one E8M0 exponent per block, value 2**(s - 127).

Decoding builds IEEE bits with integer ops only (no table gather, no float multiply), so it is
bit-exact on every backend, including subnormal results that XLA:CPU would flush to zero, and
the same arithmetic compiles inside Pallas kernels. The numpy twins serve checkpoint writers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # elements per scale block
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127

# e2m1 code -> value, the OCP table (also transformers' FP4_VALUES).
FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def e2m1_times_pow2_bits(code, scale):
    """float32 bit pattern (uint32) of FP4(code) * 2**(scale - 127), exactly.

    `code` holds e2m1 codes 0..15 and `scale` E8M0 exponents 0..254, as int32 arrays of one
    shape (jnp or numpy; works on Pallas values too). Scale 255 (E8M0 NaN) saturates to inf.
    """
    xp = jnp if isinstance(code, jax.Array) or isinstance(scale, jax.Array) else np
    code = code.astype(xp.int32)
    scale = scale.astype(xp.int32)
    sign = (code >> 3) & 1
    e = (code >> 1) & 3
    m = code & 1
    # value = q * 2**u with q in {0,1,2,3}: subnormal e2m1 is m * 2**-1, normal is (2 + m) * 2**(e - 2).
    q = xp.where(e > 0, 2 + m, m)
    x = xp.where(e > 0, e - 2, -1) + scale - SCALE_BIAS  # exponent of the lsb of q
    lead = x + (q >= 2).astype(xp.int32)  # unbiased exponent of the leading one
    mant_bit = (q == 3).astype(xp.int32)
    normal = (xp.minimum(lead + 127, 255) << 23) | xp.where(lead + 127 >= 255, 0, mant_bit << 22)
    # Below 2**-126 the result is subnormal: bits = value / 2**-149 = q << (x + 149), x >= -128.
    subnormal = q << xp.clip(x + 149, 0, 31)
    bits = xp.where(q == 0, 0, xp.where(lead >= -126, normal, subnormal))
    return (bits | (sign << 31)).astype(xp.uint32)


def unpack_nibbles(blocks):
    """[..., G, 16] uint8 -> [..., G, 32] int32 codes, low nibble first."""
    xp = jnp if isinstance(blocks, jax.Array) else np
    b = blocks.astype(xp.int32)
    codes = xp.stack([b & 0xF, b >> 4], axis=-1)
    return codes.reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])


def dequantize(blocks, scales, dtype=jnp.bfloat16):
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] in `dtype` (jnp, jit-able).

    float32 and bfloat16 are exact (bf16 keeps the top 16 bits; e2m1 * 2**k needs 2 mantissa bits).
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
    codes = unpack_nibbles(jnp.asarray(blocks))
    bits = e2m1_times_pow2_bits(codes, jnp.asarray(scales).astype(jnp.int32)[..., None])
    bits = bits.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    if dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def dequantize_np(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """numpy twin of `dequantize`, float32."""
    codes = unpack_nibbles(np.asarray(blocks))
    bits = e2m1_times_pow2_bits(codes, np.asarray(scales).astype(np.int32)[..., None])
    return bits.view(np.float32).reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)


def quantize_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., K] (K % 32 == 0) -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8).

    Per block the scale is the smallest power of two that puts max|w| within the e2m1 range (6),
    then each value rounds to the nearest code. Used to write test and random checkpoints.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of {BLOCK}, got {w.shape}")
    wb = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(wb).max(axis=-1)
    with np.errstate(divide="ignore"):
        exp = np.ceil(np.log2(np.where(amax > 0, amax, 1.0) / FP4_VALUES[7]))
    scales = np.clip(exp + SCALE_BIAS, 0, 254).astype(np.uint8)
    scaled = wb / np.exp2(scales.astype(np.float32) - SCALE_BIAS)[..., None]
    mags = FP4_VALUES[:8]
    idx = np.abs(np.abs(scaled)[..., None] - mags).argmin(axis=-1)
    codes = (idx | (np.signbit(scaled) & (idx > 0)) << 3).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.astype(np.uint8), scales


def random_packed_np(rng: np.random.Generator, shape_nk: tuple[int, ...], scale_center: int = 122,
                     scale_spread: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Random MXFP4 weights for a [..., K] matrix: uniform codes, scales near 2**(center-127)."""
    *lead, k = shape_nk
    g = k // BLOCK
    blocks = rng.integers(0, 256, size=(*lead, g, BYTES_PER_BLOCK), dtype=np.uint8)
    scales = rng.integers(scale_center - scale_spread, scale_center + scale_spread + 1,
                          size=(*lead, g)).astype(np.uint8)
    return blocks, scales
