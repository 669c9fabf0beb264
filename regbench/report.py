"""The report: results/leaderboard.md, figures, and results/report/index.html (self-contained, offline)."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from regbench import aggregate, plots
from regbench.io import write_text


def figure_paths(results_dir, dataset_id: str) -> dict[str, Path]:
    folder = Path(results_dir) / "report" / dataset_id
    return {"dice_per_structure": folder / "dice_per_structure.png"}


def write_figures(results_dir, dataset_id: str, method_ids: list[str]) -> None:
    tables = {m: pd.read_csv(Path(results_dir) / dataset_id / m / "labels.csv") for m in method_ids}
    paths = figure_paths(results_dir, dataset_id)
    plots.dice_per_structure(tables, paths["dice_per_structure"], title=f"{dataset_id}: Dice per structure")


def write_report(results_dir, dataset_ids: list[str], methods: dict[str, list[str]]) -> None:
    results_dir = Path(results_dir)
    aggregate.write_markdown(results_dir, dataset_ids)
    sections = []
    for dataset_id in dataset_ids:
        write_figures(results_dir, dataset_id, methods[dataset_id])
        board = pd.read_csv(results_dir / dataset_id / "leaderboard.csv")
        figures = "".join(
            f'<figure><img src="{path.relative_to(results_dir / "report").as_posix()}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(name.replace('_', ' '))}</figcaption></figure>"
            for name, path in figure_paths(results_dir, dataset_id).items())
        sections.append(f"<h2>{html.escape(dataset_id)}</h2>{_html_table(board)}{figures}")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>regbench report</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
            "td,th{padding:.25em .6em;border-bottom:1px solid #ccc;text-align:right}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>"
            "<h1>regbench report</h1>" + "".join(sections) + "</body></html>\n")
    write_text(results_dir / "report" / "index.html", page)


def _html_table(board: pd.DataFrame) -> str:
    columns = [c for c, *_ in aggregate.MARKDOWN_COLUMNS if f"{c}_mean" in board]
    head = "<tr><th>method</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "<th>pairs</th></tr>"
    body = ""
    for _, row in board.iterrows():
        cells = "".join(
            "<td>–</td>" if pd.isna(row[f"{c}_mean"]) else f"<td>{row[f'{c}_mean']:.3f} ± {row[f'{c}_std']:.3f}</td>"
            for c in columns)
        body += f"<tr><td>{html.escape(str(row['method']))}</td>{cells}<td>{int(row['n_pairs'])}</td></tr>"
    return f"<table>{head}{body}</table>"
