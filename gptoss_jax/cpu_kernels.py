"""XLA:CPU formulations of the few-row (decode) products: the MXFP4 experts and the dense projections.

A decode step multiplies a handful of activation rows by every weight once, so it is bound by the
bytes of the weights. On XLA:CPU the plain formulations move several times those bytes:

- a bfloat16 dot with a single row is run in float32 (XLA:CPU upcasts the operands of dots that its
  library kernels do not take), so every weight is first converted into a float32 copy as large as
  twice the weight (the whole lm_head, 2.3 GB, at each step);
- the gather-and-dequantize MoE path materialises the routed experts in the compute dtype.

The formulations here read each weight once, in its stored form, and convert it inside the fusion
that consumes it:

- `mxfp4_matvec`: the e2m1 codes are decoded (integer ops, exact) and multiplied by the activation
  inside one reduce fusion over 16-byte blocks; the E8M0 scale multiplies each block's partial sum
  (a power of two: the same products as dequantize-then-dot, summed in another order).
- `project` with the contraction on the weight's leading axes (q/k/v/o): a reduction over the
  contraction split in chunks of `CHUNK`, so the kept (output) axis is the contiguous one and
  every chunk is one vectorised fusion.
- `project` with the contraction on the weight's trailing axes (lm_head): a bfloat16 dot with at
  least `MIN_DOT_ROWS` rows, which XLA:CPU gives to its library kernel (YNNPACK) that reads the
  bfloat16 weight directly.

Why the chunks: XLA:CPU rewrites a reduction over more than 32 elements into a reduce-window
that does not fuse with its producer, which would materialise the converted weights again; and it
merges two consecutive reductions into one, so an optimization barrier keeps them apart. The
process-wide XLA:CPU options these rely on are set by `gptoss_jax.platforms.cpu_xla_flags`.

Every function here is pure jnp and differentiable; the op objects of `gptoss_jax.ops` choose them
(Runtime.create, on a CPU backend) only for few rows, and fall back to the einsums otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import mxfp4

from . import native
from .config import GptOssConfig
from .layers import swiglu

# Contraction elements per fused reduction (XLA:CPU's tree-reduction rewriter splits longer ones).
CHUNK = 32
# XLA:CPU hands bfloat16 dots to YNNPACK only with at least two rows on each side.
MIN_DOT_ROWS = 2
_HALF = mxfp4.BYTES_PER_BLOCK  # codes per nibble plane of a block


def to_f32(w):
    """float32 inside the consuming fusion; bfloat16 by its bits (a shift). XLA:CPU rewrites a convert
    of a bfloat16 parameter into a float32 copy of the whole array, and its bfloat16 convert inside
    a fusion does not vectorise (a bfloat16 activation converted in a projection's fusion halves
    its speed)."""
    if w.dtype == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.uint32) << 16
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    return w.astype(jnp.float32)


def e2m1_f32(code):
    """float32 value of e2m1 codes (int32, 0..15), exactly, from their bits: magnitude index i = 1
    is 0.5, i >= 2 is (2 + (i & 1)) * 2**((i >> 1) - 2), i.e. exponent field (i >> 1) + 126."""
    i = code & 7
    mag = jnp.where(i >= 2, (i << 22) + (126 << 23), i * (126 << 23))
    return jax.lax.bitcast_convert_type(mag | ((code & 8) << 28), jnp.float32)


def e8m0_f32(scales):
    """2**(s - 127) as float32 for E8M0 exponents s in [1, 254] (s = 0, a subnormal, reads 0)."""
    return jax.lax.bitcast_convert_type(scales.astype(jnp.int32) << 23, jnp.float32)


def mxfp4_matvec(x_RK, blocks_RNGb, scales_RNG):
    """y[r] = W_r x[r] for R rows, each with its own MXFP4 matrix W_r [N, K] (blocks [R, N, K/32, 16],
    scales [R, N, K/32], the checkpoint layout): float32 [R, N], no dequantized W_r materialised.

    The low nibble of byte j is element 2j of its block and the high nibble element 2j + 1, so x is
    split into its even and odd elements once and each byte meets both halves."""
    R, K = x_RK.shape
    G = K // mxfp4.BLOCK
    xr = to_f32(x_RK).reshape(R, 1, G, _HALF, 2)
    codes = blocks_RNGb.astype(jnp.int32)
    p = e2m1_f32(codes & 15) * xr[..., 0] + e2m1_f32(codes >> 4) * xr[..., 1]  # [R, N, G, 16]
    return jnp.sum(jnp.sum(p, axis=-1) * e8m0_f32(scales_RNG), axis=-1)


@jax.custom_vjp
def mxfp4_rows(x_RK, blocks_ENGb, scales_ENG, e_R):
    """`mxfp4_matvec` of each row r with expert e_R[r]'s matrix (all experts' blocks [E, N, K/32, 16]
    and scales [E, N, K/32] passed whole) by the native kernel (`gptoss_jax.native`; call only where
    `native.available()`): float32 [R, N]. Differentiable in x (the backward pass is XLA's)."""
    return native.mxfp4_rows_call(x_RK, blocks_ENGb, scales_ENG, e_R)


def _mxfp4_rows_fwd(x_RK, blocks_ENGb, scales_ENG, e_R):
    return mxfp4_rows(x_RK, blocks_ENGb, scales_ENG, e_R), (x_RK, blocks_ENGb, scales_ENG, e_R)


def _mxfp4_rows_bwd(res, dy_RN):
    x_RK, blocks_ENGb, scales_ENG, e_R = res
    _, vjp = jax.vjp(lambda x: mxfp4_matvec(x, blocks_ENGb[e_R], scales_ENG[e_R]), x_RK)
    return vjp(dy_RN)[0], None, None, None


mxfp4_rows.defvjp(_mxfp4_rows_fwd, _mxfp4_rows_bwd)


def experts_rows(x_RD, e_R, p, cfg: GptOssConfig, *, native_kernel: bool = False):
    """Row r through expert e_R[r] (MXFP4 weights of `p` in checkpoint layout), before the routing
    weight: float32 [R, D]. The drop-in for `layers.gathered_rows` on XLA:CPU: the routed experts'
    packed blocks are read in place, never dequantized whole; by the native kernel (`mxfp4_rows`)
    if `native_kernel`, else by XLA fusions (the gather fuses into the reduction)."""
    dtype = x_RD.dtype

    def matvec(x, blocks, scales):
        x = to_f32(x)  # widened apart from the product's fusion, as in `project`
        if native_kernel:
            return mxfp4_rows(x, blocks, scales, e_R)

        def fused(x, blocks, scales):  # the gather inside: it fuses into the reduction
            return mxfp4_matvec(x, blocks[e_R], scales[e_R])

        def nans(x, blocks, scales):  # every row holds a NaN: so does each of its outputs
            return jnp.full((x.shape[0], blocks.shape[1]), jnp.nan, jnp.float32)

        return unhoisted(fused, nans, jnp.all(jnp.any(jnp.isnan(x), axis=1)), x, blocks, scales)

    h = matvec(x_RD, p["w1_blocks"], p["w1_scales"]) + p["b1"][e_R].astype(jnp.float32)
    h = swiglu(h, cfg.swiglu_alpha, cfg.swiglu_limit).astype(dtype)  # rounded as the XLA path rounds it
    return matvec(h, p["w2_blocks"], p["w2_scales"]) + p["b2"][e_R].astype(jnp.float32)


def unhoisted(fast, other, use_other, *args):
    """fast(*args), or other(*args) where `use_other` (a traced bool) holds, as a conditional.

    Inside a decode loop XLA hoists loop-invariant conversions of a weight out of the loop, storing
    a float32 copy of the weight and reading that copy at every step; the branches of a conditional
    are out of reach of that motion, so `fast` keeps its conversions fused into its reductions.
    `other` must equal `fast` wherever `use_other` holds (it serves the rare inputs the predicate
    names), so the result is fast's everywhere."""
    return jax.lax.cond(use_other, other, fast, *args)


def split_order(x_TK):
    """x [T, K] with each 32-element block's even elements first, then its odd ones: the order in
    which `dequantize_split` lays out the columns of an MXFP4 matrix."""
    T, K = x_TK.shape
    return x_TK.reshape(T, K // mxfp4.BLOCK, _HALF, 2).swapaxes(-1, -2).reshape(T, K)


def dequantize_split(blocks_NGb, scales_NG, dtype=jnp.bfloat16):
    """MXFP4 W [N, K] dequantized with the columns in `split_order` (the low nibbles of a block, then
    its high nibbles: no interleaving, which XLA:CPU vectorises poorly). Values exact for E8M0
    exponents in [1, 254] whose products stay normal (XLA:CPU flushes subnormals)."""
    codes = blocks_NGb.astype(jnp.int32)
    scale = e8m0_f32(scales_NG)[..., None]
    planes = [(e2m1_f32(c) * scale).astype(dtype) for c in (codes & 15, codes >> 4)]
    return jnp.concatenate(planes, axis=-1).reshape(blocks_NGb.shape[0], -1)


def tile_rows(rows: int, experts: int) -> int:
    """Rows per expert tile for `expert_tile`: each tile dequantizes a whole expert, so tiles should
    be few, but every group is padded to whole tiles; twice the mean group, in [16, 128], measured
    best for a 128-token prefill of the 20b (32-row tiles: 3.4x the 128-row default's speed)."""
    mean = -(-rows // experts)
    return min(128, max(16, 2 * (1 << (mean - 1).bit_length())))


def expert_tile(x_tD, e, p, cfg: GptOssConfig, *, native_kernel: bool = False):
    """The drop-in for `layers.dequantized_tile` on XLA:CPU: expert e dequantized to bfloat16 (by the
    native kernel if `native_kernel`; else by XLA, the columns in split order and the activations
    permuted to match), then both projections as library dots: float32 [t, D].

    Expert e's packed arrays are sliced out first and enter a conditional as plain buffers: fused
    into the dequantization, the dynamic slice's per-element indexing runs it ~4x slower."""
    dtype = x_tD.dtype
    if native_kernel:
        dequantize, order = native.mxfp4_dequant_call, lambda x: x
    else:
        dequantize, order = functools.partial(dequantize_split, dtype=dtype), split_order

    def ffn(x_tD, w1_b, w1_s, b1, w2_b, w2_s, b2):
        w1 = dequantize(w1_b, w1_s)  # [2F, D]
        h = jnp.einsum("tD,ND->tN", order(x_tD), w1.astype(dtype), preferred_element_type=jnp.float32)
        h = swiglu(h + b1.astype(jnp.float32), cfg.swiglu_alpha, cfg.swiglu_limit).astype(dtype)
        w2 = dequantize(w2_b, w2_s)  # [D, F]
        return jnp.einsum("tF,DF->tD", order(h), w2.astype(dtype), preferred_element_type=jnp.float32) + \
            b2.astype(jnp.float32)

    def nothing(x_tD, *_):  # e < 0 never happens (tile experts are clipped to [0, E))
        return jnp.zeros(x_tD.shape, jnp.float32)

    names = ("w1_blocks", "w1_scales", "b1", "w2_blocks", "w2_scales", "b2")
    return unhoisted(ffn, nothing, e < 0, x_tD, *(p[n][e] for n in names))


def _matvec_in_first(x_MK, w_KN):
    """x [M, K] @ w [K, N] (contraction on w's leading axis) as chunked reductions: float32 [M, N]."""
    M, K = x_MK.shape
    A = K // CHUNK
    w = to_f32(w_KN).reshape(A, CHUNK, -1)
    x = to_f32(x_MK).reshape(M, A, CHUNK, 1)
    partial = jnp.sum(x * w, axis=2)  # [M, A, N]: one fusion, the converted w never stored
    return jnp.sum(jax.lax.optimization_barrier(partial), axis=1)


def _matvec_in_last(x_MK, w_NK):
    """x [M, K] @ w [N, K]^T (contraction on w's trailing axis), both bfloat16: float32 [M, N] from
    XLA:CPU's library dot (rows padded to MIN_DOT_ROWS), which reads the bfloat16 weight as stored."""
    M = x_MK.shape[0]
    x = jnp.pad(x_MK, ((0, max(0, MIN_DOT_ROWS - M)), (0, 0)))
    return jax.lax.dot_general(x, w_NK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)[:M]


def project(x, w, n_in: int, *, in_first: bool):
    """x [..., *in] times w ([*in, *out] if `in_first`, else [*out, *in]) over the `n_in` trailing
    axes of x: float32 [..., *out]. Exactly the einsum's values up to the order of the sums."""
    lead, ins = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    outs = w.shape[n_in:] if in_first else w.shape[:w.ndim - n_in]
    M, K, N = math.prod(lead), math.prod(ins), math.prod(outs)

    def fast(x_MK, w):
        if in_first:
            return _matvec_in_first(x_MK, w.reshape(K, N))
        return _matvec_in_last(x_MK, w.reshape(N, K))

    def nans(x_MK, w):  # every row holds a NaN: so does each of its outputs (NaN * 0 is NaN)
        return jnp.full((M, N), jnp.nan, jnp.float32)

    # bfloat16 activations widen here, outside the conditional: a bfloat16 operand of the product's
    # fusion halves its speed, however it is converted there
    x_MK = x.reshape(M, K) if not in_first else to_f32(x.reshape(M, K))
    y = unhoisted(fast, nans, jnp.all(jnp.any(jnp.isnan(x_MK), axis=1)), x_MK, w)
    return y.reshape(*lead, *outs)


def take_rows(table_VD, ids):
    """jnp.take(table, ids, axis=0) (the embedding lookup) on the table's bits: an XLA:CPU gather of
    a bfloat16 parameter would convert the whole table to float32 first. As jnp.take, negative ids
    count from the end and ids still out of range give NaN rows."""
    if table_VD.dtype != jnp.bfloat16:
        return jnp.take(table_VD, ids, axis=0)
    V = table_VD.shape[0]
    ids = jnp.where(ids < 0, ids + V, ids)
    valid = (ids >= 0) & (ids < V)

    def gather(table, ids):
        rows = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), jnp.clip(ids, 0, V - 1), axis=0)
        return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)

    def filled(table, ids):
        return jnp.where(valid[..., None], gather(table, ids), jnp.bfloat16(jnp.nan))

    return unhoisted(gather, filled, jnp.any(~valid), table_VD, ids)


def dot(x, w, n_in: int, *, in_first: bool):
    """The product `project` computes, for any number of rows, as one two-dimensional dot with a
    float32 result: XLA:CPU's library dot (YNNPACK) then reads bfloat16 operands as stored, where a
    bfloat16 result, or contracted axes XLA orders differently on the two sides (o: [N, H]), make it
    convert or transpose the weight into a copy first."""
    lead, ins = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    outs = w.shape[n_in:] if in_first else w.shape[:w.ndim - n_in]
    M, K, N = math.prod(lead), math.prod(ins), math.prod(outs)
    w2 = w.reshape(K, N) if in_first else w.reshape(N, K)
    y = jax.lax.dot_general(x.reshape(M, K), w2.astype(x.dtype), (((1,), (0 if in_first else 1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.reshape(*lead, *outs)


def supports(x, w, n_in: int, *, in_first: bool) -> bool:
    """Whether `project` has a formulation for these operands: chunks must divide a leading
    contraction; a trailing one needs bfloat16 operands (the library dot)."""
    K = math.prod(x.shape[x.ndim - n_in:])
    if in_first:
        return K % CHUNK == 0
    return x.dtype == w.dtype == jnp.bfloat16
