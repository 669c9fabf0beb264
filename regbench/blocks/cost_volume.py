"""Correlation cost volume (PWC-Net, Sun et al. CVPR 2018): local correlation within a search range.

For feature maps ``fixed`` and ``moving`` (``B x C x *spatial``, 2D or 3D, the same code) and a search
range ``d``, channel ``k`` of the volume holds, at every voxel ``x``,

    cv_k(x) = (1 / C) sum_c fixed_c(x) * moving_c(x + delta_k)

for the ``(2d + 1)^ndim`` integer offsets ``delta_k`` in ``{-d, ..., d}^ndim`` (voxels), ordered as
``itertools.product(range(-d, d + 1), repeat=ndim)``: the first axis slowest, the last fastest, so the
zero offset is the middle channel. Beyond the grid ``moving`` is zero (zero padding). This is the
correlation of PWC-Net and of the deformable registration pyramid (Gunnarsson et al. 2020), whose
official code loops over the offsets in this order and averages over the channels.

Memory: the loop runs over the offsets, one ``B x C x *spatial`` product at a time, reduced over the
channels before the next one; no ``(2d + 1)^ndim``-fold copy of the features is ever made (an unfold
or a stack of shifted copies would need ``C`` times the volume's memory, 32 x 125 x 64^3 floats = 4 GiB
in 3D). Autograd keeps only views of the two inputs (the padded moving map once), not the products.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["correlation_offsets", "cost_volume"]


def correlation_offsets(search_range: int, ndim: int) -> list[tuple[int, ...]]:
    """The offsets ``delta_k`` of the volume's channels, in channel order (voxels, array-axis order)."""
    if isinstance(search_range, bool) or not isinstance(search_range, int) or search_range < 0:
        raise ValueError(f"search_range must be an integer >= 0, got {search_range!r}")
    return list(itertools.product(range(-search_range, search_range + 1), repeat=ndim))


def cost_volume(fixed: torch.Tensor, moving: torch.Tensor, search_range: int) -> torch.Tensor:
    """Local correlation of ``fixed`` with ``moving`` shifted by every offset within ``search_range``.

    ``fixed``, ``moving``: ``B x C x *spatial`` (1 to 3 spatial axes). Returns ``B x (2d + 1)^ndim x
    *spatial``, channel k the channel-mean of ``fixed(x) * moving(x + delta_k)`` (see the module docstring;
    no activation: the pyramid applies LeakyReLU(0.1) after it).
    """
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape")
    ndim = fixed.ndim - 2
    if ndim not in (1, 2, 3):
        raise ValueError(f"fixed must be B x C x *spatial with 1 to 3 spatial axes, got shape {tuple(fixed.shape)}")
    offsets = correlation_offsets(search_range, ndim)
    d = search_range
    spatial = fixed.shape[2:]
    padded = F.pad(moving, [d] * (2 * ndim))  # zeros beyond the grid, d on every side of every axis
    volume = fixed.new_empty(fixed.shape[0], len(offsets), *spatial)
    for k, offset in enumerate(offsets):
        window = (slice(None), slice(None)) + tuple(slice(d + o, d + o + n) for o, n in zip(offset, spatial))
        volume[:, k] = (fixed * padded[window]).mean(dim=1)
    return volume
