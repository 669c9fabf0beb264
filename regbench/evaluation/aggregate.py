"""From per-pair scores to leaderboards: results/<ds>/leaderboard.csv and results/leaderboard.md."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from regbench.evaluation import stats
from regbench.io import InputError, read_json, write_csv, write_text

#: columns of pairs.csv that are not metrics
PAIR_KEYS = ("fixed", "moving")
#: what leaderboard.md shows, in order: (column, header, format, higher is better)
MARKDOWN_COLUMNS = [
    ("dice", "Dice", "{:.3f}", True),
    ("hd95", "HD95 (mm)", "{:.2f}", False),
    ("fold_pct", "folds (%)", "{:.3f}", False),
    ("sdlogj", "SDlogJ", "{:.3f}", False),
    ("epe", "EPE (vox)", "{:.2f}", False),
    ("runtime_s", "runtime (s)", "{:.3f}", False),
]


def read_pairs(method_dir: Path) -> pd.DataFrame:
    path = Path(method_dir) / "pairs.csv"
    if not path.exists():
        raise InputError(f"{path}: not found; the method was not evaluated")
    return pd.read_csv(path)


#: Leaderboard column prefixes that measure time or memory, or rank by them (Learn2Reg's score ranks runtime):
#: they differ between otherwise identical runs.
TIMING_COLUMNS = ("runtime_s", "peak_mem_mb", "train_time_s", "train_step_s", "train_peak_mem_mb", "l2r_runtime_s",
                  "l2r_score", "l2r_rank")


def leaderboard(results_dir, dataset_id: str, method_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(leaderboard, paired tests) of one dataset.

    The leaderboard has one row per method: method, then <metric>_mean/_std/_median for every metric,
    n_pairs, dsc30 (the 0.3 quantile of pair Dice), ``dice_not_worse`` (best mean Dice, or not
    significantly worse than it after Holm correction), parameters, training time and device, and
    Learn2Reg's rank scores. Methods are compared on the same pairs only.
    """
    dataset_dir = Path(results_dir) / dataset_id
    rows, pair_sets, tables = [], {}, {}
    for method_id in method_ids:
        table = read_pairs(dataset_dir / method_id)
        tables[method_id] = table
        pair_sets[method_id] = set(zip(table["fixed"], table["moving"]))
        row = {"method": method_id}
        for column in table.columns:
            if column in PAIR_KEYS or not pd.api.types.is_numeric_dtype(table[column]):
                continue
            values = table[column].to_numpy(dtype=float)
            row[f"{column}_mean"] = _nan_stat(np.nanmean, values)
            row[f"{column}_std"] = _nan_stat(lambda v: np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else np.nan, values)
            row[f"{column}_median"] = _nan_stat(np.nanmedian, values)
        row["n_pairs"] = len(table)
        if "dice" in table:
            row["dsc30"] = float(np.nanquantile(table["dice"], 0.3)) if table["dice"].notna().any() else np.nan
        if "label_warp" in table:
            row["label_warp"] = "+".join(sorted(set(table["label_warp"])))
        row.update(_training_facts(dataset_dir / method_id))
        row["moving_contrast"] = _moving_contrast(dataset_dir / method_id)
        row.update(_paper_fidelity(dataset_dir / method_id))
        rows.append(row)
    reference = next(iter(pair_sets.values()))
    for method_id, pairs in pair_sets.items():
        if pairs != reference:
            raise InputError(f"{dataset_dir / method_id / 'pairs.csv'}: its test pairs differ from "
                             f"{dataset_dir / method_ids[0] / 'pairs.csv'}; methods must be scored on the same pairs")
    board = pd.DataFrame(rows)
    metrics = [c for c in tables[method_ids[0]].columns if c in stats.HIGHER_IS_BETTER]
    tests = stats.paired_tests(tables, metrics)
    if "dice_mean" in board:
        verdict = stats.not_worse_than_best(board, tests, "dice")
        board.insert(board.columns.get_loc("n_pairs") + 1, "dice_not_worse", board["method"].map(verdict))
        board = board.merge(stats.learn2reg_rank(tables), on="method")
        board = board.sort_values("dice_mean", ascending=False, kind="stable")
    return board.reset_index(drop=True), tests


def _nan_stat(function, values):
    return float(function(values)) if np.isfinite(values).any() else np.nan


def _training_facts(method_dir: Path) -> dict:
    facts = {"parameters": 0, "train_time_s": np.nan, "train_step_s": np.nan, "train_peak_mem_mb": np.nan,
             "train_device": ""}
    if (method_dir / "train.json").exists():
        train = read_json(method_dir / "train.json")
        facts.update(parameters=train.get("parameters", 0), train_time_s=train.get("train_time_s", np.nan),
                     train_step_s=train.get("step_time_s", np.nan),
                     train_peak_mem_mb=train.get("peak_mem_mb", np.nan),
                     train_device=train.get("provenance", {}).get("device_name") or train.get("device", ""))
    elif (method_dir / "eval.json").exists():
        facts["parameters"] = read_json(method_dir / "eval.json").get("parameters", 0)
    return facts


def _moving_contrast(method_dir: Path) -> str:
    """The moving image's contrast the method was evaluated with: "image" (the primary one) or e.g. "t2"."""
    if (method_dir / "eval.json").exists():
        return str(read_json(method_dir / "eval.json").get("moving_contrast", "image"))
    return "image"


def _paper_fidelity(method_dir: Path) -> dict:
    """The recipe the row ran, how many of the method's deviations from its paper it runs with that can change
    results (regbench.method.Deviation), and the grid its network ran on (regbench.geometry)."""
    record = read_json(method_dir / "eval.json") if (method_dir / "eval.json").exists() else {}
    return {"recipe": record.get("recipe_name") or "",
            "deviations": sum(bool(d.get("applies")) for d in record.get("deviations", [])),
            "working_grid": record.get("working_grid", "dataset")}


def method_label(row) -> str:
    """The method's name, and the moving contrast when it is not the dataset's primary image."""
    contrast = row.get("moving_contrast", "image")
    return str(row["method"]) + ("" if pd.isna(contrast) or contrast == "image" else f" (moving: {contrast})")


def failed_methods(results_dir, dataset_id: str) -> dict[str, str]:
    """Methods that failed with ``on_failure: skip`` (not ranked): method -> "step: error"."""
    summary = Path(results_dir) / dataset_id / "leaderboard.json"
    return dict(read_json(summary).get("failed", {})) if summary.exists() else {}


def write_leaderboard(results_dir, dataset_id: str, method_ids: list[str]) -> pd.DataFrame:
    """results/<ds>/stats.csv, then results/<ds>/leaderboard.csv."""
    board, tests = leaderboard(results_dir, dataset_id, method_ids)
    write_csv(Path(results_dir) / dataset_id / "stats.csv", tests)
    write_csv(Path(results_dir) / dataset_id / "leaderboard.csv", board)
    return board


def markdown_table(board: pd.DataFrame) -> str:
    """A GitHub-flavoured table: mean ± std per metric; in bold, every mean that prints as the column's best."""
    columns = [c for c in MARKDOWN_COLUMNS if f"{c[0]}_mean" in board]
    header = "| method | " + " | ".join(h for _, h, _, _ in columns) + " | pairs |"
    rule = "|---|" + "---:|" * len(columns) + "---:|"
    best = {}
    for name, _, _, higher in columns:
        values = board[f"{name}_mean"]
        if values.notna().any():
            best[name] = values.max() if higher else values.min()
    lines = [header, rule]
    for _, row in board.iterrows():
        cells = []
        for name, _, fmt, _ in columns:
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            if pd.isna(mean):
                cells.append("–")
                continue
            text = fmt.format(mean) + ("" if pd.isna(std) else " ± " + fmt.format(std))
            tied = name in best and fmt.format(mean) == fmt.format(best[name])  # the best, as printed
            cells.append(f"**{text}**" if tied else text)
        mark = " ◆" if row.get("dice_not_worse") in (True, "True") else ""
        mark += " †" if _departs(row) else ""
        lines.append(f"| {method_label(row)}{mark} | " + " | ".join(cells) + f" | {int(row['n_pairs'])} |")
    return "\n".join(lines)


def _departs(row) -> bool:
    """The row runs with a deviation from its paper that can change results (leaderboard column deviations)."""
    count = row.get("deviations", 0)
    return bool(pd.notna(count) and count > 0)


def write_markdown(results_dir, dataset_ids: list[str]) -> str:
    parts = ["# regbench leaderboard", ""]
    for dataset_id in dataset_ids:
        board = pd.read_csv(Path(results_dir) / dataset_id / "leaderboard.csv")
        parts += [f"## {dataset_id}", "", markdown_table(board), ""]
        failed = failed_methods(results_dir, dataset_id)
        if failed:
            parts += ["Failed (not ranked): " + "; ".join(f"**{m}** ({why})" for m, why in failed.items()), ""]
    parts.append("Mean ± standard deviation over the test pairs; bold: the best value of each column; ◆: the best "
                 "mean Dice or not significantly worse than it (paired Wilcoxon signed-rank, Holm-corrected, p < 0.05); "
                 "†: the row's recipe departs from its paper in a way that can change results (the method file's "
                 "deviations; the report lists them). "
                 "Definitions: spec/evaluation.md (Dice over the dataset's labels, HD95 in mm, folds: % of voxels with "
                 "det(Jacobian) <= 0, EPE: end-point error against the known displacement, in voxels).")
    text = "\n".join(parts) + "\n"
    write_text(Path(results_dir) / "leaderboard.md", text)
    return text
