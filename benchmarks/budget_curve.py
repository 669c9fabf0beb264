"""Val Dice against the training budget: where a quick recipe's val curve is flat, its budget can be cut.

Trains each method's quick recipe (as the config resolves it, lock file included) with fractions of its
budget (RegistrationMethod.scale_budget, the tuning's own scaling) on embedded2d's training split, scores the
val pairs, and prints val Dice, folding and the training time per fraction. Nothing here reads the test split.

    python benchmarks/budget_curve.py [--methods voxelmorph,pyramid] [--fractions 0.25,0.5,0.75,1]
                                      [--seeds 0] [--workers 2] [--out budget_curve.csv]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run(task: tuple) -> dict:
    prepared, method_id, recipe, fraction, seed, out = task
    import torch

    from regbench.data.prepared import PreparedDataset
    from regbench.evaluation.scoring import evaluate_method
    from regbench.evaluation.selection import val_scorer
    from regbench.plugins import load_method
    from regbench.training.loop import load_trained, train

    torch.set_num_threads(1)
    method = load_method(method_id)
    dataset = PreparedDataset(prepared).without_test()
    scaled = method.scale_budget(recipe, fraction)
    start = time.perf_counter()
    summary = train(method, scaled, dataset, out, seed=seed, supervision_folder=Path(prepared).parent / "supervision",
                    checkpoint_score=val_scorer(method, dataset, scaled))
    net, scaled = load_trained(method, Path(out) / "model.pt")
    table = evaluate_method(method, scaled, dataset, out, net=net, runtime_repeats=0, split="val")
    return {"method": method_id, "fraction": fraction, "seed": seed,
            "iterations": {k: scaled[k] for k in method.budget_keys if k in scaled},
            "val_dice": float(table["dice"].mean()), "val_fold_pct": float(table["fold_pct"].mean()),
            "train_s": float(summary["train_time_s"]), "step_s": float(summary["step_time_s"]),
            "wall_s": time.perf_counter() - start}


def main() -> None:
    import json

    from regbench.plugins import load_dataset, load_method
    from regbench.workflow.config import check_config, job_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--methods", help="comma-separated (default: every learned method of the config)")
    parser.add_argument("--fractions", default="0.25,0.5,0.75,1")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overrides", default="{}", help='JSON: {"method": {"key": value}} over the recipes')
    parser.add_argument("--out", type=Path, default=Path("budget_curve.csv"))
    args = parser.parse_args()
    import yaml

    config = check_config(yaml.safe_load(args.configfile.read_text()), config_dir=args.configfile.parent)
    dataset_id = next(iter(config["datasets"]))
    methods = args.methods.split(",") if args.methods else [m for m in config["methods"]
                                                            if load_method(m).trainable]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        source = load_dataset(dataset_id)
        source.prepare(Path(tmp) / "raw", prepared, source.resolve_options(config["datasets"][dataset_id]))
        if any(load_method(m).needs_supervision for m in methods):
            from regbench.training.supervision import DEFAULT_PAIRS, compute_supervision

            pairs = max(int(job_settings(config, dataset_id, m)["recipe"].get("supervision_pairs", DEFAULT_PAIRS))
                        for m in methods if load_method(m).needs_supervision)
            compute_supervision(prepared, Path(tmp) / "supervision", job_settings(config, dataset_id, "syn"),
                                pairs, args.workers)
        overrides = json.loads(args.overrides)
        tasks = [(str(prepared), m, {**job_settings(config, dataset_id, m)["recipe"], **overrides.get(m, {})},
                  float(f), int(s),
                  str(Path(tmp) / f"{m}-{f}-{s}"))
                 for m in methods for f in args.fractions.split(",") for s in args.seeds.split(",")]
        rows = []
        with ProcessPoolExecutor(args.workers) as pool:
            for row in pool.map(run, tasks):
                print(f"{row['method']:20s} fraction {row['fraction']:.2f} seed {row['seed']}: val Dice "
                      f"{row['val_dice']:.4f}, folds {row['val_fold_pct']:.3f} %, {row['train_s']:.0f} s", flush=True)
                rows.append(row)
    table = pd.DataFrame(rows)
    table["iterations"] = table["iterations"].map(json.dumps)
    table.to_csv(args.out, index=False)
    summary = table.groupby(["method", "fraction"]).agg(val_dice=("val_dice", "mean"), val_fold=("val_fold_pct", "mean"),
                                                        train_s=("train_s", "mean")).reset_index()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
