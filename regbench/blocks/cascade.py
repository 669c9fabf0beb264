"""Cascades of registration subnetworks (VTN, JBHI 2020; Recursive Cascaded Networks, ICCV 2019).

A cascade is an affine stem followed by dense subnetworks. Stage k sees the fixed image and the moving
image warped by everything before it, and predicts its own displacement ``u_k`` on the fixed grid; the
stages' fields are *composed*, never re-warped:

    U_0 = u_affine(x) = W x_c + b                          (regbench.blocks.affine, centred coordinates)
    U_1 = u_affine + (I + W) u_1                           (exact: the affine map is linear)
    U_k = U_{k-1} * u_k = u_k(x) + U_{k-1}(x + u_k(x))      (regbench.blocks.spatial.compose_displacements)
    M_k = moving o (id + U_k)                              (always warped from the original moving image)

so ``M_k(x) = M_{k-1}(x + u_k(x))`` up to interpolation, but the image is interpolated once, however many
stages there are. Gradients flow through the composition into every earlier stage, and, unless
``warp_gradient=False`` (the official code's ``warp_gradient`` option: a stop-gradient on the warped input),
also through each stage's input image. VTN and RCN share this forward pass (:class:`CascadeNet`) and
differ in their loss: VTN scores every ``M_k``, RCN only the last.

The subnetworks are those of the official TensorFlow code (``network/base_networks.py``, read, not
copied): :class:`AffineStem` (``VTNAffineStem``), :class:`VTNFlow` (``VTN``, a FlowNet-style encoder-decoder)
and :func:`voxelmorph_flow` (its ``VoxelMorph`` base). All are ndim-generic: 2D and 3D from the same code.
Also here, because both methods train with them: the similarity :func:`correlation_loss` (``1 - CC``), the
per-stage regulariser :func:`stage_smoothness` and the training augmentation :func:`random_ffd` (a random
cubic B-spline free-form deformation).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regbench.blocks.affine import affine_displacement, compose_affine
from regbench.blocks.networks import ConvBlock, UNet, conv, flow_head
from regbench.blocks.spatial import compose_displacements, warp
from regbench.method import Deviation, TrainingStage

#: Where the cascades of VTN and RCN (one network code, microsoft/Recursive-Cascaded-Networks) depart from it.
CASCADE_DEVIATIONS = (
    Deviation("every loss term is averaged over the batch; the official code sums it",
              "the terms keep their ratios, and Adam's steps do not depend on the loss's scale (up to its "
              "epsilon)", changes_results=False),
    Deviation("the dataset's whole field of view is fitted isotropically into the 128^d cube (zero padding, "
              "linear resampling, regbench.geometry), and the displacement brought back to the dataset's grid",
              "the paper crops a region of interest (a liver bounding box, the brain) and resizes it to 128^3; "
              "regbench scores every dataset on its own grid and field of view"),
    Deviation("the affine head average-pools the coarsest feature map to 2^d before its fully connected layers "
              "(the code: a 'valid' convolution over the 2^3 map)",
              "so that any grid works (working_size 0: the dataset's grid); on the 128^d cube with 6 levels "
              "the map is 2^d and the pooling does nothing", recipes=("paper",), changes_results=False),
)


__all__ = [
    "CASCADE_DEVIATIONS",
    "VTNEncoder",
    "VTNFlow",
    "AffineStem",
    "voxelmorph_flow",
    "CascadeNet",
    "CascadeOutput",
    "build_cascade",
    "augment_moving",
    "correlation_loss",
    "step_decay_stages",
    "stage_smoothness",
    "random_ffd",
    "uniform_scaling_init_",
]

#: LeakyReLU slope of every VTN / RCN convolution (tflearn's leaky_relu with alpha 0.1)
NEGATIVE_SLOPE = 0.1


def uniform_scaling_init_(module: nn.Module) -> nn.Module:
    """tflearn's default ``uniform_scaling`` initialisation, which the official code uses for every layer.

    Each (transposed) convolution or fully connected weight is drawn from ``U(-sqrt(3 / n), sqrt(3 / n))``
    with ``n`` the product of the TensorFlow kernel's dimensions but the last (``k^d x in`` for a convolution,
    ``k^d x out`` for a transposed one, the inputs of a fully connected layer: in PyTorch's layout all are
    ``weight[0].numel()``); biases start at 0. The affine head, a 'valid' convolution over the ``2^d x 512``
    map in the code, is a fully connected layer of the same ``n`` here. PyTorch's default draws from
    ``U(-sqrt(1 / n), sqrt(1 / n))``, which for VTN's 12 layers without normalisation shrinks the activations of
    the deep levels some thousandfold.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                              nn.ConvTranspose3d)):
            bound = math.sqrt(3.0 / layer.weight[0].numel())
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound)
                if layer.bias is not None:
                    layer.bias.zero_()
    return module


def _transposed(ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    """4 x 4 (x 4) transposed convolution, stride 2, no bias: exactly doubles the size (TF 'same', cropped)."""
    layer = getattr(nn, f"ConvTranspose{ndim}d")
    return layer(in_channels, out_channels, 4, stride=2, padding=1, bias=False)


def _fit(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop a doubled map to ``size``: TensorFlow's 'same' transposed convolution to an odd size drops the last row."""
    return x[(..., *(slice(0, s) for s in size))]


class VTNEncoder(nn.Module):
    """VTN's encoder: ``levels`` stride-2 3^d convolutions, widths ``width * 2^(l-1)``, LeakyReLU(0.1).

    From the third level on, each stride-2 convolution is followed by a stride-1 one of the same width
    (``conv3_1``, ``conv4_1``, ...: in the code, not in the paper's figures). With ``width=16, levels=6``:
    16, 32, 64 (+64), 128 (+128), 256 (+256), 512 (+512). 'same' padding: a level of size n gives ceil(n / 2).
    ``forward`` returns every level's last feature map, finest first.
    """

    def __init__(self, ndim: int, in_channels: int = 2, width: int = 16, levels: int = 6):
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.ndim = ndim
        self.widths = [width * 2 ** level for level in range(levels)]
        self.levels = nn.ModuleList()
        channels = in_channels
        for index, features in enumerate(self.widths):
            layers = [ConvBlock(ndim, channels, features, stride=2, negative_slope=NEGATIVE_SLOPE)]
            if index >= 2:
                layers.append(ConvBlock(ndim, features, features, negative_slope=NEGATIVE_SLOPE))
            self.levels.append(nn.Sequential(*layers))
            channels = features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != self.ndim + 2:
            raise ValueError(f"expected a B x C x *spatial input with {self.ndim} spatial axes, got {tuple(x.shape)}")
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class VTNFlow(nn.Module):
    """VTN's dense subnetwork: (fixed, moving) -> displacement ``B x ndim x *spatial`` (voxels).

    Encoder :class:`VTNEncoder`; FlowNet-style decoder from the coarsest level ``L`` up to level 2: at each
    level a 3^d convolution predicts a ``ndim``-channel flow (``pred_l``), a transposed convolution
    upsamples that flow (``upsamp``), another upsamples the features to the next skip's width, then
    LeakyReLU (``deconv``), and ``[skip, deconv, upsamp]`` are concatenated. A last transposed convolution
    takes level 1 to full resolution with ``ndim`` channels; the result is multiplied by ``flow_scale``
    (the code's ``20 * flow_multiplier``, ``flow_multiplier = 1 / n`` for ``n`` deformable cascades).
    Transposed convolutions are 4^d, stride 2, without bias; any input size works (odd sizes are cropped).

    Initialisation: tflearn's uniform scaling (:func:`uniform_scaling_init_`) of every layer, the last one
    included, as the code: an untrained subnetwork predicts a random field several voxels large. With
    ``init_std`` the last layer is drawn from N(0, ``init_std``) instead (an untrained subnetwork is nearly
    the identity).
    """

    def __init__(self, ndim: int, width: int = 16, levels: int = 6, flow_scale: float = 20.0,
                 in_channels: int = 2, init_std: float | None = None):
        super().__init__()
        self.ndim, self.flow_scale = ndim, float(flow_scale)
        self.encoder = VTNEncoder(ndim, in_channels, width, levels)
        widths = self.encoder.widths
        self.predict, self.upsample_flow, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        channels = widths[-1]
        for skip in reversed(widths[:-1]):
            self.predict.append(conv(ndim, channels, ndim, 3))
            self.upsample_flow.append(_transposed(ndim, ndim, ndim))
            self.upsample.append(nn.Sequential(_transposed(ndim, channels, skip),
                                               nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)))
            channels = 2 * skip + ndim
        self.final = _transposed(ndim, channels, ndim)
        uniform_scaling_init_(self)
        if init_std is not None:
            with torch.no_grad():
                self.final.weight.normal_(0.0, init_std)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fixed, moving], dim=1)
        features = self.encoder(x)
        y = features[-1]
        for index, (predict, upsample_flow, upsample) in enumerate(zip(self.predict, self.upsample_flow,
                                                                      self.upsample)):
            skip = features[-2 - index]
            size = skip.shape[2:]
            flow = _fit(upsample_flow(predict(y)), size)
            y = torch.cat([skip, _fit(upsample(y), size), flow], dim=1)
        return _fit(self.final(y), x.shape[2:]) * self.flow_scale


class AffineStem(nn.Module):
    """VTN's affine subnetwork: (fixed, moving) -> ``(W, b)``, ``W``: ``B x d x d``, ``b``: ``B x d`` (voxels).

    The encoder is :class:`VTNEncoder` (the code's fixed widths 16 ... 512 are ``width=16, levels=6``), the
    head two bias-free fully connected layers from the last feature map to the ``d^2`` entries of ``W``
    (row k: the displacement's channel k) and the ``d`` of ``b``; with ``A = I + W`` the map is
    ``x -> A x_c + b`` about the grid centre (:mod:`regbench.blocks.affine`). 12 parameters in 3D, 6 in 2D.

    The code's head is a 'valid' convolution as large as the coarsest map (2^d at 128^d), so it only fits
    one input size. Here the coarsest map is first average-pooled to ``head_size^d`` (adaptively; at
    the paper's 128^d with 6 levels it is already 2^d and the pooling does nothing), so any size works.
    Every layer, the head included, starts from tflearn's uniform scaling (:func:`uniform_scaling_init_`),
    as the code; with ``init_std`` the head is drawn from N(0, ``init_std``) instead (an untrained stem then
    predicts nearly the identity).
    """

    def __init__(self, ndim: int, width: int = 16, levels: int = 6, head_size: int = 2, in_channels: int = 2,
                 init_std: float | None = None):
        super().__init__()
        self.ndim, self.head_size = ndim, head_size
        self.encoder = VTNEncoder(ndim, in_channels, width, levels)
        features = self.encoder.widths[-1] * head_size ** ndim
        self.matrix = nn.Linear(features, ndim * ndim, bias=False)
        self.translation = nn.Linear(features, ndim, bias=False)
        uniform_scaling_init_(self)
        if init_std is not None:
            with torch.no_grad():
                self.matrix.weight.normal_(0.0, init_std)
                self.translation.weight.normal_(0.0, init_std)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(torch.cat([fixed, moving], dim=1))[-1]
        pool = getattr(F, f"adaptive_avg_pool{self.ndim}d")
        x = pool(x, self.head_size).flatten(1)
        return self.matrix(x).view(-1, self.ndim, self.ndim), self.translation(x)


class _ScaledFlow(nn.Module):
    def __init__(self, unet: nn.Module, head: nn.Module, flow_scale: float):
        super().__init__()
        self.unet, self.flow, self.flow_scale = unet, head, float(flow_scale)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.flow(self.unet(torch.cat([fixed, moving], dim=1))) * self.flow_scale


def voxelmorph_flow(ndim: int, width: int = 16, flow_scale: float = 1.0) -> nn.Module:
    """RCN's ``VoxelMorph`` base network: (fixed, moving) -> displacement, times ``flow_scale`` (``1 / n``).

    VoxelMorph-2 with stride-2 convolutions: encoder ``[c, 2c, 2c, 2c]``, decoder ``2c`` at 1/16, 1/8, 1/4,
    two ``2c`` at 1/2, two ``c`` at full size (``c = width``, 16 in the code), LeakyReLU(0.1), a flow
    convolution from N(0, 1e-5), nearest x2 upsampling with skips. Unlike VTN's output it is not multiplied by 20.
    """
    c = width
    unet = UNet(ndim, 2, encoder=[c, 2 * c, 2 * c, 2 * c], decoder=[[2 * c], [2 * c], [2 * c], [2 * c, 2 * c], [c, c]],
                downsampling="strided", negative_slope=NEGATIVE_SLOPE)
    return _ScaledFlow(unet, flow_head(unet.out_channels, ndim), flow_scale)


class CascadeOutput(NamedTuple):
    """What a pass through a cascade gives (every field ``B x ndim x *spatial``, voxels, fixed grid)."""

    W: torch.Tensor | None              # affine offset (A = I + W), B x d x d; None without an affine stem
    b: torch.Tensor | None              # affine translation, B x d
    flows: list[torch.Tensor]           # each dense stage's own prediction u_1 ... u_n (repeats included)
    fields: list[torch.Tensor]          # the composed fields U_0 (affine; zeros without a stem), U_1 ... U_n
    warped: list[torch.Tensor]          # moving warped by each U_k: M_0 ... M_n

    @property
    def displacement(self) -> torch.Tensor:
        """The whole cascade's displacement ``U_n``."""
        return self.fields[-1]


class CascadeNet(nn.Module):
    """An affine stem (optional) and dense subnetworks, run as one composed cascade (module docstring).

    ``forward(fixed, moving, rep=r)`` runs each dense subnetwork ``r`` times in a row before the next
    (RCN's shared-weight cascading: ``r x n`` stages, no new parameters). Each stage receives
    ``(fixed, M_{k-1})``; with ``warp_gradient=False`` that input is detached (the composition still
    carries gradients into earlier stages). Images are warped with ``padding`` (the official code
    clamps sampling positions to the volume: ``"border"``); fields are composed with border padding.
    """

    def __init__(self, stages: Sequence[nn.Module], affine: nn.Module | None = None):
        super().__init__()
        if not stages and affine is None:
            raise ValueError("a cascade needs at least one stage")
        self.affine = affine
        self.stages = nn.ModuleList(stages)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, rep: int = 1, warp_gradient: bool = True,
                padding: str = "border") -> CascadeOutput:
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape")
        if rep < 1:
            raise ValueError(f"rep must be >= 1, got {rep}")
        shape = fixed.shape[2:]
        W = b = None
        if self.affine is not None:
            W, b = self.affine(fixed, moving)
            field = affine_displacement(W, b, shape)
        else:
            field = fixed.new_zeros(fixed.shape[0], len(shape), *shape)
        flows, fields, warped = [], [field], [warp(moving, field, padding_mode=padding)]
        for stage in self.stages:
            for _ in range(rep):
                current = warped[-1] if warp_gradient else warped[-1].detach()
                u = stage(fixed, current)
                if len(flows) == 0:
                    field = u if W is None else compose_affine(W, field, u)
                else:
                    field = compose_displacements(field, u)
                flows.append(u)
                fields.append(field)
                warped.append(warp(moving, field, padding_mode=padding))
        return CascadeOutput(W, b, flows, fields, warped)


BASE_NETWORKS = ("vtn", "voxelmorph")
#: How the affine head and the VTN subnetworks' last layers start: the standard deviation of their weights, or None
#: for tflearn's uniform scaling like every other layer (the official code)
HEAD_INITS = {"uniform_scaling": None, "near_identity": 1e-5}


def build_cascade(ndim: int, n_cascades: int, base_network: str = "vtn", width: int = 16, levels: int = 6,
                  affine: bool = True, affine_width: int = 16, flow_scale: float | None = None,
                  head_init: str = "uniform_scaling") -> CascadeNet:
    """An affine stem and ``n_cascades`` dense subnetworks, as the official code assembles them.

    ``base_network`` ``"vtn"`` (:class:`VTNFlow`, ``width``, ``levels``) or ``"voxelmorph"``
    (:func:`voxelmorph_flow`, ``width``); every dense output is multiplied by ``flow_scale / n_cascades``
    (the code's ``flow_multiplier = 1 / n``; ``flow_scale`` defaults to VTN's 20 and VoxelMorph's 1).
    The affine stem (``affine_width``, ``levels``) is :class:`AffineStem`. ``head_init`` ``"uniform_scaling"``:
    every layer from tflearn's uniform scaling, as the code; ``"near_identity"``: the affine head and each VTN
    subnetwork's last layer from N(0, 1e-5), so that an untrained cascade is nearly the identity (VoxelMorph's
    flow layer is N(0, 1e-5) in the code either way).
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {tuple(HEAD_INITS)}, got {head_init!r}")
    init_std = HEAD_INITS[head_init]
    if n_cascades < 1:
        raise ValueError(f"n_cascades must be >= 1, got {n_cascades}")
    if base_network not in BASE_NETWORKS:
        raise ValueError(f"base_network must be one of {BASE_NETWORKS}, got {base_network!r}")
    if flow_scale is None:
        flow_scale = 20.0 if base_network == "vtn" else 1.0
    multiplier = flow_scale / n_cascades
    if base_network == "vtn":
        stages = [VTNFlow(ndim, width, levels, multiplier, init_std=init_std) for _ in range(n_cascades)]
    else:
        stages = [voxelmorph_flow(ndim, width, multiplier) for _ in range(n_cascades)]
    return CascadeNet(stages, AffineStem(ndim, affine_width, levels, init_std=init_std) if affine else None)


def augment_moving(moving: torch.Tensor, amplitude: float) -> torch.Tensor:
    """The moving images warped by one :func:`random_ffd` each (border padding, as the code's clamping)."""
    field = random_ffd(moving.shape[0], moving.shape[2:], amplitude).to(moving.device, moving.dtype)
    return warp(moving, field, padding_mode="border")


def step_decay_stages(parameters, iterations: int, halvings: Sequence[float], lr: float) -> list[TrainingStage]:
    """One training stage of every parameter whose learning rate halves at fractions ``halvings`` of
    ``iterations``, Adam's moments kept across the halvings as the official code's: its schedule (1e-4
    for 3 epochs of 20k iterations, then 5e-5, then 2.5e-5) is ``halvings = [0.6, 0.8]`` of 100k.
    """
    if any(not 0 < f < 1 for f in halvings):
        raise ValueError(f"halvings must be fractions of the iterations in (0, 1), got {list(halvings)}")
    milestones = sorted(round(f * iterations) for f in halvings)
    return [TrainingStage("all", iterations, list(parameters), lr, lr_decay=(milestones, 0.5) if milestones else None)]


def correlation_loss(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The official code's similarity ``1 - CC``, averaged over the batch: 0 for a perfect match, in [0, 2].

    Per image, over all its voxels (and channels), with population moments and ``eps`` added to each
    variance, as the code's ``similarity_loss``:

        CC = cov(F, M) / sqrt((var F + eps) (var M + eps))

    so ``M = a F + c`` gives ``1 - |a| var F / sqrt((var F + eps)(a^2 var F + eps))``, about 0 for a > 0 and 2
    for a < 0, and a constant image gives exactly 1. The code sums over the batch; this is the mean.
    """
    if fixed.shape != warped.shape or fixed.ndim < 3:
        raise ValueError(f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} must both be "
                         "B x C x *spatial, of the same shape")
    f = fixed.flatten(1)
    m = warped.flatten(1)
    f = f - f.mean(1, keepdim=True)
    m = m - m.mean(1, keepdim=True)
    cc = (f * m).mean(1) / torch.sqrt((f.square().mean(1) + eps) * (m.square().mean(1) + eps))
    return (1 - cc).mean()


def stage_smoothness(u: torch.Tensor) -> torch.Tensor:
    """The official code's regulariser of one stage's own flow ``u`` (``B x d x *spatial``), batch mean:

        L(u) = 1/2 sum_k sum_x sum_c (u_c(x + e_k) - u_c(x))^2 / (|Omega| d)

    forward differences along each axis k (one voxel shorter), ``|Omega|`` the voxels of one image, ``d``
    the channels (``tf.nn.l2_loss`` of the differences over ``X Y Z 3``, summed over the batch in the code).
    It is ``d / 2`` times :func:`regbench.blocks.losses.gradient_smoothness` up to the one-voxel-shorter
    difference maps: a field growing by ``s`` per voxel in every component along every axis gives
    ``d s^2 / 2`` here (times ``(n - 1) / n``).
    """
    if u.ndim < 3 or u.shape[1] != u.ndim - 2:
        raise ValueError(f"u must be B x ndim x *spatial, got shape {tuple(u.shape)}")
    voxels = math.prod(u.shape[2:])
    total = u.new_zeros(u.shape[0])
    for axis in range(2, u.ndim):
        total = total + torch.diff(u, dim=axis).square().flatten(1).sum(1)
    return (0.5 * total / (voxels * u.shape[1])).mean()


def _cubic_bspline_basis(size: int, control_points: int, dtype=torch.float32) -> torch.Tensor:
    """``size x (control_points + 2)``: the RCN code's uniform cubic B-spline weights of each grid point.

    ``control_points - 1`` equal intervals cover the grid; grid point i sits at ``t = (i + 0.5)
    (control_points - 1) / size`` control spacings, and takes the 4 control points around its interval,
    the grid of control points being padded by one zero point at each end.
    """
    t = (torch.arange(size, dtype=torch.float64) + 0.5) * (control_points - 1) / size
    p = t.floor().clamp(max=control_points - 2)
    u = t - p
    weights = torch.stack([(1 - u) ** 3 / 6, (3 * u ** 3 - 6 * u ** 2 + 4) / 6,
                           (-3 * u ** 3 + 3 * u ** 2 + 3 * u + 1) / 6, u ** 3 / 6], dim=1)
    basis = torch.zeros(size, control_points + 2, dtype=torch.float64)
    columns = p.long()[:, None] + torch.arange(4)[None, :]
    basis.scatter_(1, columns, weights)
    return basis.to(dtype)


def random_ffd(batch: int, shape: Sequence[int], amplitude: float = 0.4, control_points: int = 5,
               power: float = 3.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """RCN's training augmentation: a random cubic B-spline displacement ``batch x d x *shape`` (voxels).

    A ``control_points^d`` grid (5 in the code) of d-vectors, each component ``sign(r) |r|^power`` with
    ``r ~ U(-amplitude^(1/power), amplitude^(1/power))`` (values in ``[-amplitude, amplitude]``,
    concentrated near 0), channel k times ``n_k // 4`` for an axis of ``n_k`` voxels (so at most
    ``0.4 * 128 / 4 = 12.8`` voxels at 128^3), interpolated by uniform cubic B-splines
    (:func:`_cubic_bspline_basis`). Drawn on the CPU from ``generator`` (default: torch's global RNG,
    which the training loop checkpoints), so a run is reproducible on any device.
    """
    shape = [int(s) for s in shape]
    ndim = len(shape)
    radius = amplitude ** (1.0 / power)
    r = torch.rand(batch, ndim, *([control_points] * ndim), generator=generator, dtype=torch.float64)
    r = (r - 0.5) * 2 * radius
    field = r.abs() ** power * r.sign()
    field = field * torch.tensor([s // 4 for s in shape], dtype=torch.float64).view(1, ndim, *([1] * ndim))
    field = F.pad(field, [1, 1] * ndim)
    for axis, size in enumerate(shape):  # contract the control axis with the grid axis, one axis at a time
        basis = _cubic_bspline_basis(size, control_points, torch.float64)
        field = torch.movedim(torch.tensordot(field, basis, dims=([axis + 2], [1])), -1, axis + 2)
    return field.to(torch.float32)
