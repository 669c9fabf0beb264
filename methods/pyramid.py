"""Learning a deformable registration pyramid (Gunnarsson, Sjölund, Schön; Learn2Reg 2020).

A PWC-Net for images: one feature pyramid, shared by the fixed and the moving image (4 levels of three
conv + LeakyReLU(0.2) + BatchNorm blocks, the first of stride 2; level 0 is the image itself), then a
coarse-to-fine loop over the levels l = 4 .. 0. At each level the previous flow and dense features are
upsampled (nearest x2, a learned 3^d conv, the flow times 2), the moving features are warped by that
flow, an affine block (global average pool -> linear, zero-initialised) turns it into ``T u + t``, the
moving features are warped again by the result, a cost volume correlates them with the fixed features
within +-d voxels (regbench.blocks.cost_volume, then LeakyReLU(0.1)), and a DenseNet estimator (5 densely
connected blocks, growth 64, 64, 32, 16, 8) predicts the level's *full* flow from [cost volume, fixed
features, affine flow, upsampled features]. A dilated context network refines one level's flow. Every
level's flow is scored: local NCC (9^d window) against the images resized to that level, an L2
gradient penalty, an affine penalty; plus Dice of the warped one-hot training labels at full
resolution (lambda = 5), L2 weight decay (1e-3) and an L1 activity penalty (0.1) on the affine outputs.
Training runs in three phases (pre-training, multi-task training, per-task fine-tuning) with their
own smoothness and affine weights; every image is resized to 64^3 and the flow predicted there.

Official code: github.com/ngunnar/learning-a-deformable-registration-pyramid (TensorFlow 2), which this file
follows (spec/methods/pyramid.md) where the paper is silent:

- The affine 3 x 4 (2 x 3 in 2D) matrix acts on the *displacement vectors*, ``u_hat = T[:, :d] u + T[:, d]``,
  not on coordinates (``TransformAffineFlow``). Warps interpolate linearly, in voxels, and continue the image
  beyond its border (neuron's transformer clamps): ``padding_mode="border"``.
- Convolutions pad as Keras' 'same' (``tf_same_padding``): symmetrically at stride 1, one voxel after an even
  axis at stride 2. Kernels start He-normal (Keras' truncated normal), flow heads and upsampling convs
  included, biases 0, the context network's output conv Glorot-uniform; BatchNorm takes Keras' eps 1e-3.
- Level l's images for its similarity term are the working images linearly resized to the level's grid,
  ceil(s / 2^l) (corner-aligned, as neuron's ``Resize``). Weight decay is a loss term, ``1e-3 sum ||W||^2``
  over every conv kernel (and the context output's bias), as Keras' kernel regularisers; the activity penalty
  is ``0.1 mean_b sum_k |a_bk|`` per level (Keras divides it by the batch size).
- The phases have the scripts' steps at batch 1 (epochs x pairs: 500 x 150, 100 x 900, 100 x 300), scaled
  to ``iterations`` (``phase_iterations``), a fresh Adam each as separate scripts, at ``lr`` times
  ``phase_lr_factors``; the fine-tuning's rate halves every tenth down to 1/16, twice (``phase_lr_schedules``).

Where it departs from the paper and the code (each a recipe key where that is cheap): ``Method.deviations``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange
from regbench.blocks.cost_volume import correlation_offsets, cost_volume
from regbench.blocks.losses import gradient_smoothness, local_ncc, mse, one_hot, present_label_dice_loss
from regbench.method import TrainingStage
from regbench.blocks.spatial import resize_displacement, warp

#: geometric level weights of the code, index = level l (0 = full resolution)
_HALVING = [1.0, 0.5, 0.25, 0.125, 0.0625]

_COMMON = {
    "grid_size": 64,                          # working grid along every axis (voxels); 0 = native grid
    "pyramid_channels": [16, 32, 32, 32],     # feature pyramid levels 1..4 (level 0 = the image)
    "dense_growth": [64, 64, 32, 16, 8],      # DenseNet estimator blocks
    "upsampled_features": 32,                 # channels of the upsampled dense features g
    "search_range": 2,                        # cost volume offsets -d..d per axis: 125 channels in 3D, 25 in 2D
    "context": "coarsest",                    # "coarsest" (code), "finest" (PWC-Net), "every", "none"
    "context_channels": [64, 64, 64, 32, 16, 8],  # dilations 1, 2, 4, 8, 16, 1
    "bn_momentum": 0.01,                      # PyTorch convention (Keras momentum 0.99)
    "similarity": "ncc",                      # "ncc" (local, squared, ncc_window^d) or "mse"
    "ncc_window": 9,
    "similarity_weights": [5 * w for w in _HALVING],   # gamma_l, every phase
    "phases": ["pretrain", "multitask", "finetune"],
    "phase_iterations": [75_000, 90_000, 30_000],      # the scripts' steps, proportions scaled to `iterations`
    "phase_lr_factors": [1.0, 0.5, 0.5],               # 1e-4, 5e-5, 5e-5
    "phase_lr_schedules": ["constant", "constant", "halving"],  # "halving": the fine-tuning's LR_scheduler
    "smoothness_weights": [[2 * w for w in _HALVING], [10 * w for w in _HALVING], [1 * w for w in _HALVING]],
    "smoothness_scale": 1.0,                  # multiplies every smoothness weight (what tuning changes; 1: the code's)
    "affine_weights": [[0.0] * 5, [1.0, 2.0, 4.0, 8.0, 16.0], [0.0] * 5],
    "affine_penalty": "intended",             # "intended": mean(a^2); "coded": mean((a - vec[I|0])^2)
    "affine_activity_weight": 0.1,            # L1 on the affine outputs a, every level, every phase
    "weight_decay": 1e-3,                     # L2 on the conv kernels
    "dice_weight": 5.0,                       # lambda, 1 - Dice of the warped one-hot labels
    "normalisation": "none",                  # "none", "joint" or "separate" min-max
    "flip_augmentation": False,
}


class Method(RegistrationMethod):
    name = "pyramid"
    citation = ("N. Gunnarsson, J. Sjölund, T. B. Schön. Learning a Deformable Registration Pyramid. In: "
                "Segmentation, Classification, and Registration of Multi-modality Medical Imaging Data "
                "(MICCAI 2020 challenges, Learn2Reg), Springer LNCS, 2021, doi:10.1007/978-3-030-71827-5_10.")
    label_terms = ("dice_weight",)   # the Dice of the warped training labels: the row learns from labels
    channels_last = False  # its steps measure ~7 % slower channels-last on CPU (layout copies; benchmarks/memory_format.py)
    # The smoothness weights of every phase and level, scaled together (smoothness_scale 1: the code's), and the rate.
    search_space = {"smoothness_scale": SearchRange(0.1, 10.0, "log"), "lr": SearchRange(1e-5, 1e-2, "log")}
    recipes = {
        # The code's three scripts at 64^3, batch 1 (one GPU), one after the other: pre-training, 500 epochs of
        # 50 pairs from each of three tasks at 1e-4 (75k steps); multi-task training, 100 epochs of 300 pairs a
        # task at 5e-5 (90k); fine-tuning, 100 epochs of one task's 300 pairs at 5e-5, halving (30k).
        "paper": {
            **_COMMON,
            "iterations": 195_000,
            "batch_size": 1,
            "lr": 1e-4,
            "checkpoint_every": 1000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176 slices): the spec's small configuration in 2D (channels
        # halved, thinner estimators, d = 2: 25 channels) on the paper's 64-voxel working grid, every loss term and
        # all three phases (308, 369 and 123 steps), batch 1 and a 40x step size: about 0.1 s a step on one CPU
        # thread. Mean Dice of embedded2d's 13 val pairs (seed 0): 0.63 unregistered, 0.81 (0.83 on an 88 x 88
        # grid, at 1.6 times the time a step).
        "quick": {
            **_COMMON,
            "grid_size": 64,
            "pyramid_channels": [8, 16, 16, 16],
            "dense_growth": [16, 16, 8, 8, 4],
            "upsampled_features": 8,
            "context_channels": [32, 32, 32, 16, 8, 4],
            "bn_momentum": 0.1,
            "iterations": 800,
            "batch_size": 1,
            "lr": 4e-3,
            "checkpoint_every": 200,
            "log_every": 10,
        },
    }

    deviations = (
        Deviation("The affine penalty is mean(a^2): the effective matrix is pulled to [I|0]",
                  "The code's Affine_loss, mean((a - vec[I|0])^2) on the raw outputs a of T = [I|0] + a, pulls T "
                  "to [2I|0] against the activity penalty, which pulls a to 0; regbench takes the evident intent "
                  "(affine_penalty 'coded' gives the code's). Which one the paper means is unverified."),
        Deviation("The context network refines the coarsest level's flow",
                  "The code's: its config turns the network off, but an index quirk applies it once, at level 4; "
                  "PWC-Net puts it at the finest level ('finest'), and whether the paper means either is "
                  "unverified. The row runs what the code computes.", changes_results=False),
        Deviation("Images are resized to the working cube corner-aligned, the flow back by (S - 1) / (s - 1)",
                  "The code resizes with skimage (centre-aligned) and multiplies the flow by S / 64; corner "
                  "alignment keeps the end voxels of both grids on each other, so the rescaled flow is exact. A "
                  "sub-voxel difference."),
        Deviation("One dataset: no joint training over three tasks; pre-training draws from every training pair",
                  "The scripts pre-train on 50 pairs of each of Learn2Reg tasks 2, 3 and 4, train on up to 300 of "
                  "each, then fine-tune on one task; regbench trains every phase on the dataset's training pairs, "
                  "with the scripts' step counts (phase_iterations 75k : 90k : 30k)."),
        Deviation("Fine-tuning continues from the multi-task weights",
                  "The README runs the scripts in that order, but the multi-task and the fine-tuning scripts both "
                  "load the pre-trained weights ('pretrained_best'), so the scripts' fine-tuned model never saw the "
                  "multi-task phase. phase_iterations [75000, 0, 30000] gives that path (the affine penalty, on in "
                  "the multi-task phase only, then never acts)."),
        Deviation("Adam restarts where the fine-tuning's rate rises, at mid-phase",
                  "The script's LR_scheduler goes back from 1/16 to 1/2 of the rate at epoch 50 of 100 and Keras "
                  "keeps Adam's moments; a regbench stage's rate can only fall (TrainingStage.lr_decay), so the "
                  "phase is two stages and the second starts a fresh Adam."),
        Deviation("The weights after the last step are evaluated",
                  "The scripts keep the epoch with the lowest training loss (ModelCheckpoint, save_best_only on "
                  "'loss')."),
        Deviation("Batch 1: the paper recipe assumes one GPU",
                  "The scripts run batch 1 per GPU under MirroredStrategy (their -gpus default names four: batch "
                  "4, a quarter of the steps); the submission's GPU count is unverified. One GPU sees the same "
                  "pairs in four times the steps.", recipes=("paper",)),
        Deviation("Intensities as the dataset serves them (normalisation 'none')",
                  "The code min-max scales both images by the fixed image's range (tasks 2, 3) or each by its own "
                  "(task 4, brain MR: 'separate'); regbench's images lie in [0, 1] but need not span it, so the "
                  "network can see another intensity scale."),
        Deviation("Dice over the dataset's evaluation labels",
                  "The code's one-hot maps have Learn2Reg's 14 classes; as there, the background is left out and "
                  "only labels present in the fixed image count.", changes_results=False),
        Deviation("BatchNorm momentum 0.1 (Keras 0.9) in the quick recipe",
                  "The running statistics follow the last ~10 steps, not ~100 (Keras' 0.99, paper recipe): the "
                  "quick recipe's weights move fast (40x the rate, 800 steps).", recipes=("quick",)),
    )

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        _check_recipe(recipe)
        return PyramidNet(ndim, recipe["pyramid_channels"], recipe["dense_growth"], recipe["upsampled_features"],
                          recipe["search_range"], recipe["context"], recipe["context_channels"],
                          recipe["bn_momentum"])

    def training_stages(self, net: nn.Module, recipe: dict) -> list[TrainingStage]:
        parameters = list(net.parameters())
        return [TrainingStage(stage.name, stage.steps, parameters, recipe["lr"] * stage.lr_factor,
                              lr_decay=stage.lr_decay) for stage in _stages(recipe)]

    def start_stage(self, net: nn.Module, index: int, recipe: dict) -> None:
        net.phase = _stages(recipe)[index].phase

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        fixed, moving = batch["fixed"], batch["moving"]
        has_labels = "fixed_seg" in batch and "moving_seg" in batch
        if recipe["dice_weight"] > 0 and not has_labels:
            raise ValueError("pyramid: dice_weight > 0 needs a dataset with segmentations (fixed_seg, moving_seg)")
        size = _grid(recipe, fixed.shape[2:])
        fixed, moving = _normalise(_resample(fixed, size), _resample(moving, size), recipe["normalisation"])
        if recipe["dice_weight"] > 0:
            labels = batch["labels"]
            fixed_onehot = _resample(one_hot(batch["fixed_seg"], labels, fixed.dtype), size).round()
            moving_onehot = _resample(one_hot(batch["moving_seg"], labels, fixed.dtype), size).round()
        if net.training and recipe["flip_augmentation"]:
            images = [fixed, moving] + ([fixed_onehot, moving_onehot] if recipe["dice_weight"] > 0 else [])
            images = _flip_and_swap(images)
            fixed, moving = images[:2]
            if recipe["dice_weight"] > 0:
                fixed_onehot, moving_onehot = images[2:]
        out = net(fixed, moving)
        phase = len(recipe["phases"]) - 1 if net.phase is None else net.phase
        similarity = _similarity(recipe)
        terms = {}
        for level, (flow, a) in enumerate(zip(out.flows, out.affines)):
            level_fixed, level_moving = _resample(fixed, flow.shape[2:]), _resample(moving, flow.shape[2:])
            warped = warp(level_moving, flow, padding_mode="border")
            terms[f"similarity_{level}"] = (recipe["similarity_weights"][level], similarity(level_fixed, warped))
            weight = recipe["smoothness_scale"] * recipe["smoothness_weights"][phase][level]
            terms[f"smoothness_{level}"] = (weight, gradient_smoothness(flow, "l2"))
            terms[f"affine_{level}"] = (recipe["affine_weights"][phase][level],
                                        affine_penalty(a, recipe["affine_penalty"]))
            terms[f"affine_activity_{level}"] = (recipe["affine_activity_weight"], affine_activity(a))
        if recipe["dice_weight"] > 0:
            warped_onehot = warp(moving_onehot, out.displacement, padding_mode="border")
            terms["dice"] = (recipe["dice_weight"], present_label_dice_loss(fixed_onehot, warped_onehot))
        terms["weight_decay"] = (recipe["weight_decay"], net.kernel_norm())
        return terms

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        native = fixed.shape[2:]
        size = _grid(recipe, native)
        fixed, moving = _normalise(_resample(fixed, size), _resample(moving, size), recipe["normalisation"])
        with torch.no_grad():
            u = net(fixed, moving).displacement
            return u if tuple(size) == tuple(native) else resize_displacement(u, native)


# ----------------------------------------------------------------------------------------------- losses

def affine_penalty(a: torch.Tensor, variant: str = "intended") -> torch.Tensor:
    """The affine loss on the raw outputs ``a`` (``B x d(d+1)``, row-major ``d x (d+1)``; ``T = [I|0] + a``).

    ``"intended"``: ``mean(a^2)``, zero when the effective ``T`` is ``[I|0]``. ``"coded"`` (the official
    code's ``Affine_loss``): ``mean((a - vec[I|0])^2)``, zero when ``T = [2I|0]``.
    """
    if variant == "intended":
        return a.square().mean()
    if variant == "coded":
        return (a - _identity_vector(a)).square().mean()
    raise ValueError(f"pyramid: affine_penalty must be 'intended' or 'coded', got {variant!r}")


def affine_activity(a: torch.Tensor) -> torch.Tensor:
    """Keras' activity penalty on the affine layer's output without its weight: ``mean_b sum_k |a_bk|``."""
    return a.abs().sum(dim=1).mean()


def _identity_vector(a: torch.Tensor) -> torch.Tensor:
    d = int(round((math.sqrt(1 + 4 * a.shape[1]) - 1) / 2))
    if d * (d + 1) != a.shape[1]:
        raise ValueError(f"affine outputs must be B x d(d+1), got shape {tuple(a.shape)}")
    return torch.eye(d, d + 1, device=a.device, dtype=a.dtype).reshape(1, -1)


# ---------------------------------------------------------------------------------------------- network

class Prediction(NamedTuple):
    flows: list          # u^l, index l (0 = full resolution), B x ndim x *grid_l, level-l voxels
    affines: list        # a^l, index l, B x ndim(ndim+1): the raw affine outputs
    displacement: torch.Tensor  # u^0


def tf_same_padding(size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's 'same' padding along one axis of ``size`` voxels: ``(before, after)``.

    The output has ceil(size / stride) voxels; the total ``max((out - 1) stride + (kernel_size - 1) dilation + 1
    - size, 0)`` is split with the smaller half before. Stride 1 (odd kernel) pads symmetrically, as PyTorch's
    ``padding=dilation``; stride 2 with a 3-kernel pads one voxel *after* an even axis, so output voxel i is
    centred on input voxel 2i + 1 (PyTorch's symmetric padding centres it on 2i, half an output voxel away).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class TFSamePad(nn.Module):
    """Pads ``B x C x *spatial`` as TensorFlow's 'same' does before a (strided) convolution."""

    def __init__(self, kernel_size: int, stride: int, dilation: int = 1):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [tf_same_padding(s, self.kernel_size, self.stride, self.dilation) for s in x.shape[2:]]
        return F.pad(x, [p for pair in reversed(pads) for p in pair])   # F.pad lists the last axis first


def _conv_layer(ndim: int, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                init: str = "he") -> nn.Module:
    """A 3^d convolution with Keras' 'same' padding (TFSamePad before a strided one) and Keras' initialisation."""
    layer = getattr(nn, f"Conv{ndim}d")(in_channels, out_channels, 3, stride=stride,
                                         padding=dilation if stride == 1 else 0, dilation=dilation)
    with torch.no_grad():
        if init == "he":  # Keras he_normal: truncated normal, std sqrt(2 / fan_in) after truncation at 2 sigma
            std = math.sqrt(2.0 / layer.weight[0].numel()) / 0.87962566103423978
            nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
        else:             # Keras glorot_uniform
            nn.init.xavier_uniform_(layer.weight)
        layer.bias.zero_()
    return layer if stride == 1 else nn.Sequential(TFSamePad(3, stride, dilation), layer)


class CBlock(nn.Sequential):
    """The code's ``CustomConv``: 3^d conv ('same'), LeakyReLU(0.2), then BatchNorm (after the activation)."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 bn_momentum: float = 0.01):
        norm = getattr(nn, f"BatchNorm{ndim}d")(out_channels, eps=1e-3, momentum=bn_momentum)
        super().__init__(_conv_layer(ndim, in_channels, out_channels, stride, dilation),
                         nn.LeakyReLU(0.2, inplace=True), norm)


class FeaturePyramid(nn.Module):
    """Levels 1..L: CBlock(stride 2), CBlock, CBlock; level 0 is the image. Returns ``[x, c1, .., cL]``."""

    def __init__(self, ndim: int, channels, bn_momentum: float):
        super().__init__()
        self.levels = nn.ModuleList()
        previous = 1
        for c in channels:
            self.levels.append(nn.Sequential(CBlock(ndim, previous, c, 2, bn_momentum=bn_momentum),
                                             CBlock(ndim, c, c, bn_momentum=bn_momentum),
                                             CBlock(ndim, c, c, bn_momentum=bn_momentum)))
            previous = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        for level in self.levels:
            features.append(level(features[-1]))
        return features


class AffineBlock(nn.Module):
    """GAP(concat[fixed features, warped moving features]) -> linear -> ``a`` (``B x d(d+1)``), zero-initialised."""

    def __init__(self, ndim: int, in_channels: int):
        super().__init__()
        self.dense = nn.Linear(in_channels, ndim * (ndim + 1))
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([fixed, warped], dim=1).flatten(2).mean(dim=2)
        return self.dense(pooled)


def apply_affine_to_flow(a: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``T u(x) + t`` at every voxel, with ``[T | t] = [I | 0] + reshape(a)``: the affine acts on the vectors."""
    batch, ndim = flow.shape[:2]
    matrix = a.reshape(batch, ndim, ndim + 1) + torch.eye(ndim, ndim + 1, device=a.device, dtype=a.dtype)
    moved = torch.einsum("bij,bj...->bi...", matrix[:, :, :ndim], flow)
    return moved + matrix[:, :, ndim].reshape(batch, ndim, *([1] * ndim))


class DenseEstimator(nn.Module):
    """DenseNet flow estimator: ``z <- concat[CBlock(z), z]`` per growth, then a linear 3^d conv to the flow.

    Returns ``(h, u)``: the dense stack (passed on to the next level) and the level's full flow.
    """

    def __init__(self, ndim: int, in_channels: int, growth, bn_momentum: float):
        super().__init__()
        self.blocks = nn.ModuleList()
        channels = in_channels
        for g in growth:
            self.blocks.append(CBlock(ndim, channels, g, bn_momentum=bn_momentum))
            channels += g
        self.out_channels = channels
        self.flow = _conv_layer(ndim, channels, ndim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            z = torch.cat([block(z), z], dim=1)
        return z, self.flow(z)


class ContextNetwork(nn.Module):
    """PWC-Net's dilated context network on the dense stack: its output is added to the flow."""

    DILATIONS = (1, 2, 4, 8, 16, 1)

    def __init__(self, ndim: int, in_channels: int, channels, bn_momentum: float):
        super().__init__()
        if len(channels) != len(self.DILATIONS):
            raise ValueError(f"pyramid: context_channels needs {len(self.DILATIONS)} entries, got {list(channels)}")
        layers, previous = [], in_channels
        for c, dilation in zip(channels, self.DILATIONS):
            layers.append(CBlock(ndim, previous, c, dilation=dilation, bn_momentum=bn_momentum))
            previous = c
        layers.append(_conv_layer(ndim, previous, ndim, init="glorot"))
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class Upsampler(nn.Module):
    """``u~ = 2 conv(NN-up(u))`` and ``g = conv(NN-up(h))`` onto the next finer grid."""

    def __init__(self, ndim: int, dense_channels: int, features: int):
        super().__init__()
        self.flow = _conv_layer(ndim, ndim, ndim)
        self.features = _conv_layer(ndim, dense_channels, features)

    def forward(self, flow: torch.Tensor, dense: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
        return 2.0 * self.flow(_upsample(flow, size)), self.features(_upsample(dense, size))


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour x2, cropped to ``size`` (a grid of ceil(S / 2) doubles to S or S + 1)."""
    up = F.interpolate(x, scale_factor=2, mode="nearest")
    return up[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]


class PyramidNet(nn.Module):
    """The registration pyramid: shared feature pyramid, then levels L..0 (U, W, A, W, CV, D[, context])."""

    def __init__(self, ndim: int, pyramid_channels=(16, 32, 32, 32), dense_growth=(64, 64, 32, 16, 8),
                 upsampled_features: int = 32, search_range: int = 2, context: str = "coarsest",
                 context_channels=(64, 64, 64, 32, 16, 8), bn_momentum: float = 0.01):
        super().__init__()
        if context not in ("coarsest", "finest", "every", "none"):
            raise ValueError(f"pyramid: context must be 'coarsest', 'finest', 'every' or 'none', got {context!r}")
        self.ndim, self.search_range = ndim, search_range
        self.top = len(pyramid_channels)                       # L: the coarsest level
        self.pyramid = FeaturePyramid(ndim, pyramid_channels, bn_momentum)
        level_channels = [1] + list(pyramid_channels)
        volume = len(correlation_offsets(search_range, ndim))
        self.affine, self.estimator, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        context_levels = {"coarsest": {self.top}, "finest": {0}, "every": set(range(self.top + 1)), "none": set()}
        self.context = nn.ModuleDict()
        for level in range(self.top + 1):
            c = level_channels[level]
            extra = upsampled_features if level < self.top else 0
            self.affine.append(AffineBlock(ndim, 2 * c))
            self.estimator.append(DenseEstimator(ndim, volume + c + ndim + extra, dense_growth, bn_momentum))
            if level in context_levels[context]:
                self.context[str(level)] = ContextNetwork(ndim, self.estimator[level].out_channels, context_channels,
                                                          bn_momentum)
        for level in range(self.top):   # upsample[l]: from level l + 1 to level l
            self.upsample.append(Upsampler(ndim, self.estimator[level + 1].out_channels, upsampled_features))
        self.phase = None  # the training phase, set by Method.start_stage; None: the last phase

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> Prediction:
        if fixed.shape != moving.shape or fixed.ndim != self.ndim + 2 or fixed.shape[1] != 1:
            raise ValueError(f"pyramid: fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must both be "
                             f"B x 1 x *spatial with {self.ndim} spatial axes")
        if min(fixed.shape[2:]) <= 2 ** self.top:  # the coarsest grid, ceil(S / 2^L), needs 2 voxels an axis
            raise ValueError(f"pyramid: a grid of {tuple(fixed.shape[2:])} is too small for {self.top} halvings; "
                             f"it needs more than {2 ** self.top} voxels along every axis")
        fixed_features, moving_features = self.pyramid(fixed), self.pyramid(moving)  # shared weights
        flows, affines = [None] * (self.top + 1), [None] * (self.top + 1)
        flow = dense = None
        for level in range(self.top, -1, -1):
            cf, cm = fixed_features[level], moving_features[level]
            if flow is None:   # coarsest level: no incoming flow, no warp
                upsampled, features, warped = cf.new_zeros(cf.shape[0], self.ndim, *cf.shape[2:]), None, cm
            else:
                upsampled, features = self.upsample[level](flow, dense, cf.shape[2:])
                warped = warp(cm, upsampled, padding_mode="border")
            a = self.affine[level](cf, warped)
            affine_flow = apply_affine_to_flow(a, upsampled)
            rewarped = warp(cm, affine_flow, padding_mode="border")   # from the original features, not chained
            volume = F.leaky_relu(cost_volume(cf, rewarped, self.search_range), 0.1)
            inputs = [volume, cf, affine_flow] + ([features] if features is not None else [])
            dense, flow = self.estimator[level](torch.cat(inputs, dim=1))
            if str(level) in self.context:
                flow = flow + self.context[str(level)](dense)
            flows[level], affines[level] = flow, a
        return Prediction(flows, affines, flows[0])

    def kernel_norm(self) -> torch.Tensor:
        """``sum ||W||^2`` over every conv kernel (and the context output convs' biases): Keras' L2 regularisers."""
        total = None
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                term = module.weight.square().sum()
                total = term if total is None else total + term
        for context in self.context.values():
            total = total + context.layers[-1].bias.square().sum()
        return total


# ---------------------------------------------------------------------------------------------- helpers

def _check_recipe(recipe: dict) -> None:
    levels = len(recipe["pyramid_channels"]) + 1
    phases = len(recipe["phases"])
    for key in ("phase_iterations", "phase_lr_factors", "phase_lr_schedules", "smoothness_weights",
                "affine_weights"):
        if len(recipe[key]) != phases:
            raise ValueError(f"pyramid: {key} needs one entry per phase ({phases}), got {recipe[key]!r}")
    for key in ("smoothness_weights", "affine_weights"):
        if any(len(weights) != levels for weights in recipe[key]):
            raise ValueError(f"pyramid: every phase of {key} needs one weight per level ({levels}), "
                             f"got {recipe[key]!r}")
    if len(recipe["similarity_weights"]) != levels:
        raise ValueError(f"pyramid: similarity_weights needs one weight per level ({levels}), "
                         f"got {recipe['similarity_weights']!r}")
    if any(schedule not in ("constant", "halving") for schedule in recipe["phase_lr_schedules"]):
        raise ValueError(f"pyramid: phase_lr_schedules must each be 'constant' or 'halving', "
                         f"got {recipe['phase_lr_schedules']!r}")
    if recipe["affine_penalty"] not in ("intended", "coded"):
        raise ValueError(f"pyramid: affine_penalty must be 'intended' or 'coded', got {recipe['affine_penalty']!r}")
    if recipe["normalisation"] not in ("none", "joint", "separate"):
        raise ValueError(f"pyramid: normalisation must be 'none', 'joint' or 'separate', "
                         f"got {recipe['normalisation']!r}")


def _phase_steps(recipe: dict) -> list[tuple[int, int]]:
    """``(phase, steps)`` of the phases with steps: ``phase_iterations`` scaled to sum to ``iterations``."""
    weights = [float(w) for w in recipe["phase_iterations"]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"pyramid: phase_iterations must be >= 0 with a positive sum, "
                         f"got {recipe['phase_iterations']}")
    total, iterations = sum(weights), int(recipe["iterations"])
    bounds, running = [0], 0.0
    for w in weights:
        running += w
        bounds.append(round(running / total * iterations))
    return [(phase, end - start) for phase, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])) if end > start]


class _Stage(NamedTuple):
    phase: int             # index into the recipe's per-phase lists
    name: str
    steps: int
    lr_factor: float       # the stage's starting rate, in units of the recipe's lr
    lr_decay: tuple | None  # (milestones counted from the stage's start, factor): TrainingStage.lr_decay


def _stages(recipe: dict) -> list[_Stage]:
    """The training stages, a fresh Adam each: one a phase, or two for a phase with the ``"halving"`` schedule.

    ``"halving"`` is the fine-tuning script's ``LR_scheduler``: over the tenths of the phase the rate is 1, 1/2,
    1/4, 1/8, 1/16, then back up to 1/2, 1/4, 1/8, 1/16, 1/16 (times the phase's rate). A stage's rate can only
    fall, so the phase is cut at its middle, where the rate rises: the second half starts a new Adam.
    """
    stages = []
    for phase, steps in _phase_steps(recipe):
        name, factor = recipe["phases"][phase], recipe["phase_lr_factors"][phase]
        if recipe["phase_lr_schedules"][phase] == "constant":
            stages.append(_Stage(phase, name, steps, factor, None))
            continue
        tenth = [round(k * steps / 10) for k in range(11)]
        halves = (_Stage(phase, name, tenth[5], factor, (tenth[1:5], 0.5)),
                  _Stage(phase, f"{name}-restart", steps - tenth[5], factor / 2,
                         ([t - tenth[5] for t in tenth[6:9]], 0.5)))
        stages.extend(stage for stage in halves if stage.steps > 0)
    return stages


def _grid(recipe: dict, native) -> tuple[int, ...]:
    size = int(recipe["grid_size"])
    if size < 0:
        raise ValueError(f"pyramid: grid_size must be >= 0 (0: the native grid), got {size}")
    return tuple(native) if size == 0 else (size,) * len(native)


def _resample(x: torch.Tensor, size) -> torch.Tensor:
    """Corner-aligned linear resize to ``size`` (neuron's ``Resize``); the input itself when it fits."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True)


def _normalise(fixed: torch.Tensor, moving: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max to [0, 1]: ``"joint"`` by the fixed image's range, ``"separate"`` each by its own."""
    if how == "none":
        return fixed, moving

    def bounds(x):
        flat = x.flatten(1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return flat.min(1).values.reshape(shape), flat.max(1).values.reshape(shape)

    low, high = bounds(fixed)
    if how == "joint":
        return [(x - low) / (high - low).clamp_min(1e-8) for x in (fixed, moving)]
    if how == "separate":
        m_low, m_high = bounds(moving)
        return (fixed - low) / (high - low).clamp_min(1e-8), (moving - m_low) / (m_high - m_low).clamp_min(1e-8)
    raise ValueError(f"pyramid: normalisation must be 'none', 'joint' or 'separate', got {how!r}")


def _flip_and_swap(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The code's task-2 augmentation: flip everything along no axis or one random axis; swap the pair half the time."""
    ndim = images[0].ndim - 2
    axis = int(torch.randint(ndim + 1, ()))
    if axis < ndim:
        images = [x.flip(2 + axis) for x in images]
    if bool(torch.randint(2, ())):
        images = [images[1], images[0]] + ([images[3], images[2]] if len(images) == 4 else [])
    return images


def _similarity(recipe: dict):
    if recipe["similarity"] == "ncc":
        window = recipe["ncc_window"]
        return lambda fixed, warped: local_ncc(fixed, warped, window)
    if recipe["similarity"] == "mse":
        return mse
    raise ValueError(f"pyramid: similarity must be 'ncc' or 'mse', got {recipe['similarity']!r}")
