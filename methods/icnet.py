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

The network is the code's ``ModelFlow_stride`` layer for layer (c = 8; convolutions 3^d without bias, ReLU, no
normalisation; transposed-convolution upsampling with bias; a 1^d convolution without bias, then tanh).

Geometry. The code trains on affinely pre-aligned 144 x 192 x 160 volumes of 1 mm voxels (its example images),
so its bound of 7 voxels is 7 mm, and its smoothness and anti-folding terms count 1 mm voxels. Here the bound is
``range_flow_mm`` (7) and the network runs on isotropic voxels of ``working_spacing_mm`` (1): a dataset of other
voxels (IXI's 1.2 mm, LPBA40's 0.86 x 1.5 x 0.86 mm) is resampled onto a grid of that spacing holding its whole
field of view, ``F = (range_flow_mm / working_spacing_mm) tanh(net)`` voxels of that grid, and the displacement is
brought back to the dataset's voxels in mm (:meth:`Method.working_grid`). A dataset of 1 mm voxels (embedded2d,
OASIS) is its own working grid. Where this file departs from the paper and the code: ``Method.deviations``.
"""
from __future__ import annotations

import torch
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange, WorkingGrid
from regbench.blocks.losses import (INVERSE_CONSISTENCY_VARIANTS, antifolding_loss, gradient_smoothness,
                                    inverse_consistency_loss, mse, self_sampled_inverse)
from regbench.blocks.spatial import warp

_COMMON = {
    "start_channel": 8,                   # c of ModelFlow_stride
    "working_spacing_mm": 1.0,            # isotropic voxels the network runs on (the code's data: 1 mm)
    "range_flow_mm": 7.0,                 # displacement bound: the code's range_flow, 7 voxels of 1 mm
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
    # The code suggests the smoothness weight in 0.1-10; the inverse-consistency weight is the paper's beta; anti-
    # folding acts only on folds and stays the code's. And the rate.
    search_space = {"smoothness_weight": SearchRange(0.1, 10.0, "log"), "inverse_weight": SearchRange(0.005, 0.5, "log"),
                    "lr": SearchRange(1e-5, 1e-2, "log")}
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
        # The default CPU run (embedded2d, 176 x 176 at 1 mm, its own working grid): the same network, loss and
        # weights with twice the step size, 250 steps (about 0.15 s of one CPU thread a step). The val curve is flat
        # past there: mean Dice of the 13 val pairs 0.689, 0.698, 0.698, 0.705 after 200, 300, 400, 500 steps (seed
        # 0; 0.63 unregistered). The anti-folding term stays 0: the quick run's fields do not fold.
        "quick": {
            **_COMMON,
            "iterations": 250,
            "batch_size": 1,
            "lr": 1e-3,
            "checkpoint_every": 250,
            "log_every": 10,
        },
    }
    deviations = (
        Deviation("No affine pre-alignment: pairs are registered as the dataset gives them",
                  "The code registers linearly pre-aligned pairs (its README: 'the image pairs must be linearly "
                  "aligned'), so its 7 mm bound only has to cover what an affine map leaves. OASIS (aligned_norm) "
                  "and the embedded data are aligned or nearly (2 degrees, 1.5 mm); IXI and LPBA40 are not, and "
                  "there a misalignment beyond range_flow_mm is out of the network's reach."),
        Deviation("The network sees the dataset's field of view at 1 mm, not the code's 144 x 192 x 160 crop",
                  "Its bound (7 voxels = 7 mm), smoothness and anti-folding count the code's 1 mm voxels; a "
                  "dataset of other voxels is resampled linearly onto the 1 mm grid that holds its field of view "
                  "(working_spacing_mm) and the displacement brought back in mm. Only the extent of background "
                  "around the head differs.", changes_results=False),
        Deviation("No robust min-max scaling nor histogram matching before the z-score",
                  "The code scales each image to [0, 1] between its 0.01 % lowest and highest values, and its "
                  "README advises matching histograms to one of its images (the similarity is MSE); here images "
                  "come in [0, 1] as their dataset scales them, and only the per-image z-score is the code's."),
        Deviation("Inverse consistency by composition (the code since December 2020), not the paper's inverse "
                  "network", "The code's 'backward mapping' commit compares F_AB with -F_BA o (id + F_AB); the "
                  "paper, as third-party notes read it (unverified), compares F_BA with the approximate inverse "
                  "-F_AB o (id + F_AB) made by its inverse network: inverse_consistency: inverse_network."),
        Deviation("Anti-folding penalises every component along every axis, as the code",
                  "The paper's argument (third-party notes; its exponent unverified) keeps the order of "
                  "neighbours along each axis, component i along axis i only: antifold_components: diagonal."),
        Deviation("The loss weights are the code's defaults (0.5, 0.05, 1e5)",
                  "The paper's alpha, beta and gamma could not be verified; the code's defaults are its "
                  "published training setting.", changes_results=False),
        Deviation("Displacement channels follow the array axes, not the code's (x, y, z)",
                  "regbench's displacement convention: the same network up to the order of its output channels.",
                  changes_results=False),
        Deviation("A transposed convolution's output is cropped to its skip's size",
                  "Any grid size runs (the code needs multiples of 16); nothing is cropped on multiples of 16 (the "
                  "code's 144 x 192 x 160, embedded2d, OASIS).", changes_results=False),
        Deviation("Warping with align_corners=True in voxel units, batches of any size, both directions in one "
                  "pass", "The exact equivalent of the code's grid normalisation at HEAD ((q - (S - 1) / 2) 2 / S "
                  "with align_corners=False), linear with zero padding as the code; the code takes one pair a "
                  "step and calls the network twice (it has no batch statistics).", changes_results=False),
        Deviation("Quick recipe: Adam at 1e-3, twice the code's 5e-4, for 250 steps",
                  "A CPU budget; the network, loss and weights are the paper recipe's.", recipes=("quick",)),
    )

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        if recipe["inverse_consistency"] not in INVERSE_CONSISTENCY_VARIANTS:
            raise ValueError(f"icnet: inverse_consistency must be one of {INVERSE_CONSISTENCY_VARIANTS}, "
                             f"got {recipe['inverse_consistency']!r}")
        return ICNetModel(ndim, int(recipe["start_channel"]), range_flow_voxels(recipe), recipe["padding_mode"])

    def working_grid(self, ndim: int, recipe: dict) -> WorkingGrid:
        """The dataset's field of view on isotropic voxels of ``working_spacing_mm`` (regbench.geometry fits the
        grid's size), where the network runs and its bound is ``range_flow_mm``; a dataset of such voxels is run
        as it is."""
        if recipe["working_spacing_mm"] <= 0:
            raise ValueError(f"icnet: working_spacing_mm must be > 0, got {recipe['working_spacing_mm']}")
        return WorkingGrid(None, (float(recipe["working_spacing_mm"]),) * ndim)

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


def range_flow_voxels(recipe: dict) -> float:
    """The bound of ``F`` in voxels of the working grid: ``range_flow_mm / working_spacing_mm`` (the code: 7)."""
    if recipe["working_spacing_mm"] <= 0 or recipe["range_flow_mm"] <= 0:
        raise ValueError(f"icnet: working_spacing_mm and range_flow_mm must be > 0, got "
                         f"{recipe['working_spacing_mm']} and {recipe['range_flow_mm']}")
    return recipe["range_flow_mm"] / recipe["working_spacing_mm"]



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
    """``ModelFlow_stride``: (A, B) -> F_AB = range_flow * tanh(...), ``B x ndim x *spatial`` (voxels of the grid
    it runs on; ``range_flow`` in those voxels)."""

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
