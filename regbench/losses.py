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
