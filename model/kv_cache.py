"""Paged KV cache bookkeeping: fixed-size blocks handed out by one allocator per replica.

The cache tensors live in the workers (model/attention.py allocates them); every
worker of a replica holds the same block ids for its own layers and heads, so
one allocator in the engine governs them all.

Prefix caching: a full block whose K/V are computed can be registered under a
hash of its tokens chained with its parent block's hash (``block_hashes``), so
the hash names the whole prefix up to and including that block. Blocks are
reference counted, so sequences with the same prefix share them. A hashed block
whose last holder frees it stays *cached*: it still counts as free and is
evicted (least recently freed first, its hash dropped) only when an allocation
finds no never-hashed free block, and until then a lookup can take it back.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class NoFreeBlocks(Exception):
    """Raised when an allocation asks for more blocks than are free."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """The hash of a full block given its parent's: equal hashes mean equal prefixes.

    sha256 rather than Python's hash(): a collision would silently reuse another
    prompt's K/V, and a 256-bit digest makes that practically impossible.
    """
    return hashlib.sha256((parent or b"") + array("q", token_ids).tobytes()).digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # never hashed, or hash dropped
        self._cached: OrderedDict[int, None] = OrderedDict()  # hashed, unused; eviction order first
        self._refs: dict[int, int] = {}  # blocks in use -> number of sequences holding them
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never-hashed free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return len(self._cached)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block of a sequence, given in order."""
        newly_cached = []
        for b in blocks:
            refs = self._refs.get(b, 0)
            if refs == 0:
                raise ValueError(f"KV block {b} freed twice or never allocated")
            if refs > 1:
                self._refs[b] = refs - 1
                continue
            del self._refs[b]
            if b in self._hash_of:
                newly_cached.append(b)
            else:
                self._free.append(b)
        # A block is only found when all its parents are, so evict a sequence's tail before its head.
        for b in reversed(newly_cached):
            self._cached[b] = None

    # -- prefix caching ----------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached run of ``hashes`` from the first; takes no reference."""
        blocks = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def num_revived(self, blocks: list[int]) -> int:
        """How many of these cached blocks are free now, i.e. how many ``share`` takes from num_free."""
        return sum(1 for b in blocks if b in self._cached)

    def share(self, blocks: list[int]) -> None:
        """Take a reference to each of these hashed blocks, reviving the ones that were free."""
        for b in blocks:
            if b in self._cached:
                del self._cached[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1

    def register(self, block: int, h: bytes) -> None:
        """Record that a block in use is full and its K/V are computed, so others may share it.

        When another block already holds the same prefix (two sequences computed it at
        the same time), the first one stays the cached copy and this one stays unhashed.
        """
        if block not in self._refs:
            raise ValueError(f"KV block {block} is not allocated")
        if block in self._hash_of or h in self._block_of:
            return
        self._hash_of[block] = h
        self._block_of[h] = block
