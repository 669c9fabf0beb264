"""DLIR: an affine ConvNet and cubic B-spline ConvNets stacked coarse to fine, trained stage by stage.

de Vos et al. (MedIA 2019) register in stages: stage k sees the fixed image and the moving image warped
by stages 1..k-1 and predicts its own transform, an affine one first (12 parameters in 3D: translation,
rotation, scaling, shearing, about the image centre) and then cubic B-spline control-point displacements
at finer and finer spacings. Each stage is trained alone, the earlier ones frozen, with the global
normalised cross-correlation as the similarity and, on the deformable stages, alpha times the bending energy
of the stage's field. No code was released; the first author's TorchIR (AIRNet, DIRNet, BsplineTransformer,
DLIRFramework, bending_energy_2d/3d) gives the layers, the transforms and the losses this file follows
(spec/methods/dlir.md):

- affine stage (AIRNet): one pipeline of 5 [3^d conv, ELU] blocks, average-pooled by 2 after the first 4 and
  globally at the end, run on each image; the two feature vectors concatenated, two FC+ELU layers, and four
  heads with PyTorch's default initialisation: translation (voxels), rotation ``tanh * pi/2`` per plane of
  axes, scaling ``2^tanh``, shear ``tan(tanh * pi/4)``; ``A = Scale * Shear * Rot`` about the image centre;
- B-spline stages (DIRNet): 5 [3^d conv, ELU] blocks on (fixed, warped moving), average-pooled after the
  first log2(spacing), two 1^d conv+ELU "dense" layers as wide and a zero-initialised 1^d conv to the
  ``floor(S / spacing)`` control displacements (voxels) that :mod:`regbench.blocks.bspline` turns into a field
  as TorchIR's transposed convolution does (controls beyond the grid zero);
- loss: ``-NCC(F, M o phi) + alpha * BE(u_k)`` with :func:`regbench.blocks.losses.bending_energy` (TorchIR's,
  averaged over voxels and components) of the stage's own field; the affine stage has NCC alone.

``iterations`` counts the steps of the whole run; ``stage_iterations`` shares them out among the stages
(affine first), e.g. [1, 3, 3] of 700: 100 affine steps, then 300 for each B-spline stage. Where this file
departs from the paper and TorchIR: ``Method.deviations``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange
from regbench.blocks.affine import affine_displacement
from regbench.blocks.bspline import bspline_displacement
from regbench.blocks.losses import global_ncc, bending_energy
from regbench.method import TrainingStage
from regbench.blocks.networks import conv
from regbench.blocks.spatial import compose_displacements, warp

_COMMON = {
    "affine": True,                 # an affine stage first
    "spacings": [32, 16, 8],        # one B-spline stage per control spacing (voxels, powers of 2), coarse to fine
    "affine_kernels": 32,           # channels of the affine ConvNet's 5 conv blocks
    "deformable_kernels": 32,       # channels of each B-spline ConvNet's 5 conv blocks
    "dense_features": 64,           # the affine ConvNet's FC layers (the B-spline 1x1 "dense" layers: kernels)
    "combine": "compose",           # "compose" (TorchIR) or "add" (the paper)
    "similarity_weight": 1.0,       # -global NCC
    "bending_weight": 1.0,          # alpha of the bending energy, deformable stages (UNVERIFIED)
    "padding_mode": "border",       # resampling outside the image (TorchIR)
    "stage_iterations": [1, 1, 1, 1],  # shares of ``iterations`` per stage (affine first), in training order
    "amsgrad": True,                # Adam's AMSGrad variant (TorchIR's example)
    "normalise_inputs": True,       # the ConvNets see intensities mapped from [0, 1] to [-1, 1] (TorchIR's example)
}


class Method(RegistrationMethod):
    name = "dlir"
    citation = ("B. D. de Vos, F. F. Berendsen, M. A. Viergever, H. Sokooti, M. Staring, I. Isgum. A deep learning "
                "framework for unsupervised affine and deformable image registration. Medical Image Analysis "
                "52:128-143, 2019, doi:10.1016/j.media.2018.11.010, arXiv:1809.06130.")
    # The bending weight alpha (the paper's value is unverified) and the rate.
    search_space = {"bending_weight": SearchRange(0.01, 10.0, "log"), "lr": SearchRange(1e-4, 1e-1, "log")}
    recipes = {
        # TorchIR's example budget (the paper's is UNVERIFIED): batch 32, 10,000 Adam steps a stage at 1e-3.
        "paper": {
            **_COMMON,
            "iterations": 40_000,       # 4 stages x 10,000
            "batch_size": 32,
            "lr": 1e-3,
            "checkpoint_every": 1000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176): affine + B-splines at 16 and 8 voxels (the data's
        # deformations have a control spacing of 16), 16 kernels, 700 steps of 2 pairs (100 affine, 300 a B-spline
        # stage; about 60 ms a step on one CPU thread, 40 s in all) at lr 3e-3, TorchIR's 1e-3 being too slow for so
        # short a run. Mean val Dice (an earlier val split of embedded2d: 8 val subjects a template, 22 pairs):
        # 0.626 unregistered -> 0.608 affine (100 steps from the heads' random start) -> 0.640 (spacing 16) -> 0.702
        # (spacing 8); lr 1e-3: 0.641.
        "quick": {
            **_COMMON,
            "spacings": [16, 8],
            "affine_kernels": 16,
            "deformable_kernels": 16,
            "stage_iterations": [1, 3, 3],
            "iterations": 700,
            "batch_size": 2,
            "lr": 3e-3,
            "checkpoint_every": 350,
            "log_every": 10,
        },
    }

    deviations = (
        Deviation("The stages' transforms are composed, not added",
                  "TorchIR composes them (its DLIRFramework names this its one departure from the paper, which "
                  "added the stages' displacement fields); combine = 'add' gives the paper's sum."),
        Deviation("Composition continues an earlier stage's field beyond the image border",
                  "regbench samples the earlier displacement with border padding; TorchIR resamples its coordinate "
                  "grid so, which clamps the position instead. They differ only where a stage maps a voxel out of "
                  "the image."),
        Deviation("Shear: 3 parameters in 3D (1 in 2D), above the diagonal",
                  "The paper's 12 affine parameters in 3D; TorchIR's AIRNet fills every off-diagonal entry (6 shears "
                  "in 3D, 2 in 2D).", changes_results=False),
        Deviation("The affine map is taken about the voxel-grid centre (S - 1) / 2",
                  "TorchIR takes it about S / 2; the translation head absorbs the difference, (A - I) / 2 voxels.",
                  changes_results=False),
        Deviation("Displacements, control points, translations and scalings in array-axis order",
                  "regbench's convention for fields; TorchIR's are in xyz order. The output units are permuted, "
                  "nothing else (the rotation matrices are TorchIR's, read in array axes).", changes_results=False),
        Deviation("One feature pipeline, shared by the two images, in the affine ConvNet",
                  "TorchIR's AIRNet; whether the paper's two pipelines share weights is UNVERIFIED."),
        Deviation("Layers as TorchIR's: 5 conv blocks of 32 kernels, ELU, no batch norm, 64-node FC layers",
                  "The paper's layer counts, widths and batch norm are UNVERIFIED (spec/methods/dlir.md); TorchIR's "
                  "AIRNet and DIRNet defaults are taken."),
        Deviation("NCC per image, averaged over the batch",
                  "TorchIR computes one NCC over the whole batch tensor (standard deviations with N - 1); per image "
                  "keeps a pair's score independent of its batch mates. Which the paper used is UNVERIFIED."),
        Deviation("Bending energy weight alpha = 1 on each B-spline stage's own field",
                  "The paper's alpha is UNVERIFIED and TorchIR's example trains without bending energy; 1, the "
                  "largest of the spec's candidates {0, 0.01, 0.1, 1}, with TorchIR's energy (a mean over "
                  "components): the quick recipe's val Dice on embedded2d is 0.702, 0.681 with 0.1, 0.669 with 0."),
        Deviation("The ConvNets see intensities mapped from [0, 1] to [-1, 1]",
                  "TorchIR's example normalises its images so; the paper's preprocessing is UNVERIFIED. On brain "
                  "slices with a background of 0, PyTorch's default initialisation otherwise leaves the B-spline "
                  "stages nearly still for hundreds of steps: val Dice 0.618 instead of 0.702 in the quick recipe "
                  "(normalise_inputs False)."),
        Deviation("Adam with AMSGrad, a fresh optimiser a stage",
                  "TorchIR's example; the paper's optimiser is UNVERIFIED."),
        Deviation("10,000 steps of 32 pairs a stage at lr 1e-3; control spacings 32, 16, 8",
                  "TorchIR's example budget and the spec's spacings; the paper's are UNVERIFIED.", recipes=("paper",)),
    )

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        net = DLIRNet(ndim, recipe["affine"], recipe["spacings"], recipe["affine_kernels"],
                      recipe["deformable_kernels"], recipe["dense_features"], recipe["combine"],
                      recipe["padding_mode"], recipe["normalise_inputs"])
        stage_steps(recipe, len(net.stages))  # a bad share list fails here, before any training
        return net

    def training_stages(self, net: nn.Module, recipe: dict) -> list[TrainingStage]:
        return [TrainingStage(name, steps, list(stage.parameters()), adam={"amsgrad": bool(recipe["amsgrad"])})
                for name, stage, steps in zip(net.stage_names, net.stages, stage_steps(recipe, len(net.stages)))]

    def start_stage(self, net: nn.Module, index: int, recipe: dict) -> None:
        net.training_stage = index

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        fixed, moving = batch["fixed"], batch["moving"]
        stage = net.training_stage
        displacement, fields = net(fixed, moving, upto=stage + 1)
        warped = warp(moving, displacement, padding_mode=recipe["padding_mode"])
        deformable = isinstance(net.stages[stage], BSplineStage)
        return {
            "similarity": (recipe["similarity_weight"], global_ncc(fixed, warped)),
            "bending": (recipe["bending_weight"] if deformable else 0.0, bending_energy(fields[-1])),
        }

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return net(fixed, moving)[0]


def stage_steps(recipe: dict, stages: int) -> list[int]:
    """Steps of each stage: ``stage_iterations`` (relative shares, one a stage) scaled to sum to ``iterations``."""
    shares = [float(w) for w in recipe["stage_iterations"]]
    if len(shares) != stages or any(not w > 0 for w in shares):
        raise ValueError(f"dlir: stage_iterations needs one positive share per stage ({stages}: the affine stage "
                         f"if any, then one per spacing), got {recipe['stage_iterations']!r}")
    bounds = [round(sum(shares[:k]) / sum(shares) * int(recipe["iterations"])) for k in range(stages + 1)]
    steps = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if min(steps) < 1:
        raise ValueError(f"dlir: {recipe['iterations']} iterations leave a stage without a step "
                         f"(stage_iterations {recipe['stage_iterations']!r})")
    return steps


class DLIRNet(nn.Module):
    """The stack: optional affine stage, then one B-spline stage per spacing; returns ``(u, [u_k])``."""

    def __init__(self, ndim: int, affine: bool = True, spacings=(32, 16, 8), affine_kernels: int = 32,
                 deformable_kernels: int = 32, dense_features: int = 64, combine: str = "compose",
                 padding_mode: str = "border", normalise_inputs: bool = True):
        super().__init__()
        if combine not in ("compose", "add"):
            raise ValueError(f"dlir: combine must be 'compose' or 'add', got {combine!r}")
        stages, names = [], []
        if affine:
            stages.append(AffineStage(ndim, affine_kernels, dense_features))
            names.append("affine")
        for spacing in spacings:
            stages.append(BSplineStage(ndim, int(spacing), deformable_kernels))
            names.append(f"bspline{int(spacing)}")
        if not stages:
            raise ValueError("dlir: no stage (affine is False and spacings is empty)")
        self.stages = nn.ModuleList(stages)
        self.stage_names = names
        self.combine, self.padding_mode, self.normalise_inputs = combine, padding_mode, normalise_inputs
        self.training_stage = len(stages) - 1  # set by Method.start_stage while training; all stages otherwise

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, upto: int | None = None):
        if self.normalise_inputs:  # an affine map of intensities commutes with (linear, border-padded) warping
            fixed, moving = 2 * fixed - 1, 2 * moving - 1
        total, fields = None, []
        for stage in self.stages[:upto]:
            current = moving if total is None else warp(moving, total, padding_mode=self.padding_mode)
            u = stage(fixed, current)
            fields.append(u)
            if total is None:
                total = u
            elif self.combine == "compose":  # warp(warp(m, total), u) = warp(m, total o u)
                total = compose_displacements(total, u, padding_mode=self.padding_mode)
            else:
                total = total + u
        return total, fields


def _conv_elu_blocks(ndim: int, in_channels: int, kernels: int, pools: int, blocks: int = 5) -> nn.Sequential:
    """``blocks`` x [3^d conv 'same', ELU], with a 2x average pool after each of the first ``pools`` blocks."""
    pool = getattr(nn, f"AvgPool{ndim}d")
    layers = []
    for block in range(blocks):
        layers += [conv(ndim, in_channels if block == 0 else kernels, kernels), nn.ELU()]
        if block < pools:
            layers.append(pool(2))
    return nn.Sequential(*layers)


class AffineStage(nn.Module):
    """TorchIR's AIRNet: a shared pipeline per image, global pooling, 2 FC layers, four bounded heads (PyTorch's
    default initialisation, as TorchIR: the untrained stage is a random transform near the identity)."""

    def __init__(self, ndim: int, kernels: int = 32, dense_features: int = 64):
        super().__init__()
        self.ndim = ndim
        planes = ndim * (ndim - 1) // 2
        self.features = _conv_elu_blocks(ndim, 1, kernels, pools=4)
        self.dense = nn.Sequential(nn.Linear(2 * kernels, dense_features), nn.ELU(),
                                   nn.Linear(dense_features, dense_features), nn.ELU())
        self.translation = nn.Linear(dense_features, ndim)
        self.rotation = nn.Linear(dense_features, planes)
        self.scaling = nn.Linear(dense_features, ndim)
        self.shear = nn.Linear(dense_features, planes)

    def parameters_of(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, t)``: the matrix (``B x d x d``) and the translation (``B x d``, voxels)."""
        pooled = [self.features(image).flatten(2).mean(-1) for image in (fixed, moving)]
        h = self.dense(torch.cat(pooled, dim=1))
        return affine_matrix(self.scaling(h), self.shear(h), self.rotation(h), self.ndim), self.translation(h)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        A, t = self.parameters_of(fixed, moving)
        eye = torch.eye(self.ndim, dtype=A.dtype, device=A.device)
        return affine_displacement(A - eye, t, fixed.shape[2:])


def affine_matrix(scaling: torch.Tensor, shear: torch.Tensor, rotation: torch.Tensor, ndim: int) -> torch.Tensor:
    """``Scale * Shear * Rot`` (``B x d x d``) from the raw head outputs; all zero gives the identity."""
    batch = scaling.shape[0]
    eye = torch.eye(ndim, dtype=scaling.dtype, device=scaling.device).expand(batch, ndim, ndim)
    scale = torch.diag_embed(torch.pow(2.0, torch.tanh(scaling)))
    upper = torch.triu_indices(ndim, ndim, offset=1, device=scaling.device)
    shear_matrix = eye.clone()
    shear_matrix[:, upper[0], upper[1]] = torch.tan(torch.tanh(shear) * math.pi / 4)
    rot = eye
    angles = torch.tanh(rotation) * math.pi / 2
    for p, (i, j) in enumerate(zip(upper[0].tolist(), upper[1].tolist())):
        cos, sin = torch.cos(angles[:, p]), torch.sin(angles[:, p])
        plane = eye.clone()
        plane[:, i, i], plane[:, j, j], plane[:, i, j], plane[:, j, i] = cos, cos, -sin, sin
        rot = torch.matmul(rot, plane)
    return scale @ shear_matrix @ rot


class BSplineStage(nn.Module):
    """TorchIR's DIRNet: conv/ELU/avg-pool down to the control grid, 1x1 dense convs as wide, zero-init output."""

    def __init__(self, ndim: int, spacing: int, kernels: int = 32):
        super().__init__()
        pools = int(round(math.log2(spacing))) if spacing >= 1 else -1
        if 2 ** max(pools, 0) != spacing or not 0 <= pools <= 5:
            raise ValueError(f"dlir: a B-spline spacing must be a power of 2 from 1 to 32, got {spacing}")
        self.ndim, self.spacing = ndim, spacing
        self.features = _conv_elu_blocks(ndim, 2, kernels, pools=pools)
        self.dense = nn.Sequential(conv(ndim, kernels, kernels, 1), nn.ELU(), conv(ndim, kernels, kernels, 1), nn.ELU())
        self.output = conv(ndim, kernels, ndim, 1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def control_points(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Control displacements ``B x d x *floor(S / s)`` (voxels), point i at voxel ``i s + floor((s - 1) / 2)``."""
        return self.output(self.dense(self.features(torch.cat([fixed, moving], dim=1))))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        shape = fixed.shape[2:]
        if any(s < self.spacing for s in shape):
            raise ValueError(f"dlir: image {tuple(shape)} is smaller than the control spacing {self.spacing}")
        return bspline_displacement(self.control_points(fixed, moving), shape, self.spacing)
