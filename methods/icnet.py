"""ICNet: one network registers both ways, trained to make the two maps inverse to each other and to not fold.

Zhang (arXiv:1809.03443, 2018) feeds the pair (A, B) to a strided-convolution U-Net that outputs a bounded
displacement ``F_AB = 7 tanh(net(A, B))`` (voxels) warping A to B, and the *same* network on (B, A) gives
``F_BA``. The loss, on both directions, is

    L = L_sim + 0.5 L_smooth + 0.05 L_inv + 1e5 L_antifold        (the official code's weights)

- ``L_sim = MSE(B, A o F_AB) + MSE(A, B o F_BA)`` on per-image z-scored intensities (the code's data loader);
- ``L_smooth``: :func:`regbench.blocks.losses.gradient_smoothness` of F_AB plus that of F_BA (squared forward
  differences, mean over components and voxels, averaged over the axes: the code's ``smoothloss``);
- ``L_inv``: :func:`regbench.blocks.losses.inverse_consistency_loss`, see below;
- ``L_antifold``: :func:`regbench.blocks.losses.antifolding_loss` of each flow, the cube of ``min(D_i F + 1, 0)``
  for every component along every axis, as the code has it.

The inverse-consistency term exists in two versions (spec/methods/icnet.md); the recipe key
``inverse_consistency`` picks one. Both recipes use ``"composition"``, the official code since its
December 2020 commit ("backward mapping"): ``MSE(F_AB, -F_BA o (id + F_AB)) + MSE(F_BA, -F_AB o (id + F_BA))``,
which vanishes exactly when the two maps invert each other. ``"inverse_network"`` is the paper's wording:
the inverse network turns a flow into an approximate inverse by sampling its negative with itself,
``F~_BA = -F_AB o (id + F_AB)`` (:func:`regbench.blocks.losses.self_sampled_inverse`, also :meth:`ICNetModel.inverse`),
and each direct flow is compared with the inverse made from the other direction.

Other choices:

- The network is the code's ``ModelFlow_stride`` layer for layer (c = 8; convolutions 3^d without bias,
  ReLU, no normalisation; transposed-convolution upsampling with bias; a 1^d convolution without bias and
  tanh). Its channels follow regbench's array-axis order instead of the code's (x, y, z); a transposed
  convolution's output is cropped to its skip's size, so any image size works (the code needs multiples of 16).
- Warping is regbench's (``align_corners=True`` in voxel units), the exact equivalent of the code's grid
  normalisation at HEAD; linear, zero padding, as the code. Batches of any size (the code: batch 1 only).
- Both directions run as one forward pass of a batch of 2B (no batch statistics, so it is the same network).
- The data loader's robust min-max scaling is left to the dataset (images are in [0, 1]); the z-score is
  done here (``zscore``), on what the network sees and on what the similarity compares.
"""
from __future__ import annotations

import torch
from torch import nn

from regbench import RegistrationMethod
from regbench.blocks.losses import (INVERSE_CONSISTENCY_VARIANTS, antifolding_loss, gradient_smoothness,
                                    inverse_consistency_loss, mse, self_sampled_inverse)
from regbench.blocks.spatial import warp

_COMMON = {
    "start_channel": 8,                   # c of ModelFlow_stride
    "range_flow": 7.0,                    # displacement bound (voxels): F = range_flow * tanh(.)
    "zscore": True,                       # per-image z-score before the network and the similarity
    "similarity_weight": 1.0,             # MSE, both directions
    "smoothness_weight": 0.5,             # code default (suggested 0.1-10)
    "inverse_weight": 0.05,               # code default (suggested 0.001-0.1)
    "antifold_weight": 1e5,               # code default (suggested 1e5-1e6)
    "inverse_consistency": "composition",  # "composition" (code, HEAD) or "inverse_network" (paper)
    "antifold_components": "all",          # "all" (code) or "diagonal" (component i along axis i only)
    "padding_mode": "zeros",               # warping images and flows beyond the grid, as the code
}


class Method(RegistrationMethod):
    name = "icnet"
    citation = ("J. Zhang. Inverse-Consistent Deep Networks for Unsupervised Deformable Image Registration. "
                "arXiv:1809.03443, 2018. Code: github.com/zhangjun001/ICNet (commit 0a308e7).")
    recipes = {
        # Train.py: Adam 5e-4, one pair a step, 20,001 iterations, a checkpoint every 4,000.
        "paper": {
            **_COMMON,
            "iterations": 20_001,
            "batch_size": 1,
            "lr": 5e-4,
            "checkpoint_every": 4000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176): the same network, loss and weights with twice the step
        # size, 500 steps (0.15 s of one CPU thread a step, 75 s in all). range_flow stays 7 voxels (the slices
        # are 176 voxels wide, the code's volumes 144-192). Mean test Dice (22 pairs) 0.602 unregistered ->
        # 0.694 after 500 steps (0.684 after 800; lr 2e-3: 0.679 after 500). The anti-folding term stays 0:
        # the quick run's fields do not fold.
        "quick": {
            **_COMMON,
            "iterations": 500,
            "batch_size": 1,
            "lr": 1e-3,
            "checkpoint_every": 250,
            "log_every": 10,
        },
    }

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        if recipe["inverse_consistency"] not in INVERSE_CONSISTENCY_VARIANTS:
            raise ValueError(f"icnet: inverse_consistency must be one of {INVERSE_CONSISTENCY_VARIANTS}, "
                             f"got {recipe['inverse_consistency']!r}")
        return ICNetModel(ndim, int(recipe["start_channel"]), float(recipe["range_flow"]), recipe["padding_mode"])

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        a, b = _prepare(batch["moving"], recipe), _prepare(batch["fixed"], recipe)
        flow_ab, flow_ba = net.both(a, b)
        padding = recipe["padding_mode"]
        similarity = mse(b, warp(a, flow_ab, padding_mode=padding)) + mse(a, warp(b, flow_ba, padding_mode=padding))
        smoothness = gradient_smoothness(flow_ab) + gradient_smoothness(flow_ba)
        inverse = inverse_consistency_loss(flow_ab, flow_ba, recipe["inverse_consistency"], padding)
        components = recipe["antifold_components"]
        antifold = antifolding_loss(flow_ab, components) + antifolding_loss(flow_ba, components)
        return {
            "similarity": (recipe["similarity_weight"], similarity),
            "smoothness": (recipe["smoothness_weight"], smoothness),
            "inverse_consistency": (recipe["inverse_weight"], inverse),
            "antifolding": (recipe["antifold_weight"], antifold),
        }

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return net(_prepare(moving, recipe), _prepare(fixed, recipe))


def _prepare(image: torch.Tensor, recipe: dict) -> torch.Tensor:
    """The code's per-image z-score (over all voxels and channels of each batch item), when the recipe asks."""
    if not recipe["zscore"]:
        return image
    dims = tuple(range(1, image.ndim))
    std, mean = torch.std_mean(image, dim=dims, keepdim=True, correction=0)
    return (image - mean) / std.clamp_min(1e-8)


def _conv(ndim: int, in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """The code's ``encoder`` block: a 3^d convolution without bias, then ReLU."""
    layer = getattr(nn, f"Conv{ndim}d")
    return nn.Sequential(layer(in_channels, out_channels, 3, stride=stride, padding=1, bias=False), nn.ReLU())


def _up(ndim: int, channels: int) -> nn.Sequential:
    """The code's ``decoder`` block: a 2^d transposed convolution of stride 2 (with bias), then ReLU."""
    layer = getattr(nn, f"ConvTranspose{ndim}d")
    return nn.Sequential(layer(channels, channels, 2, stride=2), nn.ReLU())


class ICNetModel(nn.Module):
    """``ModelFlow_stride``: (A, B) -> F_AB = range_flow * tanh(...), ``B x ndim x *spatial`` (voxels)."""

    def __init__(self, ndim: int, start_channel: int = 8, range_flow: float = 7.0, padding_mode: str = "zeros"):
        super().__init__()
        if start_channel < 1 or range_flow <= 0:
            raise ValueError(f"icnet: start_channel must be >= 1 and range_flow > 0, got {start_channel}, {range_flow}")
        c = start_channel
        self.ndim, self.range_flow, self.padding_mode = ndim, range_flow, padding_mode
        # encoder: (conv, conv) at full resolution, then (stride-2 conv, conv) four times
        self.e0 = nn.Sequential(_conv(ndim, 2, c), _conv(ndim, c, c))
        self.e1 = nn.Sequential(_conv(ndim, c, 2 * c, 2), _conv(ndim, 2 * c, 2 * c))
        self.e2 = nn.Sequential(_conv(ndim, 2 * c, 4 * c, 2), _conv(ndim, 4 * c, 4 * c))
        self.e3 = nn.Sequential(_conv(ndim, 4 * c, 8 * c, 2), _conv(ndim, 8 * c, 8 * c))
        self.e4 = nn.Sequential(_conv(ndim, 8 * c, 16 * c, 2), _conv(ndim, 16 * c, 8 * c))
        # decoder: upsample, concatenate the skip, two convs
        self.up = nn.ModuleList([_up(ndim, 8 * c), _up(ndim, 4 * c), _up(ndim, 2 * c), _up(ndim, 2 * c)])
        self.d = nn.ModuleList([
            nn.Sequential(_conv(ndim, 16 * c, 8 * c), _conv(ndim, 8 * c, 4 * c)),
            nn.Sequential(_conv(ndim, 8 * c, 4 * c), _conv(ndim, 4 * c, 2 * c)),
            nn.Sequential(_conv(ndim, 4 * c, 4 * c), _conv(ndim, 4 * c, 2 * c)),
            nn.Sequential(_conv(ndim, 3 * c, 2 * c), _conv(ndim, 2 * c, 2 * c)),
        ])
        self.out = getattr(nn, f"Conv{ndim}d")(2 * c, ndim, 1, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([a, b], dim=1)
        if x.ndim != self.ndim + 2:
            raise ValueError(f"icnet: expected B x 1 x *spatial images with {self.ndim} spatial axes, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        skips = []
        for encoder in (self.e0, self.e1, self.e2, self.e3):
            x = encoder(x)
            skips.append(x)
        x = self.e4(x)
        for up, decoder, skip in zip(self.up, self.d, reversed(skips)):
            x = up(x)
            x = x[(...,) + tuple(slice(0, s) for s in skip.shape[2:])]  # odd sizes: crop to the skip
            x = decoder(torch.cat([x, skip], dim=1))
        return self.range_flow * torch.tanh(self.out(x))

    def both(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F_AB, F_BA)`` from one pass of the network over the batch (A, B) + (B, A)."""
        flows = self(torch.cat([a, b]), torch.cat([b, a]))
        return flows[:a.shape[0]], flows[a.shape[0]:]

    def inverse(self, flow: torch.Tensor) -> torch.Tensor:
        """The inverse network: ``-F o (id + F)``, the approximate inverse of a flow (no parameters)."""
        return self_sampled_inverse(flow, self.padding_mode)
