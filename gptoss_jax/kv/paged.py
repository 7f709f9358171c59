"""The engine's paged KV cache, device side: page pools, block tables, the one-slot prefill view,
prefix restores, and sizing from a memory budget.

Full-attention layers store their K/V in pages of `page_size` positions ([P, S, K, H] per layer);
a slot's block table row lists its pages in position order (position p at page row[p // S],
offset p % S), so a sequence holds only the pages its length needs and sequences may share pages
(prefix caching). Sliding layers keep their per-slot ring of `window` positions (as `KVCache`):
they never grow with the context.

Prefix caching needs the sliding layers too: after a hit at a page boundary b the ring must hold
positions [b - window, b). Those K/V come from *snapshot pages*: while a prompt is prefilled, the
sliding layers also write their K/V of every full prompt page into a page of their own (the
`snap_tables` row says which), handed to the prefix cache with the full page. A hit copies the
snapshots of the last ceil(window / S) pages before b back into the ring (`restore`). Snapshot
pages share the pools: pool j holds the j-th full layer's pages and the j-th sliding layer's
snapshots (a page id is one or the other), so gpt-oss (as many sliding as full layers) needs no
extra memory per page, and snapshots only ever occupy pages nothing else holds (they are
evictable from the moment their chunk ran).

On a mesh the pools are split over the slots' axis (`data`): shard i holds the pages of the slots
it serves and block tables hold page ids local to the shard; kv heads split over `model` as the
rings. Reads and writes run per shard (`ops.run_on_page_shards`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ..model import GptOss, replace_at, ring_positions, ring_write
from ..ops import CachedBatch, run_on_page_shards
from .slots import cache_initializer, data_axis, get_row, local_index, set_row

# Positions per page. 128 = gpt-oss's sliding window, so one page's snapshot is exactly the window
# a prefix hit restores (one page read), and the kernels' tile: a page per kv head is a [128, 64]
# block (the MXU / tensor-core tile height, 16 KiB bf16 per DMA), few enough block-table entries
# per sequence (64 at 8k). A hit recomputes at most 127 prompt tokens; a sequence wastes < 128
# positions of its last page (< 2% at 8k tokens).
DEFAULT_PAGE_SIZE = 128


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """Static facts of a paged cache: page geometry, pools and rings per layer, the page split."""

    page_size: int
    pages_per_shard: int
    n_shards: int  # shards of the slots' mesh axis the pages are split over (1: not split)
    pages_axis: str | None  # that mesh axis (None when n_shards == 1)
    full_pool: tuple[int, ...]  # per layer: the pool of a full-attention layer, -1 for a sliding one
    ring: tuple[int, ...]  # per layer: the ring of a sliding layer, -1 for a full one
    snap_pool: tuple[int, ...]  # per layer: the pool a sliding layer writes snapshots into, -1: none
    n_pools: int
    restore_pages: int  # snapshot pages a restore reads: ceil(largest ring / page_size)

    @property
    def num_pages(self) -> int:
        return self.pages_per_shard * self.n_shards

    @property
    def snapshots(self) -> bool:
        return any(p >= 0 for p in self.snap_pool)

    @property
    def no_page(self) -> int:
        """The snapshot-table entry meaning "none": out of a shard's range, so writes are dropped."""
        return self.pages_per_shard


@flax.struct.dataclass
class PagedKVCache:
    """The paged cache as `GptOss.forward_cached` sees it (it calls `attend` per layer and
    `partition_specs`), for all slots or, during a prefill chunk, one slot's view ([1] rows,
    `owner` = the shard that holds its pages on a mesh, whole pools)."""

    rings_k: tuple  # [B, W_l, K, H] per sliding layer (a ring, as KVCache)
    rings_v: tuple
    pages_k: tuple  # [P, S, K, H] per pool
    pages_v: tuple
    lengths: jax.Array  # [B] int32, positions written
    block_tables: jax.Array  # [B, M] int32: page of positions [jS, (j+1)S) (local ids; unused: any page)
    snap_tables: jax.Array | None  # [B, M] int32: snapshot page of prompt page j (no_page: none); None: off
    owner: jax.Array | None = None  # [] int32 in a one-slot view on a split mesh
    layout: PageLayout = flax.struct.field(pytree_node=False, default=None)

    @property
    def k(self) -> tuple:
        """Per layer, the K storage it reads: its ring or its page pool."""
        L = self.layout
        return tuple(self.pages_k[p] if p >= 0 else self.rings_k[r] for p, r in zip(L.full_pool, L.ring))

    def _written(self, runtime, pool: int, k_BTKH, v_BTKH, tables_BM, n_new_B) -> "PagedKVCache":
        """The cache with the new tokens' K/V scattered into pool `pool` at the pages of `tables_BM`."""
        def write(pages_PSKH, new_BTKH):
            return run_on_page_shards(write_pages, runtime.compute_mesh, runtime.rules,
                                      (pages_PSKH, new_BTKH, tables_BM, self.lengths, n_new_B),
                                      ("pages", "q", "rows", "rows", "n_new"), "pages",
                                      pages_axis=self.layout.pages_axis, owner=self.owner)
        return self.replace(pages_k=replace_at(self.pages_k, pool, write(self.pages_k[pool], k_BTKH)),
                            pages_v=replace_at(self.pages_v, pool, write(self.pages_v[pool], v_BTKH)))

    def attend(self, layer: int, runtime, q, k, v, sinks, batch: CachedBatch, *, window, sm_scale,
               cache_empty: bool):
        """(attention output, the cache with the chunk written): sliding layers attend over their
        ring (and write snapshots), full layers write their pages and read them through the block
        tables with `runtime.paged_attention` (`cache_empty`: the chunk attends to itself)."""
        L, n_new, kw = self.layout, batch.n_new_B, dict(window=window, sm_scale=sm_scale)
        if L.ring[layer] >= 0:
            r, p = L.ring[layer], L.snap_pool[layer]
            ck, cv = self.rings_k[r], self.rings_v[r]
            new = self.replace(rings_k=replace_at(self.rings_k, r, ring_write(ck, k, self.lengths, n_new)),
                               rings_v=replace_at(self.rings_v, r, ring_write(cv, v, self.lengths, n_new)))
            if p >= 0 and self.snap_tables is not None:
                new = new._written(runtime, p, k, v, self.snap_tables, n_new)
            if cache_empty:
                return runtime.attention.prefill(q, k, v, sinks, batch, **kw), new
            slot_pos = ring_positions(self.lengths, ck.shape[1])
            return runtime.attention.decode(q, k, v, ck, cv, sinks, batch, slot_pos, **kw), new
        p = L.full_pool[layer]
        new = self._written(runtime, p, k, v, self.block_tables, n_new)
        if cache_empty:  # the first chunk: nothing cached yet, as generate()'s first chunk
            return runtime.attention.prefill(q, k, v, sinks, batch, **kw), new
        return runtime.paged_attention(q, new.pages_k[p], new.pages_v[p], self.block_tables, self.lengths, n_new,
                                       sinks, **kw, pages_axis=L.pages_axis, owner=self.owner), new

    def partition_specs(self, mesh, rules):
        """Rings and per-row arrays: rows over data, kv heads over model; pools: pages over the
        slots' axis when split, kv heads over model."""
        pool_axes = ("batch" if self.layout.n_shards > 1 else None, None, "kv_heads", None)

        def ring(a):
            return rules.spec(rules.cache, a.shape, mesh)

        def pool(a):
            return rules.spec(pool_axes, a.shape, mesh)

        def rows(a):
            return None if a is None else rules.spec(("batch",) + (None,) * (a.ndim - 1), a.shape, mesh)

        return self.replace(rings_k=tuple(map(ring, self.rings_k)), rings_v=tuple(map(ring, self.rings_v)),
                            pages_k=tuple(map(pool, self.pages_k)), pages_v=tuple(map(pool, self.pages_v)),
                            lengths=rows(self.lengths), block_tables=rows(self.block_tables),
                            snap_tables=rows(self.snap_tables), owner=None if self.owner is None else P())


def write_pages(pages_PSKH, new_BTKH, tables_BM, start_B, n_new_B):
    """Scatter row b's valid new tokens (t < n_new) to positions start + t of its pages; table
    entries out of the pool's range (and invalid tokens) are dropped."""
    P_, S = pages_PSKH.shape[:2]
    M, T = tables_BM.shape[1], new_BTKH.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = start_B[:, None] + t
    page = jnp.take_along_axis(tables_BM, jnp.minimum(pos // S, M - 1), axis=1)
    page = jnp.where(t < n_new_B[:, None], page, P_)
    return pages_PSKH.at[page, pos % S].set(new_BTKH.astype(pages_PSKH.dtype), mode="drop")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """What sizing needs: page size, layer kinds, pools, the page split and bytes per device."""

    S: int
    full: list
    sliding: list
    ring_lens: list
    snaps: bool
    n_pools: int
    axis: str | None
    n_shards: int
    slots_per_shard: int
    blocks: int  # pages of one max_len sequence
    page_bytes: int  # one page of every pool, k and v, this device's kv heads
    ring_bytes: int  # the rings of this device's slots

    @classmethod
    def of(cls, model: GptOss, max_seqs: int, max_len: int, page_size, prefix_caching) -> "_Geometry":
        cfg, rt = model.config, model.runtime
        S = DEFAULT_PAGE_SIZE if page_size is None else page_size
        if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or S < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        S = int(S)
        full = [i for i in range(cfg.num_hidden_layers) if cfg.window(i) is None]
        sliding = [i for i in range(cfg.num_hidden_layers) if cfg.window(i) is not None]
        snaps = bool(prefix_caching) and bool(sliding)
        n_pools = max(len(full), len(sliding) if snaps else 0)
        axis = data_axis(rt, max_seqs)
        n_shards = 1 if axis is None else rt.mesh.shape[axis]
        K = cfg.num_key_value_heads
        ax = rt.spec(("kv_heads",), (K,))
        split = rt.mesh.shape[ax[0]] if len(ax) and ax[0] else 1
        per_pos = 2 * (K // split) * cfg.head_dim * jnp.dtype(model.dtype).itemsize  # k and v
        ring_lens = [min(cfg.window(i), max_len) for i in sliding]
        slots = max_seqs // n_shards
        return cls(S, full, sliding, ring_lens, snaps, n_pools, axis if n_shards > 1 else None, n_shards, slots,
                   -(-max_len // S), n_pools * S * per_pos, slots * sum(ring_lens) * per_pos)


@dataclasses.dataclass(frozen=True)
class PagedCache:
    """The engine's paged cache (the static half, an argument of the jitted programs): `init`,
    `prefill`, `decode`, `release` as `SlotCache`, plus `with_tables` (the host's block tables to
    the device) and `restore` (a prefix hit's ring). Build with `PagedCache.create`. The host half,
    allocation and the prefix cache, is `kv.PagePool`."""

    max_seqs: int
    max_len: int
    layout: PageLayout

    @classmethod
    def create(cls, model: GptOss, max_seqs: int, max_len: int, *, page_size: int | None = None,
               kv_cache_bytes: int | None = None, prefix_caching: bool = True) -> "PagedCache":
        """Pools sized by `kv_cache_bytes` per device (rings included; None: every slot can hold
        `max_len` positions, the slot cache's capacity). Raises ValueError when one sequence of
        `max_len` does not fit a shard."""
        g = _Geometry.of(model, max_seqs, max_len, page_size, prefix_caching)
        if kv_cache_bytes is None:
            pages = g.slots_per_shard * g.blocks
        else:
            bad = isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, (int, np.integer))
            if bad or kv_cache_bytes < 1:
                raise ValueError(f"kv_cache_bytes must be a positive integer, got {kv_cache_bytes!r}")
            pages = (int(kv_cache_bytes) - g.ring_bytes) // g.page_bytes if g.page_bytes else g.blocks
            if pages < g.blocks:
                raise ValueError(
                    f"kv_cache_bytes={kv_cache_bytes} holds {max(pages, 0)} pages of {g.S} positions per device after "
                    f"the sliding-window rings ({g.ring_bytes} bytes for {g.slots_per_shard} slots), but one "
                    f"sequence of max_len {max_len} needs {g.blocks} ({g.blocks * g.page_bytes + g.ring_bytes} "
                    f"bytes): give more memory, a smaller max_len or fewer max_seqs")
        n = model.config.num_hidden_layers
        layout = PageLayout(
            page_size=g.S, pages_per_shard=int(pages), n_shards=g.n_shards, pages_axis=g.axis,
            full_pool=tuple(g.full.index(i) if i in g.full else -1 for i in range(n)),
            ring=tuple(g.sliding.index(i) if i in g.sliding else -1 for i in range(n)),
            snap_pool=tuple(g.sliding.index(i) if g.snaps and i in g.sliding else -1 for i in range(n)),
            n_pools=g.n_pools, restore_pages=max(1, -(-max(g.ring_lens, default=0) // g.S)))
        return cls(int(max_seqs), int(max_len), layout)

    @classmethod
    def budget(cls, model: GptOss, max_seqs: int, max_len: int, pages_per_device: int, *,
               page_size: int | None = None, prefix_caching: bool = True) -> int:
        """The `kv_cache_bytes` that gives `pages_per_device` pages (rings included)."""
        g = _Geometry.of(model, max_seqs, max_len, page_size, prefix_caching)
        return g.ring_bytes + pages_per_device * g.page_bytes

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def blocks_per_seq(self) -> int:
        """Block-table width: pages of a `max_len` sequence."""
        return -(-self.max_len // self.layout.page_size)

    def tokens_per_device(self) -> int:
        """Positions the pools of one device hold (for its kv heads): pages per shard x page size."""
        return self.layout.pages_per_shard * self.layout.page_size

    # ---- device programs ------------------------------------------------------------------------
    def zeros(self, model: GptOss) -> PagedKVCache:
        cfg, L, dt = model.config, self.layout, model.dtype
        K, H = cfg.num_key_value_heads, cfg.head_dim
        rings = [(self.max_seqs, min(cfg.window(i), self.max_len), K, H) for i in range(cfg.num_hidden_layers)
                 if L.ring[i] >= 0]
        pool = (L.num_pages, L.page_size, K, H)
        return PagedKVCache(
            rings_k=tuple(jnp.zeros(s, dt) for s in rings), rings_v=tuple(jnp.zeros(s, dt) for s in rings),
            pages_k=tuple(jnp.zeros(pool, dt) for _ in range(L.n_pools)),
            pages_v=tuple(jnp.zeros(pool, dt) for _ in range(L.n_pools)),
            lengths=jnp.zeros((self.max_seqs,), jnp.int32),
            block_tables=jnp.zeros((self.max_seqs, self.blocks_per_seq), jnp.int32),
            snap_tables=jnp.full((self.max_seqs, self.blocks_per_seq), L.no_page, jnp.int32), layout=L)

    def init(self, model: GptOss) -> PagedKVCache:
        """An empty cache placed as `runtime.cache_specs` says (rows and pages over `data`)."""
        return cache_initializer(functools.partial(self.zeros, model), model.runtime,
                                 ("paged", model.config, model.dtype, self))()

    def release(self, slot: int) -> None:
        """A slot freed: its pages go back through the host's `PagePool`; nothing on the device."""

    def _row_fields(self, cache: PagedKVCache) -> dict:
        return dict(rings_k=cache.rings_k, rings_v=cache.rings_v, lengths=cache.lengths,
                    block_tables=cache.block_tables, snap_tables=cache.snap_tables)

    def prefill(self, model: GptOss, cache: PagedKVCache, slot, ids_1T, n_new_1, *, first: bool):
        """(logits [1, V] at the chunk's last valid token, cache): the chunk attends over the slot's
        pages and ring and is written into them (its one-slot view: row arrays gathered as
        `SlotCache` does, whole pools; on a split mesh the shard holding the pages is the `owner`)."""
        L, axis = self.layout, data_axis(model.runtime, self.max_seqs)
        fields = self._row_fields(cache)
        specs = self._row_fields(model.runtime.cache_specs(cache))
        view = cache.replace(**get_row(model, fields, specs, slot, axis))
        if L.pages_axis is not None:
            view = view.replace(owner=slot // (self.max_seqs // L.n_shards))
        if first:
            view = view.replace(lengths=jnp.zeros_like(view.lengths))
        logits, view = model.forward_cached(ids_1T, view, n_new_1, cache_empty=first, logits_at_B=n_new_1 - 1)
        back = dict(rings_k=view.rings_k, rings_v=view.rings_v, lengths=view.lengths)
        rows = set_row(model, {k: fields[k] for k in back}, back, {k: specs[k] for k in back}, slot, axis)
        return logits, cache.replace(pages_k=view.pages_k, pages_v=view.pages_v, **rows)

    def decode(self, model: GptOss, cache: PagedKVCache, tok_B, n_new_B):
        """(logits [B, V], cache): one token per slot; slots with n_new 0 write nothing. Decode
        tokens are never prefix-cached: no snapshot writes."""
        logits, out = model.forward_cached(tok_B[:, None], cache.replace(snap_tables=None), n_new_B,
                                           logits_at_B=jnp.zeros_like(n_new_B))
        return logits, out.replace(snap_tables=cache.snap_tables)

    def with_tables(self, model: GptOss, cache: PagedKVCache, block_tables: np.ndarray,
                    snap_tables: np.ndarray) -> PagedKVCache:
        """The host's block tables ([max_seqs, M] each, the same on every process) on the device."""
        put = model.runtime.place_batch
        return cache.replace(block_tables=put(block_tables), snap_tables=put(snap_tables))

    def restore(self, model: GptOss, cache: PagedKVCache, slot, start, snap_pages) -> PagedKVCache:
        """A prefix hit of `start` positions (a page boundary) in `slot`: its length becomes `start`
        and its rings hold positions [start - W, start) from the snapshot pages of prompt pages
        start // S - R .. start // S - 1 (`snap_pages` [R] int32, R = layout.restore_pages)."""
        return _restore(cache, slot, start, snap_pages, kv=self, runtime=model.runtime)


@functools.partial(jax.jit, static_argnames=("kv", "runtime"), donate_argnames=("cache",))
def _restore(cache: PagedKVCache, slot, start, snap_pages_R, *, kv: PagedCache, runtime):
    L = kv.layout
    S, R = L.page_size, L.restore_pages
    axis = data_axis(runtime, kv.max_seqs)

    def rebuild(rings, pools, slot, start, snaps):
        n_local = rings[0].shape[0] if rings else 1
        i, own = (slot, True) if axis is None else local_index(n_local, slot, axis)
        out = []
        for layer, r in enumerate(L.ring):
            if r < 0:
                continue
            if L.snap_pool[layer] < 0:  # no snapshots kept (no prefix caching): never restored
                out.append(rings[r])
                continue
            ring, pool = rings[r], pools[L.snap_pool[layer]]
            W = ring.shape[1]
            pos = start - W + jnp.mod(jnp.arange(W, dtype=jnp.int32) - start, W)  # what ring slot s holds
            page = snaps[jnp.clip(pos // S - (start // S - R), 0, R - 1)]
            row = jnp.where((pos >= 0)[:, None, None], pool[page, pos % S], 0).astype(ring.dtype)
            out.append(ring.at[i].set(jnp.where(own, row, ring[i])))
        return tuple(out)

    def body(cache, slot, start, snaps):
        specs = runtime.cache_specs(cache)
        rings = []
        for kind in ("k", "v"):
            args = (getattr(cache, f"rings_{kind}"), getattr(cache, f"pages_{kind}"))
            if runtime.mesh is None:
                rings.append(rebuild(*args, slot, start, snaps))
            else:
                rs, ps = getattr(specs, f"rings_{kind}"), getattr(specs, f"pages_{kind}")
                rings.append(jax.shard_map(rebuild, mesh=runtime.compute_mesh, in_specs=(rs, ps, P(), P(), P()),
                                           out_specs=rs, check_vma=False)(*args, slot, start, snaps))
        return cache.replace(rings_k=rings[0], rings_v=rings[1], lengths=cache.lengths.at[slot].set(start))

    return runtime.auto_region(body, runtime.cache_specs(cache))(cache, slot, start, snap_pages_R)


def free_device_bytes(fraction: float) -> int:
    """`fraction` of the first local device's free memory (its allocator's limit minus what is in
    use); ValueError where the device reports no memory statistics (CPU)."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1) or isinstance(fraction, bool):
        raise ValueError(f"kv_cache_fraction must be in (0, 1], got {fraction!r}")
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"{jax.local_devices()[0].platform} devices report no memory statistics: give "
                         "kv_cache_bytes instead of kv_cache_fraction")
    return int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
