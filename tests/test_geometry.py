"""regbench.geometry: a method's working grid, images resampled onto it, displacements brought back in mm."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regbench import RegistrationMethod, WorkingGrid
from regbench.blocks.spatial import identity_grid, warp
from regbench.evaluation.scoring import evaluate_method
from regbench.geometry import GridAdapter
from regbench.io import read_json
from regbench.training.loop import train


def positions_mm(shape, spacing) -> torch.Tensor:
    """``ndim x *shape``: each voxel centre's physical position, the grid's centre at 0 (the adapter's frame)."""
    grid = identity_grid(shape, dtype=torch.float64)
    view = (-1, *([1] * len(shape)))
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    return (grid - centre.view(view)) * torch.tensor(spacing, dtype=torch.float64).view(view)


def test_fitted_spacing_is_isotropic_and_holds_the_whole_field_of_view():
    adapter = GridAdapter((160, 192, 224), (1.0, 1.0, 1.0), WorkingGrid((128, 128, 128)))
    assert adapter.spacing == pytest.approx((223 / 127,) * 3)   # the longest axis decides
    anisotropic = GridAdapter((100, 60), (1.0, 3.0), WorkingGrid((64, 64)))
    assert anisotropic.spacing == pytest.approx((59 * 3 / 63,) * 2)   # 177 mm along axis 1
    assert GridAdapter((100, 60), (1.0, 3.0), WorkingGrid((64, 64), (2.0, 2.0))).spacing == (2.0, 2.0)
    assert GridAdapter((100, 60), (1.0, 3.0), None).spacing == (1.0, 3.0)
    # a spacing and no shape: the smallest grid of that spacing that holds the field of view (63 x 0.5 = 31.5 mm)
    fitted = GridAdapter((64, 48), (0.5, 0.5), WorkingGrid(None, (1.0, 1.0)))
    assert fitted.active and fitted.shape == (33, 25) and fitted.spacing == (1.0, 1.0)
    assert not GridAdapter((64, 48), (1.0, 1.0), WorkingGrid(None, (1.0, 1.0))).active   # already that grid


@pytest.mark.parametrize("shape, spacing, working", [((40, 28), (1.0, 2.5), (32, 32)),
                                                     ((20, 26, 14), (1.2, 1.0, 2.0), (16, 16, 16))])
def test_an_affine_field_in_mm_comes_back_exactly_in_the_dataset_voxels(shape, spacing, working):
    """f(p) = A p + b (mm) given on the working grid in its voxels comes back as f(p) / spacing, exactly
    (linear interpolation reproduces an affine field), on a non-cubic anisotropic grid."""
    adapter = GridAdapter(shape, spacing, WorkingGrid(working))
    ndim = len(shape)
    generator = torch.Generator().manual_seed(0)
    A = 0.05 * torch.randn(ndim, ndim, generator=generator, dtype=torch.float64)
    b = torch.randn(ndim, generator=generator, dtype=torch.float64)

    def field_mm(positions):
        return torch.einsum("ij,j...->i...", A, positions) + b.view(-1, *([1] * ndim))

    view = (-1, *([1] * ndim))
    working_mm = torch.tensor(adapter.spacing, dtype=torch.float64).view(view)
    u_working = (field_mm(positions_mm(adapter.shape, adapter.spacing)) / working_mm)[None]
    expected = field_mm(positions_mm(shape, spacing)) / torch.tensor(spacing, dtype=torch.float64).view(view)
    back = adapter.displacement_to_dataset(u_working)[0]
    assert back.shape == expected.shape
    torch.testing.assert_close(back, expected, atol=1e-9, rtol=0)
    # and there and back: exact but within a working voxel of the edge, whose working neighbours lie outside
    again = adapter.displacement_to_dataset(adapter.displacement_to_working(expected[None]))[0]
    inner = (slice(None), *[slice(m, -m) for m in (math.ceil(adapter.spacing[0] / s) + 1 for s in spacing)])
    torch.testing.assert_close(again[inner], expected[inner], atol=1e-9, rtol=0)


def test_a_translation_of_two_mm_is_two_over_the_spacing_in_voxels():
    adapter = GridAdapter((30, 20), (0.5, 2.0), WorkingGrid((24, 24)))
    u = torch.zeros(1, 2, 24, 24, dtype=torch.float64)
    u[:, 0] = 2.0 / adapter.spacing[0]   # 2 mm along axis 0, in working voxels
    u[:, 1] = -2.0 / adapter.spacing[1]  # -2 mm along axis 1
    back = adapter.displacement_to_dataset(u)
    assert torch.allclose(back[:, 0], torch.full_like(back[:, 0], 4.0))    # 2 mm / 0.5 mm
    assert torch.allclose(back[:, 1], torch.full_like(back[:, 1], -1.0))   # -2 mm / 2 mm


def test_a_training_batch_moves_each_kind_of_entry_its_own_way():
    """adapter.batch: images linear, label maps nearest (same dtype, no new label values), a supervising field of
    4 and -1 dataset voxels (2 mm and -2 mm) as 2 / h and -2 / h working voxels everywhere (h = 38 / 23 mm: the
    fitted spacing, 19 x 2 mm over 23 voxels), also beyond the dataset's view (continued from the border), and
    ``labels`` untouched."""
    shape, spacing = (30, 20), (0.5, 2.0)
    adapter = GridAdapter(shape, spacing, WorkingGrid((24, 24)))
    h = adapter.spacing[0]
    assert h == pytest.approx(38 / 23)
    radius = torch.linalg.vector_norm(positions_mm(shape, spacing), dim=0)
    image = torch.exp(-radius ** 2 / 50)[None, None]
    seg = (radius < 6).long()[None, None] * 7 + (radius < 3).long()[None, None] * 2
    supervision = torch.zeros(1, 2, *shape, dtype=torch.float64)
    supervision[:, 0], supervision[:, 1] = 4.0, -1.0
    labels = torch.tensor([7, 9])
    moved = adapter.batch({"fixed": image, "moving": 2 * image, "fixed_seg": seg, "moving_seg": seg,
                           "supervision": supervision, "labels": labels})
    torch.testing.assert_close(moved["fixed"], adapter.image(image))
    torch.testing.assert_close(moved["moving"], 2 * adapter.image(image))
    for key in ("fixed_seg", "moving_seg"):
        assert moved[key].dtype == torch.long and moved[key].shape == (1, 1, 24, 24)
        assert set(moved[key].unique().tolist()) == {0, 7, 9}
    torch.testing.assert_close(moved["supervision"][:, 0], torch.full((1, 24, 24), 2.0 / h, dtype=torch.float64))
    torch.testing.assert_close(moved["supervision"][:, 1], torch.full((1, 24, 24), -2.0 / h, dtype=torch.float64))
    assert moved["labels"] is labels


def test_a_disc_in_mm_stays_a_disc_on_the_isotropic_working_grid():
    """Spacing is respected: a disc of radius 12 mm on a 1 x 3 mm grid is a disc on the working grid (its
    extent along both axes the same in working voxels); outside the dataset's view the image is 0."""
    shape, spacing = (80, 30), (1.0, 3.0)
    radius = torch.linalg.vector_norm(positions_mm(shape, spacing), dim=0)
    image = (radius < 12).double()[None, None]
    adapter = GridAdapter(shape, spacing, WorkingGrid((64, 64)))
    on_working = adapter.image(image)[0, 0] > 0.5
    rows, cols = np.nonzero(on_working.numpy())
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1
    extent_mm = (rows.max() - rows.min() + 1) * adapter.spacing[0]
    assert extent_mm == pytest.approx(24, abs=2 * adapter.spacing[0])
    ones = adapter.image(torch.ones_like(image))[0, 0]   # axis 0 spans 79 mm of the cube's 87: padded with 0
    assert ones[0, 32] == 0 and ones[32, 32] == 1 and ones[32, 0] == 1
    labels = (radius < 12).long()[None, None] * 7
    assert set(adapter.labels(labels).unique().tolist()) == {0, 7}
    assert adapter.labels(labels).dtype == torch.long


def test_warping_on_the_working_grid_is_warping_on_the_dataset_grid():
    """The same physical deformation, applied on either grid, gives the same warped image (where it is smooth)."""
    shape, spacing = (48, 36), (1.0, 1.5)
    position = positions_mm(shape, spacing)
    moving = torch.exp(-(position[0] ** 2 + (position[1] - 4) ** 2) / 200)[None, None]
    adapter = GridAdapter(shape, spacing, WorkingGrid((64, 64)))
    q = positions_mm(adapter.shape, adapter.spacing)
    shift_mm = torch.stack([3 * torch.sin(q[1] / 15), 2 * torch.cos(q[0] / 20)])
    u_working = (shift_mm / torch.tensor(adapter.spacing, dtype=torch.float64).view(-1, 1, 1))[None]
    u_dataset = adapter.displacement_to_dataset(u_working)
    on_dataset = warp(moving, u_dataset)
    on_working = adapter.image_to_dataset(warp(adapter.image(moving), u_working))
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert (on_dataset - on_working)[inner].abs().max() < 0.01   # 0.06 if the spacing were ignored on one side


def test_grids_of_another_dimension_are_refused():
    with pytest.raises(ValueError, match="axes"):
        GridAdapter((10, 10), (1, 1), WorkingGrid((8, 8, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        WorkingGrid((1, 8))


class TranslateTwoMillimetres(RegistrationMethod):
    """A toy method that runs on a 32^d working grid and shifts by 2 mm along axis 0 (1 working voxel = h mm)."""

    name = "translate"
    trainable = False
    recipes = {"quick": {"grid": 32}}

    def working_grid(self, ndim, recipe):
        return WorkingGrid((recipe["grid"],) * ndim)

    def register(self, net, fixed, moving, recipe):
        assert tuple(fixed.shape[2:]) == (recipe["grid"],) * (fixed.dim() - 2)   # it sees the working grid only
        self.seen_shape = tuple(fixed.shape[2:])
        h = self.adapter_spacing
        u = torch.zeros(fixed.shape[0], fixed.dim() - 2, *fixed.shape[2:], dtype=fixed.dtype)
        u[:, 0] = 2.0 / h
        return u


def test_scoring_registers_on_the_working_grid_and_records_it(small_embedded2d, tmp_path):
    method = TranslateTwoMillimetres()
    recipe = method.recipe("quick")
    adapter = method.grid_adapter(small_embedded2d.shape, small_embedded2d.spacing, recipe)
    method.adapter_spacing = adapter.spacing[0]
    evaluate_method(method, recipe, small_embedded2d, tmp_path, runtime_repeats=1)
    assert method.seen_shape == (32, 32)
    record = read_json(tmp_path / "eval.json")
    assert record["working_grid"] == "32x32"
    assert record["working_spacing_mm"] == pytest.approx(list(adapter.spacing))
    pair = small_embedded2d.split_pairs("test").iloc[0]
    batch = small_embedded2d.pair(pair.fixed, pair.moving)
    u = method.register_on_dataset_grid(None, batch["fixed"], batch["moving"], recipe, adapter)
    assert u.shape[2:] == batch["fixed"].shape[2:]
    assert torch.allclose(u[:, 0], torch.full_like(u[:, 0], 2.0 / small_embedded2d.spacing[0]), atol=1e-5)
    assert u[:, 1].abs().max() < 1e-5


class SeeTheWorkingGrid(RegistrationMethod):
    """A toy learned method that records the grid of every training batch."""

    name = "seer"
    recipes = {"quick": {"iterations": 2, "batch_size": 1, "lr": 1e-3, "grid": 24}}
    shapes: list = []

    def working_grid(self, ndim, recipe):
        return WorkingGrid((recipe["grid"],) * ndim)

    def build(self, ndim, recipe):
        return torch.nn.Linear(1, 1)

    def loss_terms(self, net, batch, recipe):
        self.shapes.append({k: tuple(v.shape[2:]) for k, v in batch.items() if k != "labels"})
        return {"zero": (1.0, net.weight.sum() * 0 + batch["fixed"].mean())}


def test_training_sees_batches_on_the_working_grid(small_embedded2d, tmp_path):
    method = SeeTheWorkingGrid()
    summary = train(method, method.recipe("quick"), small_embedded2d, tmp_path)
    assert method.shapes and all(set(s.values()) == {(24, 24)} for s in method.shapes)
    assert summary["working_grid"] == "24x24"
    assert math.isclose(summary["working_spacing_mm"][0], summary["working_spacing_mm"][1])
