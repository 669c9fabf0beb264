"""A paper's working grid and the dataset's grid: images resampled in, displacements brought back.

Several papers' networks assume a geometry: C2FViT an isotropic 128^3 cube, VTN and RCN 128^3, ... A method
declares its :class:`WorkingGrid` (``RegistrationMethod.working_grid``); the workflow then trains it on pairs
resampled onto that grid and scores it on the dataset's own grid, through one :class:`GridAdapter`:

- both grids are centred on the same physical point and their axes are the dataset's array axes; positions
  are in mm, voxel centres at ``(i - (n - 1) / 2) * spacing`` (corner-aligned sampling, as regbench.blocks.spatial);
- the working grid's spacing is given, or (``spacing=None``) the smallest isotropic spacing whose grid holds
  every voxel centre of the dataset's grid: the papers' "resize the volume to 128^3" with the aspect ratio kept
  (the rest of the cube is padding, intensity 0, label 0); or its shape is left open (``shape=None``) and is the
  smallest grid of the given spacing that holds the dataset's field of view (ICNet's 1 mm voxels);
- images and label maps are resampled linearly and by nearest neighbour; a displacement (voxels of the working
  grid) is turned into mm, resampled linearly at the dataset's voxel centres, and turned into the dataset's
  voxels, so ``warped(x) = moving(x + u(x))`` holds in physical space on both grids.

Downsampling is plain linear interpolation (no anti-aliasing filter), as the papers' own preprocessing resizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class WorkingGrid:
    """Where a network runs: ``shape`` voxels of ``spacing`` mm. ``spacing=None``: isotropic, the smallest that fits
    the dataset's field of view into ``shape``; ``shape=None``: the smallest grid of ``spacing`` that holds it."""

    shape: tuple[int, ...] | None
    spacing: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.shape is None and self.spacing is None:
            raise ValueError("a working grid needs a shape, a spacing or both")
        if self.shape is not None and (not self.shape or any(int(n) < 2 for n in self.shape)):
            raise ValueError(f"working grid shape {self.shape}: every axis needs at least 2 voxels")
        if self.spacing is not None and (any(s <= 0 for s in self.spacing)
                                         or (self.shape is not None and len(self.spacing) != len(self.shape))):
            raise ValueError(f"working grid spacing {self.spacing} must give one positive size per axis of {self.shape}")

    def describe(self) -> str:
        """``128x128x128 (isotropic, fitted)``, ``64x64 @ 1x1 mm`` or ``1x1 mm voxels, fitted``."""
        spacing = None if self.spacing is None else "x".join(f"{s:g}" for s in self.spacing)
        if self.shape is None:
            return f"{spacing} mm voxels, fitted"
        shape = "x".join(str(int(n)) for n in self.shape)
        return f"{shape} (isotropic, fitted)" if spacing is None else f"{shape} @ {spacing} mm"


class GridAdapter:
    """Resampling between a dataset's grid (``shape``, ``spacing`` in mm) and a working grid.

    With ``grid=None`` every call returns its input: the method runs on the dataset's grid.
    """

    def __init__(self, shape, spacing, grid: WorkingGrid | None):
        self.source_shape = tuple(int(n) for n in shape)
        self.source_spacing = tuple(float(s) for s in spacing)
        if len(self.source_spacing) != len(self.source_shape):
            raise ValueError(f"spacing {spacing} does not match the grid {shape}")
        self.grid = grid
        if grid is not None and len(grid.shape if grid.shape is not None else grid.spacing) != len(self.source_shape):
            raise ValueError(f"working grid {grid.describe()} has another number of axes than the dataset's grid "
                             f"{self.source_shape}")
        if grid is not None and grid.shape is None:
            # the smallest grid of that spacing, centred alike, that holds every voxel centre of the dataset's
            shape = tuple(math.ceil((n - 1) * s / h - 1e-6) + 1
                          for n, s, h in zip(self.source_shape, self.source_spacing, grid.spacing))
            if shape == self.source_shape and all(math.isclose(s, h, rel_tol=1e-6)
                                                  for s, h in zip(self.source_spacing, grid.spacing)):
                grid = self.grid = None   # the dataset's own grid: nothing to resample
            else:
                grid = self.grid = WorkingGrid(shape, tuple(float(h) for h in grid.spacing))
        if grid is None:
            self.shape, self.spacing = self.source_shape, self.source_spacing
            return
        self.shape = tuple(int(n) for n in grid.shape)
        if grid.spacing is None:
            fitted = max((n - 1) * s / (m - 1) for n, s, m in zip(self.source_shape, self.source_spacing, self.shape))
            self.spacing = (fitted,) * len(self.shape)
        else:
            self.spacing = tuple(float(s) for s in grid.spacing)

    @property
    def active(self) -> bool:
        return self.grid is not None

    def describe(self) -> str:
        if not self.active:
            return "dataset grid"
        return f"{self.grid.describe()}: {'x'.join(f'{s:.3g}' for s in self.spacing)} mm voxels"

    def record(self) -> dict:
        """What eval.json and train.json say about the grid the network ran on."""
        return {"working_grid": "dataset" if not self.active else "x".join(str(n) for n in self.shape),
                "working_spacing_mm": list(self.spacing)}

    # --------------------------------------------------------------------------------------- sampling

    def _grid(self, from_shape, from_spacing, to_shape, to_spacing, like: torch.Tensor) -> torch.Tensor:
        """grid_sample's ``1 x *to_shape x ndim`` grid: the voxel centres of one grid in the other's units."""
        axes = []
        for n_to, s_to, n_from, s_from in zip(to_shape, to_spacing, from_shape, from_spacing):
            position = (torch.arange(n_to, dtype=torch.float64) - (n_to - 1) / 2) * s_to   # mm
            axes.append(position / ((n_from - 1) * s_from / 2))                             # [-1, 1] of from
        mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flip(-1)           # xyz order
        return mesh[None].to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)

    def image(self, image: torch.Tensor) -> torch.Tensor:
        """``B x C x *dataset grid`` -> the working grid, linear, 0 outside the dataset's field of view."""
        if not self.active:
            return image
        grid = self._grid(self.source_shape, self.source_spacing, self.shape, self.spacing, image)
        return F.grid_sample(image, grid.expand(image.shape[0], *grid.shape[1:]), mode="bilinear",
                             padding_mode="zeros", align_corners=True)

    def image_to_dataset(self, image: torch.Tensor) -> torch.Tensor:
        """A working-grid image (``B x C x *working grid``) back on the dataset's grid, linear."""
        if not self.active:
            return image
        grid = self._grid(self.shape, self.spacing, self.source_shape, self.source_spacing, image)
        return F.grid_sample(image, grid.expand(image.shape[0], *grid.shape[1:]), mode="bilinear",
                             padding_mode="border", align_corners=True)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """An integer label map onto the working grid by nearest neighbour (label 0 outside); same dtype."""
        if not self.active:
            return labels
        values = labels.to(torch.float64)
        grid = self._grid(self.source_shape, self.source_spacing, self.shape, self.spacing, values)
        out = F.grid_sample(values, grid.expand(values.shape[0], *grid.shape[1:]), mode="nearest",
                            padding_mode="zeros", align_corners=True)
        return out.round().to(labels.dtype)

    def displacement_to_dataset(self, displacement: torch.Tensor) -> torch.Tensor:
        """``B x ndim x *working grid`` (working voxels) -> ``B x ndim x *dataset grid`` (dataset voxels)."""
        if not self.active:
            return displacement
        return self._move_displacement(displacement, self.shape, self.spacing, self.source_shape,
                                       self.source_spacing, padding="border")

    def displacement_to_working(self, displacement: torch.Tensor) -> torch.Tensor:
        """The other way (a supervising tool's field onto the working grid), continued from its border outside
        the dataset's field of view."""
        if not self.active:
            return displacement
        return self._move_displacement(displacement, self.source_shape, self.source_spacing, self.shape,
                                       self.spacing, padding="border")

    def _move_displacement(self, u, from_shape, from_spacing, to_shape, to_spacing, padding) -> torch.Tensor:
        ndim = len(from_shape)
        view = (1, ndim, *([1] * ndim))
        from_mm = torch.tensor(from_spacing, device=u.device, dtype=u.dtype).view(view)
        to_mm = torch.tensor(to_spacing, device=u.device, dtype=u.dtype).view(view)
        grid = self._grid(from_shape, from_spacing, to_shape, to_spacing, u)
        moved = F.grid_sample(u * from_mm, grid.expand(u.shape[0], *grid.shape[1:]), mode="bilinear",
                              padding_mode=padding, align_corners=True)
        return moved / to_mm

    def onto(self, shape, spacing) -> "GridAdapter":
        """The adapter that runs this adapter's network grid (where a model was trained) for images of another grid
        (``shape``, ``spacing`` in mm): the same adapter where the grids agree, else one whose working grid is this
        one's shape and spacing, centred alike (cross-dataset evaluation)."""
        shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
        if len(shape) != len(self.source_shape):
            raise ValueError(f"a network trained on {len(self.source_shape)}D images cannot register {len(shape)}D "
                             f"images of the grid {shape}")
        if shape == self.source_shape and all(math.isclose(a, b, rel_tol=1e-6)
                                              for a, b in zip(spacing, self.source_spacing)):
            return self
        return GridAdapter(shape, spacing, WorkingGrid(self.shape, self.spacing))

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch (regbench.method's keys) on the working grid: images linear, label maps nearest,
        a supervising displacement (``supervision``) as a displacement; ``labels`` unchanged."""
        if not self.active:
            return batch
        moved = {}
        for key, value in batch.items():
            if key in ("fixed", "moving"):
                moved[key] = self.image(value)
            elif key in ("fixed_seg", "moving_seg"):
                moved[key] = self.labels(value)
            elif key == "supervision":
                moved[key] = self.displacement_to_working(value)
            else:
                moved[key] = value
        return moved
