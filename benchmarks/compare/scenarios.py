"""The six scenarios, as run against one server (1, 2, 4, 5, 6; 3 from scenario 1's rounds paired with the offline
engine's kept beside the server).

One server per arm runs every scenario in this order, so one engine start serves them all: the order matters
(scenario 6 fills the cache with churn adapters, so it comes last and re-warms what it compares against).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from benchmarks._process_group import cpu_s as group_cpu_s
from tests.support.fake_hub import FakeHub

from .offline import OfflineRounds
from .servers import Running, disk_bytes
from .workload import BASE, BatchFigures, Client, Request, median, on_models, summarize, zipf_requests
from .world import Adapters, downloads

MIXED_SEED = 1
COST_SEED = 2


@dataclass(frozen=True)
class Profile:
    """How much work each scenario does; ``full`` fits `make bench` in 30 minutes, ``quick`` in 5."""

    name: str
    repetitions: int  # pairs of server arms (each pair also runs the offline engine once)
    mixed_requests: int  # scenario 1 (and 3): all sent at once
    mixed_tokens: int
    mixed_rounds: int  # scenario 1 (and the offline engine): the batch runs this many times; figures are the median
    cost_requests: int  # scenario 2: all sent at once, all on the base and then all through adapters
    cost_tokens: int
    cost_rounds: int  # scenario 2: base and adapters alternate this many times; the ratio is the rounds' median
    cold_adapters: int  # scenario 4: adapters timed cold, each from the Hub and then from disk
    flight_clients: int  # scenario 5
    churn_adapters: int  # scenario 6: adapters through a cache of ``cache_slots``
    churn_tokens: int
    mixed_adapters: int = 8
    lora_slots: int = 4  # --max-loras: scenario 2 runs on this many adapters, then on all mixed_adapters
    cache_slots: int = 8  # loraserve's disk budget, in adapters; --max-cpu-loras is the same
    churn_concurrency: int = 4  # clients in scenario 6: as many as the engine has LoRA slots
    small_tokens: int = 4  # cold start and single flight: time to first token matters, not decoding
    offline_bindings: tuple[str, ...] = ("default_binding", "all_cores")  # keys of offline.CONFIGS


FULL = Profile(
    "full", repetitions=2, mixed_requests=32, mixed_tokens=32, mixed_rounds=3,
    cost_requests=32, cost_tokens=16, cost_rounds=3,
    cold_adapters=3, flight_clients=16, churn_adapters=64, churn_tokens=4,
)  # fmt: skip
QUICK = Profile(
    "quick", repetitions=1, mixed_requests=16, mixed_tokens=8, mixed_rounds=1,
    cost_requests=16, cost_tokens=8, cost_rounds=1,
    cold_adapters=1, flight_clients=16, churn_adapters=16, churn_tokens=2,
    offline_bindings=("default_binding",),  # the other costs an engine start, and lost every run so far
)  # fmt: skip


def mixed_requests(profile: Profile, adapters: Adapters) -> list[Request]:
    """Scenario 1's work: base first in popularity, then the adapters, Zipf α = 1 over all of them."""
    return zipf_requests([BASE, *adapters.mixed], profile.mixed_requests, profile.mixed_tokens, MIXED_SEED)


async def run_all(
    running: Running, hub: FakeHub, adapters: Adapters, profile: Profile, offline: OfflineRounds | None = None
) -> dict[str, Any]:
    async with Client(running.url, running.base_name) as client:
        figures: dict[str, Any] = {"startup_s": running.startup_s}
        figures["mixed"] = await mixed(client, adapters, profile, _Pairing(running, offline) if offline else None)
        figures["lora_cost"] = await lora_cost(client, adapters, profile)
        figures["cold_start"] = await cold_start(client, hub, adapters, profile)
        figures["single_flight"] = await single_flight(client, hub, adapters, profile)
        figures["churn"] = await churn(client, running, hub, adapters, profile)
        return figures


async def _warm(client: Client, models: list[str]) -> None:
    """One one-token request per model, so timed runs find every adapter downloaded and loaded."""
    await client.all_at_once([Request(model, "Hello", 1) for model in models])


@dataclass
class _Pairing:
    """The offline engine kept beside the server, for rounds that alternate with the server's."""

    running: Running
    offline: OfflineRounds
    # CPU seconds each used while the other ran a round: both near 0 shows the idle one did not compete.
    offline_cpu_in_server_rounds_s: float = 0.0
    server_cpu_in_offline_rounds_s: float = 0.0

    async def round(self) -> float:
        """One offline batch, once the server's engine has gone quiet; its output tok/s."""
        await asyncio.sleep(QUIET_S)
        before = group_cpu_s(self.running.pgid)
        answer = await asyncio.to_thread(self.offline.round)
        self.server_cpu_in_offline_rounds_s += group_cpu_s(self.running.pgid) - before
        await asyncio.sleep(QUIET_S)
        return float(answer["output_tok_s"])

    async def server_round(self, client: Client, work: list[Request]) -> BatchFigures:
        before = group_cpu_s(self.offline.process.pid)
        figures = summarize(await client.all_at_once(work))
        self.offline_cpu_in_server_rounds_s += group_cpu_s(self.offline.process.pid) - before
        return figures


# vLLM's engine loops spin for about a second after their last work before they sleep: the other side waits this.
QUIET_S = 1.5


async def mixed(
    client: Client, adapters: Adapters, profile: Profile, pairing: _Pairing | None = None
) -> dict[str, Any]:
    """1. Saturation: every request at once over the base and 8 adapters; throughput and latency.

    The batch runs ``mixed_rounds`` times and the figures are the median round's (the offline engine does the
    same): one batch of a few seconds is as noisy as the differences measured. Prompts are shorter than a KV
    block (128 tokens on CPU), so prefix caching never lets a later round skip work.

    With ``pairing``, each round is paired with the same batch on the offline engine kept beside the server (the
    server first in one round, the offline engine first in the next), and scenario 3 divides each server round by
    its offline round: the median of those ratios.
    """
    await _warm(client, [BASE, *adapters.mixed])
    work = mixed_requests(profile, adapters)
    rounds: list[BatchFigures] = []
    offline_rounds: list[float] = []
    if pairing is None:
        rounds = [summarize(await client.all_at_once(work)) for _ in range(profile.mixed_rounds)]
    else:
        for order in alternating(("server", "offline"), profile.mixed_rounds):  # server first, then offline first…
            for side in order:
                if side == "server":
                    rounds.append(await pairing.server_round(client, work))
                else:
                    offline_rounds.append(await pairing.round())
    figures = {**median_round(rounds).as_dict(), "rounds_output_tok_s": [r.output_tok_s for r in rounds]}
    if pairing is not None:
        ratios = [r.output_tok_s / o for r, o in zip(rounds, offline_rounds, strict=True) if o]
        figures["paired_offline"] = {
            "rounds_output_tok_s": offline_rounds,
            "output_tok_s": median(offline_rounds),
            "over_offline_tok_s": median(ratios),
            "rounds_over_offline_tok_s": ratios,
            "offline_cpu_in_server_rounds_s": pairing.offline_cpu_in_server_rounds_s,
            "server_cpu_in_offline_rounds_s": pairing.server_cpu_in_offline_rounds_s,
        }
    return figures


async def lora_cost(client: Client, adapters: Adapters, profile: Profile) -> dict[str, Any]:
    """2. The same prompts and lengths all on the base, then all through adapters (round-robin).

    "adapters" are as many as the engine has LoRA slots, so the batch is the base's: the difference is the LoRA
    computation. With more adapters than slots the scheduler runs only the requests of ``--max-loras`` adapters at
    a time and the batch shrinks; that is measured too ("over_slots"), but it is a setting, not the LoRA's cost.

    One batch is about 2 s here, and one base/adapters pair of batches swung from 0.71 to 1.17 on unchanged code:
    so the two alternate ``cost_rounds`` times, in turn base first and adapters first, and the ratio is the median
    of the rounds' own ratios (each arm's figures are its median round).
    """
    work = zipf_requests([BASE], profile.cost_requests, profile.cost_tokens, COST_SEED)
    models = {"base": [BASE], "adapters": adapters.mixed[: profile.lora_slots]}
    rounds: list[dict[str, BatchFigures]] = []
    for order in alternating(("base", "adapters"), profile.cost_rounds):
        rounds.append({arm: summarize(await client.all_at_once(on_models(work, models[arm]))) for arm in order})
    over = summarize(await client.all_at_once(on_models(work, adapters.mixed)))
    base = median_round([r["base"] for r in rounds])
    ratios = [r["adapters"].output_tok_s / r["base"].output_tok_s for r in rounds]
    ttft_ratios = _present([_ratio(r["adapters"].ttft_p50_s, r["base"].ttft_p50_s) for r in rounds])
    return {
        "base": base.as_dict(),
        "adapters": median_round([r["adapters"] for r in rounds]).as_dict(),
        "adapters_over_base_tok_s": median(ratios),
        "adapters_over_base_ttft_p50": median(ttft_ratios),
        "rounds_adapters_over_base_tok_s": ratios,
        "over_slots": over.as_dict(),
        "over_slots_over_base_tok_s": over.output_tok_s / base.output_tok_s,
    }


def alternating(arms: tuple[str, str], rounds: int) -> list[tuple[str, str]]:
    """Each round runs both arms, the first round in the given order and every other round reversed, so neither
    arm always runs first (after the previous scenario) or last."""
    return [arms if index % 2 == 0 else (arms[1], arms[0]) for index in range(rounds)]


def median_round(figures: list[BatchFigures]) -> BatchFigures:
    """The round with the median output tok/s (the lower middle one for an even count): real figures, not a blend."""
    ordered = sorted(figures, key=lambda f: f.output_tok_s)
    return ordered[(len(ordered) - 1) // 2]


async def cold_start(client: Client, hub: FakeHub, adapters: Adapters, profile: Profile) -> dict[str, Any]:
    """4. Time to first token of an adapter not on disk, then warm, then unloaded from the engine (still on disk)."""
    from_hub, warm, from_disk, fetched_again = [], [], [], 0
    for repo in adapters.cold[: profile.cold_adapters]:
        request = Request(repo, "What is the capital of Germany?", profile.small_tokens)
        before = downloads(hub, repo)
        from_hub.append((await client.one(request)).ttft)
        warm.append((await client.one(request)).ttft)
        # Both servers take vLLM's unload API: the adapter leaves the engine, its files stay on disk.
        unloaded = await client.post("/v1/unload_lora_adapter", {"lora_name": repo})
        if unloaded != 200:
            raise RuntimeError(f"unloading {repo} answered {unloaded}")
        from_disk.append((await client.one(request)).ttft)
        fetched_again += downloads(hub, repo) - before - 1
    return {
        "from_hub_ttft_s": median(_present(from_hub)),
        "from_disk_ttft_s": median(_present(from_disk)),
        "warm_ttft_s": median(_present(warm)),
        "downloads_after_unload": fetched_again,
        "raw": {"from_hub": from_hub, "from_disk": from_disk, "warm": warm},
    }


async def single_flight(client: Client, hub: FakeHub, adapters: Adapters, profile: Profile) -> dict[str, Any]:
    """5. Many concurrent first requests for one adapter: how many times it is downloaded."""
    repo = adapters.flight
    before_completed, before_started = downloads(hub, repo), hub.hits[(repo, "adapter_model.safetensors")]
    work = [Request(repo, f"Client {i}: say hello.", profile.small_tokens) for i in range(profile.flight_clients)]
    figures = summarize(await client.all_at_once(work))
    return {
        "clients": profile.flight_clients,
        "downloads": downloads(hub, repo) - before_completed,
        "downloads_started": hub.hits[(repo, "adapter_model.safetensors")] - before_started,
        "ok": figures.ok,
        "wall_s": figures.wall_s,
        "ttft_p50_s": figures.ttft_p50_s,
        "statuses": figures.statuses,
    }


async def churn(client: Client, running: Running, hub: FakeHub, adapters: Adapters, profile: Profile) -> dict[str, Any]:
    """6. Requests over more adapters than the cache holds, against the same requests over warm adapters."""
    count = profile.churn_adapters
    await client.closed_loop([Request(repo, "Hello", 1) for repo in adapters.mixed], profile.churn_concurrency)
    warm_work = [
        Request(adapters.mixed[i % len(adapters.mixed)], f"Churn {i}.", profile.churn_tokens) for i in range(count)
    ]
    warm = summarize(await client.closed_loop(warm_work, profile.churn_concurrency))
    cold_work = [Request(repo, f"Churn {i}.", profile.churn_tokens) for i, repo in enumerate(adapters.churn[:count])]
    before = sum(downloads(hub, repo) for repo in adapters.churn[:count])
    peak = [disk_bytes(running.adapter_disk)]
    sampling = asyncio.create_task(_sample_disk(running, peak))
    try:
        cold = summarize(await client.closed_loop(cold_work, profile.churn_concurrency))
    finally:
        sampling.cancel()
    end = disk_bytes(running.adapter_disk)
    return {
        "adapters": count,
        "warm": warm.as_dict(),
        "churn": cold.as_dict(),
        "churn_over_warm_requests_s": cold.requests_s / warm.requests_s,
        "downloads": sum(downloads(hub, repo) for repo in adapters.churn[:count]) - before,
        "disk_peak_bytes": max(peak[0], end),
        "disk_end_bytes": end,
    }


async def _sample_disk(running: Running, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], await asyncio.to_thread(disk_bytes, running.adapter_disk))
        await asyncio.sleep(0.2)


def _present(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator
