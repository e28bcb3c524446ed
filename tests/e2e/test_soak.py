"""30 seconds of benchmarks/soak.py on the real stack: streaming clients, 8 adapters, a cache for 4, early leavers.

Under this load a client leaving mid-stream once let its adapter be evicted
while the engine still ran its request, and vLLM's worker crashed reloading it
(every later request was a 503). The full 5-minute soak is the benchmark.
"""

from __future__ import annotations

import asyncio

from benchmarks.soak import SoakReport, drive, make_adapters

from tests.e2e.conftest import _serve, _World


def test_thirty_seconds_of_mixed_streaming_load_stay_well_formed(world: _World) -> None:
    adapters = world.work / "soak-adapters"
    budget = int(4.5 * make_adapters(adapters, world.model_dir))
    extra = ["--adapter-dir", str(adapters), "--adapter-cache-size", str(budget), "--max-cpu-loras", "8"]
    # The suite's two other servers are still up, each with 30% of RAM: this one takes 12% (model included).
    extra += ["--gpu-memory-utilization", "0.12"]
    with _serve(world, "soak", extra) as server:
        report = SoakReport(duration_s=30, clients=16, cache_budget_bytes=budget)
        asyncio.run(drive(server.url, world.work / "soak-adapter-cache", report))
        health = server.client().with_options(max_retries=0).models.list()
    figures = report.as_dict()
    assert report.requests > 20, figures
    assert report.unexpected == 0, figures
    assert report.peak_cache_bytes <= budget, figures
    assert health.data  # the server still answers after the load
