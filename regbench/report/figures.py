"""The report's figures of one dataset, from the results of a run: results/report/<dataset>/*.png.

Most figures read what the workflow wrote (pairs.csv, labels.csv, train_log.csv, train.json). The
example figure needs displacements, which the evaluation does not keep: the median test pair is
registered again here by every method (the trained network from model.pt, or the recipe eval.json
recorded for a method without training), then scored again; ``figures.json`` records the evaluated
and the recomputed scores side by side (on CPU they are identical).

The median test pair is the pair whose Dice, averaged over the methods, is the median of the test
pairs (the lower median for an even count): a typical pair, the same for every method. Its registrations run
in a second process while the other figures are drawn (the report job asks for one thread more).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from regbench.io import InputError, read_json, write_json
from regbench.layout import plugin_id, run_dir
from regbench.report import plots, style

log = logging.getLogger("regbench")

#: the figures of a dataset, in the order the report shows them
FIGURES = ("dice_per_structure", "accuracy_regularity", "ranks", "runtime", "training_curves", "tuning",
           "median_pair")


def figure_paths(results_dir, dataset_id: str) -> dict[str, Path]:
    folder = Path(results_dir) / "report" / dataset_id
    return {name: folder / f"{name}.png" for name in FIGURES}


def facts_path(results_dir, dataset_id: str) -> Path:
    return Path(results_dir) / "report" / dataset_id / "figures.json"


def run_folders(results_dir, dataset_id: str, method_ids: list[str]) -> dict[str, list[Path]]:
    """Each method's run folders (results/<ds>/<method>/seed<k>), from the seeds rule aggregate recorded in
    leaderboard.json (seed 0 where it recorded none); the first is the run the report's examples show."""
    summary = Path(results_dir) / dataset_id / "leaderboard.json"
    seeds = (read_json(summary).get("seeds") or {}) if summary.exists() else {}
    return {m: [run_dir(results_dir, dataset_id, m, s) for s in seeds.get(m, [0])] for m in method_ids}


def seed_averaged_tables(folders: dict[str, list[Path]], name: str, keys: list[str]) -> dict[str, pd.DataFrame]:
    """Per method, the runs' ``name`` tables (pairs.csv, labels.csv) with every number averaged over the seeds."""
    tables = {}
    for method, runs in folders.items():
        joined = pd.concat([pd.read_csv(folder / name) for folder in runs], ignore_index=True)
        numeric = [c for c in joined.columns if c not in keys and pd.api.types.is_numeric_dtype(joined[c])]
        tables[method] = joined.groupby(keys, sort=False)[numeric].mean().reset_index()
    return tables


def median_pair(pair_tables: dict[str, pd.DataFrame]) -> tuple[str, str]:
    """(fixed, moving) of the pair whose Dice averaged over the methods is the (lower) median."""
    frames = [t.set_index(["fixed", "moving"])["dice"].rename(m) for m, t in pair_tables.items()]
    mean = pd.concat(frames, axis=1).mean(axis=1, skipna=True).dropna()
    if mean.empty:
        raise InputError("no test pair has a Dice score; the example figure needs one")
    ordered = mean.sort_values(kind="stable")
    return ordered.index[(len(ordered) - 1) // 2]


def display_axes(orientation: str | None, ndim: int) -> dict:
    """How to show an array as a coronal image, superior up and the patient's right on the left
    (radiological convention), from the voxel axes' orientation codes (e.g. ``"LIA"``).

    Returns ``slice_axis`` (3D: the anterior-posterior axis, sliced at its middle; None in 2D), then
    ``row``, ``col`` (array axes shown down and across) and ``flip_row``, ``flip_col``. Without usable
    codes the array is shown as stored (3D: the middle of the last axis).
    """
    codes = [c.upper() for c in (orientation or "")[:ndim]]
    groups = {"LR": None, "AP": None, "SI": None}
    for axis, code in enumerate(codes):
        for group in groups:
            if code in group and groups[group] is None:
                groups[group] = axis
    slice_axis = None if ndim == 2 else groups["AP"]
    in_plane = [a for a in range(ndim) if a != slice_axis]
    if (len(codes) == ndim and groups["SI"] in in_plane and groups["LR"] in in_plane
            and (ndim == 2 or slice_axis is not None)):
        return {"slice_axis": slice_axis, "row": groups["SI"], "col": groups["LR"],
                "flip_row": codes[groups["SI"]] == "S", "flip_col": codes[groups["LR"]] == "R"}
    slice_axis = None if ndim == 2 else ndim - 1
    return {"slice_axis": slice_axis, "row": 0, "col": 1, "flip_row": False, "flip_col": False}


class Display:
    """Turns ``*spatial`` arrays and voxel positions into the 2D view chosen by :func:`display_axes`."""

    def __init__(self, shape: tuple[int, ...], axes: dict):
        self.shape, self.axes = tuple(shape), axes
        self.index = shape[axes["slice_axis"]] // 2 if axes["slice_axis"] is not None else None

    def image(self, array: np.ndarray) -> np.ndarray:
        """A ``*spatial`` array as the 2D image to show (row 0 at the top)."""
        if self.index is not None:
            array = np.take(array, self.index, axis=self.axes["slice_axis"])
        rest = [a for a in range(len(self.shape)) if a != self.axes["slice_axis"]]
        view = np.transpose(array, [rest.index(self.axes["row"]), rest.index(self.axes["col"])])
        if self.axes["flip_row"]:
            view = view[::-1]
        if self.axes["flip_col"]:
            view = view[:, ::-1]
        return np.ascontiguousarray(view)

    def grid_lines(self, u: np.ndarray, every: int | None = None) -> list[np.ndarray]:
        """Polylines of φ = id + u along every ``every``-th row and column of the shown slice, as
        (row, column) positions of the view; the through-plane component of u is left out."""
        row_axis, col_axis = self.axes["row"], self.axes["col"]
        n_row, n_col = self.shape[row_axis], self.shape[col_axis]
        rows_idx, cols_idx = np.meshgrid(np.arange(n_row), np.arange(n_col), indexing="ij")
        # position of each voxel of the view's (row, col) grid after the map, in array coordinates
        pos_row = rows_idx + self._in_view(u[row_axis])
        pos_col = cols_idx + self._in_view(u[col_axis])
        if self.axes["flip_row"]:
            pos_row, pos_col = (n_row - 1 - pos_row)[::-1], pos_col[::-1]
        if self.axes["flip_col"]:
            pos_row, pos_col = pos_row[:, ::-1], (n_col - 1 - pos_col)[:, ::-1]
        every = every or max(3, round(max(n_row, n_col) / 22))
        lines = [np.stack([pos_row[i], pos_col[i]], axis=1) for i in range(every // 2, n_row, every)]
        lines += [np.stack([pos_row[:, j], pos_col[:, j]], axis=1) for j in range(every // 2, n_col, every)]
        return lines

    def _in_view(self, component: np.ndarray) -> np.ndarray:
        """A displacement component on the shown slice, with array axes (row axis, col axis), unflipped."""
        if self.index is not None:
            component = np.take(component, self.index, axis=self.axes["slice_axis"])
        rest = [a for a in range(len(self.shape)) if a != self.axes["slice_axis"]]
        return np.transpose(component, [rest.index(self.axes["row"]), rest.index(self.axes["col"])])


def register_median_pair(results_dir, prepared_dir, dataset_id: str, method_ids: list[str],
                         settings: dict | None = None) -> dict:
    """Register the median test pair with every method; returns the images, each method's displacement
    (``ndim x *spatial``, voxels) and its scores, recomputed and as evaluated."""
    import torch

    from regbench import plugins
    from regbench.blocks.spatial import warp
    from regbench.data.prepared import PreparedDataset
    from regbench.evaluation import metrics
    from regbench.runtime import configure_threads, select_device
    from regbench.training.instance import instance_optimised_registration
    from regbench.training.loop import load_trained

    settings = settings or {}
    if settings.get("torch_threads"):
        configure_threads(settings["torch_threads"])
    try:
        device = select_device(settings.get("device", "auto"))
    except RuntimeError as err:  # a report job without the GPU the config asks for: one pair runs on CPU
        log.warning("%s; the example registrations run on CPU", err)
        device = torch.device("cpu")
    results_dir = Path(results_dir)
    dataset = PreparedDataset(prepared_dir)
    folders = run_folders(results_dir, dataset_id, method_ids)
    fixed_id, moving_id = median_pair(seed_averaged_tables(folders, "pairs.csv", ["fixed", "moving"]))
    tables = {m: pd.read_csv(folders[m][0] / "pairs.csv") for m in method_ids}  # the run the figure shows
    batch = dataset.pair(fixed_id, moving_id)
    result = {"fixed_id": fixed_id, "moving_id": moving_id, "fixed": dataset.image(fixed_id),
              "moving": dataset.image(moving_id), "methods": {}}
    for method_id in method_ids:
        method_dir = folders[method_id][0]
        evaluation = read_json(method_dir / "eval.json")
        tuning = evaluation.get("instance_optimisation")  # a +io row: its method's trained run, fine-tuned on the pair
        method = plugins.load_method(tuning["method"] if tuning else method_id)
        trained_dir = method_dir.parent.parent / method.name / method_dir.name if tuning else method_dir
        recipe, net = evaluation.get("recipe", {}), None
        if getattr(method, "precomputed", False):
            u = np.asarray(method.load_displacement(fixed_id, moving_id, dataset.shape, recipe), dtype=np.float64)
        else:
            if method.trainable:
                net, recipe = load_trained(method, trained_dir / "model.pt", device)
            moving = dataset.pair(fixed_id, moving_id, dataset.moving_contrast(method))["moving"]  # its contrast
            adapter = method.grid_adapter(dataset.shape, dataset.spacing, recipe)
            if tuning:
                displacement = instance_optimised_registration(method, net, batch["fixed"].to(device),
                                                               moving.to(device), recipe, adapter, tuning["steps"],
                                                               tuning["lr"])
            else:
                with torch.no_grad():
                    displacement = method.register_on_dataset_grid(net, batch["fixed"].to(device), moving.to(device),
                                                                   recipe, adapter)
            u = displacement[0].detach().float().cpu().double().numpy()
        scores, _ = metrics.pair_metrics(dataset.seg(fixed_id), dataset.seg(moving_id), u, dataset.label_values,
                                         dataset.spacing, label_warp=evaluation.get("label_warp", "nearest"))
        warped = warp(torch.from_numpy(result["moving"])[None, None].double(), torch.from_numpy(u)[None])[0, 0].numpy()
        evaluated = tables[method_id].set_index(["fixed", "moving"]).loc[(fixed_id, moving_id)]
        result["methods"][method_id] = {
            "u": u, "warped": warped.astype(np.float32), "jacobian": metrics.jacobian_determinant(u),
            "scores": {k: scores[k] for k in ("dice", "fold_pct")},
            "evaluated": {k: float(evaluated[k]) for k in ("dice", "fold_pct")},
        }
        del net
    return result


def tuning_facts(lock: dict | None, lock_file: str | None, method_dirs: dict[str, Path]) -> dict:
    """What the report says of the tuning: per method that declares a search space, the lock file's choice and
    trials, and which values this run trained with (tuned, overridden by the config, or the recipe's own)."""
    from regbench import plugins

    facts = {"file": lock_file, "budget": (lock or {}).get("budget", {}), "made": (lock or {}).get("made", {}),
             "methods": {}}
    for method_id, folder in method_dirs.items():
        if method_id != plugin_id(method_id):   # a +io row: its method's row says how it was tuned
            continue
        space = plugins.load_method(method_id).search_space
        if not space:
            continue
        entry = ((lock or {}).get("methods") or {}).get(method_id)
        recipe = read_json(folder / "eval.json").get("recipe", {}) if (folder / "eval.json").exists() else {}
        record = {"search_space": {k: list(v) for k, v in space.items()},
                  "used": {k: recipe.get(k) for k in space}}
        if entry:
            record.update({k: entry[k] for k in ("chosen", "val_dice", "val_fold_pct", "status", "trial")
                           if k in entry})
            record["trials"] = len(entry.get("trials", []))
            record["overridden"] = sorted(k for k, v in entry["chosen"].items()
                                          if recipe.get(k) is not None and not np.isclose(recipe[k], v))
        facts["methods"][method_id] = record
    return facts


def write_figures(results_dir, prepared_dir, dataset_id: str, method_ids: list[str],
                  settings: dict | None = None, lock: dict | None = None, lock_file: str | None = None
                  ) -> dict[str, Path]:
    """Every figure of one dataset, and figures.json (the median pair and its scores, the tuning)."""
    results_dir = Path(results_dir)
    paths = figure_paths(results_dir, dataset_id)
    colors = style.method_colors(method_ids)
    board = pd.read_csv(results_dir / dataset_id / "leaderboard.csv")
    order = [m for m in board["method"] if m in method_ids]
    # a fresh interpreter (spawn): torch's thread pools do not survive a fork
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        example = pool.submit(example_figure, results_dir, prepared_dir, dataset_id, order, settings,
                              paths["median_pair"], colors)
        tuning = _draw_run_figures(results_dir, dataset_id, board, order, paths, colors, lock, lock_file)
        facts = {"dataset": dataset_id, **example.result(), "tuning": tuning}
    for method, scores in facts["scores"].items():
        if not np.isclose(scores["recomputed"]["dice"], scores["evaluated"]["dice"], rtol=0, atol=1e-6, equal_nan=True):
            log.warning("%s: Dice of the median pair recomputed for the figure is %.6f, the evaluation gave %.6f "
                        "(a method that is not deterministic on this device)", method,
                        scores["recomputed"]["dice"], scores["evaluated"]["dice"])
    write_json(facts_path(results_dir, dataset_id), facts)
    return paths


def _draw_run_figures(results_dir: Path, dataset_id: str, board: pd.DataFrame, order: list[str], paths: dict,
                      colors: dict, lock: dict | None, lock_file: str | None) -> dict:
    """Every figure but the example, from what the run wrote; returns the tuning facts."""
    folders = run_folders(results_dir, dataset_id, order)
    method_dirs = {m: folders[m][0] for m in order}   # the first run: training curves, devices
    labels = seed_averaged_tables(folders, "labels.csv", ["fixed", "moving", "label", "name"])
    pairs = {m: pd.concat([pd.read_csv(f / "pairs.csv") for f in folders[m]], ignore_index=True) for m in order}
    trained = {m: read_json(method_dirs[m] / "train.json") for m in order if (method_dirs[m] / "train.json").exists()}
    logs = {m: pd.read_csv(method_dirs[m] / "train_log.csv") for m in trained
            if (method_dirs[m] / "train_log.csv").exists()}

    plots.dice_per_structure(labels, paths["dice_per_structure"], colors)
    plots.accuracy_regularity(board[board["method"].isin(order)], paths["accuracy_regularity"], colors)
    ranks_path = results_dir / dataset_id / "ranks.csv"
    distribution = pd.read_csv(ranks_path) if ranks_path.exists() else pd.DataFrame(
        columns=["scope", "method", "rank", "share"])
    plots.rank_blobs(distribution[distribution["method"].isin(order)], board[board["method"].isin(order)],
                     paths["ranks"], colors)
    train_time = board.set_index("method")["train_time_s"] if "train_time_s" in board else pd.Series(dtype=float)
    plots.runtime(pairs, {m: float(train_time.get(m, np.nan)) for m in trained}, paths["runtime"],
                  colors, order=order, devices={m: device_text(trained[m]) for m in trained})
    plots.training_curves(logs, paths["training_curves"], colors)
    tuning = tuning_facts(lock, lock_file, method_dirs)
    tuned = {m: pd.DataFrame(lock["methods"][m]["trials"]) for m in tuning["methods"]
             if lock and m in lock.get("methods", {})}
    plots.tuning_trials(tuned, paths["tuning"], colors, {m: lock["methods"][m].get("trial") for m in tuned},
                        note="Not tuned on this dataset: every method trains with its recipe's own values.")
    return tuning


def example_figure(results_dir, prepared_dir, dataset_id: str, method_ids: list[str], settings: dict | None,
                   path, colors: dict) -> dict:
    """The median pair registered by every method, drawn at ``path``; returns its facts for figures.json (the pair,
    the slice shown, each method's scores recomputed and as evaluated)."""
    example = register_median_pair(results_dir, prepared_dir, dataset_id, method_ids, settings)
    info = read_json(Path(prepared_dir) / "dataset.json")
    orientation = info.get("orientation") or (info.get("provenance") or {}).get("orientation")
    display = Display(example["fixed"].shape, display_axes(orientation, int(info["ndim"])))
    rows = [{"method": m, "warped": display.image(e["warped"]), "jacobian": display.image(e["jacobian"]),
             "grid": display.grid_lines(e["u"]), **e["scores"]} for m, e in example["methods"].items()]
    plots.registration_examples(display.image(example["fixed"]), display.image(example["moving"]), rows, path, colors)
    return {
        "median_pair": {"fixed": example["fixed_id"], "moving": example["moving_id"]},
        "slice": None if display.index is None else {"axis": display.axes["slice_axis"], "index": display.index},
        "scores": {m: {"recomputed": e["scores"], "evaluated": e["evaluated"]} for m, e in example["methods"].items()},
    }


def device_text(record: dict) -> str:
    """A job's device in words: the GPU's name, or CPU and its torch threads (from train.json/eval.json)."""
    provenance = record.get("provenance") or {}
    device = str(record.get("device") or provenance.get("device") or "")
    if device.startswith("cuda"):
        text = provenance.get("device_name") or device
    elif device:
        threads = record.get("torch_threads") or provenance.get("torch_threads")
        text = "CPU" + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
    else:
        return ""
    precision = record.get("precision")
    return text + (f", {precision}" if precision and precision != "fp32" else "")


def load_facts(results_dir, dataset_id: str) -> dict:
    path = facts_path(results_dir, dataset_id)
    return json.loads(path.read_text()) if path.exists() else {}
