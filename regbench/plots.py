"""Figures of the report, all drawn in one style (seaborn's whitegrid, one palette, one size)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from regbench.io import atomic_path  # noqa: E402

STYLE = {"style": "whitegrid", "context": "notebook", "palette": "colorblind"}


def apply_style() -> None:
    sns.set_theme(**STYLE)


def save(figure, path) -> None:
    """Save atomically (PNG at 150 dpi, or by the suffix)."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, bbox_inches="tight", format=Path(path).suffix.lstrip("."))
    plt.close(figure)


def dice_per_structure(label_tables: dict[str, pd.DataFrame], path, title: str = "") -> None:
    """Dice of each anatomical structure, a box per method (the VoxelMorph paper's figure).

    Left and right structures share one box (names stripped of Left-/Right-), as in that figure.
    """
    apply_style()
    frames = []
    for method, table in label_tables.items():
        frame = table[["name", "dice"]].dropna().copy()
        frame["structure"] = frame["name"].str.replace(r"^(Left|Right)[-_]", "", regex=True)
        frame["method"] = method
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    order = (data[data["method"] == data["method"].iloc[0]].groupby("structure")["dice"].median()
             .sort_values(ascending=False).index.tolist())
    order += sorted(set(data["structure"]) - set(order))
    width = max(8.0, 0.55 * len(order) * max(1, len(label_tables)) ** 0.5)
    figure, axis = plt.subplots(figsize=(width, 4.5))
    sns.boxplot(data=data, x="structure", y="dice", hue="method", order=order, ax=axis,
                fliersize=2, linewidth=0.8)
    axis.set_xlabel("")
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1)
    axis.tick_params(axis="x", rotation=60)
    for tick in axis.get_xticklabels():
        tick.set_horizontalalignment("right")
    axis.legend(title="method", loc="lower left", fontsize="small")
    if title:
        axis.set_title(title)
    save(figure, path)
