"""gpt-oss layers: RMSNorm, YaRN RoPE, attention with sinks, and the MXFP4 mixture of experts.

Shape suffixes name the axes: B batch, T query tokens, S key tokens, D model, N q heads, K kv heads,
G q heads per kv head, H head dim, E experts, F expert ffn, M routed rows, V vocab.
The functions are pure jnp (the XLA path) except `experts_pallas`; which of them run is chosen by
the op objects of `gptoss_jax.ops` (the model's `Runtime`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import mxfp4, mxfp4_gmm
from pallas_kernels.scheduling import zeros_after

from .config import GptOssConfig


class PackedParam(nnx.Variable):
    """MXFP4 expert weights (uint8 blocks / E8M0 scales): frozen, never touched by optimizers."""


# ---------------------------------------------------------------------------------------------
# Functional building blocks
# ---------------------------------------------------------------------------------------------
def rms_norm(x, scale, eps):
    """float32 statistics, as transformers (weight kept in float32), result in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * xf).astype(x.dtype)


def rope_cos_sin(positions_BT, inv_freq, attention_scaling):
    """cos/sin [B, T, H/2] in float32, the YaRN concentration applied to both."""
    freqs = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(freqs) * attention_scaling, jnp.sin(freqs) * attention_scaling


def apply_rope(x_BTNH, cos_BTh, sin_BTh):
    """Half-split (NeoX) rotation: the first half pairs with the second half."""
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def visible_mask(q_pos_BT, k_pos_BS, window, k_valid_BS=None):
    """[B, T, S]: key j visible to query i iff pos_i - W < pos_j <= pos_i (W keys including self)."""
    q = q_pos_BT[:, :, None]
    k = k_pos_BS[:, None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    if k_valid_BS is not None:
        mask &= k_valid_BS[:, None, :]
    return mask


def matmul_dtype(dtype):
    """Output dtype of a matmul of `dtype` operands that we then continue in float32: float32, except
    for float16 operands (the compute dtype of GPUs without bf16 MMA, such as the T4), whose matmuls
    output float16. XLA runs a f16 x f16 -> f32 matmul there as a f32 GEMM on f32 copies of both
    operands (no tensor cores, and a f32 copy of the weight as a temporary: 2.3 GB for the lm_head);
    with f16 outputs the tensor cores still accumulate in f32 and only the result is rounded."""
    return jnp.float16 if jnp.dtype(dtype) == jnp.float16 else jnp.float32


def attention_xla(q_BTNH, k_BSKH, v_BSKH, sinks_N, mask_BTS, *, sm_scale):
    """Softmax attention with one sink logit per query head in the denominator only."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    acc = matmul_dtype(q_BTNH.dtype)
    if acc == jnp.float16:  # scale before the dot: the f16 scores stay far from f16's range limit
        q_BTKGH, sm_scale = q_BTKGH * jnp.asarray(sm_scale, q_BTKGH.dtype), 1.0
    s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                         preferred_element_type=acc).astype(jnp.float32) * sm_scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, -jnp.inf)
    sink_KG = sinks_N.astype(jnp.float32).reshape(K, N // K)[None, :, :, None]  # [1, K, G, 1]
    m = jnp.maximum(jnp.max(s_BKGTS, axis=-1), sink_KG)
    p = jnp.exp(s_BKGTS - m[..., None])
    denom = jnp.sum(p, axis=-1) + jnp.exp(sink_KG - m)
    o_BKGTH = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=acc).astype(jnp.float32) / denom[..., None]
    return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def paged_attention_xla(q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B, sinks_N, *,
                        window, sm_scale):
    """Attention of T new tokens per row over K/V pages, in jnp: each row's pages are gathered in
    block-table order ([B, M * S] keys, position p at page p // S, offset p % S) and masked.

    Row b's query t sits at position q_start_B[b] + t and is valid for t < n_new_B[b] (invalid rows
    give 0); its keys are positions < q_start_B[b] + n_new_B[b] (the pages already hold the new
    tokens), visible when i - window < j <= i. The contract of `pallas_kernels.paged_attention`."""
    B, T = q_BTNH.shape[:2]
    S, K, H = k_pages_PSKH.shape[1:]
    M = block_tables_BM.shape[1]
    k_BSKH = k_pages_PSKH[block_tables_BM].reshape(B, M * S, K, H).astype(q_BTNH.dtype)
    v_BSKH = v_pages_PSKH[block_tables_BM].reshape(B, M * S, K, H).astype(q_BTNH.dtype)
    t_T = jnp.arange(T, dtype=jnp.int32)
    q_pos_BT = q_start_B[:, None] + t_T
    k_pos_BS = jnp.broadcast_to(jnp.arange(M * S, dtype=jnp.int32), (B, M * S))
    mask = visible_mask(q_pos_BT, k_pos_BS, window, k_pos_BS < (q_start_B + n_new_B)[:, None])
    mask &= (t_T[None, :] < n_new_B[:, None])[:, :, None]
    return attention_xla(q_BTNH, k_BSKH, v_BSKH, sinks_N, mask, sm_scale=sm_scale)


def swiglu(gate_up, alpha, limit):
    """Interleaved gate/up (even = gate, odd = up); gate clamped above only, up both sides."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(alpha * gate))


def route(x_MD, w_DE, b_E, top_k):
    """Top-k of the router logits, then softmax over those k (not over all experts)."""
    logits_ME = jnp.dot(x_MD, w_DE.astype(x_MD.dtype)) + b_E.astype(x_MD.dtype)
    vals_Mk, idx_Mk = jax.lax.top_k(logits_ME, top_k)
    return jax.nn.softmax(vals_Mk.astype(jnp.float32), axis=-1).astype(x_MD.dtype), idx_Mk


# Rows per expert tile in the XLA MoE path: large enough to keep the matmuls efficient, small
# enough that padding every expert's group to whole tiles (< one tile per expert) stays cheap.
MOE_TILE_ROWS = 128


def _expert_tiles(e_R, E, tile):
    """Dispatch plan: rows sorted by expert, each expert's group padded to whole tiles.

    e_R [R] expert per row (E = not routed here). Returns (order [R], padded slot of each sorted
    row [R] (NT * tile for rows not routed here), expert of each tile [NT], tiles in use, NT)."""
    R = e_R.shape[0]
    order = jnp.argsort(e_R, stable=True)
    e_sorted = e_R[order]
    sizes = jnp.zeros((E,), jnp.int32).at[e_R].add(1, mode="drop")
    tiles = (sizes + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    group_start = jnp.cumsum(sizes) - sizes
    NT = -(-R // tile) + E  # static bound on the tiles in use
    e_c = jnp.minimum(e_sorted, E - 1)
    rank = jnp.arange(R, dtype=jnp.int32) - group_start[e_c]
    slot = jnp.where(e_sorted < E, (tile_end[e_c] - tiles[e_c]) * tile + rank, NT * tile)
    tile_expert = jnp.searchsorted(tile_end, jnp.arange(NT, dtype=jnp.int32), side="right")
    return order, slot, jnp.minimum(tile_expert, E - 1), tile_end[-1], NT


def dequantized_tile(x_tD, e, p, cfg: GptOssConfig):
    """One expert's FFN on a tile of rows: expert e's weights dequantized, then both projections:
    float32 [t, D] (before the routing weight)."""
    dtype = x_tD.dtype
    acc = matmul_dtype(dtype)
    w1 = mxfp4.dequantize(p["w1_blocks"][e], p["w1_scales"][e], dtype)  # [2F, D]
    h = jnp.einsum("tD,ND->tN", x_tD, w1, preferred_element_type=acc).astype(jnp.float32)
    h = swiglu(h + p["b1"][e].astype(jnp.float32), cfg.swiglu_alpha, cfg.swiglu_limit).astype(dtype)
    w2 = mxfp4.dequantize(p["w2_blocks"][e], p["w2_scales"][e], dtype)  # [D, F]
    y = jnp.einsum("tF,DF->tD", h, w2, preferred_element_type=acc).astype(jnp.float32)
    return y + p["b2"][e].astype(jnp.float32)


def _experts_tiled(x_MD, e_R, k, p, cfg: GptOssConfig, tile_fn=dequantized_tile, tile=MOE_TILE_ROWS):
    """Per-row expert outputs [R, D] (float32, before routing weights) by a scan over expert tiles of
    `tile` rows: each step runs `tile_fn` (one expert on its tile). Work and memory follow the
    routed rows, never all experts densely, and the scan is differentiable."""
    dtype = x_MD.dtype
    D = x_MD.shape[1]
    E = p["w1_blocks"].shape[0]
    order, slot, tile_expert, n_tiles, NT = _expert_tiles(e_R, E, tile)
    x0, y0 = zeros_after(x_MD, ((NT * tile, D), dtype), ((NT * tile, D), jnp.float32))
    x_pad = x0.at[slot].set(x_MD[order // k], mode="drop")

    def run_tile(t):
        return tile_fn(jax.lax.dynamic_slice_in_dim(x_pad, t * tile, tile), tile_expert[t], p, cfg)

    def step(y, t):
        y_t = jax.lax.cond(t < n_tiles, run_tile, lambda t: jnp.zeros((tile, D), jnp.float32), t)
        return jax.lax.dynamic_update_slice_in_dim(y, y_t, t * tile, 0), None

    y_pad, _ = jax.lax.scan(step, y0, jnp.arange(NT, dtype=jnp.int32))
    y_sorted = y_pad.at[slot].get(mode="fill", fill_value=0.0)
    (out0,) = zeros_after(y_sorted, (y_sorted.shape, y_sorted.dtype))
    return out0.at[order].set(y_sorted)


def gathered_rows(x_RD, e_R, p, cfg: GptOssConfig):
    """Row r through expert e_R[r], before the routing weight: float32 [R, D]. The routed experts'
    blocks are gathered and dequantized per row."""
    dtype = x_RD.dtype
    w1 = mxfp4.dequantize(p["w1_blocks"][e_R], p["w1_scales"][e_R], dtype)  # [R, 2F, D]
    w2 = mxfp4.dequantize(p["w2_blocks"][e_R], p["w2_scales"][e_R], dtype)  # [R, D, F]
    acc = matmul_dtype(dtype)
    h = jnp.einsum("RD,RND->RN", x_RD, w1, preferred_element_type=acc).astype(jnp.float32)
    h = swiglu(h + p["b1"][e_R].astype(jnp.float32), cfg.swiglu_alpha, cfg.swiglu_limit).astype(dtype)
    y_RD = jnp.einsum("RF,RDF->RD", h, w2, preferred_element_type=acc).astype(jnp.float32)
    return y_RD + p["b2"][e_R].astype(jnp.float32)


def experts_xla(x_MD, weights_Mk, idx_Mk, p, cfg: GptOssConfig, expert_offset=None, rows_fn=gathered_rows,
                tile_fn=dequantized_tile, tile_rows=MOE_TILE_ROWS):
    """Dropless MoE on the XLA path: the M*k (token, expert) rows go through their experts, whose
    MXFP4 weights are dequantized inside the jit one expert at a time, then are summed back per
    token with the routing weights.

    Fewer rows than experts (decode): `rows_fn(x_RD, e_R, p, cfg)` evaluates each row's expert.
    Otherwise rows are sorted into per-expert tiles and a scan runs `tile_fn(x_tD, e, p, cfg)` on one
    tile of `tile_rows` rows per step. (The XLA:CPU formulations of `cpu_kernels` replace both on a
    CPU backend.)

    Expert parallelism: `p` may hold a slice of E_local consecutive experts starting at global id
    `expert_offset` (a traced scalar is fine); rows routed elsewhere then contribute exactly zero, so
    summing the results over all slices gives the full layer.
    """
    dtype = x_MD.dtype
    M, D = x_MD.shape
    k = idx_Mk.shape[1]
    E = p["w1_blocks"].shape[0]  # experts held here (all of them unless sliced)
    e_R = idx_Mk.reshape(-1)  # R = M * k routed rows, token-major
    local_R = None
    if expert_offset is not None or E != cfg.num_local_experts:
        e_R = e_R - (0 if expert_offset is None else expert_offset)
        local_R = (e_R >= 0) & (e_R < E)
        e_R = jnp.where(local_R, e_R, E)  # E: a group past the last one, sorted to the end
    if M * k < E:
        e_R = jnp.minimum(e_R, E - 1)  # rows of other slices compute on any local expert, masked below
        y_RD = rows_fn(jnp.repeat(x_MD, k, axis=0), e_R, p, cfg)
    else:
        y_RD = _experts_tiled(x_MD, e_R, k, p, cfg, tile_fn, tile_rows)
    if local_R is not None:
        y_RD = jnp.where(local_R[:, None], y_RD, 0.0)  # where, not *: rows past the groups are undefined
    y_MkD = y_RD.reshape(M, k, D) * weights_Mk.astype(jnp.float32)[..., None]
    return jnp.sum(y_MkD, axis=1).astype(dtype)


def experts_pallas(x_MD, weights_Mk, idx_Mk, p, cfg: GptOssConfig, expert_offset=None, *,
                   normal_scales: bool = False, impl="auto"):
    """Dropless MoE through the Pallas MXFP4 grouped matmul (pallas_kernels.mxfp4_gmm): rows sorted
    by expert, gate/up with the fused bias + clamped SwiGLU, down with the fused bias + routing
    weight, then summed back per token. `p` holds the kernel layout (`MoE.to_kernel_layout`).

    Expert parallelism as in `experts_xla`: rows routed outside the local slice sort past the last
    group, where the kernel writes exact zeros."""
    dtype = x_MD.dtype
    M, D = x_MD.shape
    k = idx_Mk.shape[1]
    E, F = p["w1_q"].shape[0], cfg.intermediate_size
    w1 = mxfp4_gmm.MXFP4GmmWeights(p["w1_q"], p["w1_s"], k=D, n=F, normal_scales=normal_scales)
    w2 = mxfp4_gmm.MXFP4GmmWeights(p["w2_q"], p["w2_s"], k=F, n=D, normal_scales=normal_scales)
    e_R = idx_Mk.reshape(-1)
    if expert_offset is not None or E != cfg.num_local_experts:
        e_R = e_R - (0 if expert_offset is None else expert_offset)
        e_R = jnp.where((e_R >= 0) & (e_R < E), e_R, E)
    order = jnp.argsort(e_R, stable=True)
    sizes = jnp.zeros((E,), jnp.int32).at[e_R].add(1, mode="drop")
    token = order // k
    h = mxfp4_gmm.gmm(x_MD[token], w1, sizes, bias=p["b1"], epilogue="swiglu", swiglu_alpha=cfg.swiglu_alpha,
                      swiglu_limit=cfg.swiglu_limit, impl=impl)
    y = mxfp4_gmm.gmm(h, w2, sizes, bias=p["b2"], row_weights=weights_Mk.reshape(-1)[order],
                      out_dtype=jnp.float32, impl=impl)
    return jnp.zeros((M, D), jnp.float32).at[token].add(y).astype(dtype)


CHECKPOINT_EXPERT_WEIGHTS = ("w1_blocks", "w1_scales", "w2_blocks", "w2_scales")
KERNEL_EXPERT_WEIGHTS = ("w1_q", "w1_s", "w2_q", "w2_s")


# ---------------------------------------------------------------------------------------------
# NNX modules
# ---------------------------------------------------------------------------------------------
def lora_delta(module, name, x):
    """LoRA term (x A) B * scale of projection `name` (gptoss_jax.lora); 0 when it has no adapter.

    A [*in, r] contracts the projection's input axes, B [r, *out] gives its output axes."""
    a = getattr(module, f"lora_{name}_a", None)
    if a is None:
        return 0
    dt = x.dtype
    a = a[...].astype(dt)
    h = jnp.tensordot(x, a, axes=a.ndim - 1)
    b = getattr(module, f"lora_{name}_b")[...].astype(dt)
    return jnp.tensordot(h, b, axes=1) * jnp.asarray(module.lora_scale, dt)


def lora_weight(module, name, w):
    """W + scale * A B (float32) for a small projection adapted by LoRA (the router)."""
    a, b = getattr(module, f"lora_{name}_a")[...], getattr(module, f"lora_{name}_b")[...]
    return (w.astype(jnp.float32) + module.lora_scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32),
                                                                   axes=1)).astype(w.dtype)


def einsum_dense(eq, x, w, *, n_in: int = 1, in_first: bool = True, preferred_element_type=None):
    """A dense projection `eq` (x's `n_in` trailing axes contracted with w's leading axes if
    `in_first`, else its trailing ones) in x's dtype: the default of `ops.XlaDense`."""
    return jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=preferred_element_type)


def _normal(rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.window(layer)
        self.sm_scale = H ** -0.5
        self.norm = nnx.Param(jnp.ones((D,), param_dtype))
        self.wq_DNH = nnx.Param(_normal(rngs, (D, N, H), param_dtype))
        self.wk_DKH = nnx.Param(_normal(rngs, (D, K, H), param_dtype))
        self.wv_DKH = nnx.Param(_normal(rngs, (D, K, H), param_dtype))
        self.wo_NHD = nnx.Param(_normal(rngs, (N, H, D), param_dtype))
        self.bq_NH = nnx.Param(jnp.zeros((N, H), param_dtype))
        self.bk_KH = nnx.Param(jnp.zeros((K, H), param_dtype))
        self.bv_KH = nnx.Param(jnp.zeros((K, H), param_dtype))
        self.bo_D = nnx.Param(jnp.zeros((D,), param_dtype))
        self.sinks_N = nnx.Param(_normal(rngs, (N,), param_dtype))

    def qkv(self, x_BTD, cos, sin, dense=einsum_dense):
        """`dense`: the runtime's dense-projection op (`Runtime.dense`)."""
        dt = x_BTD.dtype
        q = dense("BTD,DNH->BTNH", x_BTD, self.wq_DNH[...]) + self.bq_NH[...].astype(dt)
        k = dense("BTD,DKH->BTKH", x_BTD, self.wk_DKH[...]) + self.bk_KH[...].astype(dt)
        v = dense("BTD,DKH->BTKH", x_BTD, self.wv_DKH[...]) + self.bv_KH[...].astype(dt)
        q, k, v = (q + lora_delta(self, "q", x_BTD), k + lora_delta(self, "k", x_BTD),
                   v + lora_delta(self, "v", x_BTD))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o_BTNH, dense=einsum_dense):
        dt = o_BTNH.dtype
        return (dense("BTNH,NHD->BTD", o_BTNH, self.wo_NHD[...], n_in=2) + self.bo_D[...].astype(dt)
                + lora_delta(self, "o", o_BTNH))


class MoE(nnx.Module):
    def __init__(self, cfg: GptOssConfig, *, param_dtype, rngs: nnx.Rngs):
        D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        self.cfg = cfg
        self.norm = nnx.Param(jnp.ones((D,), param_dtype))
        self.wr_DE = nnx.Param(_normal(rngs, (D, E), param_dtype))
        self.br_E = nnx.Param(jnp.zeros((E,), param_dtype))
        g_d, g_f = D // mxfp4.BLOCK, F // mxfp4.BLOCK
        nb = mxfp4.BYTES_PER_BLOCK
        key = rngs.params()
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # Random init: uniform codes with scales around 2**-5 (|w| ~ 0.05).
        self.w1_blocks = PackedParam(jax.random.randint(k1, (E, 2 * F, g_d, nb), 0, 256).astype(jnp.uint8))
        self.w1_scales = PackedParam(jax.random.randint(k2, (E, 2 * F, g_d), 120, 124).astype(jnp.uint8))
        self.w2_blocks = PackedParam(jax.random.randint(k3, (E, D, g_f, nb), 0, 256).astype(jnp.uint8))
        self.w2_scales = PackedParam(jax.random.randint(k4, (E, D, g_f), 120, 124).astype(jnp.uint8))
        self.b1 = nnx.Param(jnp.zeros((E, 2 * F), param_dtype))
        self.b2 = nnx.Param(jnp.zeros((E, D), param_dtype))

    kernel_layout = False  # True after to_kernel_layout (class default: the checkpoint layout)
    normal_scales = False

    def expert_params(self):
        names = KERNEL_EXPERT_WEIGHTS if self.kernel_layout else CHECKPOINT_EXPERT_WEIGHTS
        return {name: getattr(self, name)[...] for name in names + ("b1", "b2")}

    def to_kernel_layout(self, shardings=None, assume_normal_scales: bool | None = None):
        """One-time re-layout of the packed experts for the Pallas kernel, in place: the same bytes
        as int32 words with gate/up de-interleaved and K padded to 128 (pallas_kernels/mxfp4_gmm/
        layout.py). The checkpoint-layout arrays are dropped, so memory does not double.
        `shardings`: name -> Sharding for the new arrays (expert-parallel placement).
        `assume_normal_scales`: None checks the scales (all in [2, 252], as in every released
        checkpoint, enables the kernel's short decoder); True / False force it (abstract models)."""
        if self.kernel_layout:
            return
        lo, hi = mxfp4_gmm.layout.FAST_SCALE_MIN, mxfp4_gmm.layout.FAST_SCALE_MAX
        normal = assume_normal_scales
        if normal is None:
            normal = bool(all(jnp.all((s >= lo) & (s <= hi)) for s in (self.w1_scales[...], self.w2_scales[...])))
        for w, glu in (("w1", True), ("w2", False)):
            def prep(b, s, glu=glu):
                pw = mxfp4_gmm.prepare(b, s, interleaved_glu=glu, assume_normal_scales=normal)
                return pw.wq, pw.ws
            out_sh = None if shardings is None else (shardings[f"{w}_q"], shardings[f"{w}_s"])
            wq, ws = jax.jit(prep, out_shardings=out_sh)(getattr(self, f"{w}_blocks")[...],
                                                         getattr(self, f"{w}_scales")[...])
            delattr(self, f"{w}_blocks")
            delattr(self, f"{w}_scales")
            setattr(self, f"{w}_q", PackedParam(wq))
            setattr(self, f"{w}_s", PackedParam(ws))
        self.kernel_layout, self.normal_scales = True, normal

    def checkpoint_expert_weights(self) -> dict:
        """The four MXFP4 tensors in checkpoint layout (blocks / scales), whichever layout is held."""
        if not self.kernel_layout:
            return {n: getattr(self, n)[...] for n in CHECKPOINT_EXPERT_WEIGHTS}
        cfg, out = self.cfg, {}
        for w, k, n in (("w1", cfg.hidden_size, cfg.intermediate_size), ("w2", cfg.intermediate_size, cfg.hidden_size)):
            pw = mxfp4_gmm.MXFP4GmmWeights(getattr(self, f"{w}_q")[...], getattr(self, f"{w}_s")[...], k=k, n=n)
            out[f"{w}_blocks"], out[f"{w}_scales"] = jax.jit(mxfp4_gmm.unprepare)(pw)
        return out

    def __call__(self, x_BTD, op):
        """Route, then run the experts with `op` (an MoE op of gptoss_jax.ops, reading the expert
        layout it states)."""
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(B * T, D)
        wr_DE = self.wr_DE[...]
        if getattr(self, "lora_router_a", None) is not None:
            wr_DE = lora_weight(self, "router", wr_DE)
        weights_Mk, idx_Mk = route(x_MD, wr_DE, self.br_E[...], self.cfg.num_experts_per_tok)
        if op.kernel_layout != self.kernel_layout:
            raise ValueError("the Pallas MoE needs the experts in kernel layout: load with load_model(..., "
                             "kernels='pallas')" if op.kernel_layout else
                             "this model holds its experts in the Pallas kernel layout; use kernels='pallas'")
        y_MD = op(x_MD, weights_Mk, idx_Mk, self.expert_params(), self.cfg, normal_scales=self.normal_scales)
        return y_MD.reshape(B, T, D)
