"""The check every learned method passes: a short training on embedded2d lowers the loss on the test pairs
and beats no registration on Dice. The methods' test files share it; each sets its own budget and margins."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from regbench.blocks.spatial import warp_labels
from regbench.evaluation.selection import val_scorer
from regbench.training.loop import load_trained, train


def mean_dice(fixed_seg, warped_seg, labels) -> float:
    """Mean over ``labels`` of 2|A∩B| / (|A| + |B|), labels absent from both maps left out."""
    scores = []
    for label in labels.tolist():
        a, b = fixed_seg == label, warped_seg == label
        total = int(a.sum() + b.sum())
        if total:
            scores.append(2 * int((a & b).sum()) / total)
    return float(np.mean(scores))


def test_pairs(dataset, contrast: str | None = None) -> list[dict]:
    """The dataset's test pairs as batches of one (the moving image in ``contrast``)."""
    return [dataset.pair(p.fixed, p.moving, contrast) for p in dataset.split_pairs("test").itertuples()]


test_pairs.__test__ = False  # a helper, not a test


def identity_dice(pairs) -> float:
    """Mean Dice without registration."""
    return float(np.mean([mean_dice(b["fixed_seg"], b["moving_seg"], b["labels"]) for b in pairs]))


def registered_dice(method, net, recipe, pairs, register=None, adapter=None) -> float:
    """Mean Dice of the moving labels warped by ``method.register`` (or ``register(net, batch)``); with a
    ``GridAdapter``, registered on the method's working grid and scored on the dataset's, as the workflow does."""
    dice = []
    for batch in pairs:
        with torch.no_grad():
            if register:
                u = register(net, batch)
            elif adapter is not None:
                u = method.register_on_dataset_grid(net, batch["fixed"], batch["moving"], recipe, adapter)
            else:
                u = method.register(net, batch["fixed"], batch["moving"], recipe)
        dice.append(mean_dice(batch["fixed_seg"], warp_labels(batch["moving_seg"], u), batch["labels"]))
    return float(np.mean(dice))


def loss_and_dice(method, net, recipe, pairs, register=None, adapter=None) -> tuple[float, float]:
    """(mean weighted training loss, mean registered Dice) over ``pairs``, the network in eval mode; with a
    ``GridAdapter``, the loss on the working grid, as training computes it."""
    net.eval()
    with torch.no_grad():
        loss = [sum(w * float(v) for w, v in method.loss_terms(net, adapter.batch(batch) if adapter else batch,
                                                                recipe).values()) for batch in pairs]
    return float(np.mean(loss)), registered_dice(method, net, recipe, pairs, register, adapter)


@dataclass
class ShortTraining:
    net: torch.nn.Module          # the trained network, loaded from model.pt
    saved_recipe: dict
    summary: dict                 # train.json
    pairs: list
    identity_dice: float
    untrained_loss: float
    untrained_dice: float
    trained_loss: float
    trained_dice: float


def short_training(method, recipe, dataset, out_dir, contrast: str | None = None) -> ShortTraining:
    """Score an untrained network (seed 0) on the test pairs, train ``recipe`` (seed 0), score it again."""
    pairs = test_pairs(dataset, contrast)
    adapter = method.grid_adapter(dataset.shape, dataset.spacing, recipe)  # the identity without a working grid
    torch.manual_seed(0)
    untrained_loss, untrained_dice = loss_and_dice(method, method.build(dataset.ndim, recipe), recipe, pairs,
                                                   adapter=adapter)
    summary = train(method, recipe, dataset, out_dir, seed=0, checkpoint_score=val_scorer(method, dataset, recipe))
    net, saved_recipe = load_trained(method, Path(out_dir) / "model.pt")
    trained_loss, trained_dice = loss_and_dice(method, net, recipe, pairs, adapter=adapter)
    return ShortTraining(net, saved_recipe, summary, pairs, identity_dice(pairs), untrained_loss, untrained_dice,
                         trained_loss, trained_dice)
