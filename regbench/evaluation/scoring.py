"""Register every test pair with one method and score it: results/<ds>/<m>/seed<k>/pairs.csv and labels.csv.

The registration call alone is timed (no file I/O): one untimed warm-up call on the run's first pair (every pair
has the same grid), then per pair the median of ``runtime_repeats`` calls, with ``torch.cuda.synchronize()``
around each on GPU. Peak memory is
``torch.cuda.max_memory_allocated`` on GPU and the growth of the resident set on CPU.
"""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from regbench import learn2reg
from regbench.data.prepared import PreparedDataset
from regbench.evaluation import metrics
from regbench.io import write_csv, write_json
from regbench.method import RegistrationMethod, parameter_count
from regbench.runtime import autocast, training_precision


def evaluate_method(method: RegistrationMethod, recipe: dict[str, Any], dataset: PreparedDataset, out_dir,
                    *, net: torch.nn.Module | None = None, device: torch.device = torch.device("cpu"),
                    runtime_repeats: int = 3, label_warp: str = "nearest", split: str = "test",
                    provenance: dict | None = None, progress: bool = False,
                    export_dir=None, mixed_precision: bool = False, recipe_name: str | None = None,
                    trained_on: dict | None = None, registration: Callable | None = None,
                    row_id: str | None = None, record: dict | None = None) -> pd.DataFrame:
    """Score every pair of ``split``; write pairs.csv, labels.csv and eval.json into ``out_dir``.

    A method with ``precomputed = True`` (``external``) supplies each pair's displacement from files
    (``load_displacement``); its runtime and memory are unknown (NaN). With ``export_dir``, every
    displacement is also written there in Learn2Reg's format. ``mixed_precision`` registers under
    autocast on CUDA for methods that allow it (eval.json says which precision was used). A method with a
    working grid (``RegistrationMethod.working_grid``) registers each pair resampled onto it, and its
    displacement is scored on the dataset's grid; eval.json records the grid, and the method's deviations from
    its paper with whether the recipe ``recipe_name`` runs with each.

    ``trained_on``: the dataset ``net`` was trained on, when it is not ``dataset`` (cross-dataset evaluation):
    ``{"id", "shape", "spacing"}`` (mm). Its images are then resampled onto the grid the network was trained on,
    and the displacement is scored on ``dataset``'s grid (:meth:`RegistrationMethod.grid_adapter`); eval.json
    records both datasets.

    ``registration``: how a pair is registered, ``(method, net, fixed, moving, recipe, adapter) -> displacement``
    (default: :meth:`RegistrationMethod.register_on_dataset_grid` without gradients, under the precision's
    autocast); an instance-optimised row passes its fine-tuning (regbench.training.instance), timed with the rest.
    ``row_id`` names the result row (``voxelmorph+io``) in eval.json, and ``record`` adds entries to it.
    """
    out_dir = Path(out_dir)
    precision = training_precision(device, mixed_precision, method.allows_mixed_precision)
    pairs = dataset.split_pairs(split)
    if pairs.empty:
        raise ValueError(f"{dataset.root / 'pairs.csv'}: no {split} pairs")
    names = dict(zip(dataset.labels["label"], dataset.labels["name"]))
    contrast = dataset.moving_contrast(method)  # e.g. "t2": the moving subject's T2 against the fixed T1
    # the paper's grid, where it has one; for a network trained on another dataset, the grid it was trained on
    trained_grid = (trained_on["shape"], trained_on["spacing"]) if trained_on and net is not None else None
    adapter = method.grid_adapter(dataset.shape, dataset.spacing, recipe, trained_on=trained_grid)
    pair_rows, label_rows = [], []
    iterator = pairs.itertuples(index=False)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(pairs), desc=f"register {method.name}", mininterval=5.0)
    for pair in iterator:
        if getattr(method, "precomputed", False):
            u = method.load_displacement(pair.fixed, pair.moving, dataset.shape, recipe)
            runtime_s = peak_mem_mb = float("nan")
        else:
            batch = dataset.pair(pair.fixed, pair.moving, contrast)
            fixed, moving = batch["fixed"].to(device), batch["moving"].to(device)

            def call():  # resampling onto the method's working grid and back is part of the registration
                if registration is not None:
                    return registration(method, net, fixed, moving, recipe, adapter)
                with torch.no_grad(), autocast(device, precision):
                    return method.register_on_dataset_grid(net, fixed, moving, recipe, adapter)

            # one warm-up for the run: every pair has the same grid, so what it initialises serves them all
            displacement, runtime_s, peak_mem_mb = measure(call, device, runtime_repeats, warm_up=not pair_rows)
            u = displacement[0].detach().float().cpu().double().numpy()
        if export_dir is not None:
            learn2reg.write_displacement(Path(export_dir) / learn2reg.displacement_name(pair.fixed, pair.moving),
                                         u, dataset.spacing)
        u_true = None
        if dataset.has_ground_truth(pair.fixed, pair.moving):
            u_true = dataset.true_displacement(pair.fixed, pair.moving)[0].double().numpy()
        scores, per_label = metrics.pair_metrics(
            dataset.seg(pair.fixed), dataset.seg(pair.moving), u, dataset.label_values, dataset.spacing,
            u_true=u_true, label_warp=label_warp, device=device if device.type == "cuda" else None)
        pair_rows.append({"fixed": pair.fixed, "moving": pair.moving, **scores,
                          "runtime_s": runtime_s, "peak_mem_mb": peak_mem_mb})
        for row in per_label.to_dict("records"):
            label_rows.append({"fixed": pair.fixed, "moving": pair.moving, "label": int(row["label"]),
                               "name": names[row["label"]], "dice": row["dice"], "hd95": row["hd95"],
                               "hd95_vox": row["hd95_vox"]})
    table = pd.DataFrame(pair_rows)
    write_csv(out_dir / "labels.csv", pd.DataFrame(label_rows))
    write_csv(out_dir / "pairs.csv", table)
    write_json(out_dir / "eval.json", {
        "method": row_id or method.name, "dataset": dataset.name, "trained_on": (trained_on or {}).get("id", dataset.name),
        "split": split, "n_pairs": len(table),
        "label_warp": label_warp, "runtime_repeats": runtime_repeats, "device": str(device),
        "precision": precision, "moving_contrast": contrast or "image", **adapter.record(),
        "torch_threads": torch.get_num_threads(), "parameters": parameter_count(net), "recipe": recipe,
        "recipe_name": recipe_name, "deviations": deviation_records(method, recipe_name),
        "supervision": method.supervision(recipe),
        **(record or {}),
        "provenance": provenance or {},
    })
    return table


def deviation_records(method: RegistrationMethod, recipe_name: str | None) -> list[dict]:
    """The method's deviations as JSON records; ``applies``: the recipe runs with it and it can change results."""
    applying = method.departures(recipe_name) if recipe_name else []  # "*" in recipes: every recipe
    return [{"what": d.what, "why": d.why, "recipes": list(d.recipes), "changes_results": d.changes_results,
             "applies": d in applying} for d in method.deviations]


def measure(call: Callable[[], torch.Tensor], device: torch.device, repeats: int,
            warm_up: bool = True) -> tuple[torch.Tensor, float, float]:
    """(result, median seconds of ``repeats`` calls, after an untimed warm-up call when ``warm_up``, peak memory in
    MB); ``repeats`` 0: one untimed call (NaN seconds and memory), as tuning scores its val pairs."""
    cuda = device.type == "cuda"
    if repeats == 0:
        return call(), float("nan"), float("nan")
    if warm_up:
        call()  # lazy initialisation, caches, cuDNN autotuning
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    sampler = None if cuda else _ResidentSetSampler()
    times = []
    for _ in range(repeats):
        if sampler is not None:
            sampler.start()
        start = time.perf_counter()
        result = call()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        if sampler is not None:
            sampler.stop()
    if cuda:
        peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    else:
        peak = sampler.peak_growth_mb
    return result, statistics.median(times), float(peak)


class _ResidentSetSampler:
    """Peak growth of this process's resident set while started, sampled every millisecond."""

    def __init__(self):
        self.peak_growth_mb = 0.0
        self._page_mb = _page_size() / 2**20
        self._running = False
        self._thread = None

    def _rss_pages(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1])

    def start(self):
        try:
            self._baseline = self._rss_pages()
        except OSError:  # no /proc (not Linux): memory is not measured
            self._baseline = None
            return
        self._peak = self._baseline
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while self._running:
            self._peak = max(self._peak, self._rss_pages())
            time.sleep(0.001)

    def stop(self):
        if self._baseline is None:
            self.peak_growth_mb = float("nan")
            return
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, self._rss_pages())
        self.peak_growth_mb = max(self.peak_growth_mb, (self._peak - self._baseline) * self._page_mb)


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def pair_table_metrics(table: pd.DataFrame) -> list[str]:
    """The metric columns of a pairs.csv table (everything but the pair's names)."""
    return [c for c in table.columns if c not in ("fixed", "moving") and np.issubdtype(table[c].dtype, np.number)]
