"""The model's two swappable computations as op objects, chosen once (`Runtime.create`).

Attention ops (`XlaAttention`, `PallasAttention`) own three entry points, all taking rotated
q [B, T, N, H], k / v [B, T, K, H] of the new tokens and the sinks [N]:

  forward(q, k, v, sinks, positions_BT)       no cache; positions None means 0..T-1
  prefill(q, k, v, sinks, batch)              an empty cache: the chunk attends to itself
  decode(q, k, v, k_cache, v_cache, sinks, batch, slot_pos_BS)
                                              cached positions + the chunk (the cache is written
                                              after the call by the model)

`batch` is a `CachedBatch` (per-row cache lengths, valid new tokens, positions); `slot_pos_BS`
the position each cache slot holds (-1: empty), as `KVCache.slot_positions` gives it.

Paged attention ops (`XlaPagedAttention`, `PallasPagedAttention`: it overrides `attend_local` only) read the
full-attention layers of the engine's paged cache (`gptoss_jax.kv`) through block tables, with the
signature of `pallas_kernels.paged_attention`:
  op(q, k_pages [P, S, K, H], v_pages, block_tables [B, M], q_start [B], n_new [B], sinks)
On a mesh the pages live split over the slots' axis (`pages_axis`) with local page ids in the
tables, so the op always runs per shard (`run_on_page_shards`).

MoE ops (`XlaMoE`, `PallasMoE`) map routed tokens to expert outputs:
  op(x_MD, weights_Mk, idx_Mk, expert_params, cfg) -> [M, D]
and state which expert layout they read (`kernel_layout`).

On a mesh, an op runs its computation inside `shard_map` with the specs it declares
(`manual_specs`), over the Auto-typed compute mesh (`sharding.compute_mesh`). A new op (e.g. a paged
attention) implements the same entry points and is chosen in `Runtime.create`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import banded_attention, paged_attention
from pallas_kernels.impl import Impl

from . import cpu_kernels
from .config import GptOssConfig
from .layers import attention_xla, einsum_dense, experts_pallas, experts_xla, paged_attention_xla, visible_mask
from .sharding import DEFAULT_RULES, ShardingRules, expert_axis_size


@flax.struct.dataclass
class CachedBatch:
    """A chunk of new tokens after the cached ones: row b has `n_new_B[b]` valid tokens (right-padded)
    at positions `lengths_B[b] + t`."""

    lengths_B: jax.Array  # [B] int32, positions already cached
    n_new_B: jax.Array  # [B] int32
    positions_BT: jax.Array  # [B, T] int32
    valid_BT: jax.Array  # [B, T] bool


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class XlaAttention:
    """Pure-jnp attention (`layers.attention_xla`): masks from positions, GSPMD partitions it."""

    name = "xla"

    def forward(self, q, k, v, sinks, positions_BT, *, window, sm_scale):
        if positions_BT is None:
            B, T = q.shape[:2]
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return attention_xla(q, k, v, sinks, visible_mask(positions_BT, positions_BT, window), sm_scale=sm_scale)

    def prefill(self, q, k, v, sinks, batch: CachedBatch, *, window, sm_scale):
        mask = visible_mask(batch.positions_BT, batch.positions_BT, window, batch.valid_BT)
        return attention_xla(q, k, v, sinks, mask, sm_scale=sm_scale)

    def decode(self, q, k, v, k_cache, v_cache, sinks, batch: CachedBatch, slot_pos_BS, *, window, sm_scale):
        keys = jnp.concatenate([k_cache, k.astype(k_cache.dtype)], axis=1).astype(q.dtype)
        vals = jnp.concatenate([v_cache, v.astype(v_cache.dtype)], axis=1).astype(q.dtype)
        k_pos = jnp.concatenate([slot_pos_BS, batch.positions_BT], axis=1)
        k_valid = jnp.concatenate([slot_pos_BS >= 0, batch.valid_BT], axis=1)
        mask = visible_mask(batch.positions_BT, k_pos, window, k_valid)
        return attention_xla(q, keys, vals, sinks, mask, sm_scale=sm_scale)


@dataclasses.dataclass(frozen=True)
class PallasAttention:
    """`pallas_kernels.banded_attention` (Triton on GPU, Mosaic on TPU, interpret mode on CPU).

    A Pallas call cannot be partitioned automatically, so on a mesh it runs per shard: rows over
    the batch axis, q and kv heads over the heads axis together (whole GQA groups per shard),
    without communication. Explicit positions other than 0..T-1 go to the XLA op."""

    mesh: Mesh | None = None  # compute mesh (Auto axes)
    rules: ShardingRules = DEFAULT_RULES
    impl: Impl = Impl.AUTO
    name = "pallas"

    def manual_specs(self, batch: int, heads: int, kv_heads: int) -> tuple[P, P, P]:
        """(spec of [B, T|S, heads, H] arrays, of the [N] sinks, of [B] per-row lengths)."""
        b = self.rules.spec(("batch",), (batch,), self.mesh)[0]
        h = self.rules.spec(("heads",), (math.gcd(heads, kv_heads),), self.mesh)[0]
        return P(b, None, h, None), P(h), P(b)

    def _run(self, fn, arrays, kinds):
        """fn(*arrays) per shard; kinds[i] in {"rows_heads", "sinks", "rows"} declares each spec."""
        if self.mesh is None:
            return fn(*arrays)
        q = arrays[0]
        rows_heads, sinks, rows = self.manual_specs(q.shape[0], q.shape[2], arrays[1].shape[2])
        spec = {"rows_heads": rows_heads, "sinks": sinks, "rows": rows}
        return jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(spec[k] for k in kinds), out_specs=rows_heads,
                             check_vma=False)(*arrays)

    def forward(self, q, k, v, sinks, positions_BT, *, window, sm_scale):
        if positions_BT is not None:
            return XlaAttention().forward(q, k, v, sinks, positions_BT, window=window, sm_scale=sm_scale)
        f = functools.partial(banded_attention.attention, window=window, sm_scale=sm_scale, impl=self.impl)
        return self._run(f, (q, k, v, sinks), ("rows_heads",) * 3 + ("sinks",))

    def prefill(self, q, k, v, sinks, batch: CachedBatch, *, window, sm_scale):
        def f(q, k, v, sinks, n):
            return banded_attention.attention(q, k, v, sinks, kv_len=n, window=window, sm_scale=sm_scale,
                                              impl=self.impl)
        return self._run(f, (q, k, v, sinks, batch.n_new_B), ("rows_heads",) * 3 + ("sinks", "rows"))

    def decode(self, q, k, v, k_cache, v_cache, sinks, batch: CachedBatch, slot_pos_BS, *, window, sm_scale):
        # the kernel's cache contract (pallas_kernels/banded_attention/README.md) derives the slots'
        # positions from the per-row lengths: slot_pos_BS is not needed
        f = functools.partial(banded_attention.decode_attention, window=window, sm_scale=sm_scale, impl=self.impl)
        args = (q, k.astype(k_cache.dtype), v.astype(v_cache.dtype), k_cache, v_cache, sinks, batch.lengths_B)
        return self._run(f, args, ("rows_heads",) * 5 + ("sinks", "rows"))


# ---------------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------------
def run_on_page_shards(fn, mesh: Mesh | None, rules: ShardingRules, args, kinds, out_kind: str, *,
                       pages_axis: str | None, owner=None):
    """`fn(*args)` per shard of `mesh`, next to the pages it reads or writes.

    kinds[i] declares args[i]: "q" ([B, T, heads, H]: rows, heads), "pages" ([P, S, K, H]: pages
    over `pages_axis`, kv heads over the heads axis), "rows" ([B, ...] per-row arrays), "n_new"
    (the per-row count of new tokens), "heads" ([N]). Rows are split with the pages (each shard
    serves its own slots, tables hold local page ids), or, with `owner` (a traced shard index), all
    rows belong to that shard: every shard runs them, the others with n_new 0 (they write nothing
    and their attention rows are 0), and a "q" output is summed over the pages axis. `out_kind`:
    "q" or "pages". No mesh: fn(*args)."""
    if mesh is None:
        return fn(*args)
    K = next(a for a, k in zip(args, kinds) if k == "pages").shape[2]
    h = rules.spec(("kv_heads",), (K,), mesh)[0]
    rows = pages_axis if owner is None else None
    spec = dict(q=P(rows, None, h, None), pages=P(pages_axis, None, h, None), heads=P(h), n_new=P(rows))

    def spec_of(a, kind):
        return P(rows, *(None,) * (a.ndim - 1)) if kind == "rows" else spec[kind]

    in_specs = tuple(spec_of(a, k) for a, k in zip(args, kinds))
    combine = owner is not None and pages_axis is not None

    def local(owner, *args):
        if combine:
            own = jax.lax.axis_index(pages_axis) == owner
            args = tuple(jnp.where(own, a, 0) if k == "n_new" else a for a, k in zip(args, kinds))
        out = fn(*args)
        return jax.lax.psum(out, pages_axis) if combine and out_kind == "q" else out

    return jax.shard_map(local, mesh=mesh, in_specs=(P(),) + in_specs, out_specs=spec[out_kind],
                         check_vma=False)(jnp.int32(0) if owner is None else owner, *args)


@dataclasses.dataclass(frozen=True)
class XlaPagedAttention:
    """Paged attention in jnp (`layers.paged_attention_xla`: each row's pages gathered in block-table
    order, then masked softmax with sinks), per page shard on a mesh.

    The kernel contract: pages already hold the new tokens; row b's query t is at position
    q_start[b] + t, valid for t < n_new[b] (invalid rows give 0); keys are positions
    0 .. q_start[b] + n_new[b] - 1, position p at page block_tables[b, p // S], offset p % S;
    visible keys i - window < j <= i; one sink logit per q head; GQA N = K * G. A kernel variant
    subclasses this and overrides `attend_local` (one shard's computation)."""

    mesh: Mesh | None = None  # compute mesh (Auto axes)
    rules: ShardingRules = DEFAULT_RULES
    name = "xla"

    def attend_local(self, q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B, sinks_N, *,
                     window, sm_scale):
        return paged_attention_xla(q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B,
                                   sinks_N, window=window, sm_scale=sm_scale)

    def __call__(self, q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B, sinks_N, *,
                 window, sm_scale, pages_axis: str | None = None, owner=None):
        """`pages_axis` / `owner`: where the pages and rows live on the mesh (`run_on_page_shards`)."""
        f = functools.partial(self.attend_local, window=window, sm_scale=sm_scale)
        args = (q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B, sinks_N)
        return run_on_page_shards(f, self.mesh, self.rules, args, ("q", "pages", "pages", "rows", "rows", "n_new",
                                                                   "heads"),
                                  "q", pages_axis=pages_axis, owner=owner)


@dataclasses.dataclass(frozen=True)
class PallasPagedAttention(XlaPagedAttention):
    """`pallas_kernels.paged_attention` (Triton on GPU, Mosaic on TPU, interpret mode on CPU), per
    page shard like the XLA op: it reads only the pages in each query block's window instead of
    gathering whole rows."""

    impl: Impl = Impl.AUTO
    name = "pallas"

    def attend_local(self, q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B, n_new_B, sinks_N, *,
                     window, sm_scale):
        return paged_attention.paged_attention(q_BTNH, k_pages_PSKH, v_pages_PSKH, block_tables_BM, q_start_B,
                                               n_new_B, sinks_N, window=window, sm_scale=sm_scale, impl=self.impl)


# ---------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ExpertParallel:
    """Dropless MoE over the mesh: every token's k experts evaluated exactly once.

    Tokens [M, D] split over data (and model, where divisible, so model-parallel devices do not
    repeat each other's expert work) enter a shard_map; each expert-axis device evaluates its E/n
    experts (`run` with the global id offset of its slice; rows routed elsewhere give exactly 0)
    and a psum over `expert` sums the k contributions of each token."""

    mesh: Mesh | None = None  # compute mesh (Auto axes)
    rules: ShardingRules = DEFAULT_RULES

    def _run(self, x_MD, weights_Mk, idx_Mk, p, cfg: GptOssConfig, normal_scales: bool, expert_offset=None):
        """The experts of `p` (a slice starting at global id `expert_offset`, if given) on these rows."""
        raise NotImplementedError

    def token_axes(self, M: int) -> tuple[str, ...]:
        """Mesh axes splitting the M routed tokens inside the map: batch, then heads, while they divide M."""
        axes, n = [], 1
        for ax in (self.rules.batch, self.rules.heads):
            size = self.mesh.shape.get(ax, 1) if ax else 1
            if size > 1 and ax != self.rules.experts and M % (n * size) == 0:
                axes.append(ax)
                n *= size
        return tuple(axes)

    def manual_specs(self, M: int, p: dict) -> tuple[P, dict]:
        """(spec of the [M, ...] token arrays, specs of the expert arrays)."""
        n_e = expert_axis_size(self.mesh, self.rules, next(iter(p.values())).shape[0])
        tok = self.token_axes(M)
        e = self.rules.experts if n_e > 1 else None
        return P(tok or None, None), {name: P(e, *([None] * (v.ndim - 1))) for name, v in p.items()}

    def __call__(self, x_MD, weights_Mk, idx_Mk, p, cfg: GptOssConfig, normal_scales: bool = False):
        if self.mesh is None:
            return self._run(x_MD, weights_Mk, idx_Mk, p, cfg, normal_scales)
        E = cfg.num_local_experts
        n_e = expert_axis_size(self.mesh, self.rules, E)
        tok_spec, e_spec = self.manual_specs(x_MD.shape[0], p)

        def local(x, w, idx, pl):
            if n_e == 1:
                return self._run(x, w, idx, pl, cfg, normal_scales)
            offset = jax.lax.axis_index(self.rules.experts) * (E // n_e)
            y = self._run(x, w, idx, pl, cfg, normal_scales, expert_offset=offset)
            return jax.lax.psum(y, self.rules.experts)

        return jax.shard_map(local, mesh=self.mesh, in_specs=(tok_spec, tok_spec, tok_spec, e_spec),
                             out_specs=tok_spec, check_vma=False)(x_MD, weights_Mk, idx_Mk, p)


@dataclasses.dataclass(frozen=True)
class XlaMoE(_ExpertParallel):
    """`layers.experts_xla`: MXFP4 experts in checkpoint layout, dequantized inside the jit.
    `cpu_decode`: the XLA:CPU formulations of `cpu_kernels` (Runtime.create sets it on a CPU
    backend): few routed rows (decode) read the packed blocks in place (`experts_rows`), tiles of
    many rows dequantize one expert each (`expert_tile`); by the native kernels if `native` (built
    and registered: `gptoss_jax.native.available()`), else by XLA fusions."""

    cpu_decode: bool = False
    native: bool = False
    name = "xla"
    kernel_layout = False

    def _run(self, x_MD, weights_Mk, idx_Mk, p, cfg, normal_scales, expert_offset=None):
        if self.cpu_decode:
            tile = cpu_kernels.tile_rows(idx_Mk.size, p["w1_blocks"].shape[0])
            rows = functools.partial(cpu_kernels.experts_rows, native_kernel=self.native)
            tiles = functools.partial(cpu_kernels.expert_tile, native_kernel=self.native)
            return experts_xla(x_MD, weights_Mk, idx_Mk, p, cfg, expert_offset, rows_fn=rows, tile_fn=tiles,
                               tile_rows=tile)
        return experts_xla(x_MD, weights_Mk, idx_Mk, p, cfg, expert_offset)


@dataclasses.dataclass(frozen=True)
class PallasMoE(_ExpertParallel):
    """`layers.experts_pallas`: the MXFP4 grouped-matmul kernel on experts in kernel layout."""

    impl: Impl = Impl.AUTO  # the kernel body (Runtime.create: from the target device)
    name = "pallas"
    kernel_layout = True

    def _run(self, x_MD, weights_Mk, idx_Mk, p, cfg, normal_scales, expert_offset=None):
        return experts_pallas(x_MD, weights_Mk, idx_Mk, p, cfg, expert_offset, normal_scales=normal_scales,
                              impl=self.impl)


# ---------------------------------------------------------------------------------------------
# Dense projections
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class XlaDense:
    """The dense projections (attention q / k / v / o, lm_head): `layers.einsum_dense`, which GSPMD
    partitions, and the embedding lookup. `cpu_rows`: products of at most that many activation rows
    (decode) take `cpu_kernels.project` instead, which reads the bfloat16 weights as stored, and the
    lookup gathers the table's bits (Runtime.create sets it on a CPU backend; 0 = never)."""

    cpu_rows: int = 0

    def take(self, table_VD, ids):
        """Rows `ids` of an embedding table."""
        if self.cpu_rows:
            return cpu_kernels.take_rows(table_VD, ids)
        return jnp.take(table_VD, ids, axis=0)

    def __call__(self, eq, x, w, *, n_in: int = 1, in_first: bool = True, preferred_element_type=None):
        if not self.cpu_rows:
            return einsum_dense(eq, x, w, n_in=n_in, in_first=in_first, preferred_element_type=preferred_element_type)
        out_dtype = preferred_element_type or x.dtype
        if math.prod(x.shape[:x.ndim - n_in]) <= self.cpu_rows and cpu_kernels.supports(x, w, n_in, in_first=in_first):
            return cpu_kernels.project(x, w, n_in, in_first=in_first).astype(out_dtype)
        return cpu_kernels.dot(x, w, n_in, in_first=in_first).astype(out_dtype)


OPS = {"xla": (XlaAttention, XlaMoE), "pallas": (PallasAttention, PallasMoE)}
PAGED_OPS = {"xla": XlaPagedAttention, "pallas": PallasPagedAttention}  # the engine's paged attention
