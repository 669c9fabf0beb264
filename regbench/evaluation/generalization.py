"""Does a trained network still work on data unlike its training set? results/<dataset>/generalization.csv.

The runs trained on a dataset (config ``evaluate_on``) also register other datasets' test pairs; rule aggregate_on
joins each target's scores like the dataset's own (results/<dataset>/on_<target>/leaderboard.csv, scores.csv: each
pair's score averaged over the seeds, bootstrap intervals over pairs and seeds, ranks). This module puts them side
by side: one row per method and dataset it was scored on (the training dataset first, ``in_domain``), with

- ``dice_mean``, ``dice_std``, ``dice_seed_std``, ``dice_ci_low``, ``dice_ci_high``, ``rank``, ``rank_low``,
  ``rank_high``, ``n_pairs``, ``n_seeds``, and the means of ``hd95``, ``fold_pct`` and ``epe``, as on that dataset's
  leaderboard (methods ranked among themselves on the same pairs);
- ``dice_drop``: the in-domain mean Dice minus this one (positive: the method does worse here), with a 95 % bootstrap
  interval (``dice_drop_ci_low``, ``_high``; :func:`regbench.evaluation.uncertainty.bootstrap_difference`: a
  replicate draws the seeds once for both datasets, the pairs of each on their own);
- ``pair_mi``: the mean over the scored dataset's test pairs of MI(i; s) in bits (the prepared pairs.csv,
  :mod:`regbench.evaluation.information`), how much its intensities say about its labels.

Classical methods (no training) are registered on the target directly, with the values tuned on the training
dataset: their drop says how much harder the target is for a method that did not learn from the training data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from regbench.evaluation import uncertainty
from regbench.evaluation.aggregate import method_label, rank_text
from regbench.io import InputError, read_json, write_csv
from regbench.layout import target_dir

#: per dataset scored on: leaderboard columns copied as they are
BOARD_COLUMNS = ("supervision", "moving_contrast", "n_pairs", "n_seeds", "dice_mean", "dice_std", "dice_seed_std",
                 "dice_ci_low", "dice_ci_high", "rank", "rank_low", "rank_high", "hd95_mean", "fold_pct_mean",
                 "epe_mean")


def mean_test_pair_mi(prepared_dir) -> float:
    """Mean MI(i; s) over a prepared dataset's test pairs, bits (NaN where the prepare step did not record it)."""
    path = Path(prepared_dir) / "pairs.csv"
    if not path.exists():
        return float("nan")
    pairs = pd.read_csv(path)
    if "intensity_label_mi" not in pairs:
        return float("nan")
    values = pairs.loc[pairs["split"] == "test", "intensity_label_mi"]
    return float(values.mean()) if len(values) else float("nan")


def generalization(results_dir, dataset_id: str, targets: list[str], data_dir="data", resamples: int = 1000,
                   bootstrap_seed: int = 0) -> pd.DataFrame:
    """The generalization table of the runs trained on ``dataset_id`` (module docstring), from
    results/<dataset>/leaderboard.csv and scores.csv and each target's results/<dataset>/on_<target>/ tables."""
    folders = {dataset_id: Path(results_dir) / dataset_id}
    folders.update({t: target_dir(results_dir, dataset_id, t) for t in targets})
    boards, scores = {}, {}
    for scored_on, folder in folders.items():
        for name in ("leaderboard.csv", "scores.csv"):
            if not (folder / name).exists():
                raise InputError(f"{folder / name}: not found; aggregate the runs of {dataset_id} on {scored_on} first")
        boards[scored_on] = pd.read_csv(folder / "leaderboard.csv").set_index("method")
        scores[scored_on] = pd.read_csv(folder / "scores.csv")
    home = boards[dataset_id]
    rows = []
    for method in home.index:
        in_domain = _seed_matrix(scores[dataset_id], method)
        for scored_on, board in boards.items():
            if method not in board.index:   # failed there (on_failure: skip): its leaderboard.json says why
                continue
            row = {"method": method, "trained_on": dataset_id, "evaluated_on": scored_on,
                   "in_domain": scored_on == dataset_id}
            row.update({c: board.at[method, c] for c in BOARD_COLUMNS if c in board.columns})
            row["dice_drop"] = float(home.at[method, "dice_mean"] - board.at[method, "dice_mean"])
            if scored_on == dataset_id:
                low = high = 0.0
            else:
                samples = uncertainty.bootstrap_difference(in_domain, _seed_matrix(scores[scored_on], method),
                                                           resamples, bootstrap_seed)
                low, high = uncertainty.confidence_interval(samples)
            row["dice_drop_ci_low"], row["dice_drop_ci_high"] = low, high
            row["pair_mi"] = mean_test_pair_mi(Path(data_dir) / scored_on / "prepared")
            rows.append(row)
    return pd.DataFrame(rows)


def _seed_matrix(scores: pd.DataFrame, method: str) -> np.ndarray:
    """``seeds x pairs`` Dice of one method from a scores.csv table (seeds in order, pairs in their first order)."""
    table = scores[scores["method"] == method]
    pairs = list(dict.fromkeys(zip(table["fixed"], table["moving"])))
    return uncertainty.seed_matrix(table, "dice", pairs)


def write_generalization(results_dir, dataset_id: str, targets: list[str], data_dir="data", resamples: int = 1000,
                         bootstrap_seed: int = 0) -> pd.DataFrame:
    """results/<dataset>/generalization.csv (:func:`generalization`)."""
    table = generalization(results_dir, dataset_id, targets, data_dir, resamples, bootstrap_seed)
    write_csv(Path(results_dir) / dataset_id / "generalization.csv", table)
    return table


def read_generalization(results_dir, dataset_id: str) -> pd.DataFrame | None:
    """results/<dataset>/generalization.csv, or None where the config evaluates that dataset's runs nowhere else."""
    path = Path(results_dir) / dataset_id / "generalization.csv"
    return pd.read_csv(path) if path.exists() else None


def failed_on_targets(results_dir, dataset_id: str, targets: list[str]) -> dict[str, dict[str, str]]:
    """target -> {method: why} for the runs that failed on a target (on_failure: skip)."""
    failed = {}
    for target in targets:
        summary = target_dir(results_dir, dataset_id, target) / "leaderboard.json"
        if summary.exists() and read_json(summary).get("failed"):
            failed[target] = dict(read_json(summary)["failed"])
    return failed


def markdown_table(table: pd.DataFrame) -> str:
    """One row per method: Dice on the training dataset, then on each target with its drop and its rank there."""
    datasets = list(dict.fromkeys(table["evaluated_on"]))
    home, targets = datasets[0], datasets[1:]
    mi = table.drop_duplicates("evaluated_on").set_index("evaluated_on")["pair_mi"]
    header = (f"| method | learns from | {home} Dice (in domain) | "
              + " | ".join(f"{t} Dice | drop | rank on {t}" for t in targets) + " |")
    rule = "|---|---|---:|" + "---:|---:|---:|" * len(targets)
    lines = [header, rule]
    for method, rows in table.groupby("method", sort=False):
        rows = rows.set_index("evaluated_on")
        first = rows.loc[home]
        cells = [_dice_text(first)]
        for target in targets:
            if target not in rows.index:
                cells += ["failed", "–", "–"]
                continue
            row = rows.loc[target]
            drop = f"{row['dice_drop']:+.3f} ({row['dice_drop_ci_low']:+.3f} to {row['dice_drop_ci_high']:+.3f})"
            cells += [_dice_text(row), drop, rank_text(row)]
        lines.append(f"| {method_label(first.to_dict() | {'method': method})} | {first.get('supervision', '')} | "
                     + " | ".join(cells) + " |")
    note = ("MI(intensity; labels) of the test pairs: "
            + ", ".join(f"{d} {mi[d]:.2f} bits" for d in datasets if pd.notna(mi.get(d, np.nan))))
    return "\n".join(lines) + ("\n\n" + note if "bits" in note else "")


def _dice_text(row) -> str:
    if pd.isna(row.get("dice_mean", np.nan)):
        return "–"
    interval = "" if pd.isna(row.get("dice_ci_low", np.nan)) else \
        f" ({row['dice_ci_low']:.3f} to {row['dice_ci_high']:.3f})"
    return f"{row['dice_mean']:.3f}{interval}"

