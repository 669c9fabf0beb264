"""RCN: Recursive Cascaded Networks, a deep cascade scored only on its final warped image.

Zhao, Dong, Chang and Xu (ICCV 2019) cascade an affine stem and n dense subnetworks (VTN's, or VoxelMorph's)
recursively: cascade k receives the fixed image and the moving image warped by the composition of all
earlier cascades, predicts its own displacement on the fixed grid, and the fields are composed so that the
moving image is interpolated once. Unlike VTN, which scores every stage's output, the similarity
(``1 - CC``, global Pearson correlation) is measured on the *final* warped image only, so each cascade
learns to improve on what the previous ones left; every cascade's own flow is regularised, and the affine
stem carries VTN's orthogonality and determinant losses. Training is unsupervised and end to end, with
gradients through the recursive inputs. At test time each cascade can be repeated ``r`` times with shared
weights ("r x n cascades", no new parameters). The network is regbench.blocks.cascade's, shared with methods/vtn.py.

Choices where the paper, the code and this file differ (spec/methods/rcn.md; the official code is
microsoft/Recursive-Cascaded-Networks):

- Loss terms, weights and normalisations are the code's: ``1 - CC`` on the last warped image
  (regbench.blocks.cascade.correlation_loss: global Pearson correlation, 1e-6 added to each variance),
  ``stage_smoothness`` (``tf.nn.l2_loss`` of the forward differences over ``|Omega| d``) at 1.0 on each
  cascade's own flow, ``1/2 (det A - 1)^2`` and the orthogonality loss at 0.1 each, no similarity on the
  affine stem. The code sums every term over the batch, regbench averages: the same ratios.
- Each dense output is multiplied by ``flow_scale / n`` (the code's ``flow_multiplier = 1 / n``; VTN's
  base network also by 20, VoxelMorph's not: ``flow_scale`` None picks the base's value).
- ``rep`` repeats each cascade in training too (the code's ``-r`` of train.py; 1 in the paper, to save
  memory); ``test_rep`` is the test-time shared-weight cascading (eval.py's ``-r``). The paper notes that
  more repetitions do not always help and can amplify folding (UNVERIFIED wording).
- Paper recipe: 10 VTN cascades (the paper's best released model; its numbers are UNVERIFIED). Memory
  grows linearly with the cascades; a GPU too small for 4 pairs at 128^3 takes fewer ``n_cascades``.
- As in methods/vtn.py: the affine head average-pools the coarsest map to 2^d (any image size works),
  the heads and each cascade's last layer start near zero, the rest uses tflearn's uniform scaling;
  training augments the moving image with a random cubic B-spline deformation and halves Adam's rate
  after 60 % and 80 % of the iterations (Adam's moments kept, as the code); images are warped with border
  padding (the code clamps).
"""
from __future__ import annotations

import torch
from torch import nn

from regbench import RegistrationMethod
from regbench.blocks.affine import affine_matrix, determinant_loss, orthogonality_loss
from regbench.blocks.cascade import (augment_moving, build_cascade, correlation_loss, stage_smoothness,
                                     step_decay_stages)

_COMMON = {
    "base_network": "vtn",             # the dense cascades: "vtn" or "voxelmorph"
    "n_cascades": 10,                  # dense cascades after the affine stem
    "rep": 1,                          # each cascade run rep times in a row in training (shared weights)
    "test_rep": 1,                     # ... and test_rep times when registering
    "width": 16,                       # the base network's first width (VTN c; VoxelMorph's 16)
    "levels": 6,                       # stride-2 levels of the VTN subnetworks and of the affine stem
    "affine_width": 16,                # the affine stem's first width (16 ... 512)
    "flow_scale": None,                # dense outputs x flow_scale / n_cascades; None: VTN 20, VoxelMorph 1
    "similarity_weight": 1.0,          # 1 - CC, on the final warped image only
    "smoothness_weight": 1.0,          # stage_smoothness of every cascade's own flow
    "det_weight": 0.1,                 # 1/2 (det(I + W) - 1)^2
    "ortho_weight": 0.1,               # -2d + sum (lambda_i^2 + lambda_i^-2) of I + W
    "warp_gradient": True,             # False: stop gradients through each cascade's warped input
    "augmentation": 0.4,               # random B-spline deformation of the moving image; 0 = off
    "lr_halvings": [0.6, 0.8],         # fractions of the iterations where the learning rate halves
    "checkpoint_every": 1000,
}


class Method(RegistrationMethod):
    name = "rcn"
    citation = ("S. Zhao, Y. Dong, E. I-C. Chang, Y. Xu. Recursive Cascaded Networks for Unsupervised "
                "Medical Image Registration. ICCV 2019. arXiv:1907.12353.")
    recipes = {
        # The official training: 5 epochs of 20k iterations of 4 pairs at 128^3, Adam 1e-4 (5e-5 in
        # epoch 4, 2.5e-5 in epoch 5), 10 VTN cascades.
        "paper": {
            **_COMMON,
            "iterations": 100_000,
            "batch_size": 4,
            "lr": 1e-4,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176): the spec's small configuration (3 VTN cascades,
        # c = 8, 5 levels, affine widths halved) with every term, the augmentation and the schedule, one pair
        # a step at 10x the step size. 500 steps take about 40 s of one CPU thread; mean test Dice of the
        # default run (22 pairs) 0.649, 0.602 unregistered.
        "quick": {
            **_COMMON,
            "n_cascades": 3,
            "width": 8,
            "levels": 5,
            "affine_width": 8,
            "iterations": 500,
            "batch_size": 1,
            "lr": 1e-3,
            "log_every": 10,
            "checkpoint_every": 200,
        },
    }

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return build_cascade(ndim, recipe["n_cascades"], recipe["base_network"], recipe["width"], recipe["levels"],
                             affine=True, affine_width=recipe["affine_width"], flow_scale=recipe["flow_scale"])

    def training_stages(self, net: nn.Module, recipe: dict) -> list:
        return step_decay_stages(net.parameters(), int(recipe["iterations"]), recipe["lr_halvings"], recipe["lr"])

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        fixed, moving = batch["fixed"], batch["moving"]
        if net.training and recipe["augmentation"] > 0:
            moving = augment_moving(moving, recipe["augmentation"])
        out = net(fixed, moving, rep=recipe["rep"], warp_gradient=recipe["warp_gradient"])
        terms = {"similarity": (recipe["similarity_weight"], correlation_loss(fixed, out.warped[-1]))}
        for k, flow in enumerate(out.flows, start=1):          # every cascade's own flow, repeats included
            terms[f"smoothness_{k}"] = (recipe["smoothness_weight"], stage_smoothness(flow))
        A = affine_matrix(out.W)
        terms["det"] = (recipe["det_weight"], determinant_loss(A))
        terms["ortho"] = (recipe["ortho_weight"], orthogonality_loss(A))
        return terms

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return net(fixed, moving, rep=recipe["test_rep"]).displacement
