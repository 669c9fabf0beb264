"""Model selection on the val split: which of a training run's networks it keeps.

A recipe's ``model_selection`` (optional, a training-loop key) says which:

- ``"last"`` (the default): the last iteration's network;
- ``"val_dice"``: of the networks at every ``checkpoint_every`` iterations and the last one, the one with the highest
  mean Dice over the val pairs (the first of equals), as a paper that keeps its best validation checkpoint does
  (C2FViT). Each pair is scored as rule ``register`` scores a test pair: the displacement on the dataset's grid,
  the moving labels warped by nearest neighbour, Learn2Reg's rule for absent labels
  (:func:`regbench.evaluation.metrics.pair_metrics`'s ``dice``).

Only the val split is read: the training job's dataset has no test split (spec/protocol.md, section 1).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from regbench.evaluation import metrics
from regbench.io import InputError
from regbench.runtime import autocast

SELECTIONS = ("last", "val_dice")


def check_selection(recipe: dict[str, Any], method, dataset) -> str:
    """The recipe's ``model_selection`` ("last" when it has none), checked, with the val pairs it needs."""
    selection = recipe.get("model_selection", "last")
    if selection not in SELECTIONS:
        raise ValueError(f"{method.name}: model_selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "val_dice" and dataset.split_pairs("val").empty:
        raise InputError(f"{dataset.root / 'pairs.csv'}: no val pairs to choose a checkpoint on "
                         f"({method.name}: model_selection val_dice)")
    return selection


def val_dice(method, net: torch.nn.Module, dataset, recipe: dict[str, Any], device: torch.device,
             precision: str = "fp32") -> float:
    """Mean over ``dataset``'s val pairs of each pair's mean label Dice after registering it with ``net``."""
    pairs = dataset.split_pairs("val")
    adapter = method.grid_adapter(dataset.shape, dataset.spacing, recipe)
    contrast = dataset.moving_contrast(method)
    was_training = net.training
    net.eval()
    scores = []
    try:
        for pair in pairs.itertuples(index=False):
            batch = dataset.pair(pair.fixed, pair.moving, contrast)
            with torch.no_grad(), autocast(device, precision):
                u = method.register_on_dataset_grid(net, batch["fixed"].to(device), batch["moving"].to(device),
                                                    recipe, adapter)
            u = u[0].detach().float().cpu().double().numpy()
            moving_seg = dataset.seg(pair.moving)
            warped = metrics.warp_label_map(moving_seg, u)
            per_label = metrics.dice_per_label(dataset.seg(pair.fixed), warped, dataset.label_values, moving_seg)
            scores.append(float(np.nanmean(per_label)) if np.isfinite(per_label).any() else np.nan)
    finally:
        net.train(was_training)
    return float(np.nanmean(scores))
