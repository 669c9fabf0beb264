"""From per-pair scores to leaderboards: results/<ds>/leaderboard.csv and results/leaderboard.md."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from regbench.evaluation import stats, uncertainty
from regbench.io import InputError, read_json, write_csv, write_text
from regbench.layout import run_dir, target_dir, target_run_dir

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


def read_pairs(run_folder: Path) -> pd.DataFrame:
    path = Path(run_folder) / "pairs.csv"
    if not path.exists():
        raise InputError(f"{path}: not found; the run was not evaluated")
    return pd.read_csv(path)


#: Leaderboard column prefixes that measure time or memory, or rank by them (Learn2Reg's score ranks runtime):
#: they differ between otherwise identical runs.
TIMING_COLUMNS = ("runtime_s", "peak_mem_mb", "train_time_s", "train_step_s", "train_peak_mem_mb", "l2r_runtime_s",
                  "l2r_score", "l2r_rank")


def scored_dir(results_dir, dataset_id: str, method_id: str, seed: int, evaluated_on: str | None = None) -> Path:
    """Where a run's test scores are: its own folder, or its on_<target> folder for another dataset's test pairs."""
    if evaluated_on is None:
        return run_dir(results_dir, dataset_id, method_id, seed)
    return target_run_dir(results_dir, dataset_id, method_id, seed, evaluated_on)


def leaderboard(results_dir, dataset_id: str, runs, resamples: int = 1000, bootstrap_seed: int = 0,
                evaluated_on: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(leaderboard, paired tests, every run's scores, rank distributions) of one dataset.

    ``runs``: method -> the seeds it was run with (a list of methods: seed 0 each), read from
    results/<dataset>/<method>/seed<seed>/pairs.csv. Each test pair's score is averaged over a method's seeds
    (:mod:`regbench.evaluation.uncertainty`); the leaderboard has one row per method: its supervision class, then
    for every metric the mean, std and median over the pairs, the between-seed std of the mean (``_seed_std``) and
    a bootstrap 95 % interval of the mean over pairs and seeds (``_ci_low``, ``_ci_high``); n_pairs, n_seeds,
    dsc30 (the 0.3 quantile of pair Dice), ``dice_not_worse`` (best mean Dice, or not significantly worse than it
    after Holm correction) overall and within the class, ``dice_p_vs_identity`` and ``dice_beats_identity`` (the
    Holm-adjusted p against no registration, and whether the row's mean Dice is significantly higher), the rank by
    mean Dice with its bootstrap interval and the probability of ranking first, overall and within the class,
    parameters, training time and device, and Learn2Reg's rank scores. Methods are compared on the same pairs only.

    ``evaluated_on``: the same, for the runs trained on ``dataset_id`` scored on another dataset's test pairs
    (results/<dataset>/<method>/seed<seed>/on_<target>/pairs.csv).
    """
    runs = {m: [0] for m in runs} if not isinstance(runs, dict) else {m: list(s) for m, s in runs.items()}
    method_ids = list(runs)
    rows, pair_lists, averaged, long = [], {}, {}, []
    for method_id, seeds in runs.items():
        tables = {seed: read_pairs(scored_dir(results_dir, dataset_id, method_id, seed, evaluated_on))
                  for seed in seeds}
        first = tables[seeds[0]]
        pair_lists[method_id] = list(zip(first["fixed"], first["moving"]))
        for seed, table in tables.items():
            if set(zip(table["fixed"], table["moving"])) != set(pair_lists[method_id]):
                raise InputError(f"{scored_dir(results_dir, dataset_id, method_id, seed, evaluated_on) / 'pairs.csv'}: "
                                 f"its test pairs differ from seed {seeds[0]}'s; every run is scored on the same pairs")
            long.append(table.assign(method=method_id, seed=seed))
        runs_table = pd.concat([t.assign(seed=s) for s, t in tables.items()], ignore_index=True)
        table = uncertainty.seed_averaged(runs_table)
        averaged[method_id] = table
        folder = scored_dir(results_dir, dataset_id, method_id, seeds[0], evaluated_on)
        row = {"method": method_id, "supervision": _supervision(folder)}
        for column in table.columns:
            if column in PAIR_KEYS or not pd.api.types.is_numeric_dtype(table[column]):
                continue
            values = table[column].to_numpy(dtype=float)
            row[f"{column}_mean"] = _nan_stat(np.nanmean, values)
            row[f"{column}_std"] = _nan_stat(lambda v: np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else np.nan, values)
            row[f"{column}_median"] = _nan_stat(np.nanmedian, values)
            row[f"{column}_seed_std"] = uncertainty.between_seed_std(
                uncertainty.seed_matrix(runs_table, column, pair_lists[method_id]))
        row["n_pairs"] = len(table)
        row["n_seeds"] = len(seeds)
        if "dice" in table:
            row["dsc30"] = float(np.nanquantile(table["dice"], 0.3)) if table["dice"].notna().any() else np.nan
        if "label_warp" in first:
            row["label_warp"] = "+".join(sorted(set(first["label_warp"])))
        row.update(_training_facts([run_dir(results_dir, dataset_id, method_id, s) for s in seeds]))
        row["moving_contrast"] = _moving_contrast(folder)
        row.update(_paper_fidelity(folder))
        rows.append(row)
    reference = set(next(iter(pair_lists.values())))
    for method_id, pairs in pair_lists.items():
        if set(pairs) != reference:
            raise InputError(f"{scored_dir(results_dir, dataset_id, method_id, runs[method_id][0], evaluated_on)}"
                             f"/pairs.csv: its test pairs differ from {method_ids[0]}'s; methods must be scored on the "
                             f"same pairs")
    board = pd.DataFrame(rows)
    scores = pd.concat(long, ignore_index=True)
    scores = scores[["method", "seed", *PAIR_KEYS, *[c for c in scores.columns
                                                     if c not in ("method", "seed", *PAIR_KEYS)]]]
    order = pair_lists[method_ids[0]]
    metrics = [c for c in averaged[method_ids[0]].columns if c in stats.HIGHER_IS_BETTER]
    tests = stats.paired_tests(averaged, metrics)
    distributions = []
    for metric in metrics:
        matrices = {m: uncertainty.seed_matrix(scores[scores["method"] == m], metric, order) for m in method_ids}
        means = uncertainty.bootstrap_means(matrices, resamples, bootstrap_seed)
        intervals = {m: uncertainty.confidence_interval(means[m]) for m in method_ids}
        board[f"{metric}_ci_low"] = board["method"].map(lambda m: intervals[m][0])
        board[f"{metric}_ci_high"] = board["method"].map(lambda m: intervals[m][1])
        if metric == "dice":
            board, distributions = _rank_columns(board, means)
    if "dice_mean" in board:
        board.insert(board.columns.get_loc("n_pairs") + 1, "dice_not_worse",
                     board["method"].map(stats.not_worse_than_best(board, tests, "dice")))
        in_class = {}
        for _, members in board.groupby("supervision", sort=False):
            in_class.update(stats.not_worse_than_best(members, tests, "dice"))
        board.insert(board.columns.get_loc("dice_not_worse") + 1, "dice_not_worse_in_class",
                     board["method"].map(in_class))
        # the floor: is the row better than no registration at all (NaN: no identity row, or identity itself)?
        board.insert(board.columns.get_loc("dice_not_worse_in_class") + 1, "dice_p_vs_identity",
                     board["method"].map(stats.p_against(tests, "dice", "identity")))
        board.insert(board.columns.get_loc("dice_p_vs_identity") + 1, "dice_beats_identity",
                     board["method"].map(stats.better_than_reference(board, tests, "dice", "identity")))
        board = board.merge(stats.learn2reg_rank(averaged), on="method")
        board = board.sort_values("dice_mean", ascending=False, kind="stable")
    ranks = pd.concat(distributions, ignore_index=True) if distributions else pd.DataFrame(
        columns=["scope", "method", "rank", "share"])
    return board.reset_index(drop=True), tests, scores, ranks


def _rank_columns(board: pd.DataFrame, means: dict[str, np.ndarray]) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Rank by mean Dice (1 = best) with its bootstrap interval and the chance of ranking first, over every method
    (``rank``...) and within each supervision class (``class_rank``...); and the rank distributions."""
    distributions = []
    for prefix, groups in (("", {"overall": list(board["method"])}),
                           ("class_", {c: list(g["method"]) for c, g in board.groupby("supervision", sort=False)})):
        columns = {f"{prefix}rank": {}, f"{prefix}rank_low": {}, f"{prefix}rank_high": {}, f"{prefix}p_first": {}}
        for scope, members in groups.items():
            means_by_method = board.set_index("method").loc[members, "dice_mean"]
            point = means_by_method.rank(ascending=False, method="min").astype(int)
            ranks = uncertainty.bootstrap_ranks({m: means[m] for m in members})
            summary = uncertainty.rank_summary(ranks).set_index("method")
            for method in members:
                columns[f"{prefix}rank"][method] = int(point[method])
                columns[f"{prefix}rank_low"][method] = int(summary.at[method, "rank_low"])
                columns[f"{prefix}rank_high"][method] = int(summary.at[method, "rank_high"])
                columns[f"{prefix}p_first"][method] = float(summary.at[method, "p_first"])
            distributions.append(uncertainty.rank_distribution(ranks).assign(scope=scope))
        for name, values in columns.items():
            board[name] = board["method"].map(values)
    return board, [d[["scope", "method", "rank", "share"]] for d in distributions]


def _nan_stat(function, values):
    return float(function(values)) if np.isfinite(values).any() else np.nan


def _training_facts(run_dirs: list[Path]) -> dict:
    """Parameters and device of the first run; training time, step time and peak memory averaged over the runs."""
    facts = {"parameters": 0, "train_time_s": np.nan, "train_step_s": np.nan, "train_peak_mem_mb": np.nan,
             "train_device": ""}
    trained = [read_json(folder / "train.json") for folder in run_dirs if (folder / "train.json").exists()]
    if trained:
        first = trained[0]
        facts.update(parameters=first.get("parameters", 0),
                     train_time_s=float(np.mean([t.get("train_time_s", np.nan) for t in trained])),
                     train_step_s=float(np.mean([t.get("step_time_s", np.nan) for t in trained])),
                     train_peak_mem_mb=float(np.mean([t.get("peak_mem_mb", np.nan) for t in trained])),
                     train_device=first.get("provenance", {}).get("device_name") or first.get("device", ""))
    elif (run_dirs[0] / "eval.json").exists():
        facts["parameters"] = read_json(run_dirs[0] / "eval.json").get("parameters", 0)
    return facts


def _supervision(run_folder: Path) -> str:
    """What the row learned from (eval.json, regbench.method.RegistrationMethod.supervision)."""
    if (run_folder / "eval.json").exists():
        return str(read_json(run_folder / "eval.json").get("supervision", "none"))
    return "none"


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


def write_leaderboard(results_dir, dataset_id: str, runs, resamples: int = 1000,
                      bootstrap_seed: int = 0, evaluated_on: str | None = None) -> pd.DataFrame:
    """results/<ds>/scores.csv, ranks.csv and stats.csv, then results/<ds>/leaderboard.csv (:func:`leaderboard`);
    with ``evaluated_on``, the same tables in results/<ds>/on_<target>/."""
    board, tests, scores, ranks = leaderboard(results_dir, dataset_id, runs, resamples, bootstrap_seed, evaluated_on)
    folder = Path(results_dir) / dataset_id if evaluated_on is None else target_dir(results_dir, dataset_id, evaluated_on)
    write_csv(folder / "scores.csv", scores)
    write_csv(folder / "ranks.csv", ranks)
    write_csv(folder / "stats.csv", tests)
    write_csv(folder / "leaderboard.csv", board)
    return board


def markdown_table(board: pd.DataFrame) -> str:
    """A GitHub-flavoured table: the rank by mean Dice with its bootstrap interval, what the row learned from,
    the Dice's bootstrap interval, mean ± std per metric; in bold, every mean that prints as the column's best."""
    columns = [c for c in MARKDOWN_COLUMNS if f"{c[0]}_mean" in board]
    header = ("| rank | method | learns from | " + " | ".join(h for _, h, _, _ in columns)
              + " | Dice 95 % CI | seeds | pairs |")
    rule = "|---:|---|---|" + "---:|" * len(columns) + "---:|---:|---:|"
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
        mark += " ○" if no_better_than_identity(row) else ""
        mark += " †" if _departs(row) else ""
        interval = ("–" if pd.isna(row.get("dice_ci_low", np.nan))
                    else f"{row['dice_ci_low']:.3f} to {row['dice_ci_high']:.3f}")
        lines.append(f"| {rank_text(row)} | {method_label(row)}{mark} | {row.get('supervision', '')} | "
                     + " | ".join(cells) + f" | {interval} | {int(row.get('n_seeds', 1))} | {int(row['n_pairs'])} |")
    return "\n".join(lines)


def rank_text(row, prefix: str = "") -> str:
    """``3 (2-5)``: the rank by mean Dice and its 95 % bootstrap interval; the rank alone when the data fix it."""
    rank = row.get(f"{prefix}rank")
    if rank is None or pd.isna(rank):
        return "–"
    low, high = row.get(f"{prefix}rank_low"), row.get(f"{prefix}rank_high")
    if low is None or pd.isna(low) or (int(low) == int(high) == int(rank)):
        return str(int(rank))
    return f"{int(rank)} ({int(low)}-{int(high)})"


def no_better_than_identity(row) -> bool:
    """The row's Dice is not significantly higher than no registration's (False where there is nothing to test)."""
    return row.get("dice_beats_identity") in (False, "False")


def _departs(row) -> bool:
    """The row runs with a deviation from its paper that can change results (leaderboard column deviations)."""
    count = row.get("deviations", 0)
    return bool(pd.notna(count) and count > 0)


def write_markdown(results_dir, dataset_ids: list[str], targets: dict[str, list[str]] | None = None) -> str:
    """results/leaderboard.md: every dataset's leaderboard and, for those in ``targets`` (dataset -> the datasets
    its runs also registered), the generalization table (:mod:`regbench.evaluation.generalization`)."""
    from regbench.evaluation import generalization

    parts = ["# regbench leaderboard", ""]
    for dataset_id in dataset_ids:
        board = pd.read_csv(Path(results_dir) / dataset_id / "leaderboard.csv")
        parts += [f"## {dataset_id}", "", markdown_table(board), ""]
        failed = failed_methods(results_dir, dataset_id)
        if failed:
            parts += ["Failed (not ranked): " + "; ".join(f"**{m}** ({why})" for m, why in failed.items()), ""]
        table = generalization.read_generalization(results_dir, dataset_id) if (targets or {}).get(dataset_id) else None
        if table is not None and not table.empty:
            board_methods = set(board["method"])
            parts += [f"### Trained on {dataset_id}, tested elsewhere", "",
                      generalization.markdown_table(table[table["method"].isin(board_methods)]), "",
                      "Dice: mean over the seed-averaged test pairs (95 % bootstrap interval); drop: in-domain mean "
                      "minus the target's (positive: worse there), with its interval; rank: among these methods on "
                      "the target. Methods without training register the target directly, with the values tuned on "
                      f"{dataset_id}.", ""]
    parts.append("Rank: by mean Dice, with its 95 % bootstrap interval over test pairs and training seeds; learns "
                 "from: none (images only), labels (a segmentation loss), teacher (another tool's fields), classical "
                 "(no training). Each pair's score is averaged over the seeds; mean ± standard deviation over the test "
                 "pairs; bold: the best value of each column; ◆: the best mean Dice or not significantly worse than it "
                 "(paired Wilcoxon signed-rank on the seed-averaged pairs, Holm-corrected, p < 0.05); ○: Dice not "
                 "significantly higher than no registration's (identity), by the same test; "
                 "†: the row's recipe departs from its paper in a way that can change results (the method file's "
                 "deviations; the report lists them). "
                 "Definitions: spec/evaluation.md (Dice over the dataset's labels, HD95 in mm, folds: % of voxels with "
                 "det(Jacobian) <= 0, EPE: end-point error against the known displacement, in voxels).")
    text = "\n".join(parts) + "\n"
    write_text(Path(results_dir) / "leaderboard.md", text)
    return text
