"""Training losses shared by the methods: image similarities, regularisers, segmentation overlap.

Shapes: images and one-hot label maps are ``B x C x *spatial`` (2D or 3D, the same code), displacement
and velocity fields ``B x ndim x *spatial``. Every function returns a scalar tensor to be *minimised*:
similarities come negated (a perfect match gives -1 for the correlation and Dice losses, 0 for MSE),
and every reduction is a plain mean over the batch, the channels and the voxels unless its docstring
says otherwise. Kernels and constants are made on the input's device and dtype, never on a fixed one.

What a method's recipe combines (with the weights in the method's own file):

- :func:`local_ncc` (VoxelMorph's windowed, squared NCC), :func:`global_ncc` (Pearson correlation over
  the whole image, DLIR / DIRNet), :func:`mse`;
- :func:`gradient_smoothness` (diffusion regulariser, VoxelMorph's ``Grad``);
- :func:`soft_dice_loss` on one-hot label maps made by :func:`one_hot`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "box_sum",
    "local_ncc_map",
    "local_ncc",
    "LocalNCC",
    "global_ncc",
    "GlobalNCC",
    "mse",
    "gradient_smoothness",
    "soft_dice_loss",
    "one_hot",
]


def _check_pair(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str]) -> None:
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} {tuple(first.shape)} and {names[1]} {tuple(second.shape)} "
                         "must have the same shape")
    if first.ndim < 3:
        raise ValueError(f"{names[0]} must be B x C x *spatial, got shape {tuple(first.shape)}")


def _window(window: int | Sequence[int], ndim: int) -> list[int]:
    sizes = [int(window)] * ndim if isinstance(window, int) else [int(w) for w in window]
    if len(sizes) != ndim or any(w < 1 or w % 2 == 0 for w in sizes):
        raise ValueError(f"window must be an odd positive size, or one per spatial axis ({ndim}); got {window!r}")
    return sizes


def box_sum(x: torch.Tensor, window: int | Sequence[int]) -> torch.Tensor:
    """Sum of ``x`` over the window centred on each voxel, zeros outside: ``B x C x *spatial`` in and out.

    Equal to a 'same' convolution with a ones kernel of size ``window`` per axis (zero padding), computed
    as one 1D pass per axis: separable, so it costs ``ndim * n`` additions a voxel instead of ``n^ndim``.
    The 2D and 3D passes are average pools with ``divisor_override=1`` (exact window sums, and much
    faster on a CPU than a one-channel convolution).
    """
    ndim = x.ndim - 2
    sizes = _window(window, ndim)
    if ndim in (2, 3):
        pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
        for axis, size in enumerate(sizes):
            if size == 1:
                continue
            kernel = [1] * ndim
            kernel[axis] = size
            padding = [0] * ndim
            padding[axis] = size // 2
            if x.shape[2 + axis] < size:  # pooling refuses a kernel wider than the axis, even when padded
                pad = [0] * (2 * ndim)
                pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = size // 2
                x = F.pad(x, pad)
                padding[axis] = 0
            x = pool(x, kernel, stride=1, padding=padding, divisor_override=1)
        return x
    if ndim != 1:
        raise ValueError(f"box_sum handles 1 to 3 spatial axes, got {ndim}")
    # 1D: a grouped convolution with a ones kernel (no avg_pool1d with divisor_override)
    channels = x.shape[1]
    kernel = torch.ones(channels, 1, sizes[0], device=x.device, dtype=x.dtype)
    return F.conv1d(x, kernel, padding=sizes[0] // 2, groups=channels)


def local_ncc_map(fixed: torch.Tensor, warped: torch.Tensor, window: int | Sequence[int] = 9,
                  eps: float = 1e-5) -> torch.Tensor:
    """Squared local correlation ``cc(p)`` at every voxel: ``B x C x *spatial``, values in [0, 1].

    VoxelMorph's NCC (Balakrishnan et al. 2019). With ``S`` the sum over the ``n^d`` window centred
    on voxel p (zero padding at the border), ``N = n^d``, I = fixed and J = warped:

        cross(p) = S(IJ) - S(I) S(J) / N
        var_I(p) = S(I^2) - S(I)^2 / N          (and var_J likewise)
        cc(p)    = cross^2 / (var_I var_J + eps)

    which is voxelmorph's ``IJ_sum - u_J I_sum - u_I J_sum + u_I u_J N`` with the terms collected.
    cc is the *squared* correlation of the two windows: 1 where they are affinely related (whatever
    the sign of the slope), 0 where they are unrelated. Windows that reach past the border count the
    padding zeros as voxels, so there an intensity offset (J = a I + b, b != 0) lowers cc.
    Each channel is compared with the same channel.
    """
    _check_pair(fixed, warped, ("fixed", "warped"))
    ndim = fixed.ndim - 2
    sizes = _window(window, ndim)
    count = math.prod(sizes)
    batch, channels, spatial = fixed.shape[0], fixed.shape[1], fixed.shape[2:]
    # the five moments of every (batch, channel) side by side, summed over windows in one pass
    i = fixed.reshape(batch * channels, 1, *spatial)
    j = warped.reshape(batch * channels, 1, *spatial)
    sums = box_sum(torch.cat([i, j, i * i, j * j, i * j], dim=1), sizes)
    i_sum, j_sum, i2_sum, j2_sum, ij_sum = sums.unbind(dim=1)
    cross = ij_sum - i_sum * j_sum / count
    i_var = i2_sum - i_sum * i_sum / count
    j_var = j2_sum - j_sum * j_sum / count
    cc = cross * cross / (i_var * j_var + eps)
    return cc.reshape(batch, channels, *spatial)


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int | Sequence[int] = 9,
              eps: float = 1e-5) -> torch.Tensor:
    """Local (windowed) squared NCC as a loss: ``-mean_p cc(p)``, in [-1, 0] (-1: perfect match).

    ``cc`` is :func:`local_ncc_map` (VoxelMorph's formula, window ``n^d`` with ``n = 9`` by default,
    ``eps = 1e-5``); inputs ``B x C x *spatial``; the mean runs over batch, channels and voxels.
    """
    return -local_ncc_map(fixed, warped, window, eps).mean()


class LocalNCC(nn.Module):
    """:func:`local_ncc` as a module: ``LocalNCC(window=9, eps=1e-5)(fixed, warped)``."""

    def __init__(self, window: int | Sequence[int] = 9, eps: float = 1e-5):
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.window, self.eps = window, eps

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return local_ncc(fixed, warped, self.window, self.eps)


def global_ncc(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Global normalised cross-correlation (Pearson), as a loss: ``-CC`` in [-1, 1].

    For each image of the batch and each channel, over all its voxels:

        CC = mean[(I - mean I)(J - mean J)] / sqrt(var I * var J + eps)

    with population variances. The loss is ``-mean_{b,c} CC``: -1 when ``warped = a * fixed + b`` with
    a > 0, +1 when a < 0. Per image, not per batch (TorchIR pools the whole batch; per image keeps a pair's
    loss independent of the batch it lands in). ``eps`` sits under the square root, so a constant image
    gives CC = 0 and a finite gradient instead of 0/0 (TorchIR adds it to sigma_I sigma_J).
    """
    _check_pair(fixed, warped, ("fixed", "warped"))
    dims = tuple(range(2, fixed.ndim))
    i = fixed - fixed.mean(dim=dims, keepdim=True)
    j = warped - warped.mean(dim=dims, keepdim=True)
    cov = (i * j).mean(dim=dims)
    cc = cov / torch.sqrt((i * i).mean(dim=dims) * (j * j).mean(dim=dims) + eps)
    return -cc.mean()


class GlobalNCC(nn.Module):
    """:func:`global_ncc` as a module."""

    def __init__(self, eps: float = 1e-10):
        super().__init__()
        self.eps = eps

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return global_ncc(fixed, warped, self.eps)


def mse(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference ``mean_p (fixed(p) - warped(p))^2`` (0 for a perfect match)."""
    _check_pair(fixed, warped, ("fixed", "warped"))
    return (fixed - warped).square().mean()


def gradient_smoothness(u: torch.Tensor, penalty: str = "l2") -> torch.Tensor:
    """Diffusion regulariser on a field ``u`` (``B x ndim x *spatial``): VoxelMorph's ``Grad``.

    Forward differences along each spatial axis k, ``D_k u = u[..., x_k + 1, ...] - u[..., x_k, ...]``
    (one voxel shorter along k), penalised by ``(D_k u)^2`` ("l2") or ``|D_k u|`` ("l1"), averaged over
    batch, channels and voxels for each axis, then averaged over the axes:

        L = (1/d) sum_k mean( (D_k u)^2 )

    So a field whose every component grows by ``s`` per voxel along every axis gives ``s^2``, and a
    ramp along one axis of a d-D field gives ``s^2 / d``. The paper writes it as ``sum_p ||grad u(p)||^2``;
    the code's per-axis means differ from that by a constant factor only.
    """
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    if u.ndim < 3:
        raise ValueError(f"u must be B x ndim x *spatial, got shape {tuple(u.shape)}")
    ndim = u.ndim - 2
    total = u.new_zeros(())
    for axis in range(2, u.ndim):
        difference = torch.diff(u, dim=axis)
        total = total + (difference.square() if penalty == "l2" else difference.abs()).mean()
    return total / ndim


def soft_dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice over label channels, as a loss: in [-1, 0], -1 for identical label maps.

    ``fixed_onehot`` and ``warped_onehot`` are ``B x K x *spatial`` (one channel per label, values in
    [0, 1]; the warped one usually linearly interpolated). For each image b and label k:

        dice_bk = 2 sum_p s_f s_m / max(sum_p (s_f + s_m), eps)

    and the loss is ``-mean_{b,k} dice_bk`` (VoxelMorph's ``Dice``). A label absent from both maps
    counts as dice 0, so include only labels the images hold if -1 must be reachable.
    """
    _check_pair(fixed_onehot, warped_onehot, ("fixed_onehot", "warped_onehot"))
    dims = tuple(range(2, fixed_onehot.ndim))
    overlap = 2 * (fixed_onehot * warped_onehot).sum(dim=dims)
    size = (fixed_onehot + warped_onehot).sum(dim=dims).clamp_min(eps)
    return -(overlap / size).mean()


def one_hot(seg: torch.Tensor, labels: torch.Tensor | Sequence[int],
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer label map ``B x 1 x *spatial`` -> ``B x K x *spatial`` of 0/1 in ``dtype``, channel k for ``labels[k]``.

    Values not in ``labels`` (background, structures not evaluated) are 0 in every channel.
    """
    if seg.ndim < 3 or seg.shape[1] != 1:
        raise ValueError(f"seg must be B x 1 x *spatial, got shape {tuple(seg.shape)}")
    if seg.is_floating_point():
        raise ValueError(f"seg must hold integer labels, got dtype {seg.dtype}")
    labels = torch.as_tensor(labels, device=seg.device).to(seg.dtype).reshape(1, -1, *([1] * (seg.ndim - 2)))
    return (seg == labels).to(dtype)


def multiscale_local_ncc(fixed: torch.Tensor, warped: torch.Tensor, windows: Sequence[int] = (7, 5, 3),
                         weights: Sequence[float] | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Multi-resolution local NCC (Mok and Chung: LapIRN, C2FViT) as a loss, in [-sum_j w_j, 0]:

        L = sum_j w_j * local_ncc(D^j fixed, D^j warped, windows[j], eps)

    where ``D`` halves the resolution by average pooling (kernel 3, stride 2, padding 1, the padding left
    out of the mean: ``count_include_pad=False``), ``D^j`` is ``D`` applied j times (``D^0`` the images
    themselves) and the weights default to ``1 / 2^j``: with windows (7, 5, 3), the 7^d window at full
    resolution counts 1, the 5^d window at 1/2 counts 1/2, the 3^d window at 1/4 counts 1/4.
    Inputs ``B x C x *spatial`` (1 to 3 spatial axes); each scale is :func:`local_ncc`.
    """
    _check_pair(fixed, warped, ("fixed", "warped"))
    windows = [int(w) for w in windows]
    weights = [0.5 ** j for j in range(len(windows))] if weights is None else [float(w) for w in weights]
    if not windows or len(weights) != len(windows):
        raise ValueError(f"windows {windows} and weights {weights} must be non-empty and of the same length")
    pool = getattr(F, f"avg_pool{fixed.ndim - 2}d")
    total = fixed.new_zeros(())
    for scale, (window, weight) in enumerate(zip(windows, weights)):
        if scale > 0:
            fixed, warped = (pool(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
                             for x in (fixed, warped))
        total = total + weight * local_ncc(fixed, warped, window, eps)
    return total


__all__ += ["multiscale_local_ncc"]


def invertibility_loss(forward: torch.Tensor, backward: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """How far two displacements are from inverting each other (VTN's invertibility loss), 0 when they do.

    ``forward`` (``B x ndim x *spatial``) registers B to A: on A's grid, ``x -> x + forward(x)`` lands in B;
    ``backward`` registers A to B, on B's grid. Going there and back should return every point, so the
    composed displacements (:func:`regbench.blocks.spatial.compose_displacements`)

        r_A(x) = forward(x) + backward(x + forward(x))      r_B(y) = backward(y) + forward(y + backward(y))

    should vanish. The loss is ``mean |r_A|^2 + mean |r_B|^2``: squared vector length (summed over the
    ``ndim`` channels, voxels^2), averaged over the batch and the voxels, one term per direction.
    Sampling beyond the grid continues the field from its border (``padding_mode``).
    """
    from regbench.blocks.spatial import compose_displacements

    _check_pair(forward, backward, ("forward", "backward"))
    if forward.shape[1] != forward.ndim - 2:
        raise ValueError(f"forward must be B x ndim x *spatial, got shape {tuple(forward.shape)}")
    there_and_back = compose_displacements(backward, forward, padding_mode)
    back_and_there = compose_displacements(forward, backward, padding_mode)
    return there_and_back.square().sum(1).mean() + back_and_there.square().sum(1).mean()


__all__ += ["invertibility_loss"]


def bending_energy(u: torch.Tensor) -> torch.Tensor:
    """Bending energy of a field ``u`` (``B x ndim x *spatial``, voxels), Rueckert et al. 1999; DLIR's regulariser as
    TorchIR computes it (``bending_energy_2d/3d``, de Vos et al.): averaged over the components as well as the
    voxels. To be minimised.

    With nested forward differences ``D_kk = u(x + 2 e_k) - 2 u(x + e_k) + u(x)`` and
    ``D_kl = u(x + e_k + e_l) - u(x + e_k) - u(x + e_l) + u(x)``, all taken at the voxels x whose every stencil
    fits (the first ``S - 2`` along every axis),

        P = mean over batch, components and those voxels of [ sum_k D_kk^2 + 2 sum_{k<l} D_kl^2 ].

    Both stencils are exact on quadratics: ``u_0 = a x_0^2 + b x_0 x_1`` (all else 0) gives ``(4 a^2 + 2 b^2) / 2``
    in 2D (the sum over components divided by ndim); an affine field gives 0, so the energy of the displacement is
    that of the transform ``id + u``.
    """
    if u.ndim < 3 or u.shape[1] != u.ndim - 2:
        raise ValueError(f"u must be B x ndim x *spatial, got shape {tuple(u.shape)}")
    if min(u.shape[2:]) < 3:
        raise ValueError(f"bending_energy needs at least 3 voxels along every axis, got shape {tuple(u.shape)}")
    axes = range(2, u.ndim)
    crop = [slice(None), slice(None)] + [slice(0, n - 2) for n in u.shape[2:]]
    total = 0
    for k in axes:
        first = torch.diff(u, dim=k)
        for l in axes:
            if l >= k:
                second = torch.diff(first, dim=l)[tuple(crop)]
                total = total + (1 if l == k else 2) * second.square()
    return total.mean()


__all__ += ["bending_energy"]


def present_label_dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor,
                            eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice over the labels the fixed image holds, as ``1 - mean Dice`` in [0, 1] (0: identical maps).

    The Dice loss of the deformable registration pyramid's code (Gunnarsson et al. 2020, after NiftyNet's
    ``dice``): ``fixed_onehot`` and ``warped_onehot`` are ``B x K x *spatial`` (values in [0, 1]); for each
    image b and label k,

        dice_bk = (2 sum_p s_f s_m + eps) / (sum_p s_f + sum_p s_m + eps)

    and the loss is ``1 - mean dice_bk`` over the pairs (b, k) whose label is present in the *fixed* map
    (``sum_p s_f > 0``), so a label missing from an image neither counts as a failure nor as a success.
    With no label present at all the loss is 0. Pass the foreground labels only (the code drops channel 0,
    the background).
    """
    _check_pair(fixed_onehot, warped_onehot, ("fixed_onehot", "warped_onehot"))
    dims = tuple(range(2, fixed_onehot.ndim))
    fixed_sum = fixed_onehot.sum(dim=dims)
    overlap = 2 * (fixed_onehot * warped_onehot).sum(dim=dims)
    dice = (overlap + eps) / (fixed_sum + warped_onehot.sum(dim=dims) + eps)
    present = (fixed_sum > 0).to(dice.dtype)
    count = present.sum()
    return torch.where(count > 0, 1 - (dice * present).sum() / count.clamp_min(1), dice.new_zeros(()))


__all__ += ["present_label_dice_loss"]


# --- mutual information, anti-folding and inverse consistency (ICNet; Huang et al.'s coarse-to-fine framework)


def mutual_information(fixed: torch.Tensor, warped: torch.Tensor, bins: int = 100, sigma_ratio: float = 1.0,
                       eps: float = 1e-7) -> torch.Tensor:
    """Mutual information of two images from Parzen-window soft histograms, one value per batch item (nats).

    The estimator of voxelmorph's ``mutualInformation`` (Keras), which Huang et al. (IEEE TMI 2021) use:
    both images are clipped to [0, 1]; ``bins`` centres ``c_b = linspace(0, 1, bins)``; each voxel
    spreads over the bins with weights ``w_b(x) ∝ exp(-(x - c_b)^2 / (2 sigma^2))``, normalised to sum to 1,
    ``sigma = sigma_ratio / (bins - 1)`` (one bin width by default); then, over the N voxels (and channels)
    of one image,

        p_ab = (1/N) sum_x w_a(I(x)) w_b(J(x)),    p_a, p_b: the means of the weights,
        MI   = sum_ab p_ab log(p_ab / (p_a p_b + eps) + eps)

    with ``eps`` the Keras epsilon, 1e-7. Inputs ``B x C x *spatial``; returns ``B`` values. MI is 0 when one
    image is constant (the eps terms leave about -1e-5), ``log 2`` for a two-valued half-and-half image against itself when
    the bins are sharp (``sigma_ratio`` well below 1), and unchanged by any one-to-one remapping of
    either image's intensities, which is why it registers images of different contrasts.
    """
    _check_pair(fixed, warped, ("fixed", "warped"))
    if bins < 2 or sigma_ratio <= 0:
        raise ValueError(f"mutual_information needs bins >= 2 and sigma_ratio > 0, got {bins} and {sigma_ratio}")
    batch = fixed.shape[0]
    centres = torch.linspace(0, 1, bins, device=fixed.device, dtype=fixed.dtype)
    precision = 1.0 / (2 * (sigma_ratio / (bins - 1)) ** 2)

    def weights(image):  # exp(-precision d^2) normalised over the bins: a softmax (one fused pass)
        x = image.clamp(0, 1).reshape(batch, -1, 1)
        return torch.softmax(-precision * (x - centres).square(), dim=-1)   # B x N x bins

    w_a, w_b = weights(fixed), weights(warped)
    p_ab = torch.bmm(w_a.transpose(1, 2), w_b) / w_a.shape[1]       # B x bins x bins
    p_a, p_b = w_a.mean(1), w_b.mean(1)                              # B x bins
    p_a_p_b = p_a[:, :, None] * p_b[:, None, :] + eps
    return (p_ab * torch.log(p_ab / p_a_p_b + eps)).sum((1, 2))


def mutual_information_loss(fixed: torch.Tensor, warped: torch.Tensor, bins: int = 100, sigma_ratio: float = 1.0,
                            eps: float = 1e-7) -> torch.Tensor:
    """``-mean_batch`` :func:`mutual_information` (to be minimised; <= 0)."""
    return -mutual_information(fixed, warped, bins, sigma_ratio, eps).mean()


def background_suppression_loss(fixed: torch.Tensor, warped: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Huang et al.'s prior-knowledge term: the warped image must be dark where the fixed one is background.

    With the threshold ``gamma`` (``threshold``, on the [0, 1] intensity scale; the code's default 0.1), the
    background mask is ``B(x) = 1 - round(clip(F(x), 0, 2 gamma) / (2 gamma))`` (half to even, as Keras'
    ``K.round``): 1 where ``F(x) < gamma``, 0 where ``F(x) > gamma``. The loss is

        L = mean_x [ B(x) (F(x) - M(x)) ]^2

    over the batch, the channels and *all* voxels (not only the background ones), so it is 0 exactly when the
    warped image ``M`` equals the fixed one on the fixed image's background (for a zero background: when the
    warped background is empty), and it does not see the foreground at all. To be minimised.
    """
    _check_pair(fixed, warped, ("fixed", "warped"))
    if threshold <= 0:
        raise ValueError(f"background_suppression_loss: threshold must be > 0, got {threshold}")
    background = 1 - torch.round(fixed.clamp(0, 2 * threshold) / (2 * threshold))
    return (background * (fixed - warped)).square().mean()


def neighbour_smoothness(u: torch.Tensor) -> torch.Tensor:
    """Huang et al.'s smoothness of a field ``u`` (``B x ndim x *spatial``): mean of the squared summed L1.

    For every component and voxel, ``g(x) = sum_{y in N(x)} |u(x) - u(y)|`` over the ``2 ndim`` face
    neighbours (4 in 2D), the field taken as 0 outside the grid (so a border voxel is pulled towards 0);
    ``L = mean_x g(x)^2`` over batch, components and voxels. A constant field ``c`` in one component of a
    2D ``H x W`` grid has ``g = 0`` inside, ``|c|`` along the edges and ``2|c|`` at the 4 corners.
    Not the diffusion regulariser: it squares a *sum of absolute* differences.
    """
    if u.ndim < 3:
        raise ValueError(f"u must be B x ndim x *spatial, got shape {tuple(u.shape)}")
    ndim = u.ndim - 2
    padded = F.pad(u, [1, 1] * ndim)
    g = torch.zeros_like(u)
    for axis in range(2, u.ndim):
        size = u.shape[axis]
        for start in (0, 2):  # the neighbour before and after along this axis
            neighbour = padded.narrow(axis, start, size)
            for other in range(2, u.ndim):
                if other != axis:
                    neighbour = neighbour.narrow(other, 1, u.shape[other])
            g = g + (u - neighbour).abs()
    return g.square().mean()


def self_sampled_inverse(u: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """The first-order inverse of a displacement made by sampling it with itself: ``-u(x + u(x))``.

    ICNet's "inverse network" (Zhang 2018: ``F~_BA = -F_AB o (id + F_AB)``) and Huang et al.'s inverse
    deformation (``flowinverse``: each component warped by the field, then negated). Exact for a translation
    (inside the grid); for other fields an approximation whose error is second order in ``u``.
    ``padding_mode`` for samples beyond the grid: ``"zeros"`` (ICNet) or ``"border"`` (neuron's transformer).
    """
    from regbench.blocks.spatial import warp

    return -warp(u, u, padding_mode=padding_mode)


INVERSE_CONSISTENCY_VARIANTS = ("composition", "inverse_network")


def inverse_consistency_loss(forward: torch.Tensor, backward: torch.Tensor, variant: str = "composition",
                             padding_mode: str = "zeros") -> torch.Tensor:
    """ICNet's inverse-consistency loss between ``forward`` = F_AB and ``backward`` = F_BA (voxels), to minimise.

    Both are ``B x ndim x *spatial``, F_AB on B's grid warping A to B (``A(x + F_AB(x)) ~ B(x)``), F_BA the
    other way. Two versions (spec/methods/icnet.md), each a sum of two mean squared errors over batch,
    components and voxels:

    - ``"composition"`` (the official code since commit 0a308e7, "backward mapping"):
      ``MSE(F_AB, -F_BA o (id + F_AB)) + MSE(F_BA, -F_AB o (id + F_BA))``; its residual
      ``F_AB(x) + F_BA(x + F_AB(x))`` vanishes exactly when the two maps invert each other.
    - ``"inverse_network"`` (the paper's wording): each direct flow against the inverse that the inverse
      network makes from the *other* direction, ``MSE(F_BA, F~_BA) + MSE(F_AB, F~_AB)`` with
      ``F~_BA = -F_AB o (id + F_AB)`` (:func:`self_sampled_inverse`).

    Both are 0 for a translation and its negative where the samples stay inside the grid. Beyond the grid
    the sampled flow is 0 with ``padding_mode="zeros"`` (ICNet); ``"border"`` continues it.
    """
    from regbench.blocks.spatial import warp

    _check_pair(forward, backward, ("forward", "backward"))
    if forward.shape[1] != forward.ndim - 2:
        raise ValueError(f"forward must be B x ndim x *spatial, got shape {tuple(forward.shape)}")
    if variant == "composition":
        return (mse(forward, -warp(backward, forward, padding_mode=padding_mode))
                + mse(backward, -warp(forward, backward, padding_mode=padding_mode)))
    if variant == "inverse_network":
        return (mse(backward, self_sampled_inverse(forward, padding_mode))
                + mse(forward, self_sampled_inverse(backward, padding_mode)))
    raise ValueError(f"inverse_consistency_loss: variant must be one of {INVERSE_CONSISTENCY_VARIANTS}, got {variant!r}")


def antifolding_loss(u: torch.Tensor, components: str = "all") -> torch.Tensor:
    """ICNet's anti-folding loss of a displacement ``u`` (``B x ndim x *spatial``, voxels), to minimise.

    Neighbours m and m + 1 along axis i keep their order while ``D_i u^i + 1 > 0`` (``D_i`` the forward
    difference); where it fails the penalty is the cube of the violation. With ``a = -(D_i u + 1)``,

        L = (1/ndim) sum_i mean( relu(a) a^2 ) = (1/ndim) sum_i mean( |min(D_i u + 1, 0)|^3 )

    taking, as the official code does (``components="all"``), the difference of *every* component along
    each axis i, averaged over batch, components and the voxels where the difference exists;
    ``components="diagonal"`` takes only component i along axis i (the paper's reasoning). 0 for any field
    whose differences all exceed -1 voxel; a fold of slope s < -1 costs ``(-1 - s)^3``.
    """
    if u.ndim < 3 or u.shape[1] != u.ndim - 2:
        raise ValueError(f"u must be B x ndim x *spatial, got shape {tuple(u.shape)}")
    if components not in ("all", "diagonal"):
        raise ValueError(f"antifolding_loss: components must be 'all' or 'diagonal', got {components!r}")
    ndim = u.ndim - 2
    total = u.new_zeros(())
    for i in range(ndim):
        field = u if components == "all" else u[:, i:i + 1]
        violation = -(torch.diff(field, dim=2 + i) + 1)
        total = total + (torch.relu(violation) * violation.square()).mean()
    return total / ndim


def dual_consistency_loss(original: torch.Tensor, warped: torch.Tensor, displacement: torch.Tensor,
                          padding_mode: str = "border") -> torch.Tensor:
    """Huang et al.'s dual-consistency loss: warping forward then back must give the original image back.

    ``warped = original o (id + u)`` (``B x C x *spatial``), ``u = displacement`` (voxels). The image is
    warped back by the self-sampled inverse ``u^-1 = -u o (id + u)`` (:func:`self_sampled_inverse`) and
    compared with the original: ``L = mean_x (original(x) - warped(x + u^-1(x)))^2``. 0 for ``u = 0``, and
    for a translation wherever the image is 0 near the border. ``padding_mode`` "border" as the code's
    neuron transformer (clamped to the border).
    """
    from regbench.blocks.spatial import warp

    _check_pair(original, warped, ("original", "warped"))
    back = warp(warped, self_sampled_inverse(displacement, padding_mode), padding_mode=padding_mode)
    return mse(original, back)


__all__ += ["mutual_information", "mutual_information_loss", "background_suppression_loss", "neighbour_smoothness",
            "self_sampled_inverse", "inverse_consistency_loss", "antifolding_loss", "dual_consistency_loss"]


def robust_loss(fixed: torch.Tensor, warped: torch.Tensor, alpha: float = 0.5, scale: float = 0.3) -> torch.Tensor:
    """Barron's general robust loss (CVPR 2019) of the residual ``r = warped - fixed``, averaged over voxels:

        rho(r) = |alpha - 2| / alpha * [ ((r / c)^2 / |alpha - 2| + 1)^(alpha / 2) - 1 ]

    with shape ``alpha`` and scale ``c`` (intensity units); its limits are ``(r / c)^2 / 2`` at alpha = 2
    (MSE up to the factor) and ``log((r / c)^2 / 2 + 1)`` at alpha = 0 (Cauchy). 0 for a perfect match.
    AiR's released code calls ``RobustLOSS(0.5)(warped, fixed, 0.3)`` without shipping its definition;
    this is the reading of it as Barron's loss with alpha = 0.5, c = 0.3 (UNVERIFIED). At alpha = 0.5,
    ``rho = 3 [((r / c)^2 / 1.5 + 1)^(1/4) - 1]``: quadratic for |r| << c, growing like |r|^(1/2) beyond.
    Inputs ``B x C x *spatial``.
    """
    _check_pair(fixed, warped, ("fixed", "warped"))
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    squared = ((warped - fixed) / scale).square()
    if alpha == 2:
        return (0.5 * squared).mean()
    if alpha == 0:
        return torch.log1p(0.5 * squared).mean()
    shift = abs(alpha - 2)
    # (1 + x)^(alpha/2) - 1 as expm1(alpha/2 log1p(x)): exact to float precision for small residuals too
    return (shift / alpha * torch.expm1(alpha / 2 * torch.log1p(squared / shift))).mean()


__all__ += ["robust_loss"]
