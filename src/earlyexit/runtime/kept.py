"""What an `EarlyExit` object keeps across requests (decoders, shallow exits, task states),
bounded: the keys come from clients (methods, thresholds, knobs, tasks), so a server that
kept everything would grow with every new combination a client sends.

Least recently used entries go first. Written here (about 20 lines) rather than adding
cachetools as a dependency; a lock makes look-up-and-touch one step for the server's
threads.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Kept(Generic[V]):
    """A mapping that holds at most `limit` entries, dropping the least recently used."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a Kept mapping holds at least one entry")
        self.limit = limit
        self._items: collections.OrderedDict[Hashable, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: V) -> V:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return value

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
