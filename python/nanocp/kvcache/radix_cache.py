"""Per-instance prefix cache over KV pages (SGLang's RadixAttention, page granular).

A radix tree whose edges are token sequences of whole pages and whose nodes own the KV pages of
their edge: a path from the root spells a prompt prefix and holds its KV. A context-parallel
request's positions [s, e) held here (a DCP segment) are cached under their own root, named
(s, hash of the tokens before s) (nanocp_router.prefix_index.context_hash): the KV of a
position depends on every token before it, so a segment is found again only by a request with
the same tokens before s. ROOT = (0, 0) is the ordinary prefix root. Invariants:
  - every node's key has len(pages) * page_size tokens; a child is found by its first page's
    tokens, so siblings never share their first page;
  - a node's lock_ref counts the requests whose matched prefix ends at or below it; a node with
    lock_ref > 0 is never evicted (the requests read its pages), and its ancestors are locked too;
  - a page is owned by exactly one of: the free list, the tree, one request's private tail. The
    tree frees a page only when it evicts it, or flushes while nothing is locked.
Eviction takes unlocked leaves, least recently used first, until the allocator has the pages
asked for (an evicted leaf may make its parent a leaf, which can go next).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol

_CLOCK = itertools.count()  # last-use order (a counter: ties are impossible, time is not needed)
ROOT = (0, 0)  # (start, context hash) of prefixes from position 0
RootKey = tuple[int, int]


class Pages(Protocol):
    page_size: int

    @property
    def num_free_pages(self) -> int: ...
    def alloc(self, n: int) -> list[int] | None: ...
    def free(self, pages: list[int]) -> None: ...


class TreeNode:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_use")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: TreeNode | None) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_use = next(_CLOCK)

    def __lt__(self, other: TreeNode) -> bool:  # heap order: least recently used first
        return self.last_use < other.last_use


class RadixCache:
    def __init__(self, allocator: Pages) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.root = TreeNode(ROOT, [], None)  # a root's key is its RootKey; it holds no pages
        self.root.lock_ref = 1  # never evicted
        self.roots: dict[RootKey, TreeNode] = {ROOT: self.root}
        self.cached_pages = 0  # pages the tree owns
        self.locked_pages = 0  # of those, pages some request reads
        # prompt tokens asked for / found in the cache (for /metrics' hit rate)
        self.query_tokens = 0
        self.hit_tokens = 0
        self.evicted_pages = 0

    @property
    def evictable_pages(self) -> int:
        return self.cached_pages - self.locked_pages

    # ---------------------------------------------------------------- lookup
    def _first_page(self, tokens: tuple[int, ...] | list[int], at: int = 0) -> tuple[int, ...]:
        return tuple(tokens[at : at + self.page_size])

    def _common_pages(self, key: tuple[int, ...], tokens: list[int], at: int) -> int:
        """How many whole pages of `key` equal tokens[at:] from its start."""
        ps, n = self.page_size, min(len(key), len(tokens) - at) // self.page_size
        if tuple(tokens[at : at + n * ps]) == key[: n * ps]:
            return n
        lo, hi = 1, n  # page 0 matched (the child was found by it); bisect the first mismatch
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tuple(tokens[at : at + mid * ps]) == key[: mid * ps]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def match_prefix(self, tokens: list[int], root: RootKey = ROOT) -> tuple[list[int], TreeNode]:
        """The pages of the longest cached whole-page prefix of `tokens` under `root`, and the
        node it ends at (lock it before the pages are used: lock()). Splits a node a match ends
        inside."""
        node, at, pages = self.roots.get(root), 0, []
        if node is None:  # nothing cached under that root
            return [], self.root
        ps = self.page_size
        while len(tokens) - at >= ps:
            child = node.children.get(self._first_page(tokens, at))
            if child is None:
                break
            n = self._common_pages(child.key, tokens, at)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_use = next(_CLOCK)
            pages += child.pages
            at += n * ps
            node = child
        return pages, node

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Cut `node` after its first n pages; returns the new upper part (the parent of node)."""
        ps = self.page_size
        upper = TreeNode(node.key[: n * ps], node.pages[:n], node.parent)
        upper.lock_ref = node.lock_ref
        upper.last_use = node.last_use
        node.parent.children[self._first_page(node.key)] = upper
        node.key, node.pages, node.parent = node.key[n * ps :], node.pages[n:], upper
        upper.children[self._first_page(node.key)] = node
        return upper

    # --------------------------------------------------------------- locking
    def lock(self, node: TreeNode) -> None:
        while node.parent is not None:
            if node.lock_ref == 0:
                self.locked_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node.parent is not None:
            if node.lock_ref == 1:
                self.locked_pages -= len(node.pages)
            node.lock_ref -= 1
            if node.lock_ref < 0:
                raise RuntimeError("radix cache: lock_ref below zero")
            node = node.parent

    # ---------------------------------------------------------------- insert
    def insert(self, tokens: list[int], pages: list[int], root: RootKey = ROOT) -> tuple[int, TreeNode]:
        """Cache the KV of a whole-page prefix: pages[i] holds tokens[i*ps:(i+1)*ps]. Returns how
        many leading pages were cached already (the tree keeps its own; the caller's copies of
        them that are not the tree's pages are the caller's to free) and the node the prefix ends
        at. The tree owns the rest of `pages` from now on."""
        ps = self.page_size
        if len(tokens) != len(pages) * ps:
            raise ValueError("radix cache: insert wants whole pages")
        if root not in self.roots:
            self.roots[root] = TreeNode(root, [], None)
            self.roots[root].lock_ref = 1
        node, at = self.roots[root], 0
        while at < len(tokens):
            node.last_use = next(_CLOCK)
            child = node.children.get(self._first_page(tokens, at))
            if child is None:
                leaf = TreeNode(tuple(tokens[at:]), pages[at // ps :], node)
                node.children[self._first_page(leaf.key)] = leaf
                self.cached_pages += len(leaf.pages)
                return at // ps, leaf
            n = self._common_pages(child.key, tokens, at)
            if n < len(child.pages):
                child = self._split(child, n)
            at += n * ps
            node = child
        node.last_use = next(_CLOCK)
        return len(pages), node

    def adopt(self, tokens: list[int], pages: list[int], own_from: int, root: RootKey = ROOT) -> TreeNode:
        """Cache a request's whole pages (pages[i] holds tokens[i*ps:(i+1)*ps]; the first
        own_from are the tree's already). Where the tree had a page meanwhile (another request
        cached it), it keeps its own: the caller's copy is freed and replaced in `pages` (in
        place). Returns the node the tokens end at."""
        present, node = self.insert(tokens, pages, root)
        if present > own_from:
            tree_pages, _ = self.match_prefix(tokens[: present * self.page_size], root)
            self.allocator.free(pages[own_from:present])
            pages[own_from:present] = tree_pages[own_from:present]
        return node

    # ----------------------------------------------------------------- evict
    def evict(self, num_pages: int) -> int:
        """Free at least num_pages unlocked cached pages (fewer if that many are not
        evictable), least recently used leaves first; returns how many were freed."""
        if num_pages <= 0 or not self.evictable_pages:
            return 0
        heap = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            leaf = heapq.heappop(heap)
            self.allocator.free(leaf.pages)
            freed += len(leaf.pages)
            self.evicted_pages += len(leaf.pages)
            self.cached_pages -= len(leaf.pages)
            parent = leaf.parent
            del parent.children[self._first_page(leaf.key)]
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
            elif parent.parent is None and not parent.children and parent is not self.root:
                del self.roots[parent.key]  # a segment root with nothing under it
        return freed

    def _nodes(self) -> list[TreeNode]:
        out, stack = [], [child for root in self.roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def flush(self) -> bool:
        """Empty the cache; refused (False) while a request reads cached pages."""
        if self.locked_pages:
            return False
        self.evict(self.cached_pages)
        return True


class CachedPages:
    """The allocator as the scheduler sees it with a prefix cache: evictable cached pages count
    as free, and an allocation evicts what it needs (own requests, segments held for other homes
    and KV landing from prefill servers all allocate through this)."""

    def __init__(self, allocator: Pages, cache: RadixCache) -> None:
        self.allocator = allocator
        self.cache = cache
        self.page_size = allocator.page_size

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free_pages + self.cache.evictable_pages

    def alloc(self, n: int) -> list[int] | None:
        short = n - self.allocator.num_free_pages
        if short > 0:
            self.cache.evict(short)
        return self.allocator.alloc(n)

    def free(self, pages: list[int]) -> None:
        self.allocator.free(pages)
