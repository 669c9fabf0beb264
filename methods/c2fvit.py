"""C2FViT: affine registration by a coarse-to-fine vision transformer, trained without labels.

Mok and Chung (CVPR 2022) register a pair affinely in three stages over an image pyramid. After a
centre-of-mass (CoM) initialisation that translates the moving image's intensity centre onto the fixed
one's, the pair, shrunk to a 128^3 cube, is average-pooled into three levels. Stage i embeds the
pair of its level, [moving, fixed], by a strided convolution with a kernel larger than its stride
(k = 3/7/15, s = 2/4/8, so every level gives the same token grid), adds the previous stage's tokens
through a 3^d convolution, runs transformer blocks (global attention, a depth-wise convolution in the
MLP, no norm) and mean-pools the tokens into tanh-bounded *decoupled* affine parameters: translation,
rotation, shear and scaling, each with its own range (regbench.blocks.decoupled_affine), composed about the
moving image's CoM. Stage i's affine warps the moving image of the next level, which is stage i+1's
input (progressive spatial transformation); the output is the last stage's affine alone. The loss is
a multi-resolution local NCC (windows 7/5/3, weights 1, 1/2, 1/4) of the finest level's warped moving
image against the fixed one, with no regulariser: the parameter ranges constrain the affine. C2FViT-s,
the semi-supervised variant, adds 0.5 x a soft Dice of the linearly warped one-hot moving labels.

The network runs on its working grid (``working_size``; regbench.geometry): the official pipeline's 128^3
cube (its 256^3 volumes shrunk x0.5), here isotropic voxels with the dataset's whole field of view fitted in.
The affine parameters act in normalised coordinates ([-1, 1] across the grid), which are physical
coordinates up to one scale only on a cube of isotropic voxels: there a decoded rotation is rigid in mm and a
translation of 1 is half the cube's side along every axis, whatever the dataset's grid.

``deviations`` lists where this file departs from the paper and the official code (cwmok/C2FViT at 6a0a637;
spec/methods/c2fvit.md): the 2D analogue of the paper's 3D method, the fitted working grid and the quick recipe's
LayerNorm among them. As in the paper, a run keeps the checkpoint with the best Dice on the val split.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange, WorkingGrid
from regbench.blocks.decoupled_affine import (affine_warp, center_of_mass, center_of_mass_translation,
                                              decoupled_affine_matrix, matrix_to_displacement, parameter_count)
from regbench.blocks.losses import local_ncc, multiscale_local_ncc, one_hot, soft_dice_loss
from regbench.blocks.networks import conv
from regbench.blocks.transformer import (ConvPatchEmbedding, TransformerEncoder, grid_to_tokens,
                                         init_transformer_weights, tokens_to_grid)

SUPERVISION = ("final_multiscale", "per_stage")

_COMMON = {
    # network (C2F_ViT_stage's defaults)
    "levels": 3,                        # pyramid levels = stages, coarse to fine
    "patch_kernels": [3, 7, 15],        # patch-embedding kernel per stage, coarse first
    "patch_strides": [2, 4, 8],         # and its stride: the same token grid at every level
    "width": 256,                       # token width (embed_dims)
    "depth": 4,                         # transformer blocks per stage
    "heads": 2,
    "mlp_ratio": 2.0,
    "qkv_bias": False,
    "norm": "identity",                 # the code's norm_layer=nn.Identity; "layernorm" for PVT's
    # input and affine decoding
    "working_size": 128,                # the network's grid: a 128^d isotropic cube (256^3 x 0.5); 0: the dataset's
    "com_init": True,                   # centre-of-mass translation before the network
    "translation_range": 1.0,           # normalised units: 1 = half the field of view
    "rotation_range": math.pi,          # radians
    "shear_range": math.pi,
    "scaling_range": 0.5,               # scales in [0.5, 1.5]
    # loss: similarity = sum_j ncc_weights[j] * -LNCC_{ncc_windows[j]}(D^j warped, D^j fixed)
    "supervision": "final_multiscale",  # or "per_stage" (see deviations)
    "ncc_windows": [7, 5, 3],
    "ncc_weights": [1.0, 0.5, 0.25],
    "ncc_eps": 1e-5,                    # current code; 1e-8 in the original release
    "dice_weight": 0.0,                 # 0: C2FViT; 0.5: C2FViT-s (semi-supervised, needs segmentations)
    "augment_affine": 0.0,              # > 0: random affine on the moving image in training (not the paper's)
    "batch_size": 1,
    "model_selection": "val_dice",      # the checkpoint with the best val Dice is kept (regbench.evaluation.selection)
}


class Method(RegistrationMethod):
    name = "c2fvit"
    label_terms = ("dice_weight",)      # C2FViT-s: > 0 and the row learns from labels
    citation = ("T. C. W. Mok, A. C. S. Chung. Affine Medical Image Registration with Coarse-to-Fine Vision "
                "Transformer. CVPR 2022, arXiv:2203.15216. Code: github.com/cwmok/C2FViT.")
    # No regulariser (the decoupled parameters' ranges bound the affine): the rate alone.
    search_space = {"lr": SearchRange(1e-5, 1e-2, "log")}
    recipes = {
        # Official code: Adam 1e-4 constant, one pair a step, 160k iterations (checkpoints every 1000, the
        # best kept on 10 validation scans: here on the val pairs); 128^3 inputs, 16^3 tokens of width 256 at every
        # stage.
        "paper": {
            **_COMMON,
            "iterations": 160_000,
            "lr": 1e-4,
            "checkpoint_every": 1000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d: 176 x 176 at 1 mm on an 88 x 88 working grid of 2.01 mm, the official
        # x0.5; pyramid 22/44/88, 11 x 11 tokens at every stage): the same pyramid, embeddings and loss; a
        # narrower, shallower network with LayerNorm (see deviations), four pairs a step at 10x the step size.
        # About 50 ms a step on one CPU thread. A 64 x 64 grid trains about 20 % faster but scored lower on the val
        # pairs (seeds 0/1/2: 0.638, 0.643, 0.652 against 0.645, 0.655, 0.650). 600 steps: the val curve (13 pairs,
        # seed 0) peaks there, 0.604, 0.656, 0.650, 0.645 after 400, 600, 800, 1000 steps. A longer budget learns
        # the 40 training subjects, not the task: after 600, 1200, 2400 steps at the tuned rate (seeds 0/1/2), 13
        # unseen pairs of training subjects score 0.60, 0.66, 0.71 (0.650 unregistered) and the val pairs 0.650,
        # 0.647, 0.654 (0.634 unregistered; the loss's own optimum, theta fitted per pair, 0.681). Random affines
        # on the moving images (augment_affine 0.05) reach 0.667 on val only after 4800 steps (seed 0). The paper
        # trains on 255 subjects. No option does better at 600 steps (tuned rate, val, seeds 0/1/2): this recipe
        # 0.659, 0.655, 0.627; without the CoM step 0.646, 0.639, 0.647; per-stage supervision 0.655, 0.643, 0.650;
        # augment_affine 0.02: 0.658, 0.637, 0.657; 0.05: 0.612, 0.633, 0.614; the four parameter ranges narrowed
        # 4x: 0.642, 0.644, 0.651; 8x (scaling 0.1): 0.650, 0.640, 0.646; 16x (scaling 0.05): 0.637, 0.633, 0.621.
        "quick": {
            **_COMMON,
            "working_size": 88,
            "width": 32,
            "depth": 2,
            "norm": "layernorm",
            "batch_size": 4,
            "iterations": 600,
            "lr": 1e-3,
            "checkpoint_every": 200,
            "log_every": 10,
        },
    }
    deviations = (
        Deviation("The network runs on a 128^d cube of isotropic voxels fitted to the dataset's field of view",
                  "The official pipeline shrinks 256^3 volumes of 1 mm x0.5 to 128^3 (2 mm voxels); regbench "
                  "resamples each dataset's grid onto the cube that holds it (OASIS: 1.76 mm voxels, padded with "
                  "0), so a translation of 1 is half that cube's side; the displacement is brought back to the "
                  "dataset's grid in mm. The quick recipe's cube is 88^2."),
        Deviation("working_size 0 runs the network on the dataset's own grid",
                  "An option: there the normalised coordinates are physical only on a cube of isotropic voxels; "
                  "elsewhere a decoded rotation is not rigid in mm and each range means a different length per "
                  "axis. The official code only sees 128^3 cubes.", recipes=()),
        Deviation("Model selection: the checkpoint with the best mean Dice over the dataset's val pairs",
                  "The paper keeps the checkpoint (saved every 1000 iterations) with the best Dice on 10 "
                  "validation scans, over labels it does not name; regbench scores each checkpoint (and the last "
                  "network) on the val split as rule register scores test pairs (regbench.evaluation.selection).",
                  changes_results=False),
        Deviation("Similarity on the final warped image only, at 3 scales (supervision: final_multiscale)",
                  "The official code's loss, although a code comment calls it '3 level deep supervision'; whether "
                  "the paper sums an NCC per stage is unverified. supervision: per_stage scores stage i's affine "
                  "on level i's moving image with that level's window and weight (7/1 finest, 5/1/2, 3/1/4)."),
        Deviation("NCC with eps = 1e-5 (ncc_eps), the current official code",
                  "The original release (the paper's) used 1e-8; a 2023 commit briefly divided the local means by "
                  "w instead of w^d, a bug not reproduced. Both are the squared local NCC of "
                  "regbench.blocks.losses.local_ncc."),
        Deviation("Parameter ranges and composition order are the official code's",
                  "Translation +-1 (normalised), rotation and shear +-pi, scaling 1 +- 0.5, A = C+ Sh S R C- T; "
                  "whether the paper states the same in words is unverified.", changes_results=False),
        Deviation("2D: 6 decoupled parameters (translation x 2, one rotation, one shear, scaling x 2)",
                  "The paper is 3D only (12 parameters); this is regbench's analogue for 2D datasets, composed "
                  "as in 3D (regbench.blocks.decoupled_affine)."),
        Deviation("The CoM initialisation and the final affine's centre come from the working-grid images",
                  "The official test script computes them on the 256^3 volumes, its training Dice on the x0.5 "
                  "images; the centres differ by interpolation only. Each stage's affine acts about the CoM of "
                  "the level it warps, as in the code."),
        Deviation("Every pair of a batch has its own affine and centre of mass",
                  "The official code decodes batch element 0 only and pools one CoM over the batch, so it trains "
                  "with batch 1, where the two agree (the paper recipe); the quick recipe's batches of 4 need "
                  "the per-pair form.", changes_results=False),
        Deviation("Images are not min-max normalised again",
                  "The datasets serve every image in [0, 1] already; the official code normalises each volume.",
                  changes_results=False),
        Deviation("C2FViT-s Dice: -mean soft Dice over the dataset's evaluation labels, on the working grid",
                  "The code uses 1 - mean Dice with eps in numerator and denominator over every channel of its "
                  "one-hot files (which structures is unverified), warping the 256^3 labels twice (CoM shift, "
                  "then affine); here the labels on the working grid are warped once by the composed transform. "
                  "dice_weight 0 (C2FViT) in both recipes.", recipes=()),
        Deviation("Previous stage's tokens resized linearly where the token grids of two levels differ",
                  "Only on grids whose size is not a multiple of 2^(levels-1) x stride; the official 128^3 (and "
                  "the quick 88^2) give one token grid at every level.", recipes=()),
        Deviation("augment_affine: random decoupled affines on the training moving images",
                  "An option (0 in both recipes) for small data, suggested by spec/methods/c2fvit.md; not the "
                  "paper's.", recipes=()),
        Deviation("Only the default network (C2F_ViT_stage)",
                  "The official code's alternatives with positional encodings (_pos, _peg) are not the default "
                  "and not reimplemented.", recipes=(), changes_results=False),
        Deviation("Quick recipe: LayerNorm as the transformer blocks' norm",
                  "The official norm_layer is the identity. Without a norm the tokens of [0, 1] images are about "
                  "0.04 in size and the attention is nearly uniform (its gradients about 1e-7). Val Dice on "
                  "embedded2d (13 pairs, 0.634 unregistered; seeds 0/1/2): LayerNorm 0.645, 0.655, 0.650; "
                  "identity 0.649, 0.650, 0.627.", recipes=("quick",)),
    )

    def working_grid(self, ndim: int, recipe: dict) -> WorkingGrid | None:
        """The isotropic ``working_size``^d cube (the dataset's field of view fitted in); None for 0."""
        size = int(recipe["working_size"] or 0)
        return WorkingGrid((size,) * ndim) if size else None

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return C2FViTNet(ndim, recipe["levels"], recipe["patch_kernels"], recipe["patch_strides"], recipe["width"],
                         recipe["depth"], recipe["heads"], recipe["mlp_ratio"], recipe["qkv_bias"], recipe["norm"],
                         recipe["com_init"], _ranges(recipe))

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        moving, augmentation = batch["moving"], None
        if recipe["augment_affine"] > 0 and net.training:
            # theta ~ U(-a, a) per parameter, decoded with the recipe's ranges, about the grid centre
            theta = torch.rand(moving.shape[0], parameter_count(net.ndim), dtype=moving.dtype, device=moving.device)
            augmentation = decoupled_affine_matrix(recipe["augment_affine"] * (2 * theta - 1), **_ranges(recipe))
            moving = affine_warp(moving, augmentation)
        out = net(moving, batch["fixed"])
        windows, weights, eps = recipe["ncc_windows"], recipe["ncc_weights"], recipe["ncc_eps"]
        if len(windows) != len(weights):
            raise ValueError(f"c2fvit: ncc_windows {windows} and ncc_weights {weights} differ in length")
        terms = {}
        if recipe["supervision"] == "final_multiscale":
            # the last stage's affine on the finest level, scored at len(windows) scales
            terms["similarity"] = (1.0, multiscale_local_ncc(out.fixed[-1], out.warped, windows, weights, eps))
        elif recipe["supervision"] == "per_stage":
            # stage i's affine on level i, at that level's window and weight (finest: windows[0])
            if len(windows) < net.levels:
                raise ValueError(f"c2fvit: per_stage supervision needs {net.levels} ncc_windows, got {windows}")
            for i, (matrix, level_moving, level_fixed) in enumerate(zip(out.stage_matrices, out.moving, out.fixed)):
                j = net.levels - 1 - i
                warped = affine_warp(level_moving, matrix)
                terms[f"similarity_stage{i + 1}"] = (weights[j], local_ncc(level_fixed, warped, windows[j], eps))
        else:
            raise ValueError(f"c2fvit: supervision must be one of {SUPERVISION}, got {recipe['supervision']!r}")
        if recipe["dice_weight"] > 0:
            if "fixed_seg" not in batch or "moving_seg" not in batch:
                raise ValueError("c2fvit: dice_weight > 0 (C2FViT-s) needs a dataset with segmentations "
                                 "(fixed_seg, moving_seg)")
            labels, dtype = batch["labels"], batch["moving"].dtype
            fixed_onehot = one_hot(batch["fixed_seg"], labels, dtype=dtype)
            matrix = out.matrix if augmentation is None else augmentation @ out.matrix
            warped_onehot = affine_warp(one_hot(batch["moving_seg"], labels, dtype=dtype), matrix)
            terms["dice"] = (recipe["dice_weight"], soft_dice_loss(fixed_onehot, warped_onehot))
        return terms

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return matrix_to_displacement(net(moving, fixed).matrix, fixed.shape[2:])


def _ranges(recipe: dict) -> dict:
    return {key: float(recipe[key]) for key in ("translation_range", "rotation_range", "shear_range", "scaling_range")}


class Prediction(NamedTuple):
    matrix: torch.Tensor                # B x (d+1) x (d+1): CoM initialisation, then the last stage's affine:
                                        # the registration
    stage_matrices: list[torch.Tensor]  # each stage's affine (about the CoM of what it warps), coarse first
    parameters: list[torch.Tensor]      # each stage's theta in [-1, 1], B x 6 (2D) or B x 12 (3D)
    moving: list[torch.Tensor]          # network-input pyramid of the CoM-initialised moving image, coarse first
    fixed: list[torch.Tensor]           # and of the fixed image
    warped: torch.Tensor                # the finest level's moving image warped by the last affine


class C2FViTNet(nn.Module):
    """Three (``levels``) stages of patch embedding -> transformer -> affine head, coarse to fine.

    ``forward(moving, fixed)`` takes ``B x 1 x *spatial`` images (2D or 3D, the same grid: the working grid,
    whose finest pyramid level they are) and returns a :class:`Prediction`; every matrix is in normalised
    coordinates (regbench.blocks.decoupled_affine), so ``matrix_to_displacement(prediction.matrix, shape)`` is
    the transform at any resolution of the same field of view.
    """

    def __init__(self, ndim: int, levels: int = 3, patch_kernels=(3, 7, 15), patch_strides=(2, 4, 8),
                 width: int = 256, depth: int = 4, heads: int = 2, mlp_ratio: float = 2.0, qkv_bias: bool = False,
                 norm: str = "identity", com_init: bool = True, ranges: dict | None = None):
        super().__init__()
        if len(patch_kernels) != levels or len(patch_strides) != levels:
            raise ValueError(f"c2fvit: {levels} levels need {levels} patch_kernels and patch_strides, "
                             f"got {list(patch_kernels)} and {list(patch_strides)}")
        self.ndim, self.levels, self.com_init = ndim, levels, com_init
        self.ranges = ranges or {}
        parameters = parameter_count(ndim)
        self.embeddings = nn.ModuleList(ConvPatchEmbedding(ndim, 2, width, k, s)
                                        for k, s in zip(patch_kernels, patch_strides))
        self.encoders = nn.ModuleList(TransformerEncoder(ndim, width, depth, heads, mlp_ratio, qkv_bias, norm)
                                      for _ in range(levels))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width // 2, bias=False), nn.ReLU(inplace=True),
                          nn.Linear(width // 2, parameters, bias=False), nn.Tanh())
            for _ in range(levels))
        self.squeezes = nn.ModuleList(conv(ndim, width, width, 3) for _ in range(levels - 1))
        self.apply(init_transformer_weights)

    def pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``levels`` images, each a 2^d average pool of the next, coarsest first."""
        pool = getattr(F, f"avg_pool{self.ndim}d")
        levels = [image]
        for _ in range(self.levels - 1):
            levels.append(pool(levels[-1], 2))
        return levels[::-1]

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Prediction:
        if moving.shape != fixed.shape or moving.ndim != self.ndim + 2 or moving.shape[1] != 1:
            raise ValueError(f"c2fvit: moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must both be "
                             f"B x 1 x *spatial with {self.ndim} spatial axes")
        if min(moving.shape[2:]) < 2 ** (self.levels - 1):
            raise ValueError(f"c2fvit: images of shape {tuple(moving.shape[2:])} are too small for {self.levels} "
                             f"pyramid levels")
        initial = center_of_mass_translation(moving, fixed) if self.com_init else _identity(moving)
        moving_levels, fixed_levels = self.pyramid(affine_warp(moving, initial)), self.pyramid(fixed)

        matrices, thetas, features = [], [], None
        source = moving_levels[0]
        for i in range(self.levels):
            tokens, shape = self.embeddings[i](torch.cat([source, fixed_levels[i]], dim=1))
            if features is not None:
                if features.shape[2:] != shape:
                    features = F.interpolate(features, size=shape, mode="bilinear" if self.ndim == 2 else "trilinear")
                tokens = tokens + grid_to_tokens(features)[0]
            tokens = self.encoders[i](tokens, shape)
            theta = self.heads[i](tokens.mean(dim=1))
            # stage i's affine acts on the next level's moving image (the last stage's on its own level)
            target = moving_levels[min(i + 1, self.levels - 1)]
            matrix = decoupled_affine_matrix(theta, center_of_mass(target), **self.ranges)
            source = affine_warp(target, matrix)
            matrices.append(matrix)
            thetas.append(theta)
            if i < self.levels - 1:
                features = self.squeezes[i](tokens_to_grid(tokens, shape))
        return Prediction(initial @ matrices[-1], matrices, thetas, moving_levels, fixed_levels, source)


def _identity(image: torch.Tensor) -> torch.Tensor:
    ndim = image.ndim - 2
    return torch.eye(ndim + 1, dtype=image.dtype, device=image.device).expand(image.shape[0], -1, -1)
