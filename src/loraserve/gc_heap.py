"""Keep the startup heap out of the cyclic garbage collector's way while the server runs.

Importing vLLM, torch and transformers leaves the API process with about 670,000 objects the collector tracks.
A full (generation 2) collection walks every one of them: 0.7 s on the 2-core benchmark machine, during which
the event loop takes no request and streams no token (a burst's throughput fell by a tenth in that round).
What startup builds (modules, configs, the tokenizer) lives as long as the server, so once it is up its heap
is frozen: moved to a permanent generation that collections skip, as vLLM's own OpenAI server does
(``freeze_gc_heap``). A frozen object that later becomes unreachable is still freed by reference counting;
only a cycle of them would stay."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> None:
    """Freeze everything alive now for the rest of the process; what is garbage now is collected first."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.debug("froze %d objects in %.2f s", gc.get_freeze_count(), time.perf_counter() - started)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The startup heap frozen until exit (see ``freeze_startup_heap``), then given back to the collector."""
    freeze_startup_heap()
    try:
        yield
    finally:
        gc.unfreeze()  # a process that goes on (tests, an embedding app) collects them again
