"""Run every scenario on each arm in turn, repeat, and write results JSON, a Markdown table and a plot."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import _results
from tests.support.fake_hub import FakeHub

from loraserve.demo import embedded_model_dir

from . import report
from .offline import CONFIGS as OFFLINE_CONFIGS
from .offline import PAIRED_BINDING, OfflineRounds
from .scenarios import FULL, QUICK, Profile, mixed_requests, run_all
from .servers import EngineFlags, Kind, serve
from .world import Adapters, publish

logger = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[2]
OFFLINE_TIMEOUT_S = 900


def run_server(
    kind: Kind, model_dir: Path, flags: EngineFlags, hub: FakeHub, adapters: Adapters, profile: Profile,
    budget: int, log: Path,
) -> dict[str, Any]:  # fmt: skip
    # Started first, so its start does not share the CPU with the server's (scenario 0 times that); then idle
    # except for its scenario-1 rounds, which alternate with the server's (scenario 3 pairs them).
    env = {**os.environ, **OFFLINE_CONFIGS[PAIRED_BINDING], "PYTHONPATH": _python_path()}
    with _offline_spec(model_dir, flags, adapters, profile) as spec:
        with OfflineRounds(spec, env, log.with_suffix(".paired-offline.log")) as offline:
            with serve(kind, model_dir, flags, hub.url, adapters.all(), budget, log) as running:
                logger.info("%s healthy after %.1f s", kind, running.startup_s)
                return asyncio.run(run_all(running, hub, adapters, profile, offline))


@contextmanager
def _offline_spec(model_dir: Path, flags: EngineFlags, adapters: Adapters, profile: Profile) -> Iterator[Path]:
    """The offline engine's spec in a folder of its own, removed with what the engine wrote beside it."""
    spec = {
        "model_dir": str(model_dir),
        "engine": flags.kwargs(),
        "adapters": {repo: str(adapters.path(repo)) for repo in adapters.mixed},
        "requests": [asdict(r) for r in mixed_requests(profile, adapters)],
        "rounds": profile.mixed_rounds,
    }
    with tempfile.TemporaryDirectory(prefix="bench-offline.") as folder:
        path = Path(folder) / "spec.json"
        path.write_text(json.dumps(spec))
        yield path


def _python_path() -> str:
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def run_offline(model_dir: Path, flags: EngineFlags, adapters: Adapters, profile: Profile, log: Path) -> dict[str, Any]:
    """The offline engine in each core binding, one process each; its best ``output_tok_s`` is the limit."""
    configs: dict[str, Any] = {}
    with _offline_spec(model_dir, flags, adapters, profile) as spec:
        for name in profile.offline_bindings:
            binding = OFFLINE_CONFIGS[name]
            out = spec.parent / f"{name}.json"
            with log.with_suffix(f".{name}.log").open("wb") as sink:
                subprocess.run(
                    [sys.executable, "-m", "benchmarks.compare.offline", str(spec), str(out)],
                    stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **binding, "PYTHONPATH": _python_path()},
                    cwd=ROOT, check=True, timeout=OFFLINE_TIMEOUT_S, start_new_session=True,
                )  # fmt: skip
            configs[name] = json.loads(out.read_text())
    best = max(configs, key=lambda name: configs[name]["output_tok_s"])
    return {"best": best, "output_tok_s": configs[best]["output_tok_s"], "configs": configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small profile: one repetition, less work (< 5 min)")
    parser.add_argument("--repetitions", type=int, help="override the profile's number of repetitions")
    parser.add_argument("--arms", default="loraserve,vllm,offline", help="comma-separated subset, for debugging")
    parser.add_argument("--gpu-memory-utilization", type=float, default=EngineFlags.gpu_memory_utilization)
    parser.add_argument("--out", type=Path, default=_results.RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request drowns the progress
    profile = QUICK if args.quick else FULL
    if args.repetitions:
        profile = replace(profile, repetitions=args.repetitions)
    flags = EngineFlags(
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_loras=profile.lora_slots,
        max_cpu_loras=profile.cache_slots,
    )
    began = time.monotonic()
    commit = _results.git_commit()  # the code that ran, even if the tree changes before the end
    model_dir = embedded_model_dir(Path.home() / ".cache" / "loraserve")
    logs = Path(tempfile.mkdtemp(prefix="bench-logs."))
    runs: list[dict[str, Any]] = []
    # The adapters' folder goes at the end: every run left 0.7-1.9 GB in the temporary folder before.
    with FakeHub() as hub, tempfile.TemporaryDirectory(prefix="bench-adapters.") as made:
        adapters, size = publish(
            hub, model_dir, Path(made), profile.mixed_adapters, profile.cold_adapters, profile.churn_adapters
        )
        budget = int((profile.cache_slots + 0.5) * size)  # room for cache_slots adapters, not one more
        logger.info("%d adapters of %d bytes on the Hub at %s; logs in %s", len(adapters.all()), size, hub.url, logs)
        for rep, order in enumerate(report.schedule(profile.repetitions, args.arms.split(","))):
            for arm in order:
                logger.info("repetition %d: %s", rep + 1, arm)
                load = os.getloadavg()[0]  # other work on the machine shows here: a pair run under load is suspect
                log = logs / f"{rep}-{arm}.log"
                try:
                    if arm == "offline":
                        figures = run_offline(model_dir, flags, adapters, profile, log)
                    else:
                        figures = run_server(arm, model_dir, flags, hub, adapters, profile, budget, log)  # type: ignore[arg-type]
                except Exception as exc:  # one failed arm (e.g. RAM taken by other work) must not lose the rest
                    logger.exception("%s failed; its log: %s", arm, log)
                    figures = {"error": f"{type(exc).__name__}: {exc}"}
                runs.append({"arm": arm, "repetition": rep, "load_average_before": load, "figures": figures})
                logger.info("%s: %s", arm, json.dumps(_headline(figures)))
    report.derive(runs, budget)
    table = report.rows(runs)
    wall = time.monotonic() - began
    setup = {
        "profile": asdict(profile),
        "engine_flags": asdict(flags),
        "offline_bindings": OFFLINE_CONFIGS,
        "adapter_bytes": size,
        "loraserve_cache_budget_bytes": budget,
        "wall_s": wall,
    }
    saved = _results.save(f"compare-{profile.name}", {"git_commit": commit, "setup": setup, "runs": runs}, args.out)
    text = report.markdown(table)
    loads = ", ".join(f"{r['repetition'] + 1} {r['arm']} {r['load_average_before']:.1f}" for r in runs)
    (args.out / f"compare-{profile.name}.md").write_text(
        f"Profile `{profile.name}`, {profile.repetitions} repetition(s), {wall / 60:.1f} min; raw figures: "
        f"`{saved.name}`. Load average (1 min) before each run: {loads}.\n\n{text}"
    )
    machine = _results.machine()
    title = (
        f"loraserve vs vllm serve ({profile.name}; {machine['cpu_model']}, {machine['cpus']} cores; fp32 SmolLM2-135M)"
    )
    report.plot(table, runs, args.out / f"compare-{profile.name}.png", title)
    print(text)
    logger.info("done in %.1f min; %s", wall / 60, saved)


def _headline(figures: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "startup_s",
        "output_tok_s",
        "configs.default_binding.output_tok_s",
        "configs.all_cores.output_tok_s",
        "mixed.output_tok_s",
        "mixed.ttft_p50_s",
        "lora_cost.adapters_over_base_tok_s",
    )
    return {key: round(value, 3) for key in keys if (value := report.lookup(figures, key)) is not None}


if __name__ == "__main__":
    main()
