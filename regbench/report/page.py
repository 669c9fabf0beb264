"""The report: results/report/index.html (one page, figures embedded, works offline), a table page and
the figures per dataset, and results/leaderboard.md.

Two steps, so that a dataset's figures are one job: ``python -m regbench.report.page dataset`` writes
results/report/<dataset>/ (the figures of :mod:`regbench.report.figures`, figures.json and leaderboard.html),
then ``python -m regbench.report.page page`` writes index.html and leaderboard.md from every dataset's.

The leaderboard shows every metric of pairs.csv as mean ± std over the test pairs. Significance comes
from stats.csv: in each column the best mean is bold, and ◆ marks it and every method not significantly
different from it (paired Wilcoxon signed-rank, Holm-corrected within the metric, p ≥ 0.05); a cell's
tooltip gives the p-value. The ``published`` column holds the numbers of spec/evaluation.md where the
dataset and the method match (:data:`PUBLISHED`).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from regbench.evaluation import aggregate, generalization
from regbench.evaluation.stats import ALPHA, HIGHER_IS_BETTER
from regbench.io import InputError, read_json, write_text
from regbench.report import figures, plots, style

#: Published results (spec/evaluation.md): dataset id, regbench method id (None: a method regbench does not
#: have), the name the source uses, Dice, other metrics, source. Learn2Reg's OASIS test pairs are
#: regbench's ``oasis`` test pairs; TransMorph's IXI numbers are atlas-to-subject (regbench pairs subjects).
PUBLISHED = [
    ("oasis", "identity", "no registration", 0.559, {}, "Learn2Reg OASIS test leaderboard (38 pairs)"),
    ("oasis", None, "NiftyReg", 0.727, {}, "Learn2Reg OASIS test leaderboard (38 pairs)"),
    ("oasis", None, "ConvexAdam", 0.811, {}, "Learn2Reg OASIS test leaderboard (38 pairs)"),
    ("oasis", None, "LapIRN", 0.822, {"hd95": 1.668, "sdlogj": 0.071}, "Learn2Reg OASIS test leaderboard (38 pairs)"),
    ("oasis", None, "TransMorph", 0.829, {}, "Learn2Reg OASIS test leaderboard (38 pairs)"),
    ("oasis", None, "LapIRNv2", 0.836, {}, "Learn2Reg OASIS test leaderboard (38 pairs)"),
    ("oasis", "syn", "ANTs", 0.756, {}, "Learn2Reg OASIS validation (19 pairs)"),
    ("oasis", None, "uniGradICON", 0.790, {}, "Learn2Reg OASIS validation (19 pairs)"),
    ("ixi", "affine", "Affine", 0.386, {}, "TransMorph (MedIA 2022), IXI atlas-to-subject"),
    ("ixi", "syn", "SyN", 0.645, {}, "TransMorph (MedIA 2022), IXI atlas-to-subject"),
    ("ixi", "voxelmorph", "VoxelMorph-2", 0.732, {"fold_pct": 1.52}, "TransMorph (MedIA 2022), IXI atlas-to-subject"),
    ("ixi", None, "TransMorph", 0.753, {}, "TransMorph (MedIA 2022), IXI atlas-to-subject"),
]

#: leaderboard columns: (pairs.csv metric, header, group, format, tooltip)
METRICS = [
    ("dice", "Dice", "accuracy", "{:.3f}", "mean Dice over the dataset's labels"),
    ("dsc30", "DSC30", "accuracy", "{:.3f}", "0.3 quantile of the pair Dice (Learn2Reg)"),
    ("hd95", "HD95 (mm)", "accuracy", "{:.2f}", "95th percentile surface distance, mean over labels"),
    ("hd95_vox", "HD95 (vox)", "accuracy", "{:.2f}", "HD95 in voxels (Learn2Reg's unit)"),
    ("epe", "EPE (vox)", "accuracy", "{:.2f}", "end-point error against the true displacement"),
    ("fold_pct", "folds (%)", "regularity", "{:.3g}", "% of voxels with det J ≤ 0"),
    ("fold_pct_mask", "folds in mask (%)", "regularity", "{:.3g}", "% of the fixed foreground with det J ≤ 0"),
    ("sdlogj", "SDlogJ", "regularity", "{:.3f}", "std of log det J over voxels with det J > 0"),
    ("sdlogj_l2r", "SDlogJ (L2R)", "regularity", "{:.3f}", "Learn2Reg's SDlogJ (J + 3, border cropped)"),
    ("ndv", "NDV (%)", "regularity", "{:.3g}", "non-diffeomorphic volume, % of the image"),
    ("runtime_s", "runtime (s)", "cost", "{:.3g}", "registration call per pair, median of repeats"),
    ("peak_mem_mb", "memory (MB)", "cost", "{:.0f}", "peak memory of the registration call"),
]
FIGURE_TEXT = {
    "dice_per_structure": ("Dice per structure",
                           "Dice of each anatomical structure over the test pairs, a box per method (left and "
                           "right structures pooled), as in the VoxelMorph paper (TMI 2019, Fig. 5)."),
    "accuracy_regularity": ("Accuracy against regularity",
                            "Mean Dice against the folded voxels and against SDlogJ, one point per method (each pair's "
                            "score averaged over the seeds); bars: 95 % bootstrap intervals of the means over test "
                            "pairs and seeds. Better is up and to the left."),
    "ranks": ("How stable the ranking is",
              "Each method's rank by mean Dice in 1,000 bootstrap replicates of the test pairs and the training "
              "seeds (the blob plot of challengeR, Wiesenfarth et al. 2021): a blob at every rank it takes, its "
              "area the share of replicates; the line spans the 95 % rank interval, the dot is the median rank. "
              "Methods whose blobs overlap cannot be told apart by these data. Beside it, the ranking within each "
              "class of what the methods learn from."),
    "runtime": ("Time",
                "Left: registration time of each test pair (log scale; the black bar is the median). Right: "
                "training wall time of each trained method, with its device."),
    "training_curves": ("Training curves",
                        "Each loss term against the iteration (train_log.csv): the weighted total first, then "
                        "each term unweighted. Faint: the logged values; solid: their running mean."),
    "tuning": ("Tuning on the val split",
               "Val Dice of every trial of the tuning (the lock file this run trained with), a panel per tuned "
               "method, the same number of trials each: dots feasible, crosses folding past the bound, triangles "
               "diverged; the line is the best feasible value so far, the ring the chosen trial."),
    "median_pair": ("The median test pair",
                    "The test pair whose Dice, averaged over the methods, is the median, registered by every "
                    "method: fixed and moving images, the warped moving image, its difference to the fixed "
                    "one, the deformation grid (φ = id + u on every few lines of the fixed grid) and det J "
                    "(white: no change of volume; red: folds)."),
}
#: packages whose versions the provenance lists (runtime.PACKAGES and what draws the figures)
REPORT_PACKAGES = ("regbench", "torch", "numpy", "scipy", "pandas", "nibabel", "snakemake", "matplotlib", "seaborn")


# ------------------------------------------------------------------------------------------------ steps

def write_dataset(results_dir, prepared_dir, dataset_id: str, method_ids: list[str],
                  settings: dict | None = None, lock_file=None) -> None:
    """results/report/<dataset>/: every figure, figures.json, and leaderboard.html (the table alone).

    ``lock_file``: the tuning lock file the run trained with (config ``tuned:``), or None."""
    from regbench.tuning.lock import read_lock

    lock = read_lock(lock_file, dataset_id) if lock_file else None
    figures.write_figures(results_dir, prepared_dir, dataset_id, method_ids, settings, lock,
                          str(lock_file) if lock_file else None)
    section = DatasetSection(results_dir, dataset_id, method_ids, prepared_dir)
    write_text(Path(results_dir) / "report" / dataset_id / "leaderboard.html",
               _page(f"regbench: {dataset_id} leaderboard", section.tables_html(heading=f"{dataset_id} leaderboard")))


def write_page(results_dir, methods: dict[str, list[str]], data_dir="data", command: str | None = None,
               config_hash: str | None = None, targets: dict[str, list[str]] | None = None) -> Path:
    """results/report/index.html (figures embedded) and results/leaderboard.md.

    ``targets``: dataset -> the datasets its runs also registered (config ``evaluate_on``), whose generalization
    table (results/<dataset>/generalization.csv) the page and the Markdown show."""
    results_dir = Path(results_dir)
    targets = {d: list((targets or {}).get(d, [])) for d in methods}
    aggregate.write_markdown(results_dir, list(methods), targets)
    sections = [DatasetSection(results_dir, d, ms, Path(data_dir) / d / "prepared", targets[d])
                for d, ms in methods.items()]
    nav = "".join(f'<a href="#{html.escape(s.anchor)}">{html.escape(s.dataset_id)}</a>' for s in sections)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    all_methods = list(dict.fromkeys(m for ms in methods.values() for m in ms))
    header = (f"<header><h1>regbench report</h1><p class='meta'>{len(sections)} dataset"
              f"{'s' if len(sections) != 1 else ''}, {len(all_methods)} methods · made {html.escape(now)}"
              f"{' · config ' + html.escape(config_hash) if config_hash else ''}</p>"
              f"<nav>{nav}<a href='#provenance'>provenance</a></nav></header>")
    body = header + "".join(s.html() for s in sections) + _provenance_html(sections, command, config_hash, now)
    path = results_dir / "report" / "index.html"
    write_text(path, _page("regbench report", body))
    return path


def write_report(results_dir, dataset_ids: list[str], methods: dict[str, list[str]], data_dir="data",
                 settings: dict | None = None, command: str | None = None, config_hash: str | None = None) -> Path:
    """Both steps for every dataset (``regbench report``)."""
    for dataset_id in dataset_ids:
        write_dataset(results_dir, Path(data_dir) / dataset_id / "prepared", dataset_id, methods[dataset_id], settings)
    return write_page(results_dir, {d: methods[d] for d in dataset_ids}, data_dir, command, config_hash)


# ------------------------------------------------------------------------------------------------ a dataset

class DatasetSection:
    """What the report shows of one dataset, read from results/<dataset>/ and results/report/<dataset>/."""

    def __init__(self, results_dir, dataset_id: str, method_ids: list[str], prepared_dir=None,
                 targets: list[str] | None = None):
        self.results_dir, self.dataset_id = Path(results_dir), dataset_id
        self.targets = list(targets or [])
        self.generalization = None
        if self.targets:
            self.generalization = generalization.read_generalization(self.results_dir, dataset_id)
            if self.generalization is None:
                raise InputError(f"{self.results_dir / dataset_id / 'generalization.csv'}: not found; run "
                                 f"`regbench generalization` for {dataset_id} first")
            self.generalization = self.generalization[self.generalization["method"].isin(method_ids)]
        self.anchor = f"dataset-{dataset_id}"
        folder = self.results_dir / dataset_id
        if not (folder / "leaderboard.csv").exists():
            raise InputError(f"{folder / 'leaderboard.csv'}: not found; run the aggregate step first")
        board = pd.read_csv(folder / "leaderboard.csv")
        self.failed = aggregate.failed_methods(self.results_dir, dataset_id)
        missing = [m for m in method_ids if m not in set(board["method"]) and m not in self.failed]
        if missing:
            raise InputError(f"{folder / 'leaderboard.csv'}: no row for {', '.join(missing)}")
        self.board = board[board["method"].isin(method_ids)].reset_index(drop=True)
        self.stats = pd.read_csv(folder / "stats.csv") if (folder / "stats.csv").exists() else pd.DataFrame(
            columns=["metric", "method_a", "method_b", "p_holm"])
        self.colors = style.method_colors(method_ids)
        run_folders = figures.run_folders(results_dir, dataset_id, list(self.board["method"]))
        first_run = {m: runs[0] for m, runs in run_folders.items()}
        # the iteration each seed's run kept, for a recipe that chooses its checkpoint on val (model_selection)
        trained = {m: [read_json(run / "train.json") for run in runs] for m, runs in run_folders.items()
                   if all((run / "train.json").exists() for run in runs)}
        self.kept = {m: [t["model_selection"]["kept_iteration"] for t in runs] for m, runs in trained.items()
                     if runs[0].get("model_selection", {}).get("criterion") == "val_dice"}
        self.records = {m: {step: read_json(first_run[m] / f"{step}.json")
                            for step in ("train", "eval") if (first_run[m] / f"{step}.json").exists()}
                        for m in self.board["method"]}
        info_path = Path(prepared_dir) / "dataset.json" if prepared_dir is not None else None
        self.info = read_json(info_path) if info_path is not None and info_path.exists() else {}
        self.facts = figures.load_facts(self.results_dir, dataset_id)

    # -------------------------------------------------------------------------------------- table

    def columns(self) -> list[tuple]:
        """The metric columns with a value for some method (HD95 in voxels only when it differs from mm)."""
        columns = []
        for column in METRICS:
            name = column[0]
            key = name if name == "dsc30" else f"{name}_mean"
            if key not in self.board or not self.board[key].notna().any():
                continue
            if name == "hd95_vox" and np.allclose(self.board["hd95_vox_mean"], self.board["hd95_mean"], equal_nan=True):
                continue
            columns.append(column)
        return columns

    def significance(self, metric: str, members: list[str] | None = None) -> tuple[str | None, dict[str, float]]:
        """(best method by mean, {method: Holm-adjusted p against the best}) for a metric of stats.csv, among
        ``members`` (a supervision class; default: every method)."""
        key = metric if metric == "dsc30" else f"{metric}_mean"
        means = self.board.set_index("method")[key].dropna()
        if members is not None:
            means = means[means.index.isin(members)]
        if means.empty:
            return None, {}
        best = means.idxmax() if HIGHER_IS_BETTER.get(metric, True) else means.idxmin()
        rows = self.stats[self.stats["metric"] == metric]
        p = {}
        for _, row in rows.iterrows():
            if best in (row["method_a"], row["method_b"]):
                other = row["method_b"] if row["method_a"] == best else row["method_a"]
                p[other] = float(row["p_holm"])
        return best, p

    def published(self) -> list[tuple]:
        return [entry for entry in PUBLISHED if entry[0] == self.dataset_id]

    def tables_html(self, heading: str | None = None) -> str:
        columns = self.columns()
        groups = [(g, sum(1 for c in columns if c[2] == g)) for g in dict.fromkeys(c[2] for c in columns)]
        published = {entry[1]: entry for entry in self.published() if entry[1] is not None}
        extra = ["parameters", "training", "device", "L2R rank"] + (["published Dice"] if published else [])
        head = ("<tr><th rowspan='2' class='rank' title='rank by mean Dice; below: its 95 % bootstrap interval'>"
                "rank</th><th rowspan='2' class='method'>method</th>"
                "<th rowspan='2' class='class' title='what the row learned from'>learns from</th>"
                + "".join(f"<th colspan='{n}' class='group {g}'>{g}</th>" for g, n in groups)
                + f"<th colspan='{len(extra)}' class='group other'>setup</th></tr><tr>"
                + "".join(f"<th class='{c[2]}' title='{html.escape(c[4])}'>{html.escape(c[1])}</th>" for c in columns)
                + "".join(f"<th class='other'>{html.escape(e)}</th>" for e in extra) + "</tr>")
        classes = self.board.groupby("supervision", sort=False)["method"].apply(list).to_dict() \
            if "supervision" in self.board else {}
        marks = {(c[0], cls): self.significance(c[0], members) for c in columns for cls, members in classes.items()} \
            if classes else {(c[0], None): self.significance(c[0]) for c in columns}
        body = []
        for _, row in self.board.iterrows():
            method = row["method"]
            cls = row.get("supervision") if classes else None
            color = _hex(self.colors.get(method, (0, 0, 0)))
            cells = [f"<td class='rank' title='{html.escape(self.rank_title(row))}'>"
                     f"{html.escape(aggregate.rank_text(row))}</td>",
                     f"<th class='method' scope='row'><span class='dot' style='background:{color}'></span>"
                     f"{html.escape(aggregate.method_label(row))}{self.floor_mark(row)}"
                     f"{self.departure_mark(method)}</th>",
                     f"<td class='text class'>{html.escape(str(cls or '–'))}"
                     f"<span class='s'>{html.escape(aggregate.rank_text(row, 'class_'))} of "
                     f"{len(classes.get(cls, []))}</span></td>"]
            for name, _, group, fmt, _ in columns:
                cells.append(self._cell(row, name, group, fmt, *marks[(name, cls)]))
            cells += [f"<td class='num'>{_count(row.get('parameters'))}</td>",
                      f"<td class='num'>{self.training(method, row)}</td>",
                      f"<td class='text'>{html.escape(self.device(method))}</td>",
                      f"<td class='num'>{_int_or_dash(row.get('l2r_rank'))}</td>"]
            if published:
                entry = published.get(method)
                cells.append("<td class='num published'>–</td>" if entry is None else
                             f"<td class='num published' title='{html.escape(entry[2] + ': ' + entry[5])}'>"
                             f"{entry[3]:.3f}<span class='s'>{html.escape(entry[2])}</span></td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        n_pairs = int(self.board["n_pairs"].max()) if "n_pairs" in self.board else 0
        n_seeds = int(self.board["n_seeds"].max()) if "n_seeds" in self.board else 1
        note = (f"<p class='note'>Each test pair's score is averaged over the training seeds ({n_seeds} for a "
                f"learned method, one run for a deterministic one); mean ± standard deviation over {n_pairs} test "
                f"pairs, and for Dice its 95 % bootstrap interval over pairs and seeds. Rank: by mean Dice, with its "
                f"95 % bootstrap interval (overlapping intervals: the data cannot order the rows). Learns from: "
                f"none (images only), labels (a segmentation loss), teacher (another tool's fields), classical (no "
                f"training), with the rank within that class. <b>Bold</b> and ◆: the best mean of the column within "
                f"the row's class; ◆ alone: not significantly different from it (paired Wilcoxon signed-rank test over "
                f"the seed-averaged pairs, Holm-corrected within the metric, p ≥ {ALPHA}; hover a cell for its "
                f"p-value). Units and definitions: spec/evaluation.md. L2R rank: Learn2Reg's "
                f"overall rank (DSC, DSC30, HD95, SDlogJ, runtime). Device: where the method was trained"
                f" and registered. ○: Dice not significantly higher than no registration's (identity; the same"
                f" test, hover it for its p-value). †: the row's recipe departs from its paper in a way that can "
                f"change results (hover it, or see below).</p>")
        table = (f"<div class='table-wrap'><table class='leaderboard'><thead>{head}</thead>"
                 f"<tbody>{''.join(body)}</tbody></table></div>")
        title = f"<h3>{html.escape(heading)}</h3>" if heading else ""
        return title + table + note + self.deviations_html() + self.tuning_html() + self.published_html()

    def _cell(self, row, name, group, fmt, best, p_values) -> str:
        key = name if name == "dsc30" else f"{name}_mean"
        mean = row.get(key, np.nan)
        if pd.isna(mean):
            return f"<td class='num {group}'>–</td>"
        std = row.get(f"{name}_std", np.nan) if name != "dsc30" else np.nan
        method = row["method"]
        classes = ["num", group]
        title = ""
        mark = ""
        best_mean = self.board.set_index("method").at[best, key] if best is not None else np.nan
        if method == best or (pd.notna(best_mean) and fmt.format(mean) == fmt.format(best_mean)):  # ties as printed
            classes.append("best")
            mark = "◆"
            title = "the best mean"
        elif method in p_values:
            p = p_values[method]
            title = f"against {best}: Holm-adjusted p = {p:.3g}"
            if not p < ALPHA:
                mark = "◆"
        text = fmt.format(mean)
        spread = "" if pd.isna(std) else f"<span class='s'>± {fmt.format(std)}</span>"
        low, high = row.get(f"{name}_ci_low", np.nan), row.get(f"{name}_ci_high", np.nan)
        if name == "dice" and pd.notna(low) and pd.notna(high):
            spread += f"<span class='s'>{fmt.format(low)} to {fmt.format(high)}</span>"
        sig = f"<span class='sig'>{mark}</span>" if mark else ""
        attribute = f" title='{html.escape(title)}'" if title else ""
        return f"<td class='{' '.join(classes)}'{attribute}>{text}{sig}{spread}</td>"

    @staticmethod
    def rank_title(row) -> str:
        p_first = row.get("p_first", np.nan)
        return ("rank by mean Dice and its 95 % bootstrap interval"
                + ("" if pd.isna(p_first) else f"; first in {100 * p_first:.0f} % of the replicates"))

    def training(self, method: str, row) -> str:
        """Training wall time, and the iterations beneath it (with the ones kept on val, per seed, where the recipe
        chooses its checkpoint there)."""
        text = plots.human_seconds(float(row.get("train_time_s", np.nan)))
        iterations = self.records.get(method, {}).get("train", {}).get("iterations")
        kept = (f"<span class='s'>kept on val: {', '.join(f'{k:,}' for k in self.kept[method])}</span>"
                if method in self.kept else "")
        return text + (f"<span class='s'>{iterations:,} it.</span>" if iterations else "") + kept

    def device(self, method: str) -> str:
        records = self.records.get(method, {})
        train = figures.device_text(records["train"]) if "train" in records else ""
        register = figures.device_text(records["eval"]) if "eval" in records else ""
        if train and register and train != register:
            return f"train: {train}; register: {register}"
        return train or register or "–"

    def tuning_html(self) -> str:
        """What was tuned, over which range, with how many trials, what was chosen and its val score; or that the
        run trains with the recipes' own values (the papers' for a paper recipe)."""
        tuning = self.facts.get("tuning") or {}
        methods = tuning.get("methods") or {}
        if not methods:
            return ""
        budget = tuning.get("budget") or {}
        rows = []
        for method, record in methods.items():
            space = "; ".join(f"{html.escape(k)} {low:g} to {high:g} ({scale})"
                              for k, (low, high, scale) in record["search_space"].items())
            if "chosen" in record:
                chosen = ", ".join(f"{html.escape(k)} {v:.3g}" for k, v in record["chosen"].items())
                used = ("tuned values" if not record.get("overridden") else
                        "tuned, but the config sets " + ", ".join(record["overridden"]))
                score = f"{record['val_dice']:.3f}<span class='s'>folds {record['val_fold_pct']:.3g} %, " \
                        f"{html.escape(str(record.get('status', '')))}</span>"
                cells = [space, str(record.get("trials", "–")), chosen, score, used]
            else:
                recipe_values = ", ".join(f"{html.escape(k)} {_number(v)}" for k, v in record["used"].items())
                cells = [space, "–", "–", "–", f"the recipe's values ({recipe_values}): not tuned"]
            rows.append(f"<tr><th scope='row'>{html.escape(method)}</th>"
                        + "".join(f"<td class='text'>{c}</td>" for c in cells) + "</tr>")
        if tuning.get("file"):
            intro = (f"Trained with the values of <code>{html.escape(tuning['file'])}</code>, chosen on the val split "
                     f"({budget.get('val_pairs', '?')} pairs) with the same budget for every method: "
                     f"{budget.get('trials', '?')} trials, {budget.get('fraction', 1):g} of each recipe's steps, "
                     f"mean folds at most {budget.get('max_fold_pct', '?')} %; made at "
                     f"{html.escape(str((tuning.get('made') or {}).get('commit', '?'))[:10])}.")
        else:
            intro = ("No tuning lock file: every method trains with its recipe's own values (the papers' in a paper "
                     "recipe). Tune them on the val split with <code>snakemake --cores all tune</code> and this config.")
        return ("<details class='deviations tuning'><summary>What was tuned, and what was chosen</summary>"
                f"<p class='note'>{intro}</p><table class='plain'><thead><tr><th>method</th><th>search space</th>"
                "<th>trials</th><th>chosen</th><th>val Dice</th><th>this run</th></tr></thead><tbody>"
                + "".join(rows) + "</tbody></table></details>")

    def deviations(self, method: str) -> list[dict]:
        return self.records.get(method, {}).get("eval", {}).get("deviations", [])

    @staticmethod
    def floor_mark(row) -> str:
        """○ for a row whose Dice is not significantly higher than no registration's, its p as the tooltip."""
        if not aggregate.no_better_than_identity(row):
            return ""
        p = row.get("dice_p_vs_identity", np.nan)
        title = "Dice not significantly higher than no registration's" + (
            "" if pd.isna(p) else f" (identity; Holm-adjusted p = {p:.3g})")
        return f"<span class='floor' title='{html.escape(title)}'>○</span>"

    def departure_mark(self, method: str) -> str:
        """† with the deviations this row runs with as its tooltip; nothing for a row that is its paper."""
        applying = [d for d in self.deviations(method) if d.get("applies")]
        if not applying:
            return ""
        title = "; ".join(d["what"] for d in applying)
        return f"<span class='dev' title='{html.escape(title)}'>†</span>"

    def deviations_html(self) -> str:
        """Every method's deviations from its paper and official code (what, why, which recipes), per row."""
        blocks = []
        for _, row in self.board.iterrows():
            method = row["method"]
            entries = self.deviations(method)
            grid = self.records.get(method, {}).get("eval", {}).get("working_grid", "dataset")
            if not entries and grid == "dataset":
                continue
            recipe = self.records.get(method, {}).get("eval", {}).get("recipe_name") or "?"
            items = "".join(
                f"<li class='{'applies' if d.get('applies') else 'other'}'><b>{html.escape(d['what'])}</b>: "
                f"{html.escape(d['why'])} <span class='s'>({html.escape(_recipes_text(d))}"
                f"{'' if d.get('changes_results', True) else '; leaves the results unchanged'})</span></li>"
                for d in entries)
            grid_text = "" if grid == "dataset" else (
                f"<li class='other'>network run on its paper's grid, {html.escape(str(grid))} voxels of "
                f"{html.escape(_spacing_text(self.records[method]['eval'].get('working_spacing_mm')))}, "
                f"resampled in and its displacement brought back to this dataset's grid</li>")
            blocks.append(f"<h4>{html.escape(aggregate.method_label(row))} <span class='s'>(recipe "
                          f"{html.escape(recipe)})</span></h4><ul>{grid_text}{items}</ul>")
        if not blocks:
            return ""
        return ("<details class='deviations'><summary>Where the rows differ from their papers</summary>"
                "<p class='note'>Each method file lists where it departs from its paper and official code. "
                "Bold entries marked in the table (†) are those the row's recipe runs with and that can change "
                "its results; the others apply to another recipe or leave the numbers unchanged.</p>"
                + "".join(blocks) + "</details>")

    def published_html(self) -> str:
        entries = self.published()
        if not entries:
            return ""
        rows = "".join(
            f"<tr><th scope='row'>{html.escape(name)}{' (' + html.escape(method) + ')' if method else ''}</th>"
            f"<td class='num'>{dice:.3f}</td><td class='text'>"
            f"{html.escape(', '.join(f'{k} {v}' for k, v in others.items())) or '–'}</td>"
            f"<td class='text'>{html.escape(source)}</td></tr>"
            for _, method, name, dice, others, source in entries)
        return ("<details class='published'><summary>Published results on this dataset (spec/evaluation.md)</summary>"
                "<table class='plain'><thead><tr><th>method (regbench id)</th><th>Dice</th><th>other</th>"
                f"<th>source</th></tr></thead><tbody>{rows}</tbody></table>"
                "<p class='note'>Published pairs, labels and preprocessing may differ from this run's; "
                "compare with care.</p></details>")

    # -------------------------------------------------------------------------------------- figures

    def figures_html(self) -> str:
        parts = []
        paths = figures.figure_paths(self.results_dir, self.dataset_id)
        for name, path in paths.items():
            if not path.exists():
                raise InputError(f"{path}: not found; run `python -m regbench.report.page dataset` for "
                                 f"{self.dataset_id} first")
            heading, caption = FIGURE_TEXT[name]
            if name == "median_pair" and self.facts.get("median_pair"):
                pair = self.facts["median_pair"]
                caption += f" Fixed {pair['fixed']}, moving {pair['moving']}"
                if self.facts.get("slice"):
                    caption += f", slice {self.facts['slice']['index']} of axis {self.facts['slice']['axis']}"
                caption += "."
            data = base64.b64encode(path.read_bytes()).decode()
            relative = path.relative_to(self.results_dir / "report").as_posix()
            parts.append(f"<figure id='{html.escape(self.anchor)}-{name}'><h3>{html.escape(heading)}</h3>"
                         f"<a href='{html.escape(relative)}'><img src='data:image/png;base64,{data}' "
                         f"width='{style.display_width(path)}' "
                         f"alt='{html.escape(self.dataset_id)}: {html.escape(heading)}'></a>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return "".join(parts)

    def summary(self) -> str:
        info = self.info
        n_pairs = int(self.board["n_pairs"].max()) if "n_pairs" in self.board else 0
        parts = []
        if info:
            shape = " × ".join(str(s) for s in info.get("shape", []))
            spacing = " × ".join(f"{s:g}" for s in info.get("spacing", []))
            parts.append(f"{info.get('ndim', '?')}D, {shape} voxels of {spacing} mm")
        parts.append(f"{n_pairs} test pairs")
        mi = info.get("intensity_label_mi", {}).get("splits", {})
        if mi:
            parts.append("MI(intensity; labels) " + ", ".join(f"{mi[s]:.2f} bits ({s})" for s in ("test", "train")
                                                               if s in mi))
        if "label_warp" in self.board:
            parts.append("labels warped by " + "/".join(sorted(set(self.board["label_warp"].dropna()))))
        return ", ".join(parts)

    def html(self) -> str:
        return (f"<section id='{html.escape(self.anchor)}'><h2>{html.escape(self.dataset_id)}</h2>"
                f"<p class='meta'>{html.escape(self.summary())}</p>"
                + "".join(f"<p class='failed'>Failed, not ranked: <b>{html.escape(m)}</b> ({html.escape(why)})</p>"
                          for m, why in self.failed.items())
                + self.tables_html(heading="Leaderboard") + self.generalization_html() + self.figures_html()
                + "</section>")

    def generalization_html(self) -> str:
        """The runs trained on this dataset on every evaluate_on target: Dice, its drop from in-domain, the rank
        there; each dataset's MI(intensity; labels) in its header."""
        table = self.generalization
        if table is None or table.empty:
            return ""
        datasets = [self.dataset_id, *self.targets]
        mi = table.drop_duplicates("evaluated_on").set_index("evaluated_on")["pair_mi"].to_dict()

        def header(dataset, label):
            value = mi.get(dataset, np.nan)
            bits = "" if pd.isna(value) else f"<span class='s'>MI(i; s) {value:.2f} bits</span>"
            return f"<th colspan='{1 if dataset == self.dataset_id else 3}'>{html.escape(dataset)} ({label}){bits}</th>"

        head = ("<tr><th rowspan='2' class='method'>method</th><th rowspan='2' class='class'>learns from</th>"
                + "".join(header(d, "in domain" if d == self.dataset_id else "target") for d in datasets)
                + "</tr><tr><th>Dice</th>" + "<th>Dice</th><th>drop</th><th>rank</th>" * len(self.targets) + "</tr>")
        body = []
        for method, rows in table.groupby("method", sort=False):
            rows = rows.set_index("evaluated_on")
            home = rows.loc[self.dataset_id]
            color = _hex(self.colors.get(method, (0, 0, 0)))
            cells = [f"<th class='method' scope='row'><span class='dot' style='background:{color}'></span>"
                     f"{html.escape(aggregate.method_label(home.to_dict() | {'method': method}))}</th>",
                     f"<td class='text class'>{html.escape(str(home.get('supervision', '–')))}</td>",
                     _dice_cell(home)]
            for target in self.targets:
                if target not in rows.index:
                    cells.append("<td class='num' colspan='3'>failed</td>")
                    continue
                row = rows.loc[target]
                cells += [_dice_cell(row),
                          f"<td class='num' title='in-domain mean Dice minus this one; 95 % bootstrap interval'>"
                          f"{row['dice_drop']:+.3f}<span class='s'>{row['dice_drop_ci_low']:+.3f} to "
                          f"{row['dice_drop_ci_high']:+.3f}</span></td>",
                          f"<td class='num'>{html.escape(aggregate.rank_text(row))}</td>"]
            body.append("<tr>" + "".join(cells) + "</tr>")
        failed = generalization.failed_on_targets(self.results_dir, self.dataset_id, self.targets)
        failures = "".join(f"<p class='failed'>Failed on {html.escape(t)}: <b>{html.escape(m)}</b> ({html.escape(why)})</p>"
                           for t, methods in failed.items() for m, why in methods.items())
        note = ("<p class='note'>Every run trained on this dataset also registered the test pairs of the datasets on "
                "the right (config <code>evaluate_on</code>), their images resampled onto the grid the network was "
                "trained on where the grids differ; methods without training registered them directly, with the "
                "values tuned on this dataset. Dice: mean over the seed-averaged test pairs, below it the 95 % "
                "bootstrap interval over pairs and seeds; drop: the in-domain mean minus the target's (positive: "
                "worse on the target), with its 95 % bootstrap interval; rank: by mean Dice among these methods on "
                "the target, with its interval. MI(i; s): mean over the dataset's test pairs of the mutual "
                "information between a voxel's intensity and its label (a pair: the mean of its two images'), how "
                "much the intensities say about the labels. results/" + html.escape(self.dataset_id)
                + "/generalization.csv holds the table, results/" + html.escape(self.dataset_id)
                + "/on_&lt;target&gt;/ each target's full leaderboard.</p>")
        return ("<h3>Generalization: trained here, tested elsewhere</h3>" + failures
                + f"<div class='table-wrap'><table class='leaderboard generalization'><thead>{head}</thead>"
                  f"<tbody>{''.join(body)}</tbody></table></div>" + note)


# ------------------------------------------------------------------------------------------------ provenance

def _provenance_html(sections: list[DatasetSection], command: str | None, config_hash: str | None, now: str) -> str:
    """The run (command, config hash, commit, date), the package versions, and every job's own provenance."""
    from regbench.runtime import git_commit

    versions = {}
    for package in REPORT_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    rows, job_versions = [], {}
    for section in sections:
        for method, records in section.records.items():
            provs = {step: record.get("provenance") or {} for step, record in records.items()}
            for prov in provs.values():
                for package, version in (prov.get("versions") or {}).items():
                    job_versions.setdefault(package, set()).add(version)
            first = provs.get("train") or provs.get("eval") or {}
            commits = sorted({_short_commit(p.get("git_commit")) for p in provs.values()})
            hashes = sorted({str(p.get("config_hash", "–")) for p in provs.values()})
            rows.append(
                f"<tr><td>{html.escape(section.dataset_id)}</td><td>{html.escape(method)}</td>"
                f"<td>{' '.join(f'<code>{html.escape(h)}</code>' for h in hashes)}</td>"
                f"<td class='num'>{html.escape(str(first.get('seed', '–')))}</td>"
                f"<td>{html.escape(section.device(method))}</td>"
                f"<td>{' '.join(f'<code>{html.escape(c)}</code>' for c in commits)}</td>"
                f"<td>{html.escape(str(provs.get('train', {}).get('date', '–')))}</td>"
                f"<td>{html.escape(str(provs.get('eval', {}).get('date', '–')))}</td></tr>")
    chips = ""
    for package, version in versions.items():
        other = sorted(str(v) for v in job_versions.get(package, set()) if v != version)
        note = f" <span class='warn'>(jobs: {html.escape(', '.join(other))})</span>" if other else ""
        chips += f"<span class='chip'>{html.escape(package)} <code>{html.escape(str(version))}</code>{note}</span>"
    report_step = shlex.join(["python", "-m", "regbench.report.page", *sys.argv[1:]]) \
        if Path(sys.argv[0]).name == "report.py" else shlex.join(sys.argv)
    facts = [
        ("command", f"<code>{html.escape(command)}</code>" if command else "–"),
        ("config hash", f"<code>{html.escape(config_hash)}</code>" if config_hash else "–"),
        ("regbench commit", f"<code>{html.escape(git_commit())}</code>"),
        ("report made", html.escape(now) + f" by <code>{html.escape(report_step)}</code>"),
        ("python", html.escape(sys.version.split()[0])),
        ("packages", chips),
    ]
    return ("<section id='provenance'><h2>Provenance</h2><dl class='facts'>"
            + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
            "<h3>Jobs</h3><p class='note'>Every output carries its own provenance (train.json, eval.json): the "
            "hash of the job's settings, its seed and device, the regbench commit it ran, and when.</p>"
            "<div class='table-wrap'><table class='plain'><thead><tr><th>dataset</th><th>method</th>"
            "<th>settings hash</th><th>seed</th><th>device</th><th>commit</th><th>trained</th><th>registered</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>")


# ------------------------------------------------------------------------------------------------ HTML helpers

CSS = """
:root{--ink:#1d2329;--muted:#68717a;--line:#dfe3e8;--head:#f3f5f7;--accent:#0b6e99;--best:#fff6d6}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);
margin:0 auto;padding:1.5rem 2rem 4rem;max-width:1320px;background:#fff}
header{border-bottom:2px solid var(--ink);margin-bottom:1.5rem;padding-bottom:.6rem}
h1{font-size:1.8rem;margin:.2rem 0}
h2{font-size:1.4rem;margin:2.2rem 0 .2rem;border-bottom:1px solid var(--line);padding-bottom:.2rem}
h3{font-size:1.05rem;margin:1.6rem 0 .5rem}
.meta{color:var(--muted);margin:.1rem 0 .6rem}
nav a{margin-right:1rem;color:var(--accent);text-decoration:none;font-weight:600}
nav a:hover{text-decoration:underline}
.table-wrap{overflow-x:auto;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;font-size:.84rem;font-variant-numeric:tabular-nums}
.table-wrap table{width:100%}
th,td{padding:.32rem .45rem;border-bottom:1px solid var(--line);vertical-align:top}
thead th{background:var(--head);font-weight:600;text-align:center;line-height:1.25;vertical-align:bottom}
thead th.group{white-space:nowrap}
thead th.group{text-transform:uppercase;letter-spacing:.04em;font-size:.72rem;color:var(--muted)}
th.method{text-align:left;white-space:nowrap;position:sticky;left:0;background:#fff;z-index:1}
thead th.method{background:var(--head)}
td.num{text-align:right;white-space:nowrap}
td.rank{text-align:right;white-space:nowrap;font-weight:600}
td.text{text-align:left;font-size:.78rem;color:var(--muted);min-width:7rem}
td.best{font-weight:700;background:var(--best)}
td .s{display:block;font-size:.74rem;font-weight:400;color:var(--muted)}
td .sig{color:var(--accent);font-size:.72rem;margin-left:.15rem;vertical-align:super}
tbody tr:hover td,tbody tr:hover th{background:#f6f9fb}
tbody tr:hover td.best{background:var(--best)}
.dot{display:inline-block;width:.7rem;height:.7rem;border-radius:50%;margin-right:.45rem;vertical-align:-.05rem}
.regularity{border-left:1px solid var(--line)}
.cost,.other{border-left:1px solid var(--line)}
.note{color:var(--muted);font-size:.82rem;max-width:70rem}
table.plain th{text-align:left}
table.plain td,table.plain th{border-bottom:1px solid var(--line)}
details.published,details.deviations{margin:.6rem 0 0}
details.published summary,details.deviations summary{cursor:pointer;color:var(--accent);font-weight:600;
font-size:.9rem}
details.deviations h4{margin:.8rem 0 .2rem;font-size:.9rem}
details.deviations ul{margin:.2rem 0;padding-left:1.2rem;font-size:.85rem;max-width:70rem}
details.deviations li.other{color:var(--muted)}
details.deviations li.other b{font-weight:500}
.dev{color:#b35900;margin-left:.2rem;cursor:help}
.floor{color:var(--muted);margin-left:.2rem;cursor:help}
figure{margin:1.2rem 0 2rem}
figure img{max-width:100%;height:auto;display:block;border:1px solid var(--line);border-radius:4px}
figcaption{color:var(--muted);font-size:.85rem;margin-top:.4rem;max-width:70rem}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1.2rem;font-size:.9rem}
dl.facts dt{font-weight:600}
dl.facts dd{margin:0;overflow-wrap:anywhere}
.chip{display:inline-block;margin:0 .9rem .3rem 0;white-space:nowrap}
.warn{color:#b35900}
code{font:.82rem/1.4 ui-monospace,"DejaVu Sans Mono",monospace;background:var(--head);padding:.05rem .25rem;
border-radius:3px}
"""


def _dice_cell(row) -> str:
    """Mean Dice and its 95 % bootstrap interval beneath it."""
    if pd.isna(row.get("dice_mean", np.nan)):
        return "<td class='num'>–</td>"
    interval = "" if pd.isna(row.get("dice_ci_low", np.nan)) else \
        f"<span class='s'>{row['dice_ci_low']:.3f} to {row['dice_ci_high']:.3f}</span>"
    return f"<td class='num'>{row['dice_mean']:.3f}{interval}</td>"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def _number(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _recipes_text(deviation: dict) -> str:
    recipes = deviation.get("recipes", [])
    if "*" in recipes:
        return "every recipe"
    return ("recipes: " + ", ".join(recipes)) if recipes else "an option, off in every recipe"


def _spacing_text(spacing) -> str:
    return "x".join(f"{s:.3g}" for s in spacing) + " mm" if spacing else "? mm"


def _hex(color) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in color[:3])


def _count(value) -> str:
    """1.33 M, 12.3 k, 0."""
    if value is None or pd.isna(value):
        return "–"
    value = float(value)
    if value >= 1e6:
        return f"{value / 1e6:.3g} M"
    if value >= 1e3:
        return f"{value / 1e3:.3g} k"
    return f"{value:.0f}"


def _int_or_dash(value) -> str:
    return "–" if value is None or pd.isna(value) else str(int(value))


def _short_commit(commit) -> str:
    if not commit or commit == "unknown":
        return "unknown"
    head, _, dirty = str(commit).partition("-")
    return head[:10] + ("-" + dirty if dirty else "")


# ------------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regbench.report.page", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="step", required=True)
    p = commands.add_parser("dataset", help="results/report/<dataset>/: the figures and the table of one dataset")
    p.add_argument("--results", required=True)
    p.add_argument("--prepared", required=True, help="data/<dataset>/prepared")
    p.add_argument("--dataset", required=True)
    p.add_argument("--methods", required=True, help="comma-separated method ids, in the config's order")
    p.add_argument("--settings", help="the job settings as JSON (device, torch_threads) for the example registrations")
    p.add_argument("--lock", default="", help="the tuning lock file the run trained with (config tuned:), if any")
    p = commands.add_parser("page", help="results/report/index.html and results/leaderboard.md")
    p.add_argument("--results", required=True)
    p.add_argument("--data", default="data", help="the data folder (for data/<dataset>/prepared/dataset.json)")
    p.add_argument("--methods", required=True, help='JSON: {"dataset": ["method", ...]}')
    p.add_argument("--command", default=os.environ.get("REGBENCH_COMMAND") or None,
                   help="the command line that ran the workflow, for the provenance (default: $REGBENCH_COMMAND, which "
                        "the workflow sets)")
    p.add_argument("--config-hash", help="the hash of the run's resolved config, for the provenance")
    p.add_argument("--targets", help='JSON: {"dataset": ["other dataset", ...]}, the evaluate_on targets of each')
    args = parser.parse_args(argv)
    try:
        if args.step == "dataset":
            settings = json.loads(args.settings) if args.settings else None
            write_dataset(args.results, args.prepared, args.dataset, args.methods.split(","), settings,
                          args.lock or None)
        else:
            write_page(args.results, json.loads(args.methods), args.data, args.command, args.config_hash,
                       json.loads(args.targets) if args.targets else None)
    except (InputError, ValueError) as err:
        print(f"regbench report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
