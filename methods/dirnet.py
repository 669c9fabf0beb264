"""DIRNet: a ConvNet regresses cubic B-spline control-point displacements, trained on -NCC alone.

de Vos et al. (DLMIA 2017) register end to end with three parts: a ConvNet regressor on the fixed and
moving images concatenated, a spatial transformer that turns the regressed control points into a dense
displacement with cubic B-splines, and a resampler that warps the moving image (bilinear, border padding).
The only loss is the negated global normalised cross-correlation of the fixed image and the warped moving
image; the B-spline parametrisation is the only smoothness (bending energy came later, with DLIR). No code
was released; the layers follow the paper's description (alternating 3^d convolutions with zero padding and
2^d average pooling, ELU, batch normalisation, 1^d convolutions at the end) and the first author's TorchIR
``DIRNet`` and ``BsplineTransformer``, which recreate the paper's MNIST experiment (spec/methods/dirnet.md):
``conv_layers`` x [3^d conv 'same', batch norm, ELU] on (fixed, moving), fixed first, a 2^d average pool after
each of the first log2(spacing), ``dense_layers`` x [1^d conv, batch norm, ELU] (with the output, the paper's
three 1x1 convolutions) and a zero-initialised linear 1^d conv to ndim control displacements (voxels), so
the untrained network is the identity. The pooled map is the control grid, ``floor(S / spacing)`` points per
axis, point i at voxel ``i s + floor((s - 1) / 2)`` with zero controls beyond it, as TorchIR's transposed
convolution places them (:mod:`regbench.blocks.bspline`). Where this file departs from the paper and TorchIR:
``Method.deviations``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange
from regbench.blocks.bspline import bspline_displacement
from regbench.blocks.losses import global_ncc
from regbench.method import TrainingStage
from regbench.blocks.networks import conv
from regbench.blocks.spatial import warp

_COMMON = {
    "conv_layers": 5,           # 3^d conv blocks (the first log2(spacing) followed by a 2^d average pool)
    "dense_layers": 2,          # 1^d conv blocks before the linear 1^d output
    "batch_norm": True,         # the paper; TorchIR has none
    "similarity_weight": 1.0,   # -global NCC, the only term
    "padding_mode": "border",   # resampling outside the image (TorchIR)
    "amsgrad": True,            # TorchIR's Adam
}


class Method(RegistrationMethod):
    name = "dirnet"
    citation = ("B. D. de Vos, F. F. Berendsen, M. A. Viergever, M. Staring, I. Isgum. End-to-end unsupervised "
                "deformable image registration with a convolutional neural network. DLMIA 2017, LNCS 10553, "
                "pp. 204-212, doi:10.1007/978-3-319-67558-9_24, arXiv:1704.06065.")
    # No regulariser (the control grid is the only one): the rate alone.
    search_space = {"lr": SearchRange(1e-4, 1e-1, "log")}
    recipes = {
        # TorchIR's recreation of the paper's MNIST experiment: spacing 8, 16 kernels, Adam (amsgrad) 1e-3,
        # batches of 32 pairs, 100 epochs of 100 batches.
        "paper": {
            **_COMMON,
            "spacing": 8,               # control-point spacing, voxels (a power of 2)
            "kernels": 16,
            "iterations": 10_000,
            "batch_size": 32,
            "lr": 1e-3,
            "checkpoint_every": 1000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176 slices): spacing 16 (the data's deformations have control
        # spacing 16), the same layers and loss, 4 pairs a step at lr 1e-2 (some 75 ms a step of one core, 40 s in
        # all). Mean val Dice (an earlier val split of embedded2d: 8 val subjects a template, 22 pairs): 0.626
        # unregistered -> 0.701 after 500 steps.
        "quick": {
            **_COMMON,
            "spacing": 16,
            "kernels": 16,
            "iterations": 500,
            "batch_size": 4,
            "lr": 1e-2,
            "checkpoint_every": 500,
            "log_every": 10,
        },
    }

    deviations = (
        Deviation("Batch normalisation after every convolution but the output",
                  "The paper's description as unofficial implementations cite it (UNVERIFIED against the PDF); "
                  "TorchIR's DIRNet has none (batch_norm False gives it). Without it the quick recipe does not "
                  "register embedded2d: val Dice 0.627 against 0.626 unregistered, 0.701 with it."),
        Deviation("NCC per image, averaged over the batch",
                  "TorchIR computes one NCC over the whole batch tensor (standard deviations with N - 1); per image "
                  "keeps a pair's score independent of its batch mates. Which the paper used is UNVERIFIED."),
        Deviation("The ConvNet sees the images as given, intensities in [0, 1]",
                  "TorchIR's MNIST example maps them to [-1, 1]; the paper's preprocessing is UNVERIFIED. Batch norm "
                  "after the first convolution undoes such a map but at the zero-padded border."),
        Deviation("Control displacements in array-axis order",
                  "regbench's convention for fields; TorchIR's are in xyz order. The output channels are permuted, "
                  "nothing else.", changes_results=False),
        Deviation("Adam with AMSGrad", "TorchIR's; the paper's optimiser is UNVERIFIED."),
        Deviation("10,000 steps of 32 pairs at lr 1e-3, control spacing 8, 16 kernels",
                  "TorchIR's recreation of the paper's MNIST experiment; the paper's settings are UNVERIFIED.",
                  recipes=("paper",)),
    )

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return DIRNet(ndim, recipe["spacing"], recipe["kernels"], recipe["conv_layers"], recipe["dense_layers"],
                      recipe["batch_norm"])

    def training_stages(self, net: nn.Module, recipe: dict) -> list[TrainingStage]:
        return [TrainingStage("all", int(recipe["iterations"]), list(net.parameters()),
                              adam={"amsgrad": bool(recipe["amsgrad"])})]

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        fixed, moving = batch["fixed"], batch["moving"]
        warped = warp(moving, net(fixed, moving), padding_mode=recipe["padding_mode"])
        return {"similarity": (recipe["similarity_weight"], global_ncc(fixed, warped))}

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return net(fixed, moving)


class DIRNet(nn.Module):
    """ConvNet regressor on [fixed, moving] -> control displacements -> cubic B-spline displacement (voxels)."""

    def __init__(self, ndim: int, spacing: int = 8, kernels: int = 16, conv_layers: int = 5, dense_layers: int = 2,
                 batch_norm: bool = True):
        super().__init__()
        pools = round(math.log2(spacing)) if spacing >= 1 else -1
        if pools < 0 or 2 ** pools != spacing:
            raise ValueError(f"dirnet: the control spacing must be a power of 2, got {spacing}")
        if conv_layers < max(pools, 1) or dense_layers < 0:
            raise ValueError(f"dirnet: {conv_layers} conv layers cannot pool {pools} times down to spacing {spacing} "
                             f"(need conv_layers >= log2(spacing) and dense_layers >= 0)")
        self.ndim, self.spacing = ndim, int(spacing)
        pool = getattr(nn, f"AvgPool{ndim}d")
        layers, channels = [], 2
        for index in range(conv_layers):
            layers += _block(ndim, channels, kernels, 3, batch_norm)
            channels = kernels
            if index < pools:
                layers.append(pool(2))
        for _ in range(dense_layers):
            layers += _block(ndim, channels, kernels, 1, batch_norm)
        self.regressor = nn.Sequential(*layers)
        self.output = conv(ndim, channels, ndim, 1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def control_points(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Control displacements ``B x ndim x *floor(S / s)`` (voxels), point i at voxel ``i s + floor((s-1) / 2)``."""
        if fixed.shape != moving.shape or fixed.ndim != self.ndim + 2 or fixed.shape[1] != 1:
            raise ValueError(f"dirnet: fixed and moving must both be B x 1 x *spatial with {self.ndim} spatial axes, "
                             f"got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        if any(s < self.spacing for s in fixed.shape[2:]):
            raise ValueError(f"dirnet: image {tuple(fixed.shape[2:])} is smaller than the control spacing "
                             f"{self.spacing}")
        return self.output(self.regressor(torch.cat([fixed, moving], dim=1)))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The displacement ``B x ndim x *spatial`` on the fixed grid (voxels)."""
        return bspline_displacement(self.control_points(fixed, moving), fixed.shape[2:], self.spacing)


def _block(ndim: int, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool) -> list[nn.Module]:
    """[conv 'same' -> (batch norm) -> ELU]."""
    layers = [conv(ndim, in_channels, out_channels, kernel_size)]
    if batch_norm:
        layers.append(getattr(nn, f"BatchNorm{ndim}d")(out_channels))
    return layers + [nn.ELU()]
