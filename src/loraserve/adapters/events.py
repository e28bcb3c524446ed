"""What the adapter cache and registry report as it happens (metrics listen; the default ignores it).

A plain observer keeps the cache free of any metrics library and its tests free of registries.
"""

from __future__ import annotations


class CacheEvents:
    """Every method is a no-op here; ``loraserve.metrics.ServerMetrics`` counts them."""

    def hit(self) -> None:
        """A request found its adapter snapshot in the disk cache."""

    def miss(self) -> None:
        """A request's snapshot was not on disk: it is downloaded (or adopted from another server)."""

    def downloaded(self, size: int, seconds: float) -> None:
        """A snapshot was fetched, checked and committed to the cache."""

    def waited_for_room(self) -> None:
        """A download had to wait for adapters in use to free room."""

    def evicted_from_disk(self) -> None:
        """An entry left the disk cache to make room (or was refused by the engine)."""

    def loaded_into_engine(self) -> None:
        """An adapter was loaded into the engine (a cold load)."""

    def removed_from_engine(self) -> None:
        """loraserve removed an adapter from the engine (eviction from disk, or unload)."""


NO_EVENTS = CacheEvents()
