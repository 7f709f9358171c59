"""The gpt-oss transformer as a Flax NNX module."""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import GenerationDefaults, GptOssConfig
from . import sharding as shd
from .layers import KERNEL_EXPERT_WEIGHTS, Attention, MoE, PackedParam, matmul_dtype, rms_norm, rope_cos_sin
from .ops import CachedBatch
from .runtime import Runtime

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16, "bf16": jnp.bfloat16,
          "fp32": jnp.float32, "fp16": jnp.float16}


def canonical_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)):
        raise ValueError(f"compute dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


def ring_positions(lengths_B, S: int):
    """[B, S]: the position a ring of S slots holds in each slot after `lengths_B` positions (the
    latest p < length with p % S == slot), -1 if none. A contiguous row is the ring with S = max_len."""
    s = jnp.arange(S, dtype=jnp.int32)[None, :]
    last = lengths_B[:, None] - 1
    pos = s + S * jnp.floor_divide(last - s, S)
    return jnp.where(last >= s, pos, -1)


def ring_write(cache_BSKH, new_BTKH, lengths_B, n_new_B):
    """Scatter the valid new rows to slots (length + t) % S; only the last S of a chunk survive."""
    B, S = cache_BSKH.shape[:2]
    T = new_BTKH.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    keep = (t < n_new_B[:, None]) & (t >= n_new_B[:, None] - S)
    slot = jnp.where(keep, (lengths_B[:, None] + t) % S, S)  # S is out of bounds: dropped
    b = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    return cache_BSKH.at[b, slot].set(new_BTKH.astype(cache_BSKH.dtype), mode="drop")


def replace_at(items: tuple, i: int, value) -> tuple:
    return items[:i] + (value,) + items[i + 1:]


def param_dtype_for(dtype) -> jnp.dtype:
    """The dtype the dense parameters are held in: the checkpoint's bfloat16, except under float16
    compute, which holds them in float16 (converted once at load; a GPU without bf16 arithmetic
    would otherwise convert every weight at every use, into a temporary as large as the weight)."""
    return jnp.dtype(jnp.float16) if canonical_dtype(dtype) == jnp.float16 else jnp.dtype(jnp.bfloat16)


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value cache, [B, S_l, K, H] each, holding rotated keys.

    Full-attention layers keep S_l = max_len slots; sliding layers a ring of S_l = min(window, max_len)
    slots, so their memory does not grow with the context. Position p lives in slot p % S_l (for a
    full layer simply p). `lengths[b]` counts the positions of row b already written.

    A cache is what `GptOss.forward_cached` reads and writes through `attend` (one layer: attention
    of the new tokens over cache + chunk, then the chunk written) and `partition_specs`; the
    engine's paged cache (`gptoss_jax.kv.PagedKVCache`) implements the same two.
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
        return ring_positions(self.lengths, self.k[layer].shape[1])

    def write(self, cache_BSKH, new_BTKH, n_new_B):
        """Scatter the valid new rows to slots (length + t) % S; only the last S of a chunk survive."""
        return ring_write(cache_BSKH, new_BTKH, self.lengths, n_new_B)

    def attend(self, layer: int, runtime, q, k, v, sinks, batch: CachedBatch, *, window, sm_scale,
               cache_empty: bool):
        """(attention output, the cache with the chunk written into `layer`): the new tokens attend
        over the cached positions and the chunk (`cache_empty`: the chunk only)."""
        op = runtime.attention
        ck, cv = self.k[layer], self.v[layer]
        new = self.replace(k=replace_at(self.k, layer, self.write(ck, k, batch.n_new_B)),
                           v=replace_at(self.v, layer, self.write(cv, v, batch.n_new_B)))
        kw = dict(window=window, sm_scale=sm_scale)
        if cache_empty:
            return op.prefill(q, k, v, sinks, batch, **kw), new
        return op.decode(q, k, v, ck, cv, sinks, batch, self.slot_positions(layer), **kw), new

    def partition_specs(self, mesh, rules):
        """The cache with a PartitionSpec per array: rows over data, kv heads over model."""
        return shd.cache_specs(self, mesh, rules)


class Block(nnx.Module):
    def __init__(self, cfg: GptOssConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        self.attn = Attention(cfg, layer, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MoE(cfg, param_dtype=param_dtype, rngs=rngs)


class GptOss(nnx.Module):
    """gpt-oss causal LM. `model(input_ids [B, T] int32)` -> float32 logits [B, T, V].

    Parameters keep the checkpoint dtypes (bf16, MXFP4-packed experts); `dtype` is the compute dtype.
    float16 compute (GPUs without bf16 MMA, e.g. T4) keeps the residual stream in float32: each
    sublayer reads its RMS-normalised input in float16 (bounded) and adds its output to the float32
    sum, so the stream never meets float16's 65504 limit. `runtime` (gptoss_jax.runtime.Runtime) fixes the mesh, the sharding rules and the attention /
    MoE ops; default: one device, XLA ops.
    """

    def __init__(self, cfg: GptOssConfig, *, runtime: Runtime | None = None, dtype="bfloat16",
                 param_dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.runtime = Runtime.create() if runtime is None else runtime
        shd.expert_axis_size(self.runtime.mesh, self.runtime.rules, cfg.num_local_experts)
        self.dtype = canonical_dtype(dtype)
        self.residual_dtype = jnp.dtype(jnp.float32) if self.dtype == jnp.float16 else self.dtype
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

    @property
    def kernels(self) -> str:
        return self.runtime.kernels

    # ---- forward ---------------------------------------------------------------------------
    def rope(self, positions_BT):
        return rope_cos_sin(positions_BT, np.asarray(self._inv_freq, np.float32), self._rope_scaling)

    def embed(self, input_ids_BT):
        return self.runtime.dense.take(self.embed_VD[...], input_ids_BT).astype(self.residual_dtype)

    def normed(self, x_BTD, scale):
        """RMSNorm of the residual stream, in the compute dtype."""
        return rms_norm(x_BTD, scale, self.config.rms_norm_eps).astype(self.dtype)

    def unembed(self, x_BTD):
        x = self.normed(x_BTD, self.norm[...])
        return self.runtime.dense("BTD,VD->BTV", x, self.lm_head_VD[...], in_first=False,
                                  preferred_element_type=matmul_dtype(x.dtype)).astype(jnp.float32)

    def _block(self, i, block, x, cos, sin, attend):
        a = block.attn
        with jax.named_scope(f"block_{i}/attention"):
            q, k, v = a.qkv(self.normed(x, a.norm[...]), cos, sin, self.runtime.dense)
            x = x + a.out(attend(i, a, q, k, v), self.runtime.dense)
        with jax.named_scope(f"block_{i}/moe"):
            x = x + block.mlp(self.normed(x, block.mlp.norm[...]), self.runtime.moe)
        return x

    def _trunk(self, input_ids_BT, positions_BT, attend, remat: bool = False):
        """Embedding and blocks; `attend(layer, attention module, q, k, v)` supplies the attention of
        each layer. `remat`: each block under `nnx.remat` (its activations recomputed in the backward
        pass; only the block inputs are kept), for training."""
        with jax.named_scope("embed"):
            cos, sin = self.rope(positions_BT)
            x = self.embed(input_ids_BT)
        for i, block in enumerate(self.blocks):
            step = functools.partial(GptOss._block, self, i)  # reads only static attributes of self
            x = (nnx.remat(step, static_argnums=(4,)) if remat else step)(block, x, cos, sin, attend)
        return x

    def forward(self, input_ids_BT, positions_BT=None, *, remat: bool = False):
        """Full causal forward over the given tokens, no cache (positions default to 0..T-1).
        `remat` (training): recompute each block's activations in the backward pass."""
        B, T = input_ids_BT.shape
        out_spec = self.runtime.logits_spec((B, T, self.config.vocab_size))
        body = functools.partial(GptOss._forward, remat=remat)
        return self.within_runtime(body, out_spec, input_ids_BT, positions_BT)

    def _forward(self, input_ids_BT, positions_BT, *, remat: bool = False):
        B, T = input_ids_BT.shape
        op = self.runtime.attention
        given = positions_BT  # None: 0..T-1, which the kernels take without a mask
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

        def attend(i, a, q, k, v):
            return op.forward(q, k, v, a.sinks_N[...], given, window=a.window, sm_scale=a.sm_scale)

        x = self._trunk(input_ids_BT, positions_BT, attend, remat)
        with jax.named_scope("unembed"):
            return self.unembed(x)

    def forward_cached(self, input_ids_BT, cache: "KVCache", n_new_B, *, cache_empty: bool = False,
                       logits_at_B=None):
        """T new tokens per row after the cached ones (row b has n_new_B[b] valid tokens, right-padded).

        Attends over cache + chunk, then writes the chunk into the cache. Returns (logits, cache):
        logits [B, T, V], or [B, V] at the row offsets `logits_at_B` (only those rows go through the
        vocabulary projection). `cache_empty` (static) skips reading a cache known to be empty.
        """
        B, T = input_ids_BT.shape
        V = self.config.vocab_size
        logits_shape = (B, V) if logits_at_B is not None else (B, T, V)
        out_specs = (self.runtime.logits_spec(logits_shape), self.runtime.cache_specs(cache))
        body = functools.partial(GptOss._forward_cached, cache_empty=cache_empty)
        return self.within_runtime(body, out_specs, input_ids_BT, cache, n_new_B, logits_at_B)

    def _forward_cached(self, input_ids_BT, cache: "KVCache", n_new_B, logits_at_B, *, cache_empty: bool):
        T = input_ids_BT.shape[1]
        t_T = jnp.arange(T, dtype=jnp.int32)
        positions_BT = cache.lengths[:, None] + t_T
        batch = CachedBatch(lengths_B=cache.lengths, n_new_B=n_new_B, positions_BT=positions_BT,
                            valid_BT=t_T[None, :] < n_new_B[:, None])
        written = cache

        def attend(i, a, q, k, v):
            nonlocal written
            out, written = written.attend(i, self.runtime, q, k, v, a.sinks_N[...], batch, window=a.window,
                                          sm_scale=a.sm_scale, cache_empty=cache_empty)
            return out

        x = self._trunk(input_ids_BT, positions_BT, attend)
        with jax.named_scope("unembed"):
            if logits_at_B is not None:
                x = jnp.take_along_axis(x, logits_at_B[:, None, None].astype(jnp.int32), axis=1)
                logits = self.unembed(x)[:, 0]
            else:
                logits = self.unembed(x)
        cache = written.replace(lengths=cache.lengths + n_new_B)
        return logits, self.runtime.constrain_cache(cache)

    def within_runtime(self, method, out_specs, *args):
        """Run `method(self, *args)` in the runtime's sharding regime: on a mesh with Explicit axes
        under Auto axes (`Runtime.auto_region`; the outputs get `out_specs`, a pytree of
        PartitionSpecs), with the parameters passed in as arguments so they are converted too.
        The model's entry points (`forward`, `forward_cached`) and generation's jitted loops use it."""
        if not self.runtime.explicit:
            return method(self, *args)
        graphdef, state = nnx.split(self)

        def body(state, *args):
            return method(nnx.merge(graphdef, state), *args)

        return self.runtime.auto_region(body, out_specs)(state, *args)

    def to_kernel_layout(self, assume_normal_scales: bool | None = None):
        """Re-lay the MXFP4 experts of every layer for the Pallas kernel (see MoE.to_kernel_layout),
        keeping the expert-parallel placement on a mesh."""
        sharding = self.runtime.expert_sharding(self.config.num_local_experts)
        shardings = None if sharding is None else {n: sharding for n in KERNEL_EXPERT_WEIGHTS}
        for block in self.blocks:
            block.mlp.to_kernel_layout(shardings, assume_normal_scales)
        return self

    def __call__(self, input_ids_BT, positions_BT=None):
        if isinstance(input_ids_BT, jax.core.Tracer):
            return self.forward(input_ids_BT, positions_BT)
        ids = self.runtime.place_batch(check_token_ids(input_ids_BT, self.config.vocab_size))
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


def abstract_model(cfg: GptOssConfig, *, dtype="bfloat16", runtime: Runtime | None = None,
                   kernel_layout: bool = False) -> GptOss:
    """The model with ShapeDtypeStruct leaves: shapes and bytes without allocating anything, the
    dense parameters in `param_dtype_for(dtype)` (what `load_model` reads them into).
    `kernel_layout`: the experts as `load_model(..., kernels="pallas")` holds them (deviceless plans)."""
    def build():
        m = GptOss(cfg, runtime=runtime, dtype=dtype, param_dtype=param_dtype_for(dtype), rngs=nnx.Rngs(0))
        return m.to_kernel_layout(assume_normal_scales=True) if kernel_layout else m
    return nnx.eval_shape(build)


def count_params(model: GptOss) -> tuple[int, int]:
    """(parameters, bytes); packed MXFP4 counts 2 weights per byte and its scales as bytes only."""
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
