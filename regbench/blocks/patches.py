"""Patches for networks that see part of an image: extraction, tiling, stitching, sampling at points.

A patch network with valid (unpadded) convolutions maps an input patch of ``in_size`` voxels per axis
to an output patch of ``out_size`` voxels covering its centre, ``margin = (in_size - out_size) / 2``
voxels in from each side (BIRNet: 64 -> 24, margin 20). Everything here is in voxel units of the image,
2D and 3D through the same code; tensors are ``B x C x *spatial``.

- :func:`pad_for_patches`: zero-pad an image so that every output region inside the image has its whole
  input patch inside the padded array (``margin`` before, ``margin`` plus any shortfall after).
- :func:`output_corners`: the corners of output tiles that cover an image, ``stride`` apart along each
  axis, the last one flush with the far border; with ``stride < out_size`` the tiles overlap.
- :func:`stitch`: put output tiles back on the image grid, averaging where they overlap.
- :func:`blend`: the same with a smooth window (:func:`tile_window`), so that a field stitched from
  overlapping tiles has no step where one tile ends.
- :func:`sample_at`: linear interpolation of an image at arbitrary voxel positions (a patch warped with
  a displacement that reaches outside the patch samples the whole image).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["centre_crop", "crop", "pad_for_patches", "output_corners", "stitch", "sample_at", "random_corners",
           "foreground_corners", "tile_window", "blend"]


def centre_crop(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """The central ``size`` voxels of every spatial axis of ``x`` (``B x C x *spatial``); each axis must
    exceed ``size`` by an even number of voxels, so that the crop is centred exactly."""
    spatial = x.shape[2:]
    sizes = [int(size)] * len(spatial) if isinstance(size, int) else [int(s) for s in size]
    slices = []
    for have, want in zip(spatial, sizes):
        if have < want or (have - want) % 2:
            raise ValueError(f"cannot centre-crop {tuple(spatial)} to {tuple(sizes)}: each axis must be larger "
                             "by an even number of voxels")
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[(slice(None), slice(None), *slices)]


def crop(x: torch.Tensor, corner: Sequence[int], size: int | Sequence[int]) -> torch.Tensor:
    """``x[..., c0:c0 + s0, c1:c1 + s1, ...]`` for one corner (``B x C x *spatial`` -> ``B x C x *size``)."""
    sizes = [int(size)] * len(corner) if isinstance(size, int) else [int(s) for s in size]
    return x[(slice(None), slice(None), *(slice(int(c), int(c) + s) for c, s in zip(corner, sizes)))]


def pad_for_patches(image: torch.Tensor, in_size: int, out_size: int, value: float = 0.0) -> torch.Tensor:
    """Pad ``image`` (``B x C x *spatial``) by the margin on every side (and up to ``out_size`` along a
    shorter axis): output corner ``c`` of the image is input corner ``c`` of the padded array."""
    margin = _margin(in_size, out_size)
    pads = []
    for size in reversed(image.shape[2:]):  # F.pad takes the last axis first
        pads += [margin, margin + max(0, out_size - size)]
    return F.pad(image, pads, value=value)


def output_corners(shape: Sequence[int], out_size: int, stride: int) -> list[tuple[int, ...]]:
    """Corners of output tiles of ``out_size`` that cover ``shape``: ``0, stride, 2 stride, ...`` along each
    axis, plus one flush with the far border where the steps do not reach it (C order)."""
    if not 1 <= stride <= out_size:
        raise ValueError(f"the tiling stride must be between 1 and the output size {out_size}, got {stride}")
    per_axis = []
    for size in shape:
        last = max(int(size) - out_size, 0)
        starts = list(range(0, last + 1, stride))
        if starts[-1] != last:
            starts.append(last)
        per_axis.append(starts)
    return list(itertools.product(*per_axis))


def random_corners(shape: Sequence[int], out_size: int, count: int, generator: torch.Generator | None = None,
                   device=None) -> torch.Tensor:
    """``count x ndim`` uniform random output corners whose tiles lie inside ``shape`` (int64)."""
    highs = torch.tensor([max(int(s) - out_size, 0) + 1 for s in shape])
    corners = torch.rand(count, len(shape), generator=generator) * highs
    return corners.floor().long().clamp(max=highs - 1).to(device)


def foreground_corners(mask: torch.Tensor, out_size: int, count: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``count x ndim`` output corners whose tiles lie inside ``mask.shape`` and whose centre voxel
    (``corner + out_size // 2``) is drawn uniformly among the voxels where ``mask`` is True (int64);
    uniform corners (:func:`random_corners`) when the mask is empty."""
    voxels = torch.nonzero(mask)
    if len(voxels) == 0:
        return random_corners(mask.shape, out_size, count, generator, mask.device)
    picks = voxels[torch.randint(len(voxels), (count,), generator=generator).to(voxels.device)]
    highs = torch.tensor([max(int(s) - out_size, 0) for s in mask.shape], device=voxels.device)
    return (picks - out_size // 2).clamp(min=0).minimum(highs)


def stitch(tiles: torch.Tensor, corners: Sequence[Sequence[int]], shape: Sequence[int]) -> torch.Tensor:
    """Average ``N x C x *out`` tiles placed at ``corners`` onto a ``1 x C x *shape`` grid.

    Tiles may overlap (each voxel is the mean of the tiles that cover it) and may reach past ``shape``
    (when an axis is shorter than the tile); every voxel must be covered at least once.
    """
    out_size = tiles.shape[2:]
    extent = [max(int(s), max(int(c[k]) for c in corners) + out_size[k]) for k, s in enumerate(shape)]
    total = tiles.new_zeros(1, tiles.shape[1], *extent)
    count = tiles.new_zeros(1, 1, *extent)
    for tile, corner in zip(tiles, corners):
        region = (slice(None), slice(None), *(slice(int(c), int(c) + s) for c, s in zip(corner, out_size)))
        total[region] += tile
        count[region] += 1
    inside = (slice(None), slice(None), *(slice(0, int(s)) for s in shape))
    total, count = total[inside], count[inside]
    if bool((count == 0).any()):
        raise ValueError("the tiles do not cover the whole grid")
    return total / count


def tile_window(corner: Sequence[int], size: int, shape: Sequence[int], dtype=torch.float32,
                device=None) -> torch.Tensor:
    """The blending weight of a ``size``^d tile at ``corner`` of a ``shape`` grid (``*([size] * d)``).

    Along each axis, a raised cosine ``sin^2(pi (t + 1) / (size + 1))`` of the tile's voxel ``t``: largest at the
    tile's centre and falling toward zero one voxel past each edge; on a side where the tile touches the grid's
    border it stays 1 from the centre to that border (no other tile covers it there). Every voxel of the tile
    gets a positive weight.
    """
    t = torch.arange(size, dtype=torch.float64)
    raised = torch.sin(torch.pi * (t + 1) / (size + 1)) ** 2
    weight = torch.ones((), dtype=torch.float64)
    for c, n in zip(corner, shape):
        axis = raised.clone()
        if int(c) <= 0:
            axis[t <= (size - 1) / 2] = 1.0
        if int(c) + size >= int(n):
            axis[t >= (size - 1) / 2] = 1.0
        weight = weight[..., None] * axis
    return weight.to(dtype=dtype, device=device)


def blend(tiles: torch.Tensor, corners: Sequence[Sequence[int]], shape: Sequence[int]) -> torch.Tensor:
    """``N x C x *([size] * d)`` tiles placed at ``corners`` onto a ``1 x C x *shape`` grid, each voxel the mean of
    the tiles that cover it weighted by :func:`tile_window`.

    The weights fall smoothly toward a tile's inner edges, so where tiles overlap the result passes from one
    tile's values to the next without a step. Every tile must lie inside ``shape``; every voxel must be covered.
    """
    size = tiles.shape[2]
    if any(n != size for n in tiles.shape[2:]):
        raise ValueError(f"blend takes tiles of one size along every axis, got {tuple(tiles.shape[2:])}")
    if any(int(c) < 0 or int(c) + size > int(n) for corner in corners for c, n in zip(corner, shape)):
        raise ValueError(f"every {size}-voxel tile must lie inside the grid {tuple(shape)}")
    total = tiles.new_zeros(1, tiles.shape[1], *shape)
    weights = tiles.new_zeros(1, 1, *shape)
    for tile, corner in zip(tiles, corners):
        region = (slice(None), slice(None), *(slice(int(c), int(c) + size) for c in corner))
        window = tile_window(corner, size, shape, tiles.dtype, tiles.device)
        total[region] += tile * window
        weights[region] += window
    if bool((weights == 0).any()):
        raise ValueError("the tiles do not cover the whole grid")
    return total / weights


def sample_at(image: torch.Tensor, positions: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Linear interpolation of ``image`` (``B x C x *spatial``) at ``positions`` (``B x ndim x *out``,
    voxel coordinates of ``image``, channel k along array axis k); ``B x C x *out``.

    Positions outside the image get zeros (``padding_mode="zeros"``) or the border value (``"border"``).
    """
    ndim = image.ndim - 2
    if positions.shape[1] != ndim or positions.shape[0] != image.shape[0]:
        raise ValueError(f"positions of shape {tuple(positions.shape)} for an image of shape {tuple(image.shape)}: "
                         f"expected B x {ndim} x *out with the image's batch size")
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in image.shape[2:]], device=positions.device,
                         dtype=positions.dtype).view(1, ndim, *([1] * ndim))
    grid = (positions * scale - 1.0).movedim(1, -1).flip(-1)  # grid_sample wants (x, y, z) = reversed axes
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def _margin(in_size: int, out_size: int) -> int:
    if in_size < out_size or (in_size - out_size) % 2:
        raise ValueError(f"an input patch of {in_size} and an output patch of {out_size}: the input must be "
                         "larger by an even number of voxels")
    return (in_size - out_size) // 2
