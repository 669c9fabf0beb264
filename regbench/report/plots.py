"""The report's figures: tidy tables in, one PNG out, each in the look of :mod:`regbench.report.style`.

Every function takes ``colors`` (method -> colour, :func:`regbench.report.style.method_colors`) and draws
the methods in the order of that mapping's keys unless an ``order`` is given (the leaderboard's).
Units are those of the per-pair tables (spec/evaluation.md): Dice in [0, 1], folds in % of voxels,
runtime and training time in seconds.
"""
from __future__ import annotations

import math

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd
import seaborn as sns

from regbench.report import style


def dice_per_structure(label_tables: dict[str, pd.DataFrame], path, colors: dict | None = None) -> None:
    """Dice of each anatomical structure over the test pairs, a box per method (the VoxelMorph paper's
    figure, TMI 2019 Fig. 5).

    ``label_tables``: labels.csv per method (columns ``name``, ``dice``). Left and right structures share
    one box (names stripped of Left-/Right-), as in that figure. Structures are ordered by their median
    Dice over all methods; rows wrap when the figure would be wider than :data:`style.MAX_WIDTH`.
    """
    style.apply()
    methods = list(label_tables)
    colors = colors or style.method_colors(methods)
    frames = []
    for method, table in label_tables.items():
        frame = table[["name", "dice"]].dropna().copy()
        frame["structure"] = frame["name"].str.replace(r"^(Left|Right)[-_]", "", regex=True)
        frame["method"] = method
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    order = data.groupby("structure")["dice"].median().sort_values(ascending=False).index.tolist()
    per_structure = 0.12 * len(methods) + 0.3  # inches: a box per method and a gap
    per_row = max(1, int((style.MAX_WIDTH - 1.0) // per_structure))
    rows = math.ceil(len(order) / per_row)
    per_row = math.ceil(len(order) / rows)
    width = style.MAX_WIDTH if rows > 1 else max(7.0, 1.0 + per_row * per_structure)
    fig, axes = plt.subplots(rows, 1, figsize=(width, 3.0 * rows + 0.6), squeeze=False, layout="constrained")
    for row, axis in enumerate(axes[:, 0]):
        chunk = order[row * per_row:(row + 1) * per_row]
        sns.boxplot(data=data[data["structure"].isin(chunk)], x="structure", y="dice", hue="method",
                    order=chunk, hue_order=methods, palette=colors, ax=axis, fliersize=1.5, linewidth=0.7,
                    width=0.8, legend=row == 0)
        axis.set_xlabel("")
        axis.set_ylabel("Dice")
        axis.set_ylim(0, 1)
        axis.set_xlim(-0.5, per_row - 0.5)
        axis.tick_params(axis="x", rotation=35)
        for tick in axis.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    axes[0, 0].legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncol=min(len(methods), 7), fontsize="small",
                      handlelength=1.2, columnspacing=1.0, borderaxespad=0)
    style.save(fig, path)


def accuracy_regularity(board: pd.DataFrame, path, colors: dict) -> None:
    """Mean Dice against folding (% of voxels with det J <= 0) and against SDlogJ, one point per method: the
    trade-off every deformable method makes (better: up and to the left). Bars: the 95 % bootstrap intervals of
    the means over test pairs and seeds (``_ci_low``, ``_ci_high``), on both axes.

    ``board``: leaderboard.csv rows (``method``, ``dice_mean``, ``fold_pct_mean``, ``sdlogj_mean`` and their
    intervals; without intervals, the Dice bar is ± its std over pairs).
    """
    style.apply()
    fig, axes = plt.subplots(1, 2, figsize=(2 * style.PANEL + 2.6, style.PANEL + 0.3), layout="constrained",
                             sharey=True)
    labels = []
    for axis, (column, label) in zip(axes, [("fold_pct", "folding: voxels with det J ≤ 0 (%)"),
                                           ("sdlogj", "SDlogJ: std of log det J")]):
        xs = []
        for _, row in board.iterrows():
            x, y = row[f"{column}_mean"], row["dice_mean"]
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            color = colors.get(row["method"], "black")
            axis.errorbar(x, y, xerr=_interval(row, column), yerr=_interval(row, "dice", fallback_std=True), fmt="o",
                          color=color, markersize=7, elinewidth=1, capsize=2, markeredgecolor="white",
                          markeredgewidth=0.8, zorder=3, alpha=0.9)
            labels.append((axis, x, y, row["method"], _darker(color)))
            xs.append(x)
        axis.set_xlabel(label)
        high = max(xs, default=0.0)
        high = high if high > 0 else (1.0 if column == "fold_pct" else 0.1)
        axis.set_xlim(-0.06 * high, 1.3 * high)
    axes[0].set_ylabel("mean Dice")
    axes[0].margins(y=0.12)
    axes[1].text(0.98, 0.02, "better: up and to the left", transform=axes[1].transAxes, ha="right", va="bottom",
                 fontsize="small", color="#666666")
    _place_labels(fig, labels)
    style.save(fig, path)


def _interval(row, metric: str, fallback_std: bool = False):
    """The errorbar extent (2 x 1: below, above) of a metric's bootstrap interval; ± std, or none, without one."""
    mean, low, high = row.get(f"{metric}_mean"), row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
        return np.array([[max(mean - low, 0.0)], [max(high - mean, 0.0)]])
    std = row.get(f"{metric}_std")
    return std if fallback_std and std is not None and np.isfinite(std) else None


def rank_blobs(distribution: pd.DataFrame, board: pd.DataFrame, path, colors: dict) -> None:
    """The blob plot of challengeR (Wiesenfarth et al. 2021): for each method (by its rank), a blob at every rank
    it takes in the bootstrap, its area the share of replicates; a black dot at the median rank and a line over
    the 95 % interval. One panel over every method, one per supervision class with two methods or more."""
    style.apply()
    scopes = ["overall"] + [c for c, g in board.groupby("supervision", sort=False) if len(g) > 1
                            and c in set(distribution["scope"])]
    widths = [max(3.0, 0.42 * len(board if s == "overall" else board[board["supervision"] == s]) + 1.2)
              for s in scopes]
    fig, axes = plt.subplots(1, len(scopes), figsize=(min(sum(widths), style.MAX_WIDTH), style.PANEL + 0.8),
                             squeeze=False, layout="constrained", gridspec_kw={"width_ratios": widths})
    for axis, scope in zip(axes[0], scopes):
        members = board if scope == "overall" else board[board["supervision"] == scope]
        prefix = "" if scope == "overall" else "class_"
        members = members.sort_values([f"{prefix}rank", "method"], kind="stable")
        shares = distribution[distribution["scope"] == scope]
        for position, (_, row) in enumerate(members.iterrows()):
            method, color = row["method"], colors.get(row["method"], "black")
            mine = shares[shares["method"] == method]
            axis.scatter(np.full(len(mine), position), mine["rank"], s=600 * mine["share"], color=color, alpha=0.55,
                         edgecolors="none", zorder=2)
            axis.plot([position, position], [row[f"{prefix}rank_low"], row[f"{prefix}rank_high"]], color="black",
                      lw=1.0, zorder=3)
            if len(mine):
                ordered = mine.sort_values("rank")
                median = ordered["rank"].to_numpy()[np.searchsorted(ordered["share"].cumsum().to_numpy(), 0.5)]
                axis.plot(position, median, "o", color="black", markersize=3, zorder=4)
        axis.set_xticks(range(len(members)))
        axis.set_xticklabels(members["method"], rotation=60, ha="right", fontsize="small")
        axis.set_ylim(len(members) + 0.6, 0.4)
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title("all methods" if scope == "overall" else f"learns from: {scope}", fontsize="small")
    axes[0, 0].set_ylabel("rank by mean Dice (bootstrap)")
    style.save(fig, path)


def _place_labels(fig, labels: list[tuple]) -> None:
    """Name each point beside it. From the highest point down, a name that would overlap one placed before
    moves down just below it, so names keep the order of their points; a moved name gets a thin line to
    its point."""
    fig.canvas.draw()  # settle the layout: positions on the canvas are final
    size = plt.rcParams["font.size"] * 0.83 * fig.dpi / 72  # "small" text height in pixels
    placed = []
    for axis, x, y, text, color in sorted(labels, key=lambda item: -item[2]):
        px, py = axis.transData.transform((x, y))
        width = 0.6 * size * len(text)
        left, bottom = px + 7, py - 0.5 * size
        while True:
            box = (left, bottom, left + width, bottom + size)
            hits = [other for other in placed if _overlap(box, other)]
            if not hits:
                break
            bottom = min(other[1] for other in hits) - 0.15 * size - size
        placed.append(box)
        moved = abs(bottom - (py - 0.5 * size)) > 0.4 * size
        axis.annotate(text, (x, y), xytext=((box[0] - px) * 72 / fig.dpi, (box[1] + 0.5 * size - py) * 72 / fig.dpi),
                      textcoords="offset points", fontsize="small", color=color, va="center",
                      arrowprops=dict(arrowstyle="-", lw=0.5, color=color, shrinkA=0, shrinkB=4) if moved else None)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _darker(color) -> tuple:
    return tuple(0.75 * c for c in mcolors.to_rgb(color))


def runtime(pair_tables: dict[str, pd.DataFrame], training: dict[str, float], path, colors: dict,
            order: list[str] | None = None, devices: dict[str, str] | None = None) -> None:
    """Left: registration time of every test pair (log scale; the bar marks the median). Right: training
    wall time per method (log scale; methods without training say so).

    ``pair_tables``: pairs.csv per method (``runtime_s``); ``training``: method -> seconds (NaN when the
    method is not trained); ``devices``: method -> device text shown beside the times.
    """
    style.apply()
    order = order or list(pair_tables)
    height = max(2.4, 0.34 * len(order) + 1.1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * style.PANEL + 4.0, height), layout="constrained",
                                      sharey=True)
    frames = [pd.DataFrame({"method": m, "runtime_s": pair_tables[m]["runtime_s"].to_numpy(float)}) for m in order]
    data = pd.concat(frames, ignore_index=True)
    measured = data[np.isfinite(data["runtime_s"]) & (data["runtime_s"] > 0)]
    if not measured.empty:
        sns.stripplot(data=measured, x="runtime_s", y="method", hue="method", order=order, hue_order=order,
                      palette=colors, ax=left, size=3.5, alpha=0.6, jitter=0.22, legend=False, log_scale=True)
    for index, method in enumerate(order):
        values = measured.loc[measured["method"] == method, "runtime_s"]
        if values.empty:
            left.text(0.02, index, "not measured", transform=left.get_yaxis_transform(), va="center",
                      fontsize="small", color="#666666")
            continue
        left.plot([values.median()] * 2, [index - 0.32, index + 0.32], color="black", lw=1.6, zorder=4)
    left.set_xscale("log")
    left.set_xlabel("registration time per pair (s)")
    left.set_ylabel("")
    left.set_ylim(len(order) - 0.5, -0.5)
    seconds = [training.get(m, np.nan) for m in order]
    trained = [i for i, s in enumerate(seconds) if np.isfinite(s) and s > 0]
    if trained:
        right.barh([i for i in trained], [seconds[i] for i in trained],
                   color=[colors.get(order[i], "black") for i in trained], height=0.6)
        right.set_xscale("log")
        high = max(seconds[i] for i in trained)
        low = min(seconds[i] for i in trained)
        right.set_xlim(10 ** math.floor(math.log10(low) - 0.3), 10 ** math.ceil(math.log10(high) + 0.6))
    for index, method in enumerate(order):
        text = human_seconds(seconds[index]) if index in trained else "no training"
        if devices and devices.get(method) and index in trained:
            text += f"  {devices[method]}"
        x = seconds[index] if index in trained else None
        if x is None:
            right.text(0.02, index, text, transform=right.get_yaxis_transform(), va="center", fontsize="small",
                       color="#666666")
        else:
            right.annotate(text, (x, index), xytext=(4, 0), textcoords="offset points", va="center",
                           fontsize="small")
    right.set_xlabel("training time (wall clock)")
    right.grid(axis="y", visible=False)
    left.grid(axis="y", visible=False)
    style.save(fig, path)


def human_seconds(seconds: float) -> str:
    """12.3 s, 4.2 min, 3.5 h (NaN: an en dash)."""
    if not np.isfinite(seconds):
        return "–"
    if seconds < 0.01:
        return f"{seconds * 1e3:.2g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


#: loss-term panels per row of the training curves
CURVE_COLUMNS = 7


def training_curves(logs: dict[str, pd.DataFrame], path, colors: dict) -> None:
    """Every logged loss term against the iteration, a row per trained method: the weighted total first
    (``loss``), then each term unweighted as ``loss_terms`` returned it (train_log.csv).

    At most :data:`CURVE_COLUMNS` panels a row (more terms wrap onto the next row). A panel uses a log
    scale when its values are positive and span more than a decade; long logs get a
    running mean over the raw values; training stages (``stage``) are separated by dotted lines.
    """
    style.apply()
    if not logs:
        fig, axis = plt.subplots(figsize=(6, 1.2))
        axis.axis("off")
        axis.text(0.5, 0.5, "No method of this run is trained.", ha="center", va="center")
        style.save(fig, path)
        return
    terms = {m: ["loss"] + [c for c in log.columns if c not in ("iteration", "stage", "loss")]
             for m, log in logs.items()}
    # a method with many terms (the pyramid logs each level's) wraps onto more rows of CURVE_COLUMNS panels
    rows = [(method, terms[method][start:start + CURVE_COLUMNS], start == 0, start + CURVE_COLUMNS >= len(terms[method]))
            for method in logs for start in range(0, len(terms[method]), CURVE_COLUMNS)]
    ncols = max(len(panels) for _, panels, _, _ in rows)
    panel = min(2.7, style.MAX_WIDTH / ncols)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(panel * ncols, 1.9 * len(rows) + 0.5), squeeze=False,
                             layout="constrained")
    for index, (method, panels, first, last) in enumerate(rows):
        log, color = logs[method], colors.get(method, "black")
        below = len(rows[index + 1][1]) if not last else 0   # panels of this method on the next row
        for col in range(ncols):
            axis = axes[index, col]
            if col >= len(panels):
                axis.axis("off")
                continue
            term = panels[col]
            x, y = log["iteration"].to_numpy(float), log[term].to_numpy(float)
            window = max(1, len(y) // 25)
            if window > 1:
                axis.plot(x, y, color=color, lw=0.6, alpha=0.35)
                y_smooth = pd.Series(y).rolling(window, center=True, min_periods=1).mean().to_numpy()
                axis.plot(x, y_smooth, color=color, lw=1.6)
            else:
                axis.plot(x, y, color=color, lw=1.6, marker="o" if len(y) < 12 else None, markersize=3)
            finite = y[np.isfinite(y)]
            if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 10:
                axis.set_yscale("log")
            if "stage" in log and log["stage"].nunique() > 1:
                changes = np.flatnonzero(log["stage"].to_numpy()[1:] != log["stage"].to_numpy()[:-1]) + 1
                for change in changes:
                    axis.axvline(x[change], color="#777777", lw=0.8, ls=":")
            axis.set_title("total (weighted)" if term == "loss" else term, fontsize="small",
                           fontweight="bold" if term == "loss" else "normal")
            axis.tick_params(labelsize="x-small")
            axis.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
            axis.yaxis.get_offset_text().set_fontsize("x-small")
            if col >= below:
                axis.set_xlabel("iteration", fontsize="small")
        if first:
            axes[index, 0].set_ylabel(method, fontsize="medium", fontweight="bold", color=_darker(color))
    style.save(fig, path, tight=False)   # constrained layout, nothing outside the panels


#: panels a row in the tuning figure
TUNING_COLUMNS = 5


def tuning_trials(trials: dict[str, pd.DataFrame], path, colors: dict, chosen: dict[str, int] | None = None,
                  note: str = "") -> None:
    """Val Dice against the trial, a panel per tuned method (the same trials for each): feasible trials as dots,
    infeasible ones (folding past the bound) as crosses, diverged ones at the panel's foot; the line is the
    best feasible val Dice so far, the ring the chosen trial."""
    style.apply()
    if not trials:
        fig, axis = plt.subplots(figsize=(6, 1.2))
        axis.axis("off")
        axis.text(0.5, 0.5, note or "No method was tuned on this dataset.", ha="center", va="center")
        style.save(fig, path)
        return
    methods = list(trials)
    ncols = min(TUNING_COLUMNS, len(methods))
    nrows = -(-len(methods) // ncols)
    panel = min(2.6, style.MAX_WIDTH / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, 2.0 * nrows + 0.4), squeeze=False, sharey=True,
                             layout="constrained")
    finite = pd.concat([t["val_dice"] for t in trials.values()]).dropna()
    floor = float(finite.min()) - 0.02 if len(finite) else 0.0
    for index, axis in enumerate(axes.flat):
        if index >= len(methods):
            axis.axis("off")
            continue
        method = methods[index]
        table, color = trials[method], colors.get(method, "black")
        feasible = table["status"] == "feasible"
        axis.plot(table.loc[feasible, "trial"], table.loc[feasible, "val_dice"], "o", color=color, markersize=4)
        infeasible = table["status"] == "infeasible"
        axis.plot(table.loc[infeasible, "trial"], table.loc[infeasible, "val_dice"], "x", color=color, markersize=5)
        diverged = table["status"] == "diverged"
        axis.plot(table.loc[diverged, "trial"], np.full(int(diverged.sum()), floor), "v", color="#b35900",
                  markersize=5)
        best = table["val_dice"].where(feasible).cummax()
        axis.step(table["trial"], best, where="post", color=color, lw=1.2, alpha=0.8)
        if chosen and method in chosen:
            row = table[table["trial"] == chosen[method]]
            axis.plot(row["trial"], row["val_dice"], "o", markerfacecolor="none", markeredgecolor="black",
                      markersize=9)
        axis.set_title(method, fontsize="small", fontweight="bold", color=_darker(color))
        axis.tick_params(labelsize="x-small")
        axis.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        if index % ncols == 0:
            axis.set_ylabel("val Dice", fontsize="small")
        if index >= len(methods) - ncols:
            axis.set_xlabel("trial", fontsize="small")
    style.save(fig, path)


def registration_examples(fixed: np.ndarray, moving: np.ndarray, rows: list[dict], path, colors: dict) -> None:
    """One test pair registered by every method, a row per method: fixed, moving, warped, warped − fixed,
    the deformation grid and det J.

    Images are 2D arrays ready to show (row 0 at the top). Each of ``rows`` holds ``method``, ``warped``,
    ``jacobian`` (det ∇φ on the same slice), ``grid`` (a list of polylines, each an ``n x 2`` array of
    (row, column) positions of φ = id + u along a line of the fixed grid) and ``dice``, ``fold_pct`` (the
    pair's scores). Differences share one symmetric colour scale; det J is shown on [0, 2] with 1 (no
    change of volume) white and folds (det J ≤ 0) in :data:`style.FOLD_COLOR`.
    """
    style.apply()
    columns = ["fixed", "moving", "warped", "warped − fixed", "deformation grid", "det J"]
    height, width = fixed.shape
    panel = 1.75
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False, layout="constrained",
                             figsize=(panel * len(columns) + 0.4, panel * height / width * len(rows) + 1.0))
    vmax = np.nanpercentile(np.abs(moving - fixed), 99.5) or 1.0
    jacobian_cmap = plt.get_cmap(style.JACOBIAN_CMAP).with_extremes(under=style.FOLD_COLOR)
    difference = jacobian = None
    for index, row in enumerate(rows):
        ax = axes[index]
        ax[0].imshow(fixed, cmap=style.IMAGE_CMAP, vmin=0, vmax=1)
        ax[1].imshow(moving, cmap=style.IMAGE_CMAP, vmin=0, vmax=1)
        ax[2].imshow(row["warped"], cmap=style.IMAGE_CMAP, vmin=0, vmax=1)
        difference = ax[3].imshow(row["warped"] - fixed, cmap=style.DIFFERENCE_CMAP, vmin=-vmax, vmax=vmax)
        ax[4].imshow(fixed, cmap="gray_r", vmin=0, vmax=1, alpha=0.2)
        for line in row["grid"]:
            ax[4].plot(line[:, 1], line[:, 0], color=style.GRID_COLOR, lw=0.5)
        ax[4].set_xlim(-0.5, width - 0.5)
        ax[4].set_ylim(height - 0.5, -0.5)
        jacobian = ax[5].imshow(row["jacobian"], cmap=jacobian_cmap, vmin=0, vmax=2)
        for axis in ax:
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
        color = _darker(colors.get(row["method"], "black"))
        ax[0].set_ylabel(row["method"], fontweight="bold", color=color)
        _corner_label(ax[2], f"Dice {row['dice']:.3f}")
        _corner_label(ax[5], f"folds {row['fold_pct']:.3g} %")
        if index == 0:
            for axis, name in zip(ax, columns):
                axis.set_title(name)
    bar = fig.colorbar(difference, ax=axes[:, 3], orientation="horizontal", fraction=0.04 / max(1, len(rows)) ** 0.5,
                       aspect=12, label="intensity difference")
    bar.set_ticks([-vmax, 0, vmax], labels=[f"{-vmax:.2g}", "0", f"{vmax:.2g}"])
    bar = fig.colorbar(jacobian, ax=axes[:, 5], orientation="horizontal", extend="both",
                       fraction=0.04 / max(1, len(rows)) ** 0.5, aspect=12, label="det J (folds in red)")
    bar.set_ticks([0, 1, 2])
    style.save(fig, path)


def _corner_label(axis, text: str) -> None:
    axis.text(0.03, 0.03, text, transform=axis.transAxes, ha="left", va="bottom", fontsize="x-small",
              color="white", bbox={"boxstyle": "round,pad=0.2", "facecolor": "black", "alpha": 0.55, "lw": 0})
