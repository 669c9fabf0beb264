"""VTN: the Volume Tweening Network, an affine subnetwork and dense subnetworks trained end to end.

Zhao, Lau, Luo, Chang and Xu (JBHI 2020) cascade an affine subnetwork (it predicts ``W`` and ``b`` of
``x -> (I + W) x + b`` about the image centre) and dense FlowNet-like subnetworks; stage k sees the fixed
image and the moving image warped by the composition of all earlier stages, the fields are composed
(never the images re-warped), and the whole cascade trains jointly without labels: ``1 - CC`` (global
Pearson correlation) of every dense stage's warped image, a smoothness term on every dense stage's own
flow, and orthogonality and determinant losses that keep ``I + W`` near a rotation. An optional
invertibility loss registers each pair both ways and penalises the composed round trip. The official
code is the TensorFlow repository of its sequel, RCN (microsoft/Recursive-Cascaded-Networks), which trains
"VTN (ADDD)" (affine + 3 dense stages) as its baseline; the network is regbench.blocks.cascade's, the affine
parameterisation and penalties regbench.blocks.affine's, shared with methods/rcn.py.

Choices where the paper, the code and this file differ (spec/methods/vtn.md):

- Similarity on every *dense* stage's output (the paper); whether the affine stage's output is also
  scored is UNVERIFIED and the code does not (it does only when the affine stage is the last):
  ``affine_similarity_weight`` (0) adds it. ``1 - CC`` is the code's (regbench.blocks.cascade.correlation_loss:
  global Pearson correlation per image, 1e-6 added to each variance).
- Loss weights and normalisations are the code's (the paper's Table I is UNVERIFIED): smoothness 1.0 on
  the code's ``tf.nn.l2_loss``-normalised squared differences (regbench.blocks.cascade.stage_smoothness), det 0.1
  on ``1/2 (det A - 1)^2`` (the paper's ``(det A - 1)^2`` at weight w is ``det_weight = 2w``), ortho 0.1.
  The code sums every term over the batch, regbench averages: the same ratios.
- Each dense output is multiplied by 20 / n (the code's ``flow_multiplier = 1 / n``); gradients are not
  stopped between stages (``warp_gradient``, the code's option, can stop those through the warped inputs).
- The invertibility loss is not in the official code; its form (both round trips, regbench.blocks.losses.
  invertibility_loss) and its weight are UNVERIFIED. It is off in both recipes (``inverse_weight`` 0;
  the spec suggests tuning 1e-3 to 1); when on, the pair is also registered backwards and only the
  round trip is scored, not the backward similarity.
- The affine head is the code's fully connected pair of layers after the coarsest map is average-pooled
  to 2^d, so any image size works; at 128^3 with 6 levels the pooling does nothing. The heads and each
  dense subnetwork's last layer start near zero (an untrained cascade is near the identity); every other
  layer uses tflearn's uniform-scaling initialisation, as the code.
- Training follows the code: a random cubic B-spline deformation of the moving image (``augmentation``:
  control values up to 0.4 x size / 4 voxels; training only) and Adam whose rate halves after 60 % and
  80 % of the iterations (``lr_halvings``), its moment estimates kept across the halvings, as the code.
  Images are warped with border padding (the code clamps).
"""
from __future__ import annotations

import torch
from torch import nn

from regbench import RegistrationMethod
from regbench.blocks.affine import affine_matrix, determinant_loss, orthogonality_loss
from regbench.blocks.cascade import (augment_moving, build_cascade, correlation_loss, stage_smoothness,
                                     step_decay_stages)
from regbench.blocks.losses import invertibility_loss

_COMMON = {
    "n_cascades": 3,                   # dense stages after the affine one: "VTN (ADDD)"
    "width": 16,                       # c: the dense subnetworks' first width (c ... 32c)
    "levels": 6,                       # stride-2 levels of every subnetwork (128^3 -> 2^3)
    "affine_width": 16,                # the affine stem's first width (16 ... 512)
    "flow_scale": 20.0,                # each dense output x flow_scale / n_cascades
    "similarity_weight": 1.0,          # 1 - CC, on each dense stage's warped image
    "affine_similarity_weight": 0.0,   # 1 - CC on the affine stage's warped image (UNVERIFIED; code: 0)
    "smoothness_weight": 1.0,          # stage_smoothness of each dense stage's own flow
    "det_weight": 0.1,                 # 1/2 (det(I + W) - 1)^2
    "ortho_weight": 0.1,               # -2d + sum (lambda_i^2 + lambda_i^-2) of I + W
    "inverse_weight": 0.0,             # invertibility loss (UNVERIFIED weight; 0 = off)
    "warp_gradient": True,             # False: stop gradients through each stage's warped input
    "augmentation": 0.4,               # random B-spline deformation of the moving image; 0 = off
    "lr_halvings": [0.6, 0.8],         # fractions of the iterations where the learning rate halves
    "checkpoint_every": 1000,
}


class Method(RegistrationMethod):
    name = "vtn"
    citation = ("S. Zhao, T. Lau, J. Luo, E. I-C. Chang, Y. Xu. Unsupervised 3D End-to-End Medical Image "
                "Registration with Volume Tweening Network. IEEE JBHI 24(5):1394-1404, 2020. arXiv:1902.05020.")
    recipes = {
        # The official code's training (RCN repository): 5 epochs of 20k iterations of 4 pairs at 128^3,
        # Adam 1e-4 (5e-5 in epoch 4, 2.5e-5 in epoch 5).
        "paper": {
            **_COMMON,
            "iterations": 100_000,
            "batch_size": 4,
            "lr": 1e-4,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176): the spec's small configuration (c = 8, 5 levels,
        # affine widths halved, "ADD") with every term, the augmentation and the schedule, one pair a step
        # at 10x the step size. 600 steps take about 35 s of one CPU thread; mean test Dice of the default
        # run (22 pairs) 0.685, 0.602 unregistered.
        "quick": {
            **_COMMON,
            "n_cascades": 2,
            "width": 8,
            "levels": 5,
            "affine_width": 8,
            "iterations": 600,
            "batch_size": 1,
            "lr": 1e-3,
            "log_every": 10,
            "checkpoint_every": 200,
        },
    }

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return build_cascade(ndim, recipe["n_cascades"], "vtn", recipe["width"], recipe["levels"],
                             affine=True, affine_width=recipe["affine_width"], flow_scale=recipe["flow_scale"])

    def training_stages(self, net: nn.Module, recipe: dict) -> list:
        return step_decay_stages(net.parameters(), int(recipe["iterations"]), recipe["lr_halvings"], recipe["lr"])

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        fixed, moving = batch["fixed"], batch["moving"]
        if net.training and recipe["augmentation"] > 0:
            moving = augment_moving(moving, recipe["augmentation"])
        out = net(fixed, moving, warp_gradient=recipe["warp_gradient"])
        terms = {}
        if recipe["affine_similarity_weight"] > 0:
            terms["similarity_affine"] = (recipe["affine_similarity_weight"], correlation_loss(fixed, out.warped[0]))
        for k, warped in enumerate(out.warped[1:], start=1):   # every dense stage's output
            terms[f"similarity_{k}"] = (recipe["similarity_weight"], correlation_loss(fixed, warped))
        for k, flow in enumerate(out.flows, start=1):          # each stage's own flow, not the composed one
            terms[f"smoothness_{k}"] = (recipe["smoothness_weight"], stage_smoothness(flow))
        A = affine_matrix(out.W)
        terms["det"] = (recipe["det_weight"], determinant_loss(A))
        terms["ortho"] = (recipe["ortho_weight"], orthogonality_loss(A))
        if recipe["inverse_weight"] > 0:
            backward = net(moving, fixed, warp_gradient=recipe["warp_gradient"])
            terms["inverse"] = (recipe["inverse_weight"], invertibility_loss(out.displacement, backward.displacement))
        return terms

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return net(fixed, moving).displacement
