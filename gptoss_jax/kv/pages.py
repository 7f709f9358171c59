"""The engine's paged cache, host side: page allocation, the prefix cache, the block tables.

`PagePool` decides (on process 0): which pages a request gets at admission (its prompt, minus
a prefix hit, plus its first decode step) and as it decodes, which snapshot pages its prompt
chunks write, which cached pages are reused, which are evicted. Every decision is a list of
table changes that goes into the step's plan; `BlockTables` applies them on every process (the
same host arrays everywhere, then the device copy).

Prefix cache. A page of prompt tokens is named by a hash chained over the prompt
(h_j = sha256(h_{j-1} + tokens of page j)), so equal names mean equal prefixes. Once the chunk
that fills a page has been dispatched, the page (and its snapshot page, when the sliding layers
kept one) is registered under its name. A new request takes the longest run of its names found on
the shard of its slot, that also has the snapshots of its last ceil(window / S) pages (the ring a
hit restores), at most up to its last prompt token (which is always recomputed: its logits give
the first token). Reused pages are shared with reference counts; registered pages nobody holds
stay cached, least recently used first out when a page is needed (a finished request's pages are
released tail first, so shared heads outlive their tails). Unregistered pages go straight back to
the free list.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from .paged import PagedCache


def page_hashes(tokens: np.ndarray, page_size: int, n_pages: int) -> list[bytes]:
    """Names of the first `n_pages` full pages of `tokens`, each chained over all before it."""
    out, h = [], b""
    data = np.asarray(tokens, "<i4")
    for j in range(n_pages):
        h = hashlib.sha256(h + data[j * page_size:(j + 1) * page_size].tobytes()).digest()
        out.append(h)
    return out


@dataclasses.dataclass
class _Entry:
    """A cached prompt page: its full-layer page and the sliding layers' snapshot page (or None)."""

    page: int
    snap: int | None = None


@dataclasses.dataclass
class _Held:
    """One running request's pages."""

    slot: int
    shard: int
    pages: list  # full-layer pages in position order (its block table row)
    hashes: list  # names of its full prompt pages
    registered: int  # pages [0, registered) are cached (hits included)
    n_tokens: int  # the tokens its prefill covers
    snaps: dict = dataclasses.field(default_factory=dict)  # prompt page -> snapshot page, not yet cached


class _Shard:
    """The pages of one shard: free list, reference counts, cached names, the LRU of evictable pages."""

    def __init__(self, n: int):
        self.free = list(range(n - 1, -1, -1))  # a stack: page 0 first
        self.refs = collections.Counter()  # full pages held by requests
        self.cached: dict[bytes, _Entry] = {}
        self.owner: dict[int, tuple[bytes, str]] = {}  # cached page -> (name, "page" | "snap")
        self.lru: collections.OrderedDict = collections.OrderedDict()  # cached pages nobody holds

    def available(self) -> int:
        return len(self.free) + len(self.lru)


class PagePool:
    """Allocation and prefix caching for a `PagedCache` (see the module docstring). Methods that
    decide (admit, grow, snapshot) run on process 0 and record table changes for the plan
    (`take_changes`); `filled` and `release` keep the books there. Unknown request ids are ignored,
    so every process may call `filled` / `release`."""

    def __init__(self, kv: PagedCache, prefix_caching: bool = True):
        self.kv = kv
        self.layout = kv.layout
        self.prefix_caching = bool(prefix_caching)
        self.stats = collections.Counter()  # hit_pages, evicted_pages, snapshot_pages, snapshots_skipped
        self.reset()

    def reset(self) -> None:
        """Everything free, nothing cached (a fresh device cache)."""
        self._shards = [_Shard(self.layout.pages_per_shard) for _ in range(self.layout.n_shards)]
        self._held: dict = {}
        self._changes: list = []
        self._hash_memo: dict = {}

    # ---- queries ------------------------------------------------------------------------------
    def shard_of(self, slot: int) -> int:
        return slot // (self.kv.max_seqs // self.layout.n_shards)

    def free_pages(self) -> int:
        """Pages that can be handed out now (free or cached and unreferenced), over all shards."""
        return sum(s.available() for s in self._shards)

    def cached_pages(self) -> int:
        return sum(len(s.owner) for s in self._shards)

    def held_by(self, rid) -> list[int]:
        h = self._held.get(rid)
        return [] if h is None else list(h.pages)

    def _pages_for(self, positions: int) -> int:
        return -(-positions // self.layout.page_size)

    def _names(self, rid, tokens: np.ndarray) -> list[bytes]:
        key = (rid, len(tokens))
        if key not in self._hash_memo:
            self._hash_memo = {k: v for k, v in self._hash_memo.items() if k[0] != rid}
            S = self.layout.page_size
            self._hash_memo[key] = page_hashes(tokens, S, len(tokens) // S) if self.prefix_caching else []
        return self._hash_memo[key]

    def _hit(self, sh: _Shard, names: list[bytes], most: int) -> int:
        """Cached pages a prompt can reuse on this shard (its ring's snapshots present)."""
        m = 0
        while m < most and names[m] in sh.cached:
            m += 1
        if not self.layout.snapshots:
            return m
        R = self.layout.restore_pages
        for k in range(m, 0, -1):
            if all(sh.cached[names[j]].snap is not None for j in range(max(0, k - R), k)):
                return k
        return 0

    # ---- decisions (process 0) ------------------------------------------------------------------
    def admit(self, rid, tokens: np.ndarray, free_slots, positions: int):
        """Pages for a request entering one of `free_slots`: its prompt tokens and `positions` in
        all, minus the longest prefix hit. Returns (slot, hit positions, snapshot pages to restore
        [restore_pages]) or None when no shard has the pages (the request waits)."""
        names = self._names(rid, tokens)
        most = (len(tokens) - 1) // self.layout.page_size if self.prefix_caching else 0
        need = self._pages_for(positions)
        best, seen = None, set()
        for slot in free_slots:
            shard = self.shard_of(slot)
            if shard in seen:
                continue  # the first free slot of a shard stands for all of them
            seen.add(shard)
            sh = self._shards[shard]
            k = self._hit(sh, names, most)
            pinned = sum(sh.cached[n].page in sh.lru for n in names[:k])
            room = sh.available() - pinned
            if need - k <= room and (best is None or (k, room) > best[:2]):
                best = (k, room, slot)
        if best is None:
            return None
        k, _, slot = best
        shard = self.shard_of(slot)
        sh = self._shards[shard]
        hits = [sh.cached[n].page for n in names[:k]]
        R = self.layout.restore_pages
        snaps = [sh.cached[names[j]].snap if j >= 0 else 0 for j in range(k - R, k)] if k else [0] * R
        snaps = [0 if p is None else p for p in snaps]  # no snapshots kept: never read
        for p in hits:
            sh.lru.pop(p, None)
        for p in snaps:
            if p in sh.lru:
                sh.lru.move_to_end(p)  # read by the restore: evicted last
        pages = hits + self._take(sh, need - k)
        sh.refs.update(pages)
        self._held[rid] = _Held(slot, shard, pages, names, k, len(tokens))
        self._changes += [(slot, 0, 0, pages), (slot, 1, None, None)]
        self.stats["hit_pages"] += k
        return slot, k * self.layout.page_size, snaps

    def grow(self, rid, positions: int) -> bool:
        """Pages for `positions` in all (a decode step's writes); False (nothing taken) when the
        shard has too few."""
        h = self._held[rid]
        need = self._pages_for(positions) - len(h.pages)
        if need <= 0:
            return True
        sh = self._shards[h.shard]
        if sh.available() < need:
            return False
        new = self._take(sh, need)
        sh.refs.update(new)
        self._changes.append((h.slot, 0, len(h.pages), new))
        h.pages += new
        return True

    def snapshot(self, rid, start: int, n: int) -> None:
        """Snapshot pages for the full prompt pages a chunk [start, start + n) writes, where a page
        can be had (none left: that page is cached without one)."""
        h = self._held.get(rid)
        if h is None or not (self.prefix_caching and self.layout.snapshots):
            return
        S = self.layout.page_size
        sh = self._shards[h.shard]
        for j in range(max(h.registered, start // S), min(-(-(start + n) // S), h.n_tokens // S)):
            if j in h.snaps:
                continue
            if not sh.available():
                self.stats["snapshots_skipped"] += 1
                continue
            (p,) = self._take(sh, 1)
            h.snaps[j] = p
            self._changes.append((h.slot, 1, j, [p]))
            self.stats["snapshot_pages"] += 1

    def filled(self, rid, positions: int) -> None:
        """A chunk up to `positions` ran: register the full prompt pages it completed."""
        h = self._held.get(rid)
        if h is None:
            return
        sh = self._shards[h.shard]
        upto = min(positions, h.n_tokens) // self.layout.page_size
        for j in range(h.registered, min(upto, len(h.hashes))):
            name, page, snap = h.hashes[j], h.pages[j], h.snaps.pop(j, None)
            e = sh.cached.get(name)
            if e is None:
                sh.cached[name] = e = _Entry(page)
                sh.owner[page] = (name, "page")
            elif e.snap is not None:  # the same prefix cached meanwhile: ours stays private
                self._free(sh, snap)
                snap = None
            if snap is not None:
                e.snap = snap
                sh.owner[snap] = (name, "snap")
                sh.lru[snap] = None
        h.registered = max(h.registered, upto)

    def release(self, rid) -> None:
        """A request finished, aborted or was preempted: its pages go back (cached ones to the LRU,
        tail first, the others to the free list)."""
        h = self._held.pop(rid, None)
        self._hash_memo = {k: v for k, v in self._hash_memo.items() if k[0] != rid}
        if h is None:
            return
        sh = self._shards[h.shard]
        for p in reversed(h.pages):
            sh.refs[p] -= 1
            if sh.refs[p] == 0:
                del sh.refs[p]
                if p in sh.owner:  # cached: evictable, just after its snapshot (a hit needs both)
                    snap = sh.cached[sh.owner[p][0]].snap
                    if snap is not None:
                        sh.lru.move_to_end(snap)
                    sh.lru[p] = None
                else:
                    sh.free.append(p)
        for p in h.snaps.values():
            self._free(sh, p)

    def take_changes(self) -> list:
        """The block-table changes decided since the last call (for the step's plan)."""
        out, self._changes = self._changes, []
        return out

    # ---- pages --------------------------------------------------------------------------------
    def _free(self, sh: _Shard, p) -> None:
        if p is not None:
            sh.free.append(p)

    def _take(self, sh: _Shard, n: int) -> list[int]:
        """n pages: free ones first, then the least recently used cached ones (evicted)."""
        out = []
        while len(out) < n:
            if sh.free:
                out.append(sh.free.pop())
                continue
            p, _ = sh.lru.popitem(last=False)
            name, kind = sh.owner.pop(p)
            e = sh.cached[name]
            if kind == "snap":
                e.snap = None
            else:
                del sh.cached[name]
                if e.snap is not None:  # useless without its page
                    sh.owner.pop(e.snap)
                    sh.lru.pop(e.snap)
                    sh.free.append(e.snap)
            self.stats["evicted_pages"] += 1
            out.append(p)
        return out


class BlockTables:
    """The block tables on the host ([max_seqs, M] int32, full-layer pages and snapshot pages),
    changed only by the plan's changes, so every process holds the same; `dirty` until uploaded."""

    def __init__(self, kv: PagedCache):
        self.layout = kv.layout
        self.pages = np.zeros((kv.max_seqs, kv.blocks_per_seq), np.int32)
        self.snaps = np.full((kv.max_seqs, kv.blocks_per_seq), kv.layout.no_page, np.int32)
        self.dirty = True

    def apply(self, changes) -> None:
        """(slot, 0, start, pages): the slot's pages from block `start`; (slot, 1, None, None): no
        snapshots; (slot, 1, j, [page]): prompt page j's snapshot page."""
        for slot, table, start, values in changes:
            if table == 0:
                self.pages[slot, start:start + len(values)] = values
            elif start is None:
                self.snaps[slot] = self.layout.no_page
            else:
                self.snaps[slot, start:start + len(values)] = values
            self.dirty = True
