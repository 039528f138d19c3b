"""The KV page allocator: fixed-size pages of token slots, handed out per request.

A request's sequence length is known when it is admitted (prompt + generated positions), so
it receives all its pages then and never grows; memory pressure therefore shows up as
admission waiting for pages, never as a request failing mid-way.
"""

from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError("num_pages and page_size must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        need = self.pages_for(num_tokens)
        if need > len(self._free):
            raise MemoryError(f"{need} KV pages needed, {len(self._free)} free")
        return [self._free.pop() for _ in range(need)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        if len(self._free) > self.num_pages:
            raise RuntimeError("KV pages freed twice")
