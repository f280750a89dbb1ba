"""A per-key hold-back queue: the next item of a key is handed out only after the
previous one is released, while items of other keys flow in arrival order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class HoldbackQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}
        self._ready: deque[str] = deque()  # keys with items and nothing out
        self._busy: set[str] = set()  # keys with an item out
        self.size = 0

    def push(self, key: str, item: T) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(item)
        self.size += 1
        if len(queue) == 1 and key not in self._busy:
            self._ready.append(key)

    def push_front(self, key: str, item: T) -> None:
        """Puts an item that was out back at the head of its key and releases the key."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.appendleft(item)
        self.size += 1
        self._busy.discard(key)
        self._ready.appendleft(key)

    def pop(self) -> tuple[str, T] | None:
        """The head item of the first ready key; that key is busy until ``release``."""
        while self._ready:
            key = self._ready.popleft()
            queue = self._queues.get(key)
            if not queue:
                self._queues.pop(key, None)
                continue
            item = queue.popleft()
            self.size -= 1
            if not queue:
                del self._queues[key]
            self._busy.add(key)
            return key, item
        return None

    def is_busy(self, key: str) -> bool:
        return key in self._busy

    def queued(self, key: str) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def has_ready(self) -> bool:
        """Whether ``pop`` would hand something out."""
        return any(self._queues.get(key) for key in self._ready)

    def take_all(self) -> dict[str, list[T]]:
        """Every item queued, by key in queue order; keys stay busy as they were."""
        taken = {key: list(queue) for key, queue in self._queues.items() if queue}
        self._queues.clear()
        self._ready.clear()
        self.size = 0
        return taken

    def hold(self, key: str) -> None:
        """Keeps ``key`` busy although none of its items is out (e.g. a delayed retry)."""
        self._busy.add(key)

    def release(self, key: str) -> None:
        if key in self._busy:
            self._busy.discard(key)
            if self._queues.get(key):
                self._ready.append(key)

    def remove_if(self, predicate: Callable[[T], bool]) -> int:
        removed = 0
        for key in list(self._queues):
            queue = self._queues[key]
            kept = deque(item for item in queue if not predicate(item))
            removed += len(queue) - len(kept)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
        self.size -= removed
        self._ready = deque(k for k in self._ready if k in self._queues)
        return removed
