"""VoxelMorph: a U-Net that maps (moving, fixed) to a dense displacement, trained without labels.

Balakrishnan et al. introduced VoxelMorph-1 and -2 at CVPR 2018 and the full framework in IEEE TMI 2019:
the two images, moving first, go through a U-Net whose last convolution (initialised near zero) gives
a displacement u; a spatial transformer warps the moving image, and the loss is an image similarity
(local NCC over 9^d windows, or MSE) plus lambda times the diffusion regulariser on u, optionally plus
gamma times a soft Dice of the warped training segmentations (TMI's auxiliary-data variant). Dalca et
al. (MICCAI 2018, MedIA 2019) made it diffeomorphic: the network output, halved in resolution, is a
stationary velocity field integrated by scaling and squaring (7 steps), and the regulariser acts on
that velocity.

The regulariser weight follows the similarity as in the papers and the README of the code: lambda = 1 with
NCC, 0.01 with MSE (0.02 with MSE and the Dice term, TMI's auxiliary-data setting), unless the config sets
``smoothness_weight``. Downsampling is a recipe key: both recipes use ``"strided"``, the papers' network
(stride-2 convs; decoder [32], [32], [32], [32, 32] up to half resolution, then [16, 16] after concatenating
the input); ``"maxpool"`` gives voxelmorph's PyTorch ``VxmDense`` layer for layer (same parameter count). With
``bidir`` the fixed image is also warped to the moving one, by exp(-v) (diffeomorphic) or by -u, each similarity
weighted 0.5. Where this file departs from the papers and the code: ``Method.deviations``
(spec/methods/voxelmorph.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange, WorkingGrid
from regbench.blocks.losses import gradient_smoothness, local_ncc, mse, one_hot, soft_dice_loss
from regbench.blocks.networks import UNet, flow_head
from regbench.blocks.spatial import integrate_velocity, resize_displacement, warp

#: voxelmorph's feature lists (encoder, decoder), one entry per convolution: VoxelMorph-1 and -2 of CVPR 2018
ARCHITECTURES = {
    "vm1": ([16, 32, 32, 32], [32, 32, 32, 32, 8, 8]),
    "vm2": ([16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]),
}

_COMMON = {
    "architecture": "vm2",        # "vm1" or "vm2" (ARCHITECTURES)
    "features": None,             # or [[encoder], [decoder]] in voxelmorph's flat form; replaces architecture
    "downsampling": "strided",    # "strided" (papers) or "maxpool" (voxelmorph's PyTorch code)
    "similarity": "ncc",          # "ncc" (local, squared, window ncc_window^d) or "mse"
    "ncc_window": 9,
    "smoothness_penalty": "l2",   # Grad: "l2" (papers) or "l1"
    "diffeomorphic": False,       # True: Dalca et al.'s velocity field, integrated
    "int_steps": 7,               # scaling and squaring steps (diffeomorphic only)
    "int_downsize": 2,            # the velocity lives at 1/int_downsize resolution (diffeomorphic only)
    "bidir": False,               # also warp fixed -> moving; each similarity weighted 0.5
    "working_size": 0,            # > 0: run on an isotropic working_size^d grid fitted to the image (0: its own)
    "checkpoint_every": 1000,
}

#: lambda of the papers per similarity (TMI 2019; README of the code), and with the Dice term (TMI, MSE: 0.02)
PAPER_SMOOTHNESS = {"ncc": 1.0, "mse": 0.01}
PAPER_SMOOTHNESS_WITH_DICE = {"ncc": 1.0, "mse": 0.02}


class Method(RegistrationMethod):
    name = "voxelmorph"
    allows_mixed_precision = True  # the U-Net runs under autocast; the field, warp and losses stay float32
    citation = ("G. Balakrishnan, A. Zhao, M. R. Sabuncu, J. Guttag, A. V. Dalca. VoxelMorph: A Learning "
                "Framework for Deformable Medical Image Registration. IEEE TMI 38(8):1788-1800, 2019 "
                "(CVPR 2018: arXiv:1802.02604). Diffeomorphic variant: A. V. Dalca et al., MICCAI 2018, "
                "arXiv:1805.04605.")
    recipes = {
        # TMI 2019: NCC with lambda 1 (MSE: lambda 0.01; with the Dice term gamma 0.01, lambda 0.02),
        # Adam 1e-4, one pair a step, 150k iterations.
        "paper": {
            **_COMMON,
            "smoothness_weight": None,    # lambda; None: the paper's for the similarity (PAPER_SMOOTHNESS)
            "dice_weight": 0.0,           # gamma; 0 = unsupervised (TMI's auxiliary variant: 0.01)
            "iterations": 150_000,
            "batch_size": 1,
            "lr": 1e-4,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176 slices): the same network and loss with a 10x step size, on a
        # 128 x 128 working grid (1.38 mm voxels, a quick-only deviation): 40 ms a step on one CPU thread instead of
        # 90 at 176 x 176, and mean Dice of the 13 val pairs (seed 0) 0.806 against 0.794 (0.63 unregistered).
        "quick": {
            **_COMMON,
            "smoothness_weight": None,
            "dice_weight": 0.0,
            "working_size": 128,
            "iterations": 1500,
            "batch_size": 1,
            "lr": 1e-3,
            "log_every": 10,
            "checkpoint_every": 500,
        },
    }

    # The papers tuned lambda (TMI 2019, Fig. 6); the rate is what every user sets. Both recipes' values inside.
    search_space = {"smoothness_weight": SearchRange(0.01, 10.0, "log"), "lr": SearchRange(1e-5, 1e-2, "log")}
    label_terms = ("dice_weight",)   # TMI's auxiliary segmentation loss: > 0 and the row learns from labels
    deviations = (
        Deviation("Convolutions keep PyTorch's default initialisation",
                  "voxelmorph's PyTorch code does the same; the Keras original of the papers used He-normal."),
        Deviation("The diffeomorphic variant is voxelmorph's current code, not the MICCAI 2018 probabilistic "
                  "network", "No sigma head and no KL term: the velocity is the network's output, integrated in 7 "
                  "steps at half resolution, regularised by Grad times int_downsize, as the current code.",
                  recipes=()),
        Deviation("Resized fields are rescaled by (S_new - 1) / (S_old - 1); integration continues the field at "
                  "the border", "The factor that is exact for corner-aligned grids (voxelmorph multiplies by 1/2 "
                  "and 2) and a displacement continued rather than set to zero outside the grid (voxelmorph pads "
                  "with zeros); only the diffeomorphic option uses either.", recipes=()),
        Deviation("Without integration the smoothness is not multiplied by int_downsize",
                  "voxelmorph's PyTorch training script multiplies Grad by int_downsize (2) whatever the "
                  "integration, which doubles lambda for the non-diffeomorphic network; the papers' lambda "
                  "(TMI 2019, and the Keras code) is kept, and the factor applies to the half-resolution "
                  "velocity only. The row follows the paper; the PyTorch script would regularise twice as much.",
                  recipes=("paper", "quick"), changes_results=False),
        Deviation("Quick recipe: the network runs on a 128 x 128 working grid fitted to the image",
                  "The papers register at the dataset's resolution; the default CPU run of three seeds must fit its "
                  "time budget, and at 1.38 mm voxels a step costs less than half (val Dice 0.806 against 0.794 at "
                  "176 x 176, seed 0). The displacement is brought back to the dataset's grid in mm.",
                  recipes=("quick",)),
        Deviation("The Dice term warps one-hot labels linearly over the dataset's evaluation labels",
                  "TMI's auxiliary-data variant used coarse label groups; it is off (dice_weight 0) in both "
                  "recipes.", recipes=()),
    )

    def complete_recipe(self, recipe: dict) -> dict:
        """lambda follows the similarity unless the config sets it (1 for NCC, 0.01 for MSE; 0.02 for MSE with
        the Dice term)."""
        if recipe["smoothness_weight"] is None:
            table = PAPER_SMOOTHNESS_WITH_DICE if recipe["dice_weight"] > 0 else PAPER_SMOOTHNESS
            if recipe["similarity"] not in table:
                raise ValueError(f"voxelmorph: similarity must be 'ncc' or 'mse', got {recipe['similarity']!r}")
            recipe = {**recipe, "smoothness_weight": table[recipe["similarity"]]}
        elif isinstance(recipe["smoothness_weight"], bool) or not isinstance(recipe["smoothness_weight"], (int, float)):
            raise ValueError(f"method 'voxelmorph': recipe key 'smoothness_weight' must be a number, "
                             f"got {recipe['smoothness_weight']!r}")
        return recipe

    def working_grid(self, ndim: int, recipe: dict) -> WorkingGrid | None:
        """The papers run on the dataset's grid; ``working_size`` > 0 runs the network on a coarser cube."""
        return WorkingGrid((int(recipe["working_size"]),) * ndim) if recipe["working_size"] else None

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        encoder, decoder = _features(recipe)
        return VoxelMorphNet(ndim, encoder, decoder, recipe["downsampling"], recipe["diffeomorphic"],
                             recipe["int_steps"], recipe["int_downsize"])

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        moving, fixed = batch["moving"], batch["fixed"]
        out = net(moving, fixed, inverse=recipe["bidir"])
        similarity = _similarity(recipe)
        terms = {}
        if recipe["bidir"]:
            terms["similarity"] = (0.5, similarity(fixed, warp(moving, out.displacement)))
            terms["similarity_inverse"] = (0.5, similarity(moving, warp(fixed, out.inverse)))
        else:
            terms["similarity"] = (1.0, similarity(fixed, warp(moving, out.displacement)))
        # Grad on what the network predicts: u, or the half-resolution velocity times int_downsize
        smoothness = gradient_smoothness(out.regularised, recipe["smoothness_penalty"])
        terms["smoothness"] = (recipe["smoothness_weight"], out.regulariser_scale * smoothness)
        if recipe["dice_weight"] > 0:
            if "fixed_seg" not in batch or "moving_seg" not in batch:
                raise ValueError("voxelmorph: dice_weight > 0 needs a dataset with segmentations "
                                 "(fixed_seg, moving_seg)")
            labels = batch["labels"]
            fixed_onehot = one_hot(batch["fixed_seg"], labels, dtype=moving.dtype)
            moving_onehot = one_hot(batch["moving_seg"], labels, dtype=moving.dtype)
            terms["dice"] = (recipe["dice_weight"], soft_dice_loss(fixed_onehot, warp(moving_onehot, out.displacement)))
        return terms

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return net(moving, fixed).displacement


class Prediction(NamedTuple):
    displacement: torch.Tensor          # B x ndim x *spatial, full resolution, voxels
    regularised: torch.Tensor           # the field the smoothness term acts on
    regulariser_scale: float            # voxelmorph's loss_mult: int_downsize for the velocity, else 1
    inverse: torch.Tensor | None        # fixed -> moving displacement, when asked for


class VoxelMorphNet(nn.Module):
    """U-Net on [moving, fixed] -> flow conv -> displacement (or velocity, integrated)."""

    def __init__(self, ndim: int, encoder, decoder, downsampling: str = "strided", diffeomorphic: bool = False,
                 int_steps: int = 7, int_downsize: int = 2):
        super().__init__()
        if diffeomorphic and (int_steps < 1 or int_downsize < 1):
            raise ValueError(f"diffeomorphic VoxelMorph needs int_steps >= 1 and int_downsize >= 1, "
                             f"got {int_steps} and {int_downsize}")
        self.unet = UNet(ndim, 2, encoder, _decoder_groups(encoder, decoder, downsampling), downsampling)
        self.flow = flow_head(self.unet.out_channels, ndim)
        self.diffeomorphic, self.int_steps, self.int_downsize = diffeomorphic, int_steps, int_downsize

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, inverse: bool = False) -> Prediction:
        field = self.flow(self.unet(torch.cat([moving, fixed], dim=1))).float()  # float32 under autocast too
        if not self.diffeomorphic:
            return Prediction(field, field, 1.0, -field if inverse else None)
        shape = field.shape[2:]
        velocity = field
        if self.int_downsize > 1:
            velocity = resize_displacement(field, [max(2, s // self.int_downsize) for s in shape])

        def exp(v):
            u = integrate_velocity(v, self.int_steps)
            return resize_displacement(u, shape) if self.int_downsize > 1 else u

        return Prediction(exp(velocity), velocity, float(self.int_downsize), exp(-velocity) if inverse else None)


def _features(recipe: dict) -> tuple[list, list]:
    if recipe["features"] is not None:
        encoder, decoder = recipe["features"]
        return list(encoder), list(decoder)
    if recipe["architecture"] not in ARCHITECTURES:
        raise ValueError(f"voxelmorph: architecture must be one of {sorted(ARCHITECTURES)} "
                         f"(or give features), got {recipe['architecture']!r}")
    return ARCHITECTURES[recipe["architecture"]]


def _decoder_groups(encoder: list, decoder: list, downsampling: str) -> list[list[int]]:
    """voxelmorph's flat decoder list -> convs per resolution, coarsest first (regbench.blocks.networks.UNet).

    PyTorch code (max pool): one conv at each of the len(encoder) coarser resolutions, the rest at full
    resolution. Keras papers (strided): one conv a level down to 1/4, two at 1/2, the rest at full.
    """
    levels = len(encoder)
    if len(decoder) < levels + (1 if downsampling == "strided" else 0):
        raise ValueError(f"voxelmorph: a decoder of {len(decoder)} convs is too short for {levels} levels")
    if downsampling == "maxpool":
        return [[f] for f in decoder[:levels]] + [list(decoder[levels:])]
    return [[f] for f in decoder[:levels - 1]] + [list(decoder[levels - 1:levels + 1]), list(decoder[levels + 1:])]


def _similarity(recipe: dict):
    if recipe["similarity"] == "ncc":
        window = recipe["ncc_window"]
        return lambda fixed, warped: local_ncc(fixed, warped, window)
    if recipe["similarity"] == "mse":
        return mse
    raise ValueError(f"voxelmorph: similarity must be 'ncc' or 'mse', got {recipe['similarity']!r}")
