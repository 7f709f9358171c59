"""The contiguous per-slot KV cache of the engine, and moving one slot's row in and out of a cache
whose slots are split over the mesh's `data` axis (used by the paged cache too)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..model import GptOss, KVCache


@dataclasses.dataclass(frozen=True)
class SlotCache:
    """The contiguous per-slot KV cache (`KVCache` with `max_seqs` rows): full-attention layers
    `max_len` positions, sliding layers their ring of `window` slots.

    The engine calls `init`, `prefill` (one chunk of one slot's prompt) and `decode` (one token per
    slot), and `release` when a slot frees; the paged cache (`kv.PagedCache`) implements the same.
    Prefill gathers the slot's row, runs `forward_cached` on a [1, T] batch and writes the row back
    (the cache is donated: in place); on a mesh with slots over `data` the row moves with a psum over
    `data` from its owner, never the whole cache. A slot whose first chunk comes starts at length 0:
    `KVCache.slot_positions` sees its old entries as empty, so nothing is cleared."""

    max_seqs: int
    max_len: int

    def zeros(self, model: GptOss) -> KVCache:
        return KVCache.init(model.config, self.max_seqs, self.max_len, model.dtype)

    def init(self, model: GptOss) -> KVCache:
        """An empty cache placed as `runtime.cache_specs` says (slots over `data`)."""
        return cache_initializer(functools.partial(self.zeros, model), model.runtime,
                                 ("slots", model.config, model.dtype, self))()

    def release(self, slot: int) -> None:
        """A slot freed: nothing to do for contiguous rows (its next first chunk resets its length)."""

    def prefill(self, model: GptOss, cache: KVCache, slot, ids_1T, n_new_1, *, first: bool):
        """(logits [1, V] at the chunk's last valid token, cache) after writing the chunk into `slot`."""
        axis, specs = data_axis(model.runtime, self.max_seqs), model.runtime.cache_specs(cache)
        row = get_row(model, cache, specs, slot, axis)
        if first:
            row = row.replace(lengths=jnp.zeros_like(row.lengths))
        logits, row = model.forward_cached(ids_1T, row, n_new_1, cache_empty=first, logits_at_B=n_new_1 - 1)
        return logits, set_row(model, cache, row, specs, slot, axis)

    def decode(self, model: GptOss, cache: KVCache, tok_B, n_new_B):
        """(logits [B, V], cache): one token per slot; slots with n_new 0 write nothing."""
        return model.forward_cached(tok_B[:, None], cache, n_new_B, logits_at_B=jnp.zeros_like(n_new_B))


# ---- the cache's placement and one row in and out -----------------------------------------------
_INITIALIZERS: dict = {}


def cache_initializer(make, runtime, key):
    """One jitted initializer of `make()` per key (the cache's kind, config, dtype, shape, runtime),
    placed as `runtime.cache_specs` says: a new engine compiles nothing."""
    key = (key, runtime)
    if key not in _INITIALIZERS:
        out = None
        if runtime.mesh is not None:
            out = jax.tree.map(lambda s: NamedSharding(runtime.mesh, s), runtime.cache_specs(jax.eval_shape(make)))
        _INITIALIZERS[key] = jax.jit(make, out_shardings=out)
    return _INITIALIZERS[key]


def data_axis(runtime, max_seqs: int) -> str | None:
    """The mesh axis the `max_seqs` slots are split over (None: not split)."""
    spec = runtime.spec(("batch",), (max_seqs,))
    return spec[0] if len(spec) else None


def local_index(n_local: int, slot, axis):
    """(row index in this shard, clipped, and whether this shard owns `slot`)."""
    i = slot - jax.lax.axis_index(axis) * n_local
    return jnp.clip(i, 0, n_local - 1), (i >= 0) & (i < n_local)


def _row_specs(specs):
    return jax.tree.map(lambda s: P(None, *s[1:]), specs)


def _n_rows(tree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def get_row(model: GptOss, tree, specs, slot, axis):
    """Row `slot` ([1, ...]) of every [B, ...] array of `tree` (`specs`: their PartitionSpecs, rows
    over `axis`); on a mesh the owner contributes its row to a psum over `axis`, the others zeros."""
    if axis is None:
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, 0), tree)

    def local(c, slot):
        i, own = local_index(_n_rows(c), slot, axis)

        def get(a):
            r = jax.lax.dynamic_slice_in_dim(a, i, 1, 0)
            return jax.lax.psum(jnp.where(own, r, jnp.zeros_like(r)), axis)
        return jax.tree.map(get, c)

    return jax.shard_map(local, mesh=model.runtime.compute_mesh, in_specs=(specs, P()), out_specs=_row_specs(specs),
                         check_vma=False)(tree, slot)


def set_row(model: GptOss, tree, row, specs, slot, axis):
    """`tree` with row `slot` replaced by `row`; on a mesh only the owner changes its row."""
    if axis is None:
        return jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, 0), tree, row)

    def local(c, r, slot):
        i, own = local_index(_n_rows(c), slot, axis)

        def put(a, x):
            old = jax.lax.dynamic_slice_in_dim(a, i, 1, 0)
            return jax.lax.dynamic_update_slice_in_dim(a, jnp.where(own, x, old), i, 0)
        return jax.tree.map(put, c, r)

    return jax.shard_map(local, mesh=model.runtime.compute_mesh, in_specs=(specs, _row_specs(specs), P()),
                         out_specs=specs, check_vma=False)(tree, row, slot)
