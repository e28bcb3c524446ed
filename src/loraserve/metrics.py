"""``GET /metrics``: vLLM's own engine series under their own names, then loraserve's.

vLLM's Prometheus logger records into prometheus_client's process registry (or
its multiprocess directory when ``PROMETHEUS_MULTIPROC_DIR`` is set), so LoRA-aware
routers that read ``vllm:*`` see a loraserve replica as a vLLM one. loraserve's own
series live in a registry per app: several apps in one test process never clash.

Label values stay bounded: a request's ``model`` label is the model that answered
(the base, or an adapter that resolved); everything else counts under ``other``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraserve.adapters.events import CacheEvents
from loraserve.observe import RequestRecord

OTHER = "other"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_DOWNLOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def engine_registry() -> CollectorRegistry:
    """Where vLLM's series are: its multiprocess directory if one is configured, else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


class _CacheGauges(Collector):
    """Read at scrape time from the live cache, so the values are never stale."""

    def __init__(self) -> None:
        self.read: Callable[[], dict[str, int] | None] = lambda: None

    def collect(self) -> Iterable[Metric]:
        summary = self.read()
        if summary is None:  # the server is still starting
            return
        yield GaugeMetricFamily("loraserve_adapter_cache_used_bytes", "Bytes of adapters in the disk cache.",
                                value=summary["used_bytes"])  # fmt: skip
        yield GaugeMetricFamily(
            "loraserve_adapter_cache_budget_bytes", "Byte budget of the disk cache.", value=summary["budget"]
        )
        adapters = GaugeMetricFamily(
            "loraserve_adapters", "Adapters on disk, loaded in the engine, and pinned.", labels=["state"]
        )
        adapters.add_metric(["disk"], summary["entries"])
        adapters.add_metric(["engine"], summary["in_engine"])
        adapters.add_metric(["pinned"], summary["pinned"])
        yield adapters


class ServerMetrics(CacheEvents):
    """loraserve's series: per model (base or adapter) and for the adapter cache."""

    def __init__(self, model_paths: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self._model_paths = frozenset(model_paths)
        self._labelled: set[str] = set()  # models that answered once: their later failures count under them
        reg = self.registry
        self.requests = Counter(
            "loraserve_requests", "Requests to the model endpoints, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"], registry=reg,
        )  # fmt: skip
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens, by model.", ["model"], registry=reg)
        self.completion_tokens = Counter(
            "loraserve_completion_tokens", "Generated tokens, by model.", ["model"], registry=reg
        )
        self.time_to_first_token = Histogram(
            "loraserve_time_to_first_token_seconds", "From the request's arrival to its first generated token.",
            ["model"], buckets=_TTFT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.request_duration = Histogram(
            "loraserve_request_duration_seconds", "From the request's arrival to the answer's last byte.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.cache_hits = Counter("loraserve_adapter_cache_hits", "Adapter requests found on disk.", registry=reg)
        self.cache_misses = Counter(
            "loraserve_adapter_cache_misses", "Adapter requests whose snapshot was not on disk.", registry=reg
        )
        self.downloads = Counter("loraserve_adapter_downloads", "Adapter snapshots fetched.", registry=reg)
        self.download_bytes = Counter(
            "loraserve_adapter_download_bytes", "Bytes of adapter snapshots fetched.", registry=reg
        )
        self.download_seconds = Histogram(
            "loraserve_adapter_download_seconds", "Time to fetch and check one adapter snapshot.",
            buckets=_DOWNLOAD_BUCKETS, registry=reg,
        )  # fmt: skip
        self.evictions = Counter(
            "loraserve_adapter_evictions", "Adapters evicted from the disk cache or removed from the engine by "
            "loraserve (vLLM's own CPU-side LRU is not visible here).", ["where"], registry=reg,
        )  # fmt: skip
        self.engine_loads = Counter(
            "loraserve_adapter_engine_loads", "Adapters loaded into the engine (cold loads).", registry=reg
        )
        self.room_waits = Counter(
            "loraserve_adapter_cache_waits", "Downloads that waited for adapters in use to free room.", registry=reg
        )
        for where in ("disk", "engine"):
            self.evictions.labels(where=where)  # both series exist from the start, at 0
        self._cache_gauges = _CacheGauges()
        reg.register(self._cache_gauges)

    def watch_cache(self, read: Callable[[], dict[str, int] | None]) -> None:
        """Where the cache gauges read from, once the cache exists."""
        self._cache_gauges.read = read

    # -- per request --------------------------------------------------------

    def observe_request(self, record: RequestRecord) -> None:
        if record.path not in self._model_paths:
            return
        if record.model is not None:
            self._labelled.add(record.model)
            model = record.model
        else:
            model = record.requested if record.requested in self._labelled else OTHER
        self.requests.labels(model=model, endpoint=record.path, status=str(record.status)).inc()
        if record.model is None:
            return
        self.prompt_tokens.labels(model=model).inc(record.prompt_tokens)
        self.completion_tokens.labels(model=model).inc(record.progress.completion_tokens)
        ttft = record.time_to_first_token
        if ttft is not None:
            self.time_to_first_token.labels(model=model).observe(ttft)
        self.request_duration.labels(model=model).observe(record.duration)

    # -- the adapter cache (CacheEvents) ------------------------------------

    def hit(self) -> None:
        self.cache_hits.inc()

    def miss(self) -> None:
        self.cache_misses.inc()

    def downloaded(self, size: int, seconds: float) -> None:
        self.downloads.inc()
        self.download_bytes.inc(size)
        self.download_seconds.observe(seconds)

    def waited_for_room(self) -> None:
        self.room_waits.inc()

    def evicted_from_disk(self) -> None:
        self.evictions.labels(where="disk").inc()

    def loaded_into_engine(self) -> None:
        self.engine_loads.inc()

    def removed_from_engine(self) -> None:
        self.evictions.labels(where="engine").inc()

    # -- exposition ---------------------------------------------------------

    def exposition(self) -> bytes:
        return b"".join(self._parts())

    def _parts(self) -> Iterator[bytes]:
        yield generate_latest(engine_registry())
        yield generate_latest(self.registry)
