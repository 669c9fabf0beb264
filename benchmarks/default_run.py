"""The default benchmark's budget: wall time of `snakemake --cores all` from nothing, twice.

Prints the wall time of each run, the mean test Dice of every method (and VoxelMorph's gain over no
registration), and whether the two runs' leaderboard.csv files are identical apart from timing and
memory columns. Each run starts in an empty working directory, as on a clean clone.

    python benchmarks/default_run.py [--configfile config/config.yaml] [--runs 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from regbench.evaluation.aggregate import TIMING_COLUMNS as TIMING_PREFIXES

ROOT = Path(__file__).resolve().parents[1]


def run_once(workdir: Path, configfile: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "-s", str(ROOT / "Snakefile"),
                    "--directory", str(workdir), "--configfile", str(configfile), "--quiet", "all"],
                   check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    boards = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            workdir = Path(tmp) / f"run{run}"
            workdir.mkdir()
            seconds = run_once(workdir, args.configfile.resolve())
            print(f"run {run + 1}: snakemake --cores all took {seconds:.1f} s")
            for board_path in sorted((workdir / "results").glob("*/leaderboard.csv")):
                board = pd.read_csv(board_path)
                boards.append((board_path.parent.name, run, board))
                dice = board.set_index("method")["dice_mean"]
                print(f"  {board_path.parent.name}: " + ", ".join(f"{m} {d:.4f}" for m, d in dice.items()))
                if {"identity", "voxelmorph"} <= set(dice.index):
                    print(f"  voxelmorph - identity mean Dice: {dice['voxelmorph'] - dice['identity']:+.4f}")
    if args.runs > 1:
        by_dataset: dict[str, list[pd.DataFrame]] = {}
        for dataset, _, board in boards:
            by_dataset.setdefault(dataset, []).append(board)
        for dataset, runs in by_dataset.items():
            keep = [c for c in runs[0].columns if not c.startswith(TIMING_PREFIXES)]
            same = all(r[keep].equals(runs[0][keep]) for r in runs[1:])
            print(f"{dataset}: leaderboards identical apart from timings: {same}")


if __name__ == "__main__":
    main()
