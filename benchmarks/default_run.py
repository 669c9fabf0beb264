"""The default benchmark's budget: wall time of `snakemake --cores all` from nothing, and the README's figures.

Prints the machine's speed before and after the runs (the median time of a VoxelMorph training step, one thread:
the same work's wall time moves with it), the wall time of each run and where it went (each step's job time, from
Snakemake's benchmark records: regbench.workflow.job_times), the mean test Dice of every method with its bootstrap
interval and rank, and, with --runs 2, whether the two runs' leaderboard.csv files are identical apart from timing
columns.
Each run starts in an empty working directory, as on a clean clone. With --readme, the figures table of the
README (between its <!-- default-run --> markers) is rewritten from the first run's leaderboard, with the
commit and the wall time that produced it: the README's numbers are always a run's, never typed in. Where the
config evaluates the runs on other datasets (``evaluate_on``), the generalization table of the first dataset is
written between the <!-- default-run-generalization --> markers the same way.

    python benchmarks/default_run.py [--configfile config/config.yaml] [--runs 1] [--readme README.md] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from regbench.evaluation.aggregate import TIMING_COLUMNS, method_label, rank_text
from readme_figures import write_between_markers
from regbench.runtime import git_commit
from regbench.workflow.job_times import read_job_times, time_by_step, time_sentence

ROOT = Path(__file__).resolve().parents[1]


def run_once(workdir: Path, configfile: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "-s", str(ROOT / "Snakefile"),
                    "--directory", str(workdir), "--configfile", str(configfile), "--quiet", "all"],
                   check=True)
    return time.perf_counter() - start


def reference_step_ms(steps: int = 30) -> float:
    """The machine's speed at the time, in ms: the median of ``steps`` training steps of VoxelMorph's quick recipe on a
    fixed 176 x 176 grid (embedded2d's; one thread, a synthetic batch, memory_format.py's step), after two of warm-up.

    The same work whatever the config: measured before and after the run, it tells a slow machine from slow code.
    On a shared 2-core machine this step's time can change by a third within an hour, and the default run's wall
    time moves with it."""
    import statistics

    import torch

    from memory_format import step_in_layout
    from regbench import plugins

    torch.set_num_threads(1)
    method = plugins.load_method("voxelmorph")
    grid = {"ndim": 2, "shape": (176, 176), "spacing": (1.0, 1.0), "labels": 4}
    layout = torch.channels_last if method.channels_last else torch.contiguous_format
    step, _ = step_in_layout(method, method.recipe("quick"), grid, layout)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def figures_table(board: pd.DataFrame, seconds: float, commit: str, configfile: Path,
                  reference_ms: tuple[float, float] | None = None, time_note: str = "") -> str:
    """The README's table: rank with its interval, method, what it learned from, Dice mean ± std and its interval,
    folding, runtime per pair and training time, and a line saying what produced it (``time_note``: where the run's
    time went, regbench.workflow.job_times.time_sentence)."""
    lines = ["| rank | method | learns from | Dice | Dice 95 % CI | p vs identity | folds (%) | runtime (s) | training (s) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for _, row in board.iterrows():
        train = "–" if pd.isna(row.get("train_time_s")) else f"{row['train_time_s']:.0f}"
        p = row.get("dice_p_vs_identity", float("nan"))
        p_text = "–" if pd.isna(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")
        lines.append(f"| {rank_text(row)} | {method_label(row)} | {row['supervision']} | "
                     f"{row['dice_mean']:.3f} ± {row['dice_std']:.3f} | "
                     f"{row['dice_ci_low']:.3f} to {row['dice_ci_high']:.3f} | {p_text} | {row['fold_pct_mean']:.3f} | "
                     f"{row['runtime_s_mean']:.3f} | {train} |")
    seeds = int(board["n_seeds"].max())
    lines.append("")
    lines.append(f"Measured by `python benchmarks/default_run.py --readme README.md` at commit `{commit[:12]}` "
                 f"(`{configfile.relative_to(ROOT) if configfile.is_relative_to(ROOT) else configfile}`, "
                 f"{seeds} seeds, {int(board['n_pairs'].max())} test pairs): {seconds / 60:.1f} min of wall time on "
                 f"this machine's CPU, from nothing"
                 + (f" (the machine's speed then: a VoxelMorph training step of {reference_ms[0]:.1f} ms before the "
                    f"run and {reference_ms[1]:.1f} ms after it, one thread)" if reference_ms else "")
                 + f". p vs identity: paired Wilcoxon signed-rank test of the seed-averaged "
                 f"test Dice against no registration, Holm-corrected over every pair of methods "
                 f"(leaderboard.csv's dice_p_vs_identity, from stats.csv). "
                 f"Training time: mean over the seeds, one thread. " + (time_note + " " if time_note else "")
                 + identity_verdict(board))
    return "\n".join(lines)


def identity_verdict(board: pd.DataFrame) -> str:
    """Which learned rows do not beat no registration (a higher mean Dice and Holm p < 0.05: the leaderboard's
    dice_beats_identity), or that every one does."""
    if "dice_beats_identity" not in board:
        return ""
    learned = board[board["supervision"] != "classical"]
    beats = learned["dice_beats_identity"].eq(True)   # NaN (no test) does not beat it
    behind = [method_label(row) for _, row in learned[~beats].iterrows()]
    if not behind:
        return f"Every learned method ({len(learned)}) beats no registration (a higher mean Dice with p < 0.05)."
    return (f"Learned methods that do not beat no registration here (a higher mean Dice with p < 0.05): "
            f"{', '.join(behind)}.")


def generalization_figures(table: pd.DataFrame, commit: str, configfile: Path) -> str:
    """The README's generalization table (regbench.evaluation.generalization.markdown_table) and what produced it."""
    from regbench.evaluation.generalization import markdown_table

    home = table["trained_on"].iloc[0]
    return (markdown_table(table) + "\n\n"
            f"Measured by `python benchmarks/default_run.py --readme README.md` at commit `{commit[:12]}` "
            f"(`{configfile.relative_to(ROOT) if configfile.is_relative_to(ROOT) else configfile}`): every run "
            f"trained on {home}, on its own test pairs and on each target's; classical methods register each target "
            f"directly with {home}'s tuned values. Dice: mean over the seed-averaged test pairs (95 % bootstrap "
            f"interval); drop: in-domain mean minus the target's (positive: worse there), with its interval; rank: "
            f"among these methods on the target (results/{home}/generalization.csv).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--readme", type=Path, help="rewrite this README's figures table from the first run")
    parser.add_argument("--keep", type=Path, help="run in <keep>/run<k> (new, empty folders) and keep what they hold")
    args = parser.parse_args()
    boards, seconds, generalization, time_note = [], [], None, ""
    commit = git_commit(ROOT)
    reference = [reference_step_ms()]
    print(f"reference: a VoxelMorph training step takes {reference[0]:.1f} ms (median, one thread)")
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            workdir = (args.keep.resolve() if args.keep else Path(tmp)) / f"run{run}"
            workdir.mkdir(parents=True)   # an existing folder is an error: each run starts from nothing
            seconds.append(run_once(workdir, args.configfile.resolve()))
            print(f"run {run + 1}: snakemake --cores all took {seconds[-1]:.1f} s")
            jobs = read_job_times(workdir / "results")
            print(time_by_step(jobs).round({"wall_s": 1, "share": 3}).to_string())
            if run == 0:
                time_note = time_sentence(jobs, seconds[0], len(os.sched_getaffinity(0)))
            for board_path in sorted((workdir / "results").glob("*/leaderboard.csv")):
                board = pd.read_csv(board_path)
                boards.append((board_path.parent.name, run, board))
                for _, row in board.iterrows():
                    print(f"  {board_path.parent.name}: {rank_text(row):>9} {method_label(row):34s} "
                          f"Dice {row['dice_mean']:.4f} [{row['dice_ci_low']:.4f}, {row['dice_ci_high']:.4f}] "
                          f"seed std {row['dice_seed_std']:.4f} ({row['supervision']})")
            tables = sorted((workdir / "results").glob("*/generalization.csv"))
            if run == 0 and tables:
                generalization = pd.read_csv(tables[0])
                print(generalization[["method", "evaluated_on", "dice_mean", "dice_drop", "rank"]].to_string(index=False))
    reference.append(reference_step_ms())
    print(f"reference after the runs: a VoxelMorph training step takes {reference[1]:.1f} ms")
    if args.runs > 1:
        by_dataset: dict[str, list[pd.DataFrame]] = {}
        for dataset, _, board in boards:
            by_dataset.setdefault(dataset, []).append(board)
        for dataset, runs in by_dataset.items():
            keep = [c for c in runs[0].columns if not c.startswith(TIMING_COLUMNS)]
            same = all(r[keep].equals(runs[0][keep]) for r in runs[1:])
            print(f"{dataset}: leaderboards identical apart from timings: {same}")
    if args.readme:
        write_between_markers(args.readme, "default-run",
                              figures_table(boards[0][2], seconds[0], commit, args.configfile.resolve(),
                                            tuple(reference), time_note))
        if generalization is not None:
            write_between_markers(args.readme, "default-run-generalization",
                                  generalization_figures(generalization, commit, args.configfile.resolve()))
        print(f"wrote the figures of run 1 into {args.readme}")


if __name__ == "__main__":
    main()
