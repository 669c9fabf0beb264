"""What a config will cost before it runs: ``regbench plan``.

Per (dataset, method): the training steps of its recipe, the seconds one step takes on this machine's device
and the seconds one registration takes, both measured by a short calibration (a few real steps of the method's
own loss on a synthetic batch of the dataset's grid, after one warm-up step), and from them the estimated hours
of training (every seed), of tuning (trials x the tuned fraction of the budget) and of registering the test
pairs (the dataset's and its ``evaluate_on`` targets'; a method's ``+io`` row adds its fine-tuning steps a pair,
at the mean step time of its training). Classical methods are not calibrated (their cost depends on the images:
time one pair with the workflow). The dataset's grid comes from its prepared folder, else from what its plugin knows before the
download (``DatasetSource.expected_grid``).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from regbench import plugins
from regbench.data.prepared import PreparedDataset, to_device
from regbench.io import InputError
from regbench.runtime import in_memory_format, memory_format, synchronize, training_precision
from regbench.training.loop import adam, optimiser_step, train_only, weighted_loss
from regbench.workflow.config import dataset_options, evaluation_targets, job_settings


def dataset_grid(config: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    """ndim, shape, spacing, number of labels and test pairs of a dataset: prepared, or as its plugin expects."""
    prepared = Path(config["data_dir"]) / dataset_id / "prepared"
    if (prepared / "dataset.json").exists():
        dataset = PreparedDataset(prepared)
        return {"ndim": dataset.ndim, "shape": dataset.shape, "spacing": dataset.spacing,
                "labels": len(dataset.label_values), "test_pairs": len(dataset.split_pairs("test"))}
    source = plugins.load_dataset(dataset_id)
    expected = source.expected_grid(source.resolve_options(dataset_options(config, dataset_id)))
    if expected is None:
        raise InputError(f"{prepared / 'dataset.json'}: not prepared, and dataset {dataset_id!r} cannot say its grid "
                         f"before preparation: prepare it first (snakemake {prepared / 'dataset.json'} --cores all)")
    return expected


def synthetic_batch(grid: dict[str, Any], batch_size: int, supervised: bool) -> dict[str, torch.Tensor]:
    """A training batch of the grid's size: smooth random images, random label maps, zero teacher fields."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, 1, *grid["shape"])
    pool = torch.nn.functional.avg_pool3d if grid["ndim"] == 3 else torch.nn.functional.avg_pool2d
    images = [pool(torch.rand(shape, generator=generator), 5, stride=1, padding=2) for _ in range(2)]
    labels = [torch.randint(0, grid["labels"] + 1, shape, generator=generator, dtype=torch.uint8) for _ in range(2)]
    batch = {"fixed": images[0], "moving": images[1], "fixed_seg": labels[0], "moving_seg": labels[1],
             "labels": torch.arange(1, grid["labels"] + 1)}
    if supervised:
        batch["supervision"] = torch.zeros(batch_size, grid["ndim"], *grid["shape"])
    return batch


def calibrate(method, recipe: dict[str, Any], grid: dict[str, Any], device: torch.device, steps: int = 3,
              mixed_precision: bool = False) -> dict[str, float]:
    """Seconds per training step and per registration, and the steps of the recipe.

    Every training stage is timed with the training loop's own step (:func:`regbench.training.loop.weighted_loss`,
    :func:`~regbench.training.loop.optimiser_step`, the same precision): the median of ``steps`` after a warm-up,
    on that stage's parameters; ``step_s`` is the mean over the recipe's steps, weighted by each stage's length.
    """
    layout = memory_format(device, grid["ndim"], method.channels_last)  # the training loop's layout
    net = method.build(grid["ndim"], recipe).to(device, memory_format=layout)
    adapter = method.grid_adapter(grid["shape"], grid["spacing"], recipe)
    stages = method.training_stages(net, recipe)
    precision = training_precision(device, mixed_precision, method.allows_mixed_precision)
    batch = in_memory_format(adapter.batch(to_device(synthetic_batch(grid, int(recipe["batch_size"]),
                                                                     method.needs_supervision), device)),
                             layout, grid["ndim"])
    net.train()
    stage_seconds = []
    for index, stage in enumerate(stages):
        train_only(net, stage.parameters)
        method.start_stage(net, index, recipe)
        optimiser = adam(stage.parameters, 1e-6, stage.adam)  # a tiny rate: the weights stay as built
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            _, total = weighted_loss(method, net, batch, recipe, device, precision)
            optimiser_step(total, optimiser, scaler)
            synchronize(device)
            times.append(time.perf_counter() - start)
        stage_seconds.append(statistics.median(times[1:]))
    train_only(net, net.parameters())
    net.eval()
    pair = to_device(synthetic_batch(grid, 1, False), device)
    with torch.no_grad():
        method.register_on_dataset_grid(net, pair["fixed"], pair["moving"], recipe, adapter)   # warm-up
        synchronize(device)
        start = time.perf_counter()
        method.register_on_dataset_grid(net, pair["fixed"], pair["moving"], recipe, adapter)
        synchronize(device)
    register_s = time.perf_counter() - start
    total_steps = sum(stage.iterations for stage in stages)
    seconds = sum(stage.iterations * s for stage, s in zip(stages, stage_seconds))
    return {"steps": total_steps, "step_s": seconds / total_steps if total_steps else stage_seconds[0],
            "register_s": register_s}


def plan(config: dict[str, Any], device: torch.device, steps: int = 3) -> pd.DataFrame:
    """One row per (dataset, method) of the config: steps, calibrated seconds, estimated hours."""
    rows = []
    tuning = config["tuning"]
    for dataset_id in config["datasets"]:
        grid = dataset_grid(config, dataset_id)
        # the test pairs its runs register: its own and each evaluate_on target's (on the grid they trained on)
        pairs = grid["test_pairs"] + sum(dataset_grid(config, target)["test_pairs"]
                                         for target in evaluation_targets(config, dataset_id))
        for method_id in config["methods"]:
            method = plugins.load_method(method_id)
            settings = job_settings(config, dataset_id, method_id)
            seeds = len(config["seeds"]) if method.seeded else 1
            row = {"dataset": dataset_id, "method": method_id, "recipe": settings["recipe_name"], "seeds": seeds,
                   "grid": "x".join(map(str, grid["shape"])), "device": str(device)}
            if not method.trainable:
                rows.append({**row, "steps": 0})
                continue
            cost = calibrate(method, settings["recipe"], grid, device, steps, settings["mixed_precision"])
            train_h = cost["steps"] * cost["step_s"] / 3600
            register_s = cost["register_s"]
            if method_id in config["instance_optimisation"]["methods"]:   # its +io row: fine-tuning steps a pair too
                register_s += cost["register_s"] + config["instance_optimisation"]["steps"] * cost["step_s"]
            rows.append({**row, **cost, "train_h": seeds * train_h,
                         "tune_h": int(tuning["trials"]) * float(tuning["fraction"]) * train_h,
                         "register_h": seeds * pairs * register_s / 3600})
    table = pd.DataFrame(rows)
    for column in ("step_s", "register_s", "train_h", "tune_h", "register_h"):
        if column not in table:
            table[column] = float("nan")
    return table


def summary(table: pd.DataFrame) -> str:
    """The table for a terminal, and the totals."""
    shown = table.copy()
    lines = [shown.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-")]
    lines.append(f"\ntotal on {', '.join(sorted(set(table['device'])))}: training {table['train_h'].sum():.2f} h "
                 f"(all seeds), registration {table['register_h'].sum():.2f} h, tuning {table['tune_h'].sum():.2f} h "
                 "(only with `snakemake tune`); classical methods not included")
    return "\n".join(lines)
