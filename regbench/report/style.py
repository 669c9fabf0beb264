"""The one look of every report figure: theme, sizes, a colour per method, image colour maps, saving.

Every function of :mod:`regbench.report.plots` starts with :func:`apply` and ends with :func:`save`, and
takes its colours from :func:`method_colors`, so a method has the same colour in every figure of a
run (the order of the config's ``methods``; ``identity``, the floor of every table, is grey).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from regbench.io import atomic_path  # noqa: E402

#: seaborn's theme for every figure
THEME = {"style": "whitegrid", "context": "notebook", "font_scale": 0.9}
RC = {
    "font.family": "DejaVu Sans",
    "axes.titlesize": "medium",
    "axes.titleweight": "bold",
    "axes.labelsize": "medium",
    "axes.edgecolor": "#444444",
    "grid.color": "#e3e3e3",
    "legend.frameon": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
#: PNG resolution, and the CSS pixels per inch at which the HTML page shows every figure (so that text
#: has one size on the page whatever the figure's width)
DPI = 150
DISPLAY_PPI = 84
#: width of one figure panel and of the widest figure (the page's width at DISPLAY_PPI), inches
PANEL = 3.2
MAX_WIDTH = 15.0

#: colour of the baseline without registration, and the sequence the other methods take in order
BASELINE = {"identity": "#8c8c8c"}
_GREY = "#949494"

#: image panels: intensities, a signed difference, det(Jacobian) (1 = no volume change) and folds
IMAGE_CMAP = "gray"
DIFFERENCE_CMAP = "RdBu_r"
JACOBIAN_CMAP = "PuOr_r"
FOLD_COLOR = "#d7191c"
GRID_COLOR = "#1f1f1f"


def apply() -> None:
    """Set the theme (call before drawing a figure)."""
    sns.set_theme(**THEME, palette="colorblind", rc=RC)


def method_colors(method_ids: list[str]) -> dict[str, tuple]:
    """A colour per method in the given order (the config's): grey for ``identity``, then seaborn's
    colour-blind palette without its grey, then its ``deep`` palette, then evenly spaced hues."""
    others = [m for m in method_ids if m not in BASELINE]
    sequence = [c for c in sns.color_palette("colorblind") if matplotlib.colors.to_hex(c) != _GREY]
    sequence += [c for c in sns.color_palette("deep") if matplotlib.colors.to_hex(c) != "#8c8c8c"]
    if len(others) > len(sequence):
        sequence += sns.color_palette("husl", len(others) - len(sequence))
    colors = {m: matplotlib.colors.to_rgb(BASELINE[m]) for m in method_ids if m in BASELINE}
    colors.update({m: tuple(sequence[i]) for i, m in enumerate(others)})
    return colors


def figure(width: float, height: float, **subplots):
    """``plt.subplots`` at a size capped to :data:`MAX_WIDTH` (the height scales with it)."""
    if width > MAX_WIDTH:
        height, width = height * MAX_WIDTH / width, MAX_WIDTH
    return plt.subplots(figsize=(width, height), **subplots)


def save(fig, path, tight: bool = True) -> None:
    """Save atomically (PNG at :data:`DPI`, or the format of the suffix) and close the figure.

    ``tight``: crop to the drawn artists (one more draw of the figure); a constrained-layout figure with nothing
    outside its axes is already tight, and its many-panel figures draw twice as fast without it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight" if tight else None, format=Path(path).suffix.lstrip("."))
    plt.close(fig)


def display_width(path) -> int:
    """The width in CSS pixels at which a saved PNG shows its text at the size of every other figure."""
    with open(path, "rb") as png:
        header = png.read(24)
    if header[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    return round(int.from_bytes(header[16:20], "big") * DISPLAY_PPI / DPI)
