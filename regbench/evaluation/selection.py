"""Model selection on the val split: the score by which a training run keeps one of its networks.

A recipe's ``model_selection: val_dice`` (:data:`regbench.method.OPTIONAL_TRAINING_KEYS`) asks the training loop to
keep, of the networks at every ``checkpoint_every`` iterations and the last one, the one with the highest mean Dice
over the val pairs (the first of equals), as a paper that keeps its best validation checkpoint does (C2FViT). The
loop takes the score as ``checkpoint_score`` (:func:`regbench.training.loop.train`); :func:`val_scorer` makes it.
Each pair is scored as rule ``register`` scores a test pair: the displacement on the dataset's grid, the moving
labels warped as the evaluation warps them, Learn2Reg's rule for absent labels (:func:`regbench.evaluation.metrics.pair_dice`,
``pair_metrics``'s ``dice``). Only the val split is read: the training job's dataset has no test split (spec/protocol.md, section 1).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch

from regbench.evaluation import metrics
from regbench.io import InputError
from regbench.runtime import autocast


def val_scorer(method, dataset, recipe: dict[str, Any], device="cpu",
               label_warp: str = "nearest") -> Callable[..., float] | None:
    """``checkpoint_score`` for training ``recipe`` on ``dataset``: ``(net, precision) -> val Dice`` where the recipe
    selects on val, None where it keeps the last network. ``label_warp``: the evaluation's (config ``evaluation``)."""
    if recipe.get("model_selection", "last") != "val_dice":
        return None
    if dataset.split_pairs("val").empty:
        raise InputError(f"{dataset.root / 'pairs.csv'}: no val pairs to choose a checkpoint on "
                         f"({method.name}: model_selection val_dice)")
    return functools.partial(val_dice, method, dataset=dataset, recipe=recipe, device=torch.device(device),
                             label_warp=label_warp)


def val_dice(method, net: torch.nn.Module, precision: str = "fp32", *, dataset, recipe: dict[str, Any],
             device: torch.device, label_warp: str = "nearest") -> float:
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
            scores.append(metrics.pair_dice(dataset.seg(pair.fixed), dataset.seg(pair.moving),
                                            u[0].detach().float().cpu().double().numpy(), dataset.label_values,
                                            label_warp))
    finally:
        net.train(was_training)
    return float(np.nanmean(scores))
