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
own smoothness and affine weights. Official code: github.com/ngunnar/learning-a-deformable-registration-pyramid
(TensorFlow); this file follows it (spec/methods/pyramid.md), with these choices:

- **Affine penalty.** The code penalises ``mean((a - vec[I|0])^2)`` of the *raw* 12-vector ``a``, while
  the layer uses ``T = [I|0] + a``: that pulls the effective matrix towards ``2 I`` (and fights the
  activity penalty, which pulls ``a`` to 0). We take the intended ``mean(a^2)``, i.e. ``T -> [I|0]``
  (``affine_penalty = "intended"``, both recipes); ``"coded"`` gives the code's version.
- **Context network.** The config turns it off, but an index quirk (the loop counter compared with
  ``last = 1``) applies it once, at the coarsest level: ``context = "coarsest"`` (both recipes);
  ``"finest"`` moves it to level 0 as in PWC-Net, ``"every"`` is the code's ``use_context_net=True``,
  ``"none"`` drops it.
- **Working grid.** The paper resizes every image to 64^3 and predicts the flow there; ``grid_size``
  (voxels along every axis; 0 = the native grid) does the same, with corner-aligned linear resizing
  (skimage's is centre-aligned), and the flow is resized back to the native grid and rescaled by
  (S - 1) / (s - 1) per axis (the code: S / 64). Labels for the Dice term are resized as one-hot maps
  (linear) and rounded, as in the code.
- The affine 3 x 4 (2 x 3 in 2D) matrix acts on the *displacement vectors*, ``u_hat = T[:, :d] u + T[:, d]``,
  not on coordinates (the code's ``TransformAffineFlow``). Warps interpolate linearly, in voxels, and
  continue the image beyond its border (the code's neuron transformer clamps): ``padding_mode="border"``.
- Level l's images for its similarity term are the working images linearly resized to the level's grid
  (corner-aligned, as neuron's ``Resize``); the level's grid is the pyramid's, ceil(s / 2^l).
- Convolutions start He-normal (Keras' truncated normal), the flow heads and upsampling convs included (so
  an untrained pyramid predicts a random flow, not the identity), biases 0, the context network's output
  conv Glorot-uniform (Keras' default); BatchNorm takes Keras' eps 1e-3 and ``bn_momentum`` (paper: 0.01 in
  PyTorch's convention = Keras' 0.99).
- Weight decay is a loss term, ``1e-3 * sum ||W||^2`` over every conv kernel (and the context output's
  bias), as Keras' kernel regularisers; the activity penalty is ``0.1 * mean_b sum_k |a_bk|`` per level
  (Keras divides it by the batch size).
- Phases are training stages (a fresh Adam each, as the separate scripts). ``phase_iterations`` give their
  proportions (the code's epochs x pairs for one task, batch 1), scaled to ``iterations``; each phase's
  rate is ``lr`` times its factor. Not reproduced: pre-training on a 50-pair subset, the fine-tuning
  script's step-decay learning rate (and its start from the pre-trained rather than the multi-task
  weights), and joint training over three tasks (one dataset here).
- Dice runs over the dataset's evaluation labels (the code: 14 one-hot classes less the background),
  counting only labels present in the fixed image (regbench.blocks.losses.present_label_dice_loss).
- Intensities: regbench's datasets are already in [0, 1] (``normalisation = "none"``); ``"joint"`` (tasks 2,
  3: both images by the fixed one's min and max) and ``"separate"`` (task 4) are the code's. Flips and
  swapped pair directions (the code's task-2 augmentation) are ``flip_augmentation``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from regbench import RegistrationMethod
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
    "phase_iterations": [25_000, 30_000, 30_000],      # proportions, scaled to `iterations`
    "phase_lr_factors": [1.0, 0.5, 0.5],               # 1e-4, 5e-5, 5e-5
    "smoothness_weights": [[2 * w for w in _HALVING], [10 * w for w in _HALVING], [1 * w for w in _HALVING]],
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
    recipes = {
        # The code's three scripts at 64^3, batch 1 (one GPU): 500 epochs x 50 pairs at 1e-4, then
        # 100 x 300 at 5e-5 (starting from the pre-trained weights), then 100 x 300 at 5e-5.
        "paper": {
            **_COMMON,
            "iterations": 85_000,
            "batch_size": 1,
            "lr": 1e-4,
            "checkpoint_every": 1000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176 slices, 2 threads): the spec's small configuration in
        # 2D (channels halved, thinner estimators, d = 2: 25 channels) on an 88 x 88 working grid, every loss
        # term and all three phases, batch 1 and a 40x step size. On a small embedded2d (8 training subjects
        # a template, 4 test pairs), mean test Dice 0.558 unregistered -> 0.68 after 200 steps, 0.77 after
        # 500, 0.81 after 800 (117 s of CPU time on one thread, about 0.15 s a step); at 500 steps lr 1e-3
        # gave 0.73 and 2e-3 0.76.
        "quick": {
            **_COMMON,
            "grid_size": 88,
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

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        _check_recipe(recipe)
        return PyramidNet(ndim, recipe["pyramid_channels"], recipe["dense_growth"], recipe["upsampled_features"],
                          recipe["search_range"], recipe["context"], recipe["context_channels"],
                          recipe["bn_momentum"])

    def training_stages(self, net: nn.Module, recipe: dict) -> list[TrainingStage]:
        parameters = list(net.parameters())
        return [TrainingStage(recipe["phases"][phase], steps, parameters,
                              recipe["lr"] * recipe["phase_lr_factors"][phase])
                for phase, steps in _phase_steps(recipe)]

    def start_stage(self, net: nn.Module, index: int, recipe: dict) -> None:
        net.phase = _phase_steps(recipe)[index][0]

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
            terms[f"smoothness_{level}"] = (recipe["smoothness_weights"][phase][level], gradient_smoothness(flow, "l2"))
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


def _conv_layer(ndim: int, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                init: str = "he") -> nn.Module:
    layer = getattr(nn, f"Conv{ndim}d")(in_channels, out_channels, 3, stride=stride, padding=dilation,
                                         dilation=dilation)
    with torch.no_grad():
        if init == "he":  # Keras he_normal: truncated normal, std sqrt(2 / fan_in) after truncation at 2 sigma
            std = math.sqrt(2.0 / layer.weight[0].numel()) / 0.87962566103423978
            nn.init.trunc_normal_(layer.weight, 0.0, std, -2 * std, 2 * std)
        else:             # Keras glorot_uniform
            nn.init.xavier_uniform_(layer.weight)
        layer.bias.zero_()
    return layer


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
    for key in ("phase_iterations", "phase_lr_factors", "smoothness_weights", "affine_weights"):
        if len(recipe[key]) != phases:
            raise ValueError(f"pyramid: {key} needs one entry per phase ({phases}), got {recipe[key]!r}")
    for key in ("smoothness_weights", "affine_weights"):
        if any(len(weights) != levels for weights in recipe[key]):
            raise ValueError(f"pyramid: every phase of {key} needs one weight per level ({levels}), "
                             f"got {recipe[key]!r}")
    if len(recipe["similarity_weights"]) != levels:
        raise ValueError(f"pyramid: similarity_weights needs one weight per level ({levels}), "
                         f"got {recipe['similarity_weights']!r}")
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
