"""C2FViT: affine registration by a coarse-to-fine vision transformer, trained without labels.

Mok and Chung (CVPR 2022) register a pair affinely in three stages over an image pyramid. After a
centre-of-mass (CoM) initialisation that translates the moving image's intensity centre onto the fixed
one's, both images are downsampled x0.5 and average-pooled into three levels. Stage i embeds the
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

2D (the paper is 3D only): 6 decoupled parameters, the natural analogue of the 12: translation x 2,
one rotation, one shear, scaling x 2 (regbench.blocks.decoupled_affine documents the composition).

Choices where the paper and the official code (cwmok/C2FViT at 6a0a637) differ or are silent
(spec/methods/c2fvit.md):

- Similarity: the code's multi-resolution NCC on the *final* warped image (``supervision:
  "final_multiscale"``), although a code comment calls it "3 level deep supervision"; whether the paper
  sums a per-stage NCC is unverified, so ``"per_stage"`` is offered: stage i's affine warps level i's
  moving image, scored by the local NCC of that level's window and weight (7/1 finest, 5/1/2, 3/1/4).
- NCC: squared local NCC with local means over the whole w^d window and eps = 1e-5, the current code
  (regbench.blocks.losses.local_ncc is that formula). The original release used eps = 1e-8 (``ncc_eps``); a
  2023 commit briefly divided the means by w instead of w^d, a bug not reproduced.
- Dice (C2FViT-s): regbench's ``soft_dice_loss`` (-mean Dice, eps only in the denominator) over the
  dataset's evaluation labels, instead of the code's 1 - mean Dice with eps in numerator and
  denominator over every channel of its one-hot files: the same gradient up to the eps terms. The
  moving labels are resampled once, by the composed CoM + affine transform, where the code resamples
  them twice (CoM shift, then affine), both bilinear at full resolution.
- Batches: the code decodes the affine of batch element 0 only and computes one CoM over the whole
  batch (so it trains with batch 1); here both are per pair.
- Centres of mass: each stage's affine acts about the CoM of the image it warps (the network's level),
  as in the code. The returned transform, like the test script's, applies the last stage's parameters
  about the CoM of the full-resolution CoM-initialised moving image; the training script's Dice warps
  the full-resolution labels with the CoM of the x0.5 image instead (the two differ by interpolation only).
- Images are already min-max normalised to [0, 1] by the datasets, so no normalisation is repeated.
- On grids whose token grids differ between levels (sizes not multiples of 2^(levels-1) x stride), the
  previous stage's tokens are linearly resized to the new grid before they are added; the official
  code only sees 128^3 and 16^3 tokens at every level.
- ``augment_affine`` (off in both recipes) warps each training moving image by a random decoupled affine
  first, the extra training pairs spec/methods/c2fvit.md suggests for small data; not the paper's.
- Not reimplemented: the alternative ``_pos`` / ``_peg`` networks (positional encodings), not the default.

The quick recipe keeps the loss, the pyramid, the patch embeddings, the ranges and the CoM initialisation,
and changes the network's size and one layer: width 32, 2 blocks a stage, and PVT's LayerNorm as the
blocks' norm (``norm_layer`` of the code, whose default is the identity). Without the norm the tokens of
[0, 1] images are about 0.04 in size, the attention is uniform (its gradients about 1e-7) and in a
CPU budget the network learns little more than one affine for every pair. Measured on embedded2d (16
test pairs, unregistered mean Dice 0.609), 800 steps at width 32, seeds 0/1/2: identity norm 0.614, 0.611,
0.587; LayerNorm 0.639, 0.645, 0.623.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from regbench import RegistrationMethod
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
    "input_scale": 0.5,                 # 256^3 -> 128^3 before the network (trilinear, align_corners=True)
    "com_init": True,                   # centre-of-mass translation before the network
    "translation_range": 1.0,           # normalised units: 1 = half the field of view
    "rotation_range": math.pi,          # radians
    "shear_range": math.pi,
    "scaling_range": 0.5,               # scales in [0.5, 1.5]
    # loss: similarity = sum_j ncc_weights[j] * -LNCC_{ncc_windows[j]}(D^j warped, D^j fixed)
    "supervision": "final_multiscale",  # or "per_stage" (see the docstring)
    "ncc_windows": [7, 5, 3],
    "ncc_weights": [1.0, 0.5, 0.25],
    "ncc_eps": 1e-5,                    # current code; 1e-8 in the original release
    "dice_weight": 0.0,                 # 0: C2FViT; 0.5: C2FViT-s (semi-supervised, needs segmentations)
    "augment_affine": 0.0,              # > 0: random affine on the moving image in training (not the paper's)
    "batch_size": 1,
}


class Method(RegistrationMethod):
    name = "c2fvit"
    citation = ("T. C. W. Mok, A. C. S. Chung. Affine Medical Image Registration with Coarse-to-Fine Vision "
                "Transformer. CVPR 2022, arXiv:2203.15216. Code: github.com/cwmok/C2FViT.")
    recipes = {
        # Official code: Adam 1e-4 constant, one pair a step, 160k iterations (checkpoints every 1000, the
        # best chosen on 10 validation scans); 128^3 inputs, 16^3 tokens of width 256 at every stage.
        "paper": {
            **_COMMON,
            "iterations": 160_000,
            "lr": 1e-4,
            "checkpoint_every": 1000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d: 176 x 176 -> 88 x 88 network input, pyramid 22/44/88, 11 x 11 tokens
        # at every stage): the same pyramid, embeddings and loss; a narrower, shallower network with LayerNorm
        # (see above), four pairs a step at 10x the step size. About 50 ms a step on one CPU thread, so
        # 1000 steps take some 50 s.
        "quick": {
            **_COMMON,
            "width": 32,
            "depth": 2,
            "norm": "layernorm",
            "batch_size": 4,
            "iterations": 1000,
            "lr": 1e-3,
            "checkpoint_every": 200,
            "log_every": 10,
        },
    }

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return C2FViTNet(ndim, recipe["levels"], recipe["patch_kernels"], recipe["patch_strides"], recipe["width"],
                         recipe["depth"], recipe["heads"], recipe["mlp_ratio"], recipe["qkv_bias"], recipe["norm"],
                         recipe["input_scale"], recipe["com_init"], _ranges(recipe))

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
    matrix: torch.Tensor                # B x (d+1) x (d+1): CoM initialisation, then the last stage's affine
                                        # (about the CoM of the full-resolution image): the registration
    stage_matrices: list[torch.Tensor]  # each stage's affine (about the CoM of what it warps), coarse first
    parameters: list[torch.Tensor]      # each stage's theta in [-1, 1], B x 6 (2D) or B x 12 (3D)
    moving: list[torch.Tensor]          # network-input pyramid of the CoM-initialised moving image, coarse first
    fixed: list[torch.Tensor]           # and of the fixed image
    warped: torch.Tensor                # the finest level's moving image warped by the last affine


class C2FViTNet(nn.Module):
    """Three (``levels``) stages of patch embedding -> transformer -> affine head, coarse to fine.

    ``forward(moving, fixed)`` takes ``B x 1 x *spatial`` images (2D or 3D, the same grid) and returns a
    :class:`Prediction`; every matrix is in normalised coordinates (regbench.blocks.decoupled_affine), so
    ``matrix_to_displacement(prediction.matrix, shape)`` is the transform at any resolution.
    """

    def __init__(self, ndim: int, levels: int = 3, patch_kernels=(3, 7, 15), patch_strides=(2, 4, 8),
                 width: int = 256, depth: int = 4, heads: int = 2, mlp_ratio: float = 2.0, qkv_bias: bool = False,
                 norm: str = "identity", input_scale: float = 0.5, com_init: bool = True, ranges: dict | None = None):
        super().__init__()
        if len(patch_kernels) != levels or len(patch_strides) != levels:
            raise ValueError(f"c2fvit: {levels} levels need {levels} patch_kernels and patch_strides, "
                             f"got {list(patch_kernels)} and {list(patch_strides)}")
        if not 0 < input_scale <= 1:
            raise ValueError(f"c2fvit: input_scale must be in (0, 1], got {input_scale}")
        self.ndim, self.levels, self.input_scale, self.com_init = ndim, levels, input_scale, com_init
        self.ranges = ranges or {}
        parameters = parameter_count(ndim)
        self.embeddings = nn.ModuleList(ConvPatchEmbedding(ndim, 2, width, k, s) for k, s in zip(patch_kernels, patch_strides))
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
        smallest = min(moving.shape[2:]) * self.input_scale / 2 ** (self.levels - 1)
        if smallest < 1:
            raise ValueError(f"c2fvit: images of shape {tuple(moving.shape[2:])} are too small for {self.levels} "
                             f"pyramid levels after scaling by {self.input_scale}")
        initial = center_of_mass_translation(moving, fixed) if self.com_init else _identity(moving)
        moving = affine_warp(moving, initial)
        small_moving, small_fixed = moving, fixed
        if self.input_scale != 1:
            mode = "bilinear" if self.ndim == 2 else "trilinear"
            small_moving, small_fixed = (F.interpolate(x, scale_factor=self.input_scale, mode=mode, align_corners=True)
                                         for x in (moving, fixed))
        moving_levels, fixed_levels = self.pyramid(small_moving), self.pyramid(small_fixed)

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
        # at full resolution the last affine acts about the CoM of the full-resolution image (the test script)
        output = decoupled_affine_matrix(thetas[-1], center_of_mass(moving), **self.ranges)
        return Prediction(initial @ output, matrices, thetas, moving_levels, fixed_levels, source)


def _identity(image: torch.Tensor) -> torch.Tensor:
    ndim = image.ndim - 2
    return torch.eye(ndim + 1, dtype=image.dtype, device=image.device).expand(image.shape[0], -1, -1)
