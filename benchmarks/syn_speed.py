"""ANTs SyN and affine on the embedded2d test pairs: seconds per pair and mean Dice, quick and paper recipes.

Prepares embedded2d (default options; the test pairs do not depend on the number of training subjects,
so ``n_train`` 2 keeps the preparation short) and registers its 22 test pairs with ``affine`` and
``syn``, each recipe, as the workflow's register job does (``Method.register``, one ITK thread). Prints,
per method and recipe: mean Dice (nearest-neighbour labels), folding, and the seconds per pair: wall
clock and CPU time of the process (ANTs runs on one thread, so the CPU time is what the wall clock
shows on an idle machine; on a loaded one it is the fairer number). Identity is the floor. The budget
of the issue: SyN quick at most 2 s per pair on this data.

    python benchmarks/syn_speed.py [--paper-pairs 22] [--prepared data/embedded2d/prepared]

The paper recipe of SyN takes about 15 s of CPU per pair here; ``--paper-pairs`` registers only the
first N test pairs with it (Dice then also shown for quick on the same pairs).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from regbench import plugins
from regbench.data.prepared import PreparedDataset
from regbench.evaluation.metrics import pair_metrics
from regbench.runtime import configure_threads

QUICK_BUDGET_S = 2.0


def run(method_id: str, recipe_name: str, dataset: PreparedDataset, pairs) -> dict:
    method = plugins.load_method(method_id)
    recipe = method.recipe(recipe_name)
    dice, folds, wall, cpu = [], [], [], []
    for fixed_id, moving_id in pairs:
        batch = dataset.pair(fixed_id, moving_id)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        u = method.register(None, batch["fixed"], batch["moving"], recipe)[0].double().numpy()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
        scores, _ = pair_metrics(dataset.seg(fixed_id), dataset.seg(moving_id), u, dataset.label_values,
                                 dataset.spacing)
        dice.append(scores["dice"])
        folds.append(scores["fold_pct"])
    return {"method": method_id, "recipe": recipe_name, "pairs": len(pairs), "dice": float(np.mean(dice)),
            "fold_pct": float(np.mean(folds)), "wall_median": float(np.median(wall)), "wall_max": float(np.max(wall)),
            "cpu_median": float(np.median(cpu)), "cpu_max": float(np.max(cpu)), "threads": recipe.get("threads")}


def identity_dice(dataset: PreparedDataset, pairs) -> float:
    zero = np.zeros((dataset.ndim, *dataset.shape))
    return float(np.mean([pair_metrics(dataset.seg(f), dataset.seg(m), zero, dataset.label_values)[0]["dice"]
                          for f, m in pairs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, help="an embedded2d prepared folder (default: prepare one)")
    parser.add_argument("--paper-pairs", type=int, default=22, help="test pairs for SyN's paper recipe")
    args = parser.parse_args()
    configure_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = args.prepared
        if prepared is None:
            source = plugins.load_dataset("embedded2d")
            prepared = Path(tmp) / "prepared"
            source.prepare(Path(tmp) / "raw", prepared, source.resolve_options({"n_train": 2}))
        dataset = PreparedDataset(prepared)
        pairs = list(dataset.split_pairs("test")[["fixed", "moving"]].itertuples(index=False, name=None))
        paper_pairs = pairs[: args.paper_pairs]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"embedded2d {dataset.shape} at {dataset.spacing} mm, {len(pairs)} test pairs; "
              f"load average {load:.1f} on {os.cpu_count()} CPUs")
        rows = [run("affine", "quick", dataset, pairs), run("syn", "quick", dataset, pairs),
                run("affine", "paper", dataset, pairs)]
        if paper_pairs:
            if len(paper_pairs) < len(pairs):
                rows.append(run("syn", "quick", dataset, paper_pairs))
            rows.append(run("syn", "paper", dataset, paper_pairs))
        print(f"{'method':8s} {'recipe':6s} {'pairs':>5s} {'Dice':>7s} {'fold %':>7s} "
              f"{'wall s/pair (median, max)':>26s} {'CPU s/pair (median, max)':>25s}")
        print(f"{'identity':8s} {'-':6s} {len(pairs):5d} {identity_dice(dataset, pairs):7.4f}")
        if 0 < len(paper_pairs) < len(pairs):
            print(f"{'identity':8s} {'-':6s} {len(paper_pairs):5d} {identity_dice(dataset, paper_pairs):7.4f}")
        for r in rows:
            print(f"{r['method']:8s} {r['recipe']:6s} {r['pairs']:5d} {r['dice']:7.4f} {r['fold_pct']:7.3f} "
                  f"{r['wall_median']:14.2f} {r['wall_max']:10.2f} {r['cpu_median']:14.2f} {r['cpu_max']:10.2f}")
        quick = rows[1]
        verdict = "within" if quick["cpu_median"] <= QUICK_BUDGET_S else "OVER"
        print(f"SyN quick: {quick['cpu_median']:.2f} s CPU, {quick['wall_median']:.2f} s wall per pair (median, "
              f"{quick['threads']} ITK thread): {verdict} the {QUICK_BUDGET_S:.0f} s budget")


if __name__ == "__main__":
    main()
