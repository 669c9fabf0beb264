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

Transforms. AT-Net outputs ``[A | t]`` (``d x (d + 1)``, from a zero-initialised dense layer whose bias is the
identity) acting on normalised coordinates, -1 and 1 at the first and last voxel centres, rows in array-axis
order; it becomes regbench's centred voxel form (:func:`regbench.blocks.affine.affine_displacement`) as
``W = D A D^-1 - I``, ``b = D t``, ``D = diag((S - 1) / 2)``. ``M_A`` is sampled as the code's AT-Net sampler
samples (:func:`stn_warp`: 0 at and past the last voxel); DT-Net's warps clamp to the border as neuron's
transformer (``padding_mode``). ``register`` returns the affine composed exactly with ``u``.

Where this file departs from the paper and the code: ``Method.deviations``.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from regbench import Deviation, RegistrationMethod, SearchRange
from regbench.blocks.affine import affine_displacement, compose_affine
from regbench.blocks.losses import (background_suppression_loss, dual_consistency_loss, mutual_information_loss,
                                    neighbour_smoothness)
from regbench.blocks.spatial import identity_grid, warp
from regbench.method import TrainingStage

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
    "padding_mode": "border",      # DT-Net's warps (neuron's transformer clamps); AT-Net samples as the code
    "augment": True,               # paired shift / rotation / zoom / flip, as the code's generators
}


class Method(RegistrationMethod):
    name = "ctf_multicontrast"
    moving_contrast = "t2"
    citation = ("W. Huang, H. Yang, X. Liu, C. Li, I. Zhang, R. Wang, H. Zheng, S. Wang. A coarse-to-fine "
                "deformable transformation framework for unsupervised multi-contrast MR image registration with "
                "dual consistency constraint. IEEE TMI 40(10):2589-2599, 2021, doi:10.1109/TMI.2021.3059282. "
                "Code: github.com/SZUHvern/TMI_multi-contrast-registration.")
    # The paper's two regularisers of the deformable network (smoothness, dual consistency lambda_4) and its rate.
    search_space = {"smoothness_weight": SearchRange(0.1, 10.0, "log"), "dual_weight": SearchRange(10.0, 1000.0, "log"),
                    "lr": SearchRange(1e-4, 1e-1, "log")}
    budget_keys = ("affine_iterations", "iterations")
    recipes = {
        # The code's settings: AT-Net Adam 1e-4, DT-Net Adam 1e-2; epochs and early stopping replaced by a fixed
        # budget (``deviations``). For a dataset that serves the second contrast (IXI T1 <-> T2).
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
        # image. Every loss term and weight is the code's, and AT-Net's lr; smaller and shorter: AT-Net w = 8, DT-Net
        # w = 16 (the spec's small configuration), one pair a step, and the quick-only changes in ``deviations``.
        # Budget, from the recipe's MI on the 4 val pairs of an earlier val split (0.749 unregistered): AT-Net
        # reaches 0.764 after 20 steps and holds 0.785-0.798 from 40 on (0.797 after 150); the whole registration's
        # val MI holds 0.96-0.99 from 500 deformable steps to 800, so AT-Net's 150 steps (each about 0.3 of a
        # deformable one) come out of the deformable stage's: 350 of them. With the affine stage, the whole run's
        # val Dice (13 val pairs, 0.63 unregistered) is flat over the earlier 900-step budget (150 + 750): 0.694,
        # 0.719, 0.732, 0.694 at 0.4, 0.6, 0.8 and 1 of it; the 500 steps kept (150 + 350) lie on its flat part.
        "quick": {
            **_COMMON,
            "affine_width": 8,
            "affine_pool": 5,
            "width": 16,
            "bn_momentum": 0.1,
            "bins": 32,
            "flow_init": "small",
            "augment": False,
            "affine_iterations": 150,
            "affine_lr": 1e-4,
            "iterations": 350,
            "batch_size": 1,
            "lr": 1e-3,
            "checkpoint_every": 100,
            "log_every": 10,
        },
    }

    deviations = (
        Deviation("theta acts on normalised coordinates with -1 and 1 at the first and last voxel centres",
                  "regbench's convention (grid_sample with align_corners=True): theta's identity samples every voxel "
                  "at itself. The code's Keras sampler takes a normalised coordinate n to the pixel 0.5 (n + 1) S "
                  "(-1 at the first pixel, +1 one pixel past the last), so its identity samples pixel j at "
                  "j S / (S - 1), a pixel off at the far edge. With the code's sampling rule both leave the last "
                  "row and column 0. Its rows are (x, y), regbench's follow the array axes (a relabelling only)."),
        Deviation("An adaptive average pool to affine_pool cells per axis before AT-Net's flatten",
                  "The code flattens the 7 x 7 map of its 224 x 224 slices (five poolings) and takes no other size; "
                  "regbench runs on each dataset's grid. The pool is the identity at 224 x 224 with affine_pool = 7 "
                  "(the paper recipe) and at 176 x 176 with 5 (the quick recipe); on other grids it averages."),
        Deviation("On 3D data: 3D networks and a 12-parameter affine",
                  "The paper and the code are 2D (slices); every layer has its 3D counterpart, nothing else "
                  "changes. 2D rows (embedded2d) run the paper's 2D setting."),
        Deviation("The evaluated image is one resampling of the composed displacement",
                  "The code resamples twice (AT-Net's sampler, then neuron's transformer on M_A); register returns "
                  "the affine composed exactly with u and the workflow warps once, as for every method. Beyond the "
                  "image the workflow's warp decides; training and DT-Net's input use the code's sampler."),
        Deviation("After the affine stage AT-Net runs in eval mode (BatchNorm running statistics, no dropout)",
                  "In the code (Keras 2.2) the frozen AT-Net (trainable=False) keeps its training-phase behaviour: "
                  "its BatchNorm normalises with each batch's statistics and its dropout stays on while DT-Net "
                  "trains. regbench gives DT-Net the M_A it is tested on."),
        Deviation("He-normal convolution weights from an untruncated normal",
                  "Keras' he_normal draws from a normal truncated at two standard deviations; the flow head and "
                  "the dense layers are initialised as in the code (He-normal; Glorot-uniform; zero weights and an "
                  "identity bias for theta)."),
        Deviation("A fixed number of steps per stage, one batch size, the last weights kept",
                  "The code trains each stage for at most 100 epochs (AT-Net batch 64, DT-Net batch 32) with early "
                  "stopping on the validation loss (patience 20; its validation data is its test file) and keeps "
                  "the best checkpoint; its slice count per epoch is unknown. The paper recipe runs 10,000 steps a "
                  "stage at batch 32, the quick recipe 150 and 350 at batch 1; nothing is selected."),
        Deviation("gamma = 0.1 on every dataset",
                  "The code's default (parameter_threth), on DWI fixed images; the paper sets gamma from the data's "
                  "statistics (a third-party reading, UNVERIFIED). Where a T1 is below 0.1 and the T2 bright (CSF "
                  "outside the labelled structures: about 1,750 pixels of an embedded2d val slice, against the "
                  "subject's own T2), the term pays even for a perfect alignment."),
        Deviation("The smoothness term and the unnormalised inputs are the code's",
                  "The paper's smoothness formula and whether its inputs were standardised could not be checked "
                  "(UNVERIFIED); regbench follows the code: the squared sum of absolute neighbour differences, and "
                  "intensities in [0, 1] as served (the code's featurewise_center generators are never fitted, "
                  "a no-op).", changes_results=False),
        Deviation("Paired augmentation re-implemented in torch",
                  "The code's ImageDataGenerator settings: rotation +-5 degrees, zoom 1 +- 0.1 and shift +-10 % per "
                  "axis, a flip of the last array axis, linear interpolation, zero fill, one draw for both images of "
                  "a pair. Keras shifts before it rotates (the shift turned by at most 5 degrees); in 3D one "
                  "rotation per plane of axes.", recipes=("paper",), changes_results=False),
        Deviation("Quick: 32 Parzen bins (the code: 100)", "Speed; sigma stays one bin width.", recipes=("quick",)),
        Deviation("Quick: DT-Net at lr 1e-3 (the code: 1e-2)",
                  "One pair a step instead of 32: at 1e-2 or 3e-3 DT-Net distorts the images.", recipes=("quick",)),
        Deviation("Quick: BatchNorm momentum 0.1 (the code: Keras' 0.99, 0.01 here)",
                  "With Keras' constant the running statistics are still far from the batches' after a few hundred "
                  "steps, and the networks are tested on them.", recipes=("quick",)),
        Deviation("Quick: DT-Net's flow head starts at Normal(0, 1e-5) (the code: He-normal)",
                  "voxelmorph's near-identity start: with the He-normal head the first ~250 steps only undo the "
                  "untrained network's rough field of about a voxel.", recipes=("quick",)),
        Deviation("Quick: no augmentation", "The embedded pairs need no pose variety; the budget is short.",
                  recipes=("quick",)),
    )

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


def stn_warp(image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``out(x) = image(x + u(x))`` (voxels, ij channels) by the rule of the code's AT-Net sampler.

    The code's Keras ``BilinearInterpolation`` (``src/models/layers.py``), per axis of ``S`` voxels at the sampling
    position ``p``: the two corners are ``trunc(p)`` and ``trunc(p) + 1`` (a cast to int, toward zero), each clipped
    to ``[0, S - 1]``, weighted ``p1 - p`` and ``p - p0`` with the *clipped* corners. Hence linear interpolation on
    ``[0, S - 1)``; 0 at and past the last voxel (``p >= S - 1``: both corners clip to ``S - 1`` and their weights
    cancel) and at and below ``p = -1``; on ``(-1, 0)`` the line through voxels 0 and 1, extrapolated. Every axis
    alike (2D and 3D), the weights multiplied over the axes. Differentiable in the image and in ``u``.
    """
    shape = tuple(image.shape[2:])
    batch, channels = displacement.shape[0], image.shape[1]
    positions = identity_grid(shape, displacement.device, displacement.dtype)[None] + displacement
    flat = image.expand(batch, *image.shape[1:]).reshape(batch, channels, -1)
    strides = [math.prod(shape[axis + 1:]) for axis in range(len(shape))]
    corners = []                                   # per axis: ((index, weight), (index, weight))
    for axis, size in enumerate(shape):
        p = positions[:, axis]
        lower = torch.trunc(p.detach()).nan_to_num(-1.0).clamp(-1, size)   # NaN: a NaN out, no bad index
        p0, p1 = lower.clamp(0, size - 1), (lower + 1).clamp(0, size - 1)
        corners.append(((p0.long() * strides[axis], p1 - p), (p1.long() * strides[axis], p - p0)))
    out = 0
    for corner in itertools.product(*corners):
        index = sum(offset for offset, _ in corner).reshape(batch, 1, -1).expand(-1, channels, -1)
        weight = math.prod(w for _, w in corner)
        out = out + weight[:, None] * flat.gather(2, index).reshape(batch, channels, *shape)
    return out


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
        """``(M_A, W, affine field)``: the moving image after AT-Net (the code's sampler), its transform (voxels)."""
        shape = fixed.shape[2:]
        if min(shape) < 32:
            raise ValueError(f"ctf_multicontrast: AT-Net pools five times; images need 32 voxels an axis, "
                             f"got {tuple(shape)}")
        W, b = theta_to_voxels(self.affine(moving, fixed), shape)
        field = affine_displacement(W, b, shape)
        return stn_warp(moving, field), W, field

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
