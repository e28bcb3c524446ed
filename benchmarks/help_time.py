"""How long `loraserve … --help` takes to answer, from process start to exit.

Runs each help command several times through the installed console script
(next to this interpreter), prints the median and the fastest, and saves the
figures as JSON under benchmarks/results/. Help on loraserve's own flags must
not load vLLM; help on one of vLLM's groups does, and is timed for contrast.

    .venv/bin/python benchmarks/help_time.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COMMANDS = [
    ["--help"],
    ["serve", "--help"],
    ["serve", "--help=loraserve"],
    ["--help=loraserve"],
    ["serve", "--help=LoRAConfig"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    loraserve = str(Path(sys.executable).with_name("loraserve"))
    figures = []
    for command in COMMANDS:
        seconds = []
        for _ in range(args.runs):
            started = time.perf_counter()
            result = subprocess.run([loraserve, *command], capture_output=True, text=True, check=False)
            seconds.append(time.perf_counter() - started)
            if result.returncode != 0 or result.stderr:
                raise SystemExit(f"`loraserve {' '.join(command)}` failed or logged: {result.stderr[-2000:]}")
        figure = {
            "command": "loraserve " + " ".join(command),
            "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3),
            "lines": len(result.stdout.splitlines()),
        }
        figures.append(figure)
        print(f"{figure['command']:<40} median {figure['median_s']:6.2f} s   min {figure['min_s']:6.2f} s")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"help_time-{int(time.time())}.json"
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    out.write_text(json.dumps({"machine": machine, "runs": args.runs, "figures": figures}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
