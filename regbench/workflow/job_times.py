"""Where a run's time went: the wall time of every job, from Snakemake's benchmark records.

Every rule writes ``results/benchmarks/<the job's log path>.tsv`` (its ``benchmark:`` directive). Only the wall time
(column ``s``) is read: Snakemake samples CPU time and memory every few seconds, so a job of a few seconds has none.
A job of the default run uses one thread, so its wall time is its core-seconds.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from regbench.io import InputError

def job_step(path: Path) -> str:
    """A job's step: its record's stem, a per-target form folded into its step (aggregate_on_<target> -> aggregate)."""
    return path.stem.split("_on_")[0]


def read_job_times(results: str | Path) -> pd.DataFrame:
    """One row a job of ``results/benchmarks``: ``job`` (the record's path there, without .tsv), ``step`` and
    ``wall_s``. An unreadable record is an :class:`InputError` naming it."""
    folder = Path(results) / "benchmarks"
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        try:
            record = pd.read_csv(path, sep="\t")
            wall = float(record["s"].iloc[0])
        except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, IndexError, ValueError) as err:
            raise InputError(f"{path}: not a Snakemake benchmark record with a wall time column 's' ({err})") from err
        rows.append({"job": path.relative_to(folder).with_suffix("").as_posix(), "step": job_step(path),
                     "wall_s": wall})
    return pd.DataFrame(rows, columns=["job", "step", "wall_s"])


def time_by_step(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per step, the most time first: ``jobs``, ``wall_s`` (summed over its jobs) and ``share`` of all jobs' time."""
    table = jobs.groupby("step").agg(jobs=("job", "size"), wall_s=("wall_s", "sum"))
    table["share"] = table["wall_s"] / table["wall_s"].sum()
    return table.sort_values("wall_s", ascending=False)


def time_sentence(jobs: pd.DataFrame, run_wall_s: float, cores: int) -> str:
    """One sentence for the README: all jobs' time, how busy the cores were, and each step's part."""
    if jobs.empty:
        return ""
    steps = time_by_step(jobs)
    total = steps["wall_s"].sum()
    parts = ", ".join(f"{step} {row.wall_s:.0f} s ({row.jobs:.0f} job{'' if row.jobs == 1 else 's'}, {row.share:.0%})"
                      for step, row in steps.iterrows())
    return (f"Where the time went (Snakemake's benchmark records, results/benchmarks/): {total:.0f} s of job time in "
            f"all, {total / (run_wall_s * cores):.0%} of {cores} cores' wall time: {parts}.")
