"""The engine's KV caches: `SlotCache` (one contiguous row per slot) and the paged cache
(`PagedCache` on the device, `PagePool` and `BlockTables` on the host) with prefix caching."""

from .paged import DEFAULT_PAGE_SIZE, PagedCache, PagedKVCache, PageLayout, free_device_bytes
from .pages import BlockTables, PagePool, page_hashes
from .slots import SlotCache

__all__ = ["SlotCache", "PagedCache", "PagedKVCache", "PageLayout", "PagePool", "BlockTables", "page_hashes",
           "DEFAULT_PAGE_SIZE", "free_device_bytes"]
