"""The gpt-oss transformer as a Flax NNX module."""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import GenerationDefaults, GptOssConfig
from .layers import KERNELS, MoE, Attention, attention_xla, rms_norm, rope_cos_sin, visible_mask

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "bf16": jnp.bfloat16, "fp32": jnp.float32}


def canonical_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"compute dtype must be bfloat16 or float32, got {dtype}")
    return dtype


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value cache, [B, S_l, K, H] each, holding rotated keys.

    Full-attention layers keep S_l = max_len slots; sliding layers a ring of S_l = min(window, max_len)
    slots, so their memory does not grow with the context. Position p lives in slot p % S_l (for a
    full layer simply p). `lengths[b]` counts the positions of row b already written.
    """

    k: tuple
    v: tuple
    lengths: jax.Array  # [B] int32

    @classmethod
    def init(cls, cfg: GptOssConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "KVCache":
        shapes = [(batch, max_len if cfg.window(i) is None else min(cfg.window(i), max_len),
                   cfg.num_key_value_heads, cfg.head_dim) for i in range(cfg.num_hidden_layers)]
        return cls(k=tuple(jnp.zeros(s, dtype) for s in shapes), v=tuple(jnp.zeros(s, dtype) for s in shapes),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return max(k.shape[1] for k in self.k)

    def slot_positions(self, layer: int):
        """[B, S]: the position held by each slot (the latest p < length with p % S == slot), -1 if none."""
        S = self.k[layer].shape[1]
        s = jnp.arange(S, dtype=jnp.int32)[None, :]
        last = self.lengths[:, None] - 1
        pos = s + S * jnp.floor_divide(last - s, S)
        return jnp.where(last >= s, pos, -1)

    def write(self, cache_BSKH, new_BTKH, n_new_B):
        """Scatter the valid new rows to slots (length + t) % S; only the last S of a chunk survive."""
        B, S = cache_BSKH.shape[:2]
        T = new_BTKH.shape[1]
        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        keep = (t < n_new_B[:, None]) & (t >= n_new_B[:, None] - S)
        slot = jnp.where(keep, (self.lengths[:, None] + t) % S, S)  # S is out of bounds: dropped
        b = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        return cache_BSKH.at[b, slot].set(new_BTKH.astype(cache_BSKH.dtype), mode="drop")


class Block(nnx.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        self.attn = Attention(cfg, layer, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MoE(cfg, param_dtype=param_dtype, rngs=rngs)


class GptOss(nnx.Module):
    """gpt-oss causal LM. `model(input_ids [B, T] int32)` -> float32 logits [B, T, V].

    Parameters keep the checkpoint dtypes (bf16, MXFP4-packed experts); `dtype` is the compute dtype.
    """

    def __init__(self, cfg: GptOssConfig, *, dtype="bfloat16", param_dtype=jnp.bfloat16,
                 kernels: str = "xla", rngs: nnx.Rngs | None = None):
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = canonical_dtype(dtype)
        self.kernels = kernels
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed_VD = nnx.Param((0.02 * jax.random.normal(rngs.params(), (V, D))).astype(param_dtype))
        self.blocks = nnx.List([Block(cfg, i, param_dtype=param_dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = nnx.Param(jnp.ones((D,), param_dtype))
        self.lm_head_VD = nnx.Param((0.02 * jax.random.normal(rngs.params(), (V, D))).astype(param_dtype))
        inv_freq, scaling = cfg.rope_tables()
        self._inv_freq = tuple(float(f) for f in inv_freq)  # static: part of the graph, not a parameter
        self._rope_scaling = scaling
        eos = cfg.eos_token_id
        self.generation_defaults = GenerationDefaults(
            stop_tokens=tuple(eos) if isinstance(eos, tuple) else (() if eos is None else (eos,)))

    # ---- forward ---------------------------------------------------------------------------
    def rope(self, positions_BT):
        return rope_cos_sin(positions_BT, np.asarray(self._inv_freq, np.float32), self._rope_scaling)

    def embed(self, input_ids_BT):
        return jnp.take(self.embed_VD[...], input_ids_BT, axis=0).astype(self.dtype)

    def unembed(self, x_BTD):
        x = rms_norm(x_BTD, self.norm[...], self.config.rms_norm_eps)
        return jnp.einsum("BTD,VD->BTV", x, self.lm_head_VD[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)

    def _trunk(self, input_ids_BT, positions_BT, attend):
        """Embedding and blocks; `attend(layer, q, k, v)` supplies the attention of each layer."""
        cos, sin = self.rope(positions_BT)
        eps = self.config.rms_norm_eps
        x = self.embed(input_ids_BT)
        for i, block in enumerate(self.blocks):
            a = block.attn
            q, k, v = a.qkv(rms_norm(x, a.norm[...], eps), cos, sin)
            x = x + a.out(attend(i, q, k, v))
            x = x + block.mlp(rms_norm(x, block.mlp.norm[...], eps), self.kernels)
        return x

    def forward(self, input_ids_BT, positions_BT=None):
        """Full causal forward over the given tokens, no cache."""
        B, T = input_ids_BT.shape
        default_positions = positions_BT is None  # the kernel takes positions 0..T-1 (any others: XLA)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

        def attend(i, q, k, v):
            a = self.blocks[i].attn
            if self.kernels == "pallas" and default_positions:
                return self._pallas_attention("attention", q, k, v, a.sinks_N[...], window=a.window,
                                              sm_scale=a.sm_scale)
            mask = visible_mask(positions_BT, positions_BT, a.window)
            return attention_xla(q, k, v, a.sinks_N[...], mask, sm_scale=a.sm_scale)

        return self.unembed(self._trunk(input_ids_BT, positions_BT, attend))

    def forward_cached(self, input_ids_BT, cache: "KVCache", n_new_B, *, cache_empty: bool = False,
                       logits_at_B=None):
        """T new tokens per row after the cached ones (row b has n_new_B[b] valid tokens, right-padded).

        Attends over cache + chunk, then writes the chunk into the cache. Returns (logits, cache):
        logits [B, T, V], or [B, V] at the row offsets `logits_at_B` (only those rows go through the
        vocabulary projection). `cache_empty` (static) skips reading a cache known to be empty.
        """
        B, T = input_ids_BT.shape
        t_T = jnp.arange(T, dtype=jnp.int32)
        positions_BT = cache.lengths[:, None] + t_T
        new_valid_BT = t_T[None, :] < n_new_B[:, None]
        new_k, new_v = [], []

        def attend(i, q, k, v):
            a = self.blocks[i].attn
            ck, cv = cache.k[i], cache.v[i]
            new_k.append(cache.write(ck, k, n_new_B))
            new_v.append(cache.write(cv, v, n_new_B))
            if self.kernels == "pallas":  # cache contract: pallas_kernels/banded_attention/README.md
                if cache_empty:
                    return self._pallas_attention("prefill_attention", q, k, v, a.sinks_N[...], n_new_B,
                                                  window=a.window, sm_scale=a.sm_scale)
                return self._pallas_attention("decode_attention", q, k.astype(ck.dtype), v.astype(cv.dtype),
                                              ck, cv, a.sinks_N[...], cache.lengths, window=a.window,
                                              sm_scale=a.sm_scale)
            if cache_empty:
                keys, vals, k_pos, k_valid = k, v, positions_BT, new_valid_BT
            else:
                slot_pos = cache.slot_positions(i)
                keys = jnp.concatenate([ck, k.astype(ck.dtype)], axis=1).astype(q.dtype)
                vals = jnp.concatenate([cv, v.astype(cv.dtype)], axis=1).astype(q.dtype)
                k_pos = jnp.concatenate([slot_pos, positions_BT], axis=1)
                k_valid = jnp.concatenate([slot_pos >= 0, new_valid_BT], axis=1)
            mask = visible_mask(positions_BT, k_pos, a.window, k_valid)
            return attention_xla(q, keys, vals, a.sinks_N[...], mask, sm_scale=a.sm_scale)

        x = self._trunk(input_ids_BT, positions_BT, attend)
        if logits_at_B is not None:
            x = jnp.take_along_axis(x, logits_at_B[:, None, None].astype(jnp.int32), axis=1)
            logits = self.unembed(x)[:, 0]
        else:
            logits = self.unembed(x)
        cache = cache.replace(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths + n_new_B)
        if getattr(self, "mesh", None) is not None:  # sharded: B over data, K over model (sharding.py)
            from .sharding import constrain_cache
            cache = constrain_cache(cache, self.mesh, self.sharding_rules)
        return logits, cache

    def _pallas_attention(self, fn: str, *args, **kw):
        """pallas_kernels.banded_attention.`fn`; on a mesh inside shard_map (heads over `model`,
        rows over `data`), since a Pallas call cannot be partitioned automatically."""
        from pallas_kernels import banded_attention

        if fn == "prefill_attention":  # empty cache: the chunk alone, n valid keys per row
            f = lambda q, k, v, sinks, n: banded_attention.attention(q, k, v, sinks, kv_len=n, **kw)  # noqa: E731
        else:
            f = functools.partial(getattr(banded_attention, fn), **kw)
        if getattr(self, "mesh", None) is None:
            return f(*args)
        from .sharding import attention_sharded
        return attention_sharded(f, args, self.mesh, self.sharding_rules)

    def to_kernel_layout(self, assume_normal_scales: bool | None = None):
        """Re-lay the MXFP4 experts of every layer for the Pallas kernel (see MoE.to_kernel_layout),
        keeping the expert-parallel placement on a mesh."""
        from .layers import KERNEL_EXPERT_WEIGHTS

        mesh = getattr(self, "mesh", None)
        for block in self.blocks:
            shardings = None
            if mesh is not None:
                from .sharding import expert_sharding
                shardings = {n: expert_sharding(mesh, self.sharding_rules, self.config.num_local_experts)
                             for n in KERNEL_EXPERT_WEIGHTS}
            block.mlp.to_kernel_layout(shardings, assume_normal_scales)
        return self

    def __call__(self, input_ids_BT, positions_BT=None):
        if isinstance(input_ids_BT, jax.core.Tracer):
            return self.forward(input_ids_BT, positions_BT)
        ids = check_token_ids(input_ids_BT, self.config.vocab_size)
        if getattr(self, "mesh", None) is not None:  # the same host ids on every process -> global array
            from .sharding import shard_batch
            ids = shard_batch(np.asarray(ids), self.mesh, self.sharding_rules)
        graphdef, state = nnx.split(self)
        return _jitted_forward(graphdef)(state, ids, positions_BT)


@functools.lru_cache(maxsize=8)
def _jitted_forward(graphdef):
    @jax.jit
    def f(state, ids, positions):
        return nnx.merge(graphdef, state).forward(ids, positions)
    return f


def check_token_ids(input_ids, vocab_size: int) -> jax.Array:
    """Host-side validation: int [B, T], 0 <= id < vocab."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [batch, tokens], got {ids.shape}")
    if ids.size == 0:
        raise ValueError("input_ids is empty")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ValueError(f"token id {int(ids[b, t])} at [{b}, {t}] is out of range [0, {vocab_size})")
    return jnp.asarray(ids, jnp.int32)


def abstract_model(cfg: GptOssConfig, *, dtype="bfloat16", kernels="xla", kernel_layout: bool = False) -> GptOss:
    """The model with ShapeDtypeStruct leaves: shapes and bytes without allocating anything.
    `kernel_layout`: the experts as `load_model(..., kernels="pallas")` holds them (deviceless plans)."""
    def build():
        m = GptOss(cfg, dtype=dtype, kernels=kernels, rngs=nnx.Rngs(0))
        return m.to_kernel_layout(assume_normal_scales=True) if kernel_layout else m
    return nnx.eval_shape(build)


def count_params(model: GptOss) -> tuple[int, int]:
    """(parameters, bytes); packed MXFP4 counts 2 weights per byte and its scales as bytes only."""
    from .layers import PackedParam

    n_params = n_bytes = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        leaf = var.get_value() if hasattr(var, "get_value") else var.value
        size = int(np.prod(leaf.shape))
        n_bytes += size * jnp.dtype(leaf.dtype).itemsize
        if isinstance(var, PackedParam) or (hasattr(var, "type") and var.type is PackedParam):
            n_params += 2 * size if str(path[-1]).endswith("blocks") else 0
        else:
            n_params += size
    return n_params, n_bytes
