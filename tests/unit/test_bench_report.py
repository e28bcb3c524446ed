"""The benchmark harness's pure parts: the Zipf workload, the per-pair ratio maths, the Markdown table."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
from benchmarks.compare.report import (
    OFFLINE,
    OURS,
    THEIRS,
    Goal,
    Metric,
    derive,
    geomean,
    markdown,
    pair_ratios,
    rows,
    schedule,
)
from benchmarks.compare.scenarios import alternating, median_round
from benchmarks.compare.servers import disk_bytes
from benchmarks.compare.workload import (
    BASE,
    BatchFigures,
    Timed,
    on_models,
    percentile,
    summarize,
    zipf_requests,
    zipf_weights,
)


def test_zipf_weights_fall_as_one_over_rank() -> None:
    assert zipf_weights(4) == [1.0, 0.5, pytest.approx(1 / 3), 0.25]
    assert zipf_weights(3, alpha=2) == [1.0, 0.25, pytest.approx(1 / 9)]


def test_the_same_seed_gives_the_same_requests_for_every_arm() -> None:
    models = [BASE, "a", "b", "c"]
    assert zipf_requests(models, 50, 8, seed=1) == zipf_requests(models, 50, 8, seed=1)
    assert zipf_requests(models, 50, 8, seed=1) != zipf_requests(models, 50, 8, seed=2)


def test_zipf_requests_favour_the_first_model_and_have_distinct_prompts() -> None:
    requests = zipf_requests([BASE, "a", "b", "c", "d"], 2000, 8, seed=3)
    counts = Counter(r.model for r in requests)
    assert counts[BASE] > counts["a"] > counts["d"]
    assert counts[BASE] / len(requests) == pytest.approx(1 / sum(zipf_weights(5)), abs=0.04)
    assert len({r.prompt for r in requests}) == len(requests)
    assert {r.max_tokens for r in requests} == {8}


def test_on_models_keeps_prompts_and_spreads_models_round_robin() -> None:
    work = zipf_requests([BASE, "a"], 5, 4, seed=1)
    moved = on_models(work, ["x", "y"])
    assert [r.model for r in moved] == ["x", "y", "x", "y", "x"]
    assert [r.prompt for r in moved] == [r.prompt for r in work]


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_summarize_counts_tokens_over_the_batch_wall_time_and_skips_failures() -> None:
    timed = [
        Timed("a", 200, sent=0.0, first=1.0, done=4.0, tokens=4),
        Timed("b", 200, sent=0.0, first=2.0, done=3.0, tokens=3),
        Timed("c", 500, sent=0.5),
    ]
    figures = summarize(timed)
    assert (figures.requests, figures.ok, figures.output_tokens) == (3, 2, 7)
    assert figures.wall_s == 4.0 and figures.output_tok_s == 7 / 4 and figures.requests_s == 0.5
    assert figures.ttft_p50_s == 1.5
    assert figures.itl_p50_s == pytest.approx((1.0 + 0.5) / 2)
    assert figures.statuses == {"200": 2, "500": 1}


def test_alternating_rounds_swap_which_arm_runs_first() -> None:
    assert alternating(("base", "adapters"), 3) == [("base", "adapters"), ("adapters", "base"), ("base", "adapters")]
    assert alternating(("base", "adapters"), 1) == [("base", "adapters")]


def test_the_median_round_is_a_real_round_and_the_lower_middle_for_an_even_count() -> None:
    def batch(tok_s: float) -> BatchFigures:
        return summarize([Timed("a", 200, sent=0.0, first=0.5, done=1.0, tokens=int(tok_s))])

    rounds = [batch(30), batch(10), batch(20)]
    assert median_round(rounds) is rounds[2]
    assert median_round(rounds[:2]) is rounds[1]


def _run(arm: str, rep: int, **figures: object) -> dict[str, object]:
    return {"arm": arm, "repetition": rep, "figures": figures}


RUNS = [
    _run(OURS, 0, mixed={"output_tok_s": 20.0, "ttft_p50_s": 2.0}),
    _run(THEIRS, 0, mixed={"output_tok_s": 10.0, "ttft_p50_s": 4.0}),
    _run(OFFLINE, 0, output_tok_s=25.0),
    _run(THEIRS, 1, mixed={"output_tok_s": 40.0, "ttft_p50_s": 1.0}),
    _run(OURS, 1, mixed={"output_tok_s": 20.0, "ttft_p50_s": 2.0}),
    _run(OFFLINE, 1, output_tok_s=20.0),
]


def test_ratios_are_taken_within_a_repetition_and_combined_by_geometric_mean() -> None:
    ratios = pair_ratios(RUNS, "mixed.output_tok_s")
    assert ratios == [2.0, 0.5]
    assert geomean(ratios) == pytest.approx(1.0)  # an arithmetic mean would claim 1.25
    assert geomean([]) is None
    assert math.isclose(geomean([2.0, 8.0]) or 0, 4.0)


def test_a_repetition_missing_an_arm_gives_no_ratio() -> None:
    assert pair_ratios([*RUNS[:3], RUNS[3]], "mixed.output_tok_s") == [2.0]


def test_derive_divides_each_server_by_the_offline_engine_of_its_own_repetition() -> None:
    runs = [dict(run, figures=dict(run["figures"])) for run in RUNS]  # type: ignore[call-overload]
    derive(runs, cache_budget=1000)
    by = {(r["arm"], r["repetition"]): r["figures"] for r in runs}
    assert by[(OURS, 0)]["facade"]["over_offline_tok_s"] == pytest.approx(0.8)
    assert by[(OURS, 1)]["facade"]["over_offline_tok_s"] == pytest.approx(1.0)
    assert by[(THEIRS, 1)]["facade"]["over_offline_tok_s"] == pytest.approx(2.0)


def test_goals_apply_to_the_ratio_or_to_loraserve_alone() -> None:
    metrics = (
        Metric("1", "tok/s", "mixed.output_tok_s", "tok/s", "higher", Goal("ratio", ">=", 1.10)),
        Metric("1", "TTFT", "mixed.ttft_p50_s", "s", "lower", Goal("loraserve", "<=", 2.0)),
    )
    tok, ttft = rows(RUNS, metrics)
    assert tok.ours == [20.0, 20.0] and tok.theirs == [10.0, 40.0]
    assert tok.goal_met is False  # ratio 1.0
    assert ttft.goal_met is True
    assert ttft.advantage() == pytest.approx(1.0)


def test_markdown_table_has_a_line_per_metric_with_each_pairs_ratio() -> None:
    metric = Metric("1 mixed", "output tok/s", "mixed.output_tok_s", "tok/s", "higher", Goal("ratio", ">=", 1.1))
    text = markdown(rows(RUNS, (metric,)))
    lines = text.strip().splitlines()
    assert lines[0].startswith("| scenario | metric | loraserve | vllm serve |")
    assert len(lines) == 3
    assert (
        lines[2] == "| 1 mixed | output tok/s | 20.00 tok/s | 25.00 tok/s | 1.00 (2.00, 0.50) | ratio ≥ 1.1 | **no** |"
    )


def test_arms_run_forwards_then_backwards() -> None:
    assert schedule(3, ["a", "b", "c"]) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]


def test_disk_bytes_counts_regular_files_once_and_not_the_hf_caches_symlinks(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"x" * 100)
    snapshot = tmp_path / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    (snapshot / "adapter_model.safetensors").symlink_to(blob)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "moved-mid-walk").hardlink_to(blob)  # the same file met twice, as a rename during the walk does
    assert disk_bytes(tmp_path) == 102
    assert disk_bytes(tmp_path / "missing") == 0


def test_disk_bytes_passes_over_a_folder_removed_during_the_walk_and_skips_what_it_is_told(tmp_path: Path) -> None:
    (tmp_path / "entry.bin").write_bytes(b"x" * 10)
    (tmp_path / "key.lock").write_text("")
    (tmp_path / "meta.json").write_text("{}")
    gone = tmp_path / "tmp" / "key.incomplete"
    gone.mkdir(parents=True)
    (gone / "part").write_bytes(b"y" * 5)

    def skip(name: str) -> bool:
        # The walk reads the top folder's files before it descends: the server renames the download away now.
        shutil.rmtree(gone, ignore_errors=True)
        return name.endswith(".lock") or name == "meta.json"

    assert disk_bytes(tmp_path, skip=skip) == 10
