"""Instance optimisation: fine-tune a trained network on the one pair it registers (Learn2Reg's winners' last step).

As in VoxelMorph (Balakrishnan et al., TMI 2019, section IV-E, "instance-specific optimization"), the network's
weights, started from the trained ones, take ``steps`` Adam steps on the test pair alone with the method's own
loss (:meth:`RegistrationMethod.loss_terms` of its last training stage, through the training loop's
:func:`~regbench.training.loop.weighted_loss`), and the pair is then registered with the fine-tuned weights.
What the pair may not supply stays out: the label terms' weights are 0 (test labels are what is scored) and a
method that learns from a teacher's fields has no loss without them, so it cannot be instance-optimised. The
network is in eval mode while it is fine-tuned: training-time augmentation is off and batch-norm statistics
stay the trained ones. Every pair starts again from the trained weights.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from regbench.geometry import GridAdapter
from regbench.method import RegistrationMethod
from regbench.training.loop import adam, optimiser_step, train_only, weighted_loss


def check_instance_optimisation(method: RegistrationMethod, settings: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` naming the method when ``settings`` (``{"steps", "lr"}``) cannot apply to it."""
    if not settings:
        return
    if not method.trainable:
        raise ValueError(f"instance optimisation: {method.name!r} does not train; it applies to learned methods")
    if method.needs_supervision:
        raise ValueError(f"instance optimisation: {method.name!r} learns from a teacher's fields, which a test pair "
                         "does not have")
    if int(settings["steps"]) < 1 or not float(settings["lr"]) > 0:
        raise ValueError(f"instance optimisation: steps must be >= 1 and lr > 0, got {settings}")


def unsupervised_recipe(method: RegistrationMethod, recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with every label term's weight set to 0 (:attr:`RegistrationMethod.label_terms`)."""
    return {**recipe, **{key: 0.0 for key in method.label_terms if key in recipe}}


def instance_optimised_registration(method: RegistrationMethod, net: torch.nn.Module, fixed: torch.Tensor,
                                    moving: torch.Tensor, recipe: dict[str, Any], adapter: GridAdapter,
                                    steps: int, lr: float) -> torch.Tensor:
    """The displacement of (``fixed``, ``moving``) on the dataset's grid after ``steps`` Adam steps at rate ``lr`` on
    this pair; ``net`` itself is left as it was."""
    tuned = copy.deepcopy(net)
    tuned.eval()
    loss_recipe = unsupervised_recipe(method, recipe)
    stages = method.training_stages(tuned, loss_recipe)
    last = len(stages) - 1
    train_only(tuned, stages[last].parameters)
    method.start_stage(tuned, last, loss_recipe)
    optimiser = adam(stages[last].parameters, lr, stages[last].adam)
    batch = adapter.batch({"fixed": fixed, "moving": moving})
    with torch.enable_grad():
        for _ in range(int(steps)):
            _, total = weighted_loss(method, tuned, batch, loss_recipe, fixed.device)
            optimiser_step(total, optimiser)
    train_only(tuned, tuned.parameters())
    with torch.no_grad():
        return method.register_on_dataset_grid(tuned, fixed, moving, recipe, adapter)
