"""From the runs to the comparison: per-pair ratios, the Markdown table and the plot.

A run is one arm started once: ``{"arm": "loraserve" | "vllm" | "offline", "repetition": i, "figures": {...}}``.
Arms of one repetition ran back to back, so a ratio is taken within a repetition (a pair) and the pairs'
ratios are combined by geometric mean: machine drift between repetitions cancels instead of adding noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OURS, THEIRS, OFFLINE = "loraserve", "vllm", "offline"
Run = dict[str, Any]


@dataclass(frozen=True)
class Goal:
    """The issue's target: on the ratio loraserve ÷ vllm serve, or on loraserve's own figure."""

    on: Literal["ratio", "loraserve"]
    op: Literal[">=", "<=", "=="]
    target: float

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        if self.op == ">=":
            return value >= self.target
        if self.op == "<=":
            return value <= self.target
        return value == self.target

    def __str__(self) -> str:
        subject = "ratio" if self.on == "ratio" else "loraserve"
        return f"{subject} {self.op.replace('==', '=').replace('>=', '≥').replace('<=', '≤')} {self.target:g}"


@dataclass(frozen=True)
class Metric:
    scenario: str
    label: str
    key: str  # dotted path into a server run's figures
    unit: str  # "tok/s", "s", "x", "MB", "n", "req/s"
    better: Literal["higher", "lower"] | None  # None: shown, not compared
    goal: Goal | None = None


METRICS: tuple[Metric, ...] = (
    Metric("0 start", "engine start to /health", "startup_s", "s", "lower"),
    Metric("1 mixed", "output tok/s", "mixed.output_tok_s", "tok/s", "higher", Goal("ratio", ">=", 1.10)),
    Metric("1 mixed", "requests/s", "mixed.requests_s", "req/s", "higher"),
    Metric("1 mixed", "TTFT p50", "mixed.ttft_p50_s", "s", "lower", Goal("ratio", "<=", 0.8)),
    Metric("1 mixed", "TTFT p99", "mixed.ttft_p99_s", "s", "lower"),
    Metric("1 mixed", "inter-token latency p50", "mixed.itl_p50_s", "s", "lower"),
    Metric("2 LoRA cost", "all base: output tok/s", "lora_cost.base.output_tok_s", "tok/s", "higher"),
    Metric("2 LoRA cost", "adapters (as many as slots): tok/s", "lora_cost.adapters.output_tok_s", "tok/s", "higher"),
    Metric(
        "2 LoRA cost",
        "adapters ÷ base, tok/s",
        "lora_cost.adapters_over_base_tok_s",
        "x",
        "higher",
        Goal("loraserve", ">=", 0.90),
    ),
    Metric("2 LoRA cost", "adapters ÷ base, TTFT p50", "lora_cost.adapters_over_base_ttft_p50", "x", "lower"),
    Metric("2 LoRA cost", "2× more adapters than slots: tok/s", "lora_cost.over_slots.output_tok_s", "tok/s", "higher"),
    Metric("2 LoRA cost", "2× more adapters than slots ÷ base", "lora_cost.over_slots_over_base_tok_s", "x", "higher"),
    Metric("3 facade", "offline engine, own process: output tok/s", "facade.offline_tok_s", "tok/s", None),
    Metric("3 facade", "server ÷ offline in own process, tok/s", "facade.over_offline_tok_s", "x", "higher"),
    Metric("3 facade", "offline engine beside the server: tok/s", "mixed.paired_offline.output_tok_s", "tok/s", None),
    Metric(
        "3 facade",
        "server ÷ offline, paired rounds, tok/s",
        "mixed.paired_offline.over_offline_tok_s",
        "x",
        "higher",
        Goal("loraserve", ">=", 0.95),
    ),
    Metric(
        "4 cold start",
        "TTFT, adapter from the Hub",
        "cold_start.from_hub_ttft_s",
        "s",
        "lower",
        Goal("ratio", "<=", 1.0),
    ),
    Metric(
        "4 cold start",
        "TTFT, adapter on disk, not in engine",
        "cold_start.from_disk_ttft_s",
        "s",
        "lower",
        Goal("ratio", "<=", 1.0),
    ),
    Metric("4 cold start", "TTFT, adapter warm", "cold_start.warm_ttft_s", "s", "lower"),
    Metric(
        "5 single flight",
        "downloads for 16 first requests",
        "single_flight.downloads",
        "n",
        "lower",
        Goal("loraserve", "==", 1),
    ),
    Metric("5 single flight", "time until all answered", "single_flight.wall_s", "s", "lower"),
    Metric("6 churn", "warm adapters: requests/s", "churn.warm.requests_s", "req/s", "higher"),
    Metric("6 churn", "churning adapters: requests/s", "churn.churn.requests_s", "req/s", "higher"),
    Metric(
        "6 churn",
        "churn ÷ warm, requests/s",
        "churn.churn_over_warm_requests_s",
        "x",
        "higher",
        Goal("loraserve", ">=", 0.85),
    ),
    Metric("6 churn", "adapter disk, peak", "churn.disk_peak_bytes", "MB", "lower"),
    Metric("6 churn", "adapter disk budget", "churn.disk_budget_bytes", "MB", None),
)


@dataclass
class Row:
    metric: Metric
    ours: list[float] = field(default_factory=list)  # one per repetition that measured it
    theirs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # ours ÷ theirs, per pair

    @property
    def ratio(self) -> float | None:
        return geomean(self.ratios)

    @property
    def goal_met(self) -> bool | None:
        goal = self.metric.goal
        if goal is None:
            return None
        return goal.met(self.ratio if goal.on == "ratio" else _median(self.ours))

    def advantage(self) -> float | None:
        """The ratio turned so that above 1 means loraserve is better (what the plot shows)."""
        if self.ratio is None or self.metric.better is None or self.ratio <= 0:
            return None
        return self.ratio if self.metric.better == "higher" else 1 / self.ratio


def lookup(figures: dict[str, Any], key: str) -> float | None:
    value: Any = figures
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def geomean(values: Sequence[float]) -> float | None:
    positive = [v for v in values if v > 0]
    if not positive or len(positive) != len(values):
        return _median(values) if values else None  # a zero or negative ratio: the geometric mean means nothing
    return math.exp(sum(math.log(v) for v in positive) / len(positive))


def schedule(repetitions: int, arms: list[str]) -> list[list[str]]:
    """Arm order per repetition: forwards, then backwards (A B C, C B A, …), so a linear drift cancels in pairs."""
    return [arms if rep % 2 == 0 else arms[::-1] for rep in range(repetitions)]


def pairs(runs: Sequence[Run], a: str, b: str) -> list[tuple[Run, Run]]:
    """Runs of arms ``a`` and ``b`` from the same repetition, in repetition order."""
    by_rep: dict[int, dict[str, Run]] = {}
    for run in runs:
        by_rep.setdefault(run["repetition"], {})[run["arm"]] = run
    return [(arms[a], arms[b]) for _, arms in sorted(by_rep.items()) if a in arms and b in arms]


def pair_ratios(runs: Sequence[Run], key: str, a: str = OURS, b: str = THEIRS) -> list[float]:
    ratios = []
    for run_a, run_b in pairs(runs, a, b):
        x, y = lookup(run_a["figures"], key), lookup(run_b["figures"], key)
        if x is not None and y:
            ratios.append(x / y)
    return ratios


def derive(runs: Sequence[Run], cache_budget: int) -> None:
    """Add the figures that need another arm (scenario 3) or the set-up (the disk budget) to each server run."""
    for arm in (OURS, THEIRS):
        for server, offline in pairs(runs, arm, OFFLINE):
            ours = lookup(server["figures"], "mixed.output_tok_s")
            limit = lookup(offline["figures"], "output_tok_s")
            server["figures"]["facade"] = {
                "offline_tok_s": limit,
                "over_offline_tok_s": ours / limit if ours is not None and limit else None,
            }
    for run in runs:
        if run["arm"] == OURS and "churn" in run["figures"]:
            run["figures"]["churn"]["disk_budget_bytes"] = cache_budget  # vllm serve has none: its HF cache grows


def rows(runs: Sequence[Run], metrics: Sequence[Metric] = METRICS) -> list[Row]:
    table = []
    for metric in metrics:
        row = Row(metric)
        for run in sorted(runs, key=lambda r: r["repetition"]):
            value = lookup(run["figures"], metric.key)
            if value is not None and run["arm"] == OURS:
                row.ours.append(value)
            elif value is not None and run["arm"] == THEIRS:
                row.theirs.append(value)
        if metric.better is not None:
            row.ratios = pair_ratios(runs, metric.key)
        table.append(row)
    return table


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "MB":
        return f"{value / 1e6:.1f} MB"
    if unit == "n":
        return f"{value:g}"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "x":
        return f"{value:.2f}×"
    return f"{value:.2f} {unit}"


def markdown(table: Sequence[Row]) -> str:
    """One line per metric: each arm's median over repetitions, the ratio (geometric mean of the pairs'), the goal."""
    lines = [
        "| scenario | metric | loraserve | vllm serve | loraserve ÷ vllm serve (per pair) | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        m = row.metric
        if row.ratio is None:
            ratio = "–"
        else:
            ratio = f"{row.ratio:.2f}" + (
                f" ({', '.join(f'{r:.2f}' for r in row.ratios)})" if len(row.ratios) > 1 else ""
            )
        met = {True: "yes", False: "**no**", None: ""}[row.goal_met]
        lines.append(
            f"| {m.scenario} | {m.label} | {fmt(_median(row.ours), m.unit)} | {fmt(_median(row.theirs), m.unit)} "
            f"| {ratio} | {m.goal or ''} | {met} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: Sequence[Row], runs: Sequence[Run], path: Path, title: str) -> None:
    """Left: loraserve's advantage per compared metric (above 1 = better), each pair a dot. Right: tok/s per arm."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compared = [row for row in table if row.advantage() is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.42 * len(compared) + 2), width_ratios=(3, 2))
    labels = [f"{row.metric.scenario}: {row.metric.label}" for row in compared]
    ys = list(range(len(compared)))[::-1]
    for y, row in zip(ys, compared, strict=True):
        advantage = row.advantage() or 1.0
        left.barh(y, advantage - 1, left=1, color="tab:green" if advantage >= 1 else "tab:red", alpha=0.7)
        points = [r if row.metric.better == "higher" else 1 / r for r in row.ratios if r > 0]
        left.plot(points, [y] * len(points), "k.", markersize=5)
    left.axvline(1, color="black", linewidth=0.8)
    left.set_xscale("log", base=2)
    low, high = left.get_xlim()
    left.set_xticks([t for t in (0.25, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 8, 16) if low <= t <= high])
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.set_yticks(ys, labels, fontsize=8)
    left.set_xlabel("loraserve advantage over vllm serve (×; >1 = loraserve better; dots = pairs)")

    groups = [("1 mixed", "mixed.output_tok_s", "output_tok_s"), ("2 all base", "lora_cost.base.output_tok_s", None),
              ("2 all adapters", "lora_cost.adapters.output_tok_s", None)]  # fmt: skip
    width = 0.27
    arms = (
        (OURS, "loraserve", "tab:blue"),
        (THEIRS, "vllm serve", "tab:orange"),
        (OFFLINE, "offline engine", "tab:gray"),
    )
    for i, (arm, name, color) in enumerate(arms):
        values = []
        for _, key, offline_key in groups:
            found = [
                lookup(r["figures"], offline_key if arm == OFFLINE and offline_key else key)
                for r in runs
                if r["arm"] == arm
            ]
            values.append(_median([v for v in found if v is not None]) or 0.0)
        right.bar([x + (i - 1) * width for x in range(len(groups))], values, width, label=name, color=color)
    right.set_xticks(range(len(groups)), [g[0] for g in groups])
    right.set_ylabel("output tokens/s (median over repetitions)")
    right.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
