"""The prefix cache's books (kvcache/radix_cache.py through kvcache/manager.py), property-tested:
random requests over a tiny alphabet (so prefixes are shared) start, grow, cache chunks, finish,
fail or are retracted, with a small pool (so the cache evicts). After every operation: every
page is in exactly one place (free list, tree, one request's private tail), no page a request
reads is free or evicted, each request's slots hold its own tokens (a page's "KV" is the tokens
written into it), and the lock counts match the requests. After flush every page is free."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nanocp.kvcache.manager import KVManager  # noqa: E402
from nanocp.kvcache.pool import PageAllocator, ReqToTokenPool  # noqa: E402
from nanocp.kvcache.radix_cache import RadixCache  # noqa: E402


@dataclass(eq=False)
class FakeReq:
    fill_ids: list[int]
    req_pool_idx: int | None = None
    kv_pages: list[int] = field(default_factory=list)
    kv_len: int = 0
    held_ranges: list[tuple[int, int]] | None = None
    cache_node: object = None
    cached_len: int = 0
    computed_len: int = 0
    cached_tokens: int = 0
    skipped_len: int = 0
    cached_prefix: int = 0
    cache_root: object = None


class World:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.kv = KVManager(
            PageAllocator(num_pages, page_size), ReqToTokenPool(8, 64, "cpu"), prefix_cache=True
        )
        self.content: dict[int, tuple[int, int]] = {}  # slot -> (token, position) written there
        self.live: list[FakeReq] = []

    def start(self, tokens: list[int], chunk: int) -> None:
        """Admission: adopt the cached prefix, then compute a first chunk (at least the last
        token is left to compute after the prefix)."""
        if len(self.live) >= 8:
            return
        req = FakeReq(list(tokens))
        self.kv.match_prefix(req)
        n = min(chunk, len(tokens) - req.kv_len)
        assert n >= 1
        if self.kv.extend(req, n) is None:
            self.kv.unmatch(req)
            assert req.req_pool_idx is None and not req.kv_pages
            return
        self.kv.count_admitted(req)
        self._write(req, req.kv_len - n, req.kv_len)
        self.live.append(req)

    def grow(self, i: int, n: int) -> None:
        req = self.live[i % len(self.live)]
        n = min(n, len(req.fill_ids) - req.kv_len)
        if n > 0 and self.kv.extend(req, n) is not None:
            self._write(req, req.kv_len - n, req.kv_len)

    def cache_chunk(self, i: int) -> None:
        self.kv.cache_unfinished(self.live[i % len(self.live)])

    def end(self, i: int, cache: bool) -> None:
        self.kv.release(self.live.pop(i % len(self.live)), cache)

    def _write(self, req: FakeReq, lo: int, hi: int) -> None:
        table = self.kv.req_to_token_pool.req_to_token
        for p in range(lo, hi):
            self.content[int(table[req.req_pool_idx, p])] = (req.fill_ids[p], p)

    def check(self) -> None:
        kv, cache = self.kv, self.kv.cache
        ps = kv.page_size
        free = list(kv.allocator._free)
        tree: list[int] = []
        locked = 0
        stack = list(cache.root.children.values())
        while stack:
            node = stack.pop()
            assert len(node.key) == len(node.pages) * ps and node.pages
            tree += node.pages
            locked += len(node.pages) if node.lock_ref > 0 else 0
            stack.extend(node.children.values())
        private = [pg for r in self.live for pg in r.kv_pages[r.cached_len // ps :]]
        everything = free + tree + private
        assert sorted(everything) == list(range(kv.allocator.num_pages)), "a page lost or in two places"
        assert cache.cached_pages == len(tree) and cache.locked_pages == locked
        table = kv.req_to_token_pool.req_to_token
        for r in self.live:
            assert r.cached_len % ps == 0 and r.cached_len <= r.kv_len
            shared = r.kv_pages[: r.cached_len // ps]
            assert not set(shared) & set(free), "a page a request reads is free"
            for p in range(r.kv_len):  # its slots hold its own tokens (shared pages included)
                assert self.content[int(table[r.req_pool_idx, p])] == (r.fill_ids[p], p)
        # locks: every node on a live request's path is locked at least once per request on it
        refs: dict[int, int] = {}
        for r in self.live:
            node = r.cache_node
            while node is not None and node is not cache.root:
                refs[id(node)] = refs.get(id(node), 0) + 1
                node = node.parent
        stack = list(cache.root.children.values())
        while stack:
            node = stack.pop()
            assert node.lock_ref == refs.get(id(node), 0)
            stack.extend(node.children.values())


DOCS = [[1, 2, 0, 1, 1, 2, 2, 0, 1, 0, 2, 1, 0, 0, 1, 2], [1, 2, 0, 1, 2, 2, 1, 1], [2, 0, 2, 0, 1, 1, 0, 2]]
OPS = st.one_of(  # a request: a prefix of a shared document + its own tail
    st.tuples(
        st.just("start"),
        st.integers(0, 2),
        st.integers(0, 16),
        st.lists(st.integers(0, 2), max_size=6),
        st.integers(1, 24),
    ),
    st.tuples(st.just("grow"), st.integers(0, 7), st.integers(1, 9)),
    st.tuples(st.just("cache"), st.integers(0, 7)),
    st.tuples(st.just("end"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("evict"), st.integers(1, 6)),
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(6, 24), st.lists(OPS, max_size=60))
def test_radix_books_hold_under_any_sequence(page_size: int, num_pages: int, ops: list) -> None:
    w = World(num_pages, page_size)
    for op in ops:
        if op[0] == "start":
            w.start(DOCS[op[1]][: op[2]] + op[3] or [0], op[4])
        elif op[0] == "evict":
            w.kv.cache.evict(op[1])
        elif w.live:
            if op[0] == "grow":
                w.grow(op[1], op[2])
            elif op[0] == "cache":
                w.cache_chunk(op[1])
            else:
                w.end(op[1], op[2])
        w.check()
    assert (w.kv.cache.flush()) == (not w.live or w.kv.cache.locked_pages == 0)
    while w.live:
        w.end(0, True)
    w.check()
    assert w.kv.cache.flush()
    assert w.kv.allocator.num_free_pages == num_pages and w.kv.cache.cached_pages == 0


def test_match_insert_split_and_lru_eviction() -> None:
    alloc = PageAllocator(10, 2)
    cache = RadixCache(alloc)
    a = alloc.alloc(3)
    assert cache.insert([1, 2, 3, 4, 5, 6], a) == (0, cache.match_prefix([1, 2, 3, 4, 5, 6])[1])
    pages, node = cache.match_prefix([1, 2, 3, 4, 9, 9, 7])  # ends inside the node: it is split
    assert pages == a[:2] and node.key == (1, 2, 3, 4) and len(node.children) == 1
    assert cache.match_prefix([1, 2, 3])[0] == a[:1]  # whole pages only
    b = alloc.alloc(3)
    present, _ = cache.insert([1, 2, 3, 4, 7, 7], [*a[:2], b[0]])
    assert present == 2 and cache.cached_pages == 4
    alloc.free(b[1:])
    cache.lock(node)  # a request reads [1,2,3,4]: only the leaves can go
    cache.match_prefix([1, 2, 3, 4, 7, 7])  # [.., 7, 7] used last: [.., 5, 6] goes first
    assert cache.evict(1) == 1 and cache.match_prefix([1, 2, 3, 4, 5, 6])[0] == a[:2]
    assert cache.evict(5) == 1 and cache.cached_pages == 2 and not cache.flush()
    cache.unlock(node)
    assert cache.flush() and alloc.num_free_pages == 10


def test_context_parallel_segments_are_cached_under_their_own_root() -> None:
    """A home holding positions [8, 16) caches them under (8, hash of tokens[:8]); a request
    with the same tokens and placement reuses them once its holders confirmed [0, 8) cached."""
    kv = KVManager(PageAllocator(16, 2), ReqToTokenPool(4, 32, "cpu"), prefix_cache=True)
    ids = list(range(14))
    home_tail = FakeReq(ids, held_ranges=[(8, 16)])
    kv.extend(home_tail, 14)
    kv.release(home_tail)
    assert kv.cache.cached_pages == 3 and (0, 0) in kv.cache.roots and len(kv.cache.roots) == 2
    blind = FakeReq(ids, held_ranges=[(8, 16)])  # holders did not confirm anything: nothing skipped
    assert kv.match_prefix(blind) == 0
    again = FakeReq(ids, held_ranges=[(8, 16)], cached_prefix=8)
    assert kv.match_prefix(again) == 12 and again.cached_len == 4  # its last token is computed
    table = kv.req_to_token_pool.req_to_token[again.req_pool_idx]
    assert table[:8].tolist() == [-1] * 8 and kv.cache.locked_pages == 2
    other = FakeReq([99] + ids[1:], held_ranges=[(8, 16)], cached_prefix=8)  # other tokens before 8
    assert kv.match_prefix(other) == 8 and other.cached_len == 0
    kv.unmatch(other)
    kv.extend(again, 1)
    kv.release(again)
    head = FakeReq(ids, held_ranges=[(0, 6), (10, 16)])  # holds [0, 6) from 0: the ordinary root
    kv.extend(head, 12)
    kv.release(head)
    assert kv.match_prefix(FakeReq(ids, held_ranges=[(0, 6), (10, 16)])) == 6
    assert kv.match_prefix(FakeReq(ids, held_ranges=[(0, 6), (10, 16)], cached_prefix=10)) == 10


def test_holders_cache_their_segments_and_never_evict_one_in_use() -> None:
    """ForeignKV with the cache: a segment held for another home is cached under its root when
    released after the prefill; a later request reusing it in place gets the same pages, locked:
    neither eviction nor a full pool takes them while it runs."""
    from nanocp.kvcache.radix_cache import CachedPages
    from nanocp.scheduler.dcp import ForeignKV

    alloc = PageAllocator(14, 4)
    cache = RadixCache(alloc)
    foreign = ForeignKV(CachedPages(alloc, cache), cache)
    tokens = list(range(100, 124))
    root = (16, 12345)  # (start, hash of the tokens before it)
    assert foreign.reserve(1, 16, 40, root=root, tokens=tokens) and foreign.cached(1, 16) == 0
    first = list(foreign.segments[1][0].pages)
    foreign.release(1, cache=False)  # not prefilled: nothing kept
    assert cache.cached_pages == 0 and alloc.num_free_pages == 14
    assert foreign.reserve(1, 16, 40, root=root, tokens=tokens)
    first = list(foreign.segments[1][0].pages)
    foreign.release(1, cache=True)
    assert cache.cached_pages == 6 and alloc.num_free_pages == 8
    # the same tokens under another root (other tokens before them): no reuse
    assert foreign.reserve(2, 16, 40, root=(16, 999), tokens=tokens, reuse=24) and foreign.cached(2, 16) == 0
    foreign.release(2)
    assert foreign.reserve(3, 16, 44, root=root, tokens=tokens + [7, 7, 7, 7], reuse=24)
    assert foreign.cached(3, 16) == 24 and foreign.segments[3][0].pages[:6] == first
    assert cache.locked_pages == 6 and cache.evict(8) == 0  # in use: not evictable
    assert not foreign.reserve(4, 0, 4 * 9)  # 7 pages are not locked: a 9-page segment fails
    foreign.release(3, cache=True)
    assert cache.locked_pages == 0 and cache.cached_pages == 7 and cache.flush()
    assert alloc.num_free_pages == 14
