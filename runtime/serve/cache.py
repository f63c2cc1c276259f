"""Paged latent KV cache for MLA serving: page pool, page allocator with reference counts, prefix cache.

Per token and layer the cache holds one row of `kv_lora_rank + qk_rope_head_dim` values (the normalised
latent, then the rotated shared rope key), i.e. 576 values for DeepSeek-V3 instead of 2 x heads x head_dim
for MHA. Rows live in fixed-size pages `kv[layer]: [num_pages, page_size, width]`; a sequence owns a list
of pages (its block table row). Pages are reference counted so that a prompt prefix computed once can be
shared by later requests (the prefix cache holds its own reference and gives pages back, least recently
used first, when the allocator runs dry).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import torch

__all__ = ["BlockTable", "PageAllocator", "PrefixCache", "PagedLatentCache", "page_hashes", "tokens_from_free_memory"]


class PageAllocator:
    """Free list + reference counts. A page is free exactly when its count is zero."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n fresh pages (count 1 each), or None (nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        return pages

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            if self.refs[p] <= 0:
                raise RuntimeError(f"incref of free page {p}")
            self.refs[p] += 1

    def check(self) -> None:
        """Every free page is on the free list exactly once, with a zero count (for tests)."""
        if len(set(self._free)) != len(self._free) or any(self.refs[p] for p in self._free):
            raise AssertionError("the free list holds a page twice or a page still referenced")

    def decref(self, pages: list[int]) -> None:
        for p in pages:
            if self.refs[p] <= 0:
                raise RuntimeError(f"double free of page {p}")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free.append(p)


def page_hashes(tokens: list[int], page_size: int, n_pages: int | None = None) -> list[bytes]:
    """Chained digests of the first full pages of `tokens`: page i's key covers tokens[0 : (i+1)*page_size],
    so equal keys mean equal prefixes (and so equal latents, positions included)."""
    full = len(tokens) // page_size if n_pages is None else min(n_pages, len(tokens) // page_size)
    out, prev = [], b""
    for i in range(full):
        block = tokens[i * page_size : (i + 1) * page_size]
        prev = hashlib.blake2b(prev + b"|" + ",".join(map(str, block)).encode(), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixCache:
    """Digest of a full page's prefix -> page id. Holds one reference per cached page; LRU eviction."""

    def __init__(self, allocator: PageAllocator) -> None:
        self.alloc = allocator
        self.pages: OrderedDict[bytes, int] = OrderedDict()
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found cached

    def __len__(self) -> int:
        return len(self.pages)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The longest cached run of pages for these digests, each with a new reference for the caller."""
        found = []
        for h in hashes:
            p = self.pages.get(h)
            if p is None:
                break
            self.pages.move_to_end(h)
            found.append(p)
        self.alloc.incref(found)
        return found

    def insert(self, hashes: list[bytes], pages: list[int]) -> None:
        for h, p in zip(hashes, pages):
            if h in self.pages:
                self.pages.move_to_end(h)
                continue
            self.alloc.incref([p])
            self.pages[h] = p

    def evictable(self) -> int:
        return sum(1 for p in self.pages.values() if self.alloc.refs[p] == 1)

    def evict(self, n: int) -> int:
        """Drop up to n least recently used pages that nobody else holds; returns how many were freed."""
        freed = 0
        for h in list(self.pages):
            if freed >= n:
                break
            p = self.pages[h]
            if self.alloc.refs[p] == 1:
                del self.pages[h]
                self.alloc.decref([p])
                freed += 1
        return freed

    def clear(self) -> None:
        self.evict(len(self.pages))


class BlockTable:
    """The page ids of the running sequences, one row each, as one persistent int32 tensor on the pool's device
    ([rows, max pages per sequence], grown on demand). Steps only write what changed: the pages a sequence
    gained since the last step, or a whole row when the row changed hands (`update`, one indexed write)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.table = torch.zeros(0, 0, dtype=torch.int32, device=self.device)
        self._free: list[int] = []  # rows given back, handed out again first
        self._rows = 0

    def take_row(self) -> int:
        """A row for a sequence that starts holding pages (the driver's engine hands rows out; other ranks
        take theirs from the plans)."""
        if self._free:
            return self._free.pop()
        self._rows += 1
        return self._rows - 1

    def give_row(self, row: int) -> None:
        self._free.append(row)

    def reserve(self, rows: int, cols: int) -> None:
        """Grow the table to at least rows x cols (new entries 0)."""
        r, c = self.table.shape
        if rows > r or cols > c:
            grown = torch.zeros(max(rows, 2 * r), max(cols, 2 * c), dtype=torch.int32, device=self.device)
            grown[:r, :c] = self.table
            self.table = grown

    def update(self, rows: list[int], cols: list[int], pages: list[int]) -> None:
        """table[rows[i], cols[i]] = pages[i] for every i (growing the table to fit)."""
        if not rows:
            return
        self.reserve(max(rows) + 1, max(cols) + 1)
        at = torch.tensor([rows, cols, pages], dtype=torch.long, device=self.device)
        self.table.index_put_((at[0], at[1]), at[2].to(torch.int32))


class PagedLatentCache:
    """The page pool for every layer plus its allocator, prefix cache and block table.

    `kv` is one tensor [num_layers, num_pages + 1, page_size, width]; `layer(l)` is a view of one layer in the
    layout the paged-attention kernel reads. The last page (`scratch_page`) is never handed out: padding rows
    of fixed-shape steps (runtime/serve/graphs.py) write there.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.width = kv_lora_rank + rope_dim
        self.kv = torch.zeros(num_layers, num_pages + 1, page_size, self.width, dtype=dtype, device=device)
        self.scratch_page = num_pages
        self.allocator = PageAllocator(num_pages)
        self.prefix = PrefixCache(self.allocator)
        self.block_table = BlockTable(device)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.width * self.kv.element_size()

    def layer(self, idx: int) -> torch.Tensor:
        return self.kv[idx]

    def alloc(self, n: int) -> list[int] | None:
        """n pages, evicting cached prefixes if needed; None when even that is not enough."""
        short = n - self.allocator.num_free
        if short > 0:
            if self.prefix.evictable() < short:
                return None
            self.prefix.evict(short)
        return self.allocator.alloc(n)

    def pages_used(self) -> int:
        """Pages held by requests (excludes pages kept only by the prefix cache)."""
        cached_only = sum(1 for p in self.prefix.pages.values() if self.allocator.refs[p] == 1)
        return self.num_pages - self.allocator.num_free - cached_only

    def usage(self) -> float:
        return self.pages_used() / self.num_pages

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store rows for flat slot ids (page * page_size + offset): latent [N, r], k_pe [N, dr]."""
        flat = self.kv[layer].view(-1, self.width)
        flat[slots] = torch.cat([latent, k_pe], dim=-1).to(flat.dtype)

    def gather(self, layer: int, pages: list[int] | torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` rows of a sequence whose pages are `pages`: [length, width]."""
        idx = torch.as_tensor(pages, dtype=torch.long, device=self.kv.device)
        return self.kv[layer].index_select(0, idx).reshape(-1, self.width)[:length]


def tokens_from_free_memory(bytes_per_token: int, device: torch.device, cap: int, group=None) -> int:
    """KV capacity when serve.kv_cache_tokens = 0: half the free accelerator memory, or on CPU a tenth of
    the available RAM, never more than max_batch * max_model_len tokens; the minimum over `group`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        try:
            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 10
        except (ValueError, OSError, AttributeError):
            budget = 1 << 30
    n = max(1, min(cap, budget // max(1, bytes_per_token)))
    if group is not None:
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.int64, device="cpu")  # over the control group
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        n = int(t[0])
    return n
