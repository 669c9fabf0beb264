"""RCN: Recursive Cascaded Networks, a deep cascade scored only on its final warped image.

Zhao, Dong, Chang and Xu (ICCV 2019) cascade an affine stem and n dense subnetworks (VTN's, or VoxelMorph's)
recursively: cascade k receives the fixed image and the moving image warped by the composition of all
earlier cascades, predicts its own displacement on the fixed grid, and the fields are composed so that the
moving image is interpolated once. Unlike VTN, which scores every stage's output, the similarity
(``1 - CC``, global Pearson correlation) is measured on the *final* warped image only, so each cascade
learns to improve on what the previous ones left; every cascade's own flow is regularised, and the affine
stem carries VTN's orthogonality and determinant losses. Training is unsupervised and end to end, with
gradients through the recursive inputs, on 128^3 volumes. Each cascade can be repeated ``r`` times in a row
with shared weights ("r x n cascades", no new parameters): at test time (``test_rep``, the official eval.py's
``-r``) and in training (``rep``, train.py's ``-r``; 1 in the paper, to save memory). With ``rep > 1`` the
official code scores the similarity on the output of every repeat of the last cascade (the repeats of a
cascade share one entry of loss weights, and the last cascade's scores the similarity), and so does this file.
The paper notes that more repetitions do not always help and can amplify folding (UNVERIFIED wording).

The official code is microsoft/Recursive-Cascaded-Networks (TensorFlow); the network is
regbench.blocks.cascade's, shared with methods/vtn.py, and runs on a ``working_size^d`` cube
(regbench.geometry). As in the code, each dense output is multiplied by ``flow_scale / n`` (the VTN base's 20,
VoxelMorph's 1), every layer starts from tflearn's uniform scaling (VoxelMorph's flow layer from
N(0, 1e-5)), training deforms the moving image by a random cubic B-spline field and halves Adam's rate after
60 % and 80 % of the iterations, and images are warped with border padding. Where this file departs from the
paper and the official code: ``Method.deviations`` (spec/methods/rcn.md).
"""
from __future__ import annotations

import torch
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange, WorkingGrid
from regbench.blocks.affine import affine_matrix, determinant_loss, orthogonality_loss
from regbench.blocks.cascade import (CASCADE_DEVIATIONS, augment_moving, build_cascade, correlation_loss,
                                     stage_smoothness, step_decay_stages)

_COMMON = {
    "base_network": "vtn",             # the dense cascades: "vtn" or "voxelmorph"
    "n_cascades": 10,                  # dense cascades after the affine stem
    "rep": 1,                          # each cascade run rep times in a row in training (shared weights)
    "test_rep": 1,                     # ... and test_rep times when registering (eval.py's default: 1)
    "width": 16,                       # the base network's first width (VTN c; VoxelMorph's 16)
    "levels": 6,                       # stride-2 levels of the VTN subnetworks and of the affine stem
    "affine_width": 16,                # the affine stem's first width (16 ... 512)
    "flow_scale": None,                # dense outputs x flow_scale / n_cascades; None: VTN 20, VoxelMorph 1
    "similarity_weight": 1.0,          # 1 - CC, on the final warped image only (each repeat of the last cascade)
    "smoothness_weight": 1.0,          # stage_smoothness of every cascade's own flow
    "det_weight": 0.1,                 # 1/2 (det(I + W) - 1)^2
    "ortho_weight": 0.1,               # -2d + sum (lambda_i^2 + lambda_i^-2) of I + W
    "warp_gradient": True,             # False: stop gradients through each cascade's warped input
    "augmentation": 0.4,               # random B-spline deformation of the moving image; 0 = off
    "lr_halvings": [0.6, 0.8],         # fractions of the iterations where the learning rate halves
    "working_size": 128,               # the network runs on a working_size^d cube (the paper's 128^3); 0: dataset grid
    "head_init": "uniform_scaling",    # the affine head and VTN's last layers: tflearn's uniform scaling (the
                                       # code) or "near_identity" (N(0, 1e-5))
    "checkpoint_every": 1000,
}


class Method(RegistrationMethod):
    name = "rcn"
    citation = ("S. Zhao, Y. Dong, E. I-C. Chang, Y. Xu. Recursive Cascaded Networks for Unsupervised "
                "Medical Image Registration. ICCV 2019. arXiv:1907.12353.")
    # The smoothness weight (the code's 1.0) and the rate; det and ortho of the affine cascade stay the code's.
    search_space = {"smoothness_weight": SearchRange(0.1, 10.0, "log"), "lr": SearchRange(1e-5, 1e-2, "log")}
    recipes = {
        # The official training: 5 epochs of 20k iterations of 4 pairs at 128^3, Adam 1e-4 (5e-5 in epoch 4,
        # 2.5e-5 in epoch 5), 10 VTN cascades (the paper's largest released model; memory grows linearly with
        # the cascades: a GPU too small for 4 pairs takes fewer n_cascades). Registered with test_rep 1, eval.py's
        # default: the n trained cascades once each; test_rep r > 1 is the paper's shared-weight "r x n cascades".
        "paper": {
            **_COMMON,
            "iterations": 100_000,
            "batch_size": 4,
            "lr": 1e-4,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176 at 1 mm, resampled onto 128 x 128 at 1.38 mm): the spec's
        # small configuration (3 VTN cascades, c = 8, 5 levels, affine widths halved) with every term, the
        # augmentation and the schedule, one pair a step at 10x the step size, the heads started near zero
        # (deviations), test_rep 1. A step on 128^2 takes about 0.7 times one on 176^2, so 700 steps cost what
        # 500 did there. Mean val Dice (4 pairs of an earlier val split) 0.781, 0.629 unregistered; 0.741 for 500
        # steps on 176^2.
        "quick": {
            **_COMMON,
            "n_cascades": 3,
            "width": 8,
            "levels": 5,
            "affine_width": 8,
            "head_init": "near_identity",
            "iterations": 700,
            "batch_size": 1,
            "lr": 1e-3,
            "log_every": 10,
            "checkpoint_every": 200,
        },
    }

    deviations = (
        *CASCADE_DEVIATIONS,
        Deviation("quick: 5 levels on the 128^2 cube leave a 4^2 map, average-pooled to the head's 2^2",
                  "the spec's small configuration (5 levels), as methods/vtn.py's quick recipe", recipes=("quick",)),
        Deviation("quick: the affine head and each cascade's last layer start from N(0, 1e-5) (head_init "
                  "near_identity), not tflearn's uniform scaling: the untrained cascade is the identity",
                  "from the code's random initial fields (voxels large) the quick training does not register: val "
                  "Dice 0.638 against 0.781, 0.629 unregistered", recipes=("quick",)),
    )

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return build_cascade(ndim, recipe["n_cascades"], recipe["base_network"], recipe["width"], recipe["levels"],
                             affine=True, affine_width=recipe["affine_width"], flow_scale=recipe["flow_scale"],
                             head_init=recipe["head_init"])

    def working_grid(self, ndim: int, recipe: dict) -> WorkingGrid | None:
        """The paper's cube, ``working_size^d`` (isotropic, the dataset's field of view fitted in)."""
        return WorkingGrid((int(recipe["working_size"]),) * ndim) if recipe["working_size"] else None

    def training_stages(self, net: nn.Module, recipe: dict) -> list:
        return step_decay_stages(net.parameters(), int(recipe["iterations"]), recipe["lr_halvings"], recipe["lr"])

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        fixed, moving = batch["fixed"], batch["moving"]
        if net.training and recipe["augmentation"] > 0:
            moving = augment_moving(moving, recipe["augmentation"])
        rep = recipe["rep"]
        out = net(fixed, moving, rep=rep, warp_gradient=recipe["warp_gradient"])
        if rep == 1:
            terms = {"similarity": (recipe["similarity_weight"], correlation_loss(fixed, out.warped[-1]))}
        else:   # as the official code: the output of every repeat of the last cascade
            last = len(out.warped) - rep
            terms = {f"similarity_{k}": (recipe["similarity_weight"], correlation_loss(fixed, out.warped[k]))
                     for k in range(last, len(out.warped))}
        for k, flow in enumerate(out.flows, start=1):          # every cascade's own flow, repeats included
            terms[f"smoothness_{k}"] = (recipe["smoothness_weight"], stage_smoothness(flow))
        A = affine_matrix(out.W)
        terms["det"] = (recipe["det_weight"], determinant_loss(A))
        terms["ortho"] = (recipe["ortho_weight"], orthogonality_loss(A))
        return terms

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return net(fixed, moving, rep=recipe["test_rep"]).displacement
