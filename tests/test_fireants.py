"""FireANTs (the fireants package) as a classical anchor: its normalised sampling grid becomes regbench's displacement
(voxels, array axes, ``warped(x) = moving(x + u(x))``) in 2D and 3D, it recovers a known smooth warp better than ANTs'
affine, it is deterministic on one CPU thread, and its recipes are the values they document."""
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

pytest.importorskip("fireants", reason="the FireANTs anchor needs the fireants package")

from regbench import plugins

MODULE = sys.modules[type(plugins.load_method("fireants")).__module__]


def _known_warp(shape, seed=0, amplitude=3.0):
    """Smooth random blobs (fixed), a smooth random u of at most ``amplitude`` voxels and the moving image
    ``moving(y) = fixed(y - u(y))``, so that ``moving(x + u(x))`` is close to ``fixed(x)``: u is the displacement to
    recover, to first order."""
    rng = np.random.default_rng(seed)
    fixed = gaussian_filter(rng.normal(size=shape), 2.5)
    fixed = ((fixed - fixed.min()) / (fixed.max() - fixed.min())).astype(np.float32)
    u = np.stack([gaussian_filter(rng.normal(size=shape), 6) for _ in shape])
    u *= amplitude / np.abs(u).max()
    moving = map_coordinates(fixed, np.indices(shape) - u, order=3, mode="nearest").astype(np.float32)
    return fixed, moving, u


def _inner(shape, margin=6):
    return (slice(None),) + tuple(slice(margin, -margin) for _ in shape)


def _endpoint_error(u, truth):
    """Mean length (voxels) of the difference between a displacement and the truth, away from the border."""
    return float(np.sqrt(((u - truth) ** 2).sum(0))[_inner(truth.shape[1:])[1:]].mean())


def _warped_error(fixed, moving, u):
    """Mean squared difference between fixed and moving(x + u(x)), away from the border."""
    warped = map_coordinates(moving, np.indices(fixed.shape) + u, order=1, mode="nearest")
    return float(np.mean((warped - fixed)[_inner(fixed.shape)[1:]] ** 2))


@pytest.mark.parametrize("shape, iterations", [((72, 64), [100, 50, 10]), ((40, 36, 32), [30, 20, 10])])
def test_fireants_recovers_a_smooth_warp_better_than_affine(shape, iterations):
    fixed, moving, truth = _known_warp(shape)
    pair = [torch.from_numpy(x)[None, None] for x in (fixed, moving)]
    fireants, affine = plugins.load_method("fireants"), plugins.load_method("affine")
    u_fireants = fireants.register(None, *pair, fireants.recipe("quick", {"iterations": iterations}))[0].numpy()
    u_affine = affine.register(None, *pair, affine.recipe("quick"))[0].numpy()
    assert u_fireants.shape == (len(shape),) + shape
    # the displacement is the warp itself, component by component: the endpoint error is a fraction of affine's
    none, by_affine, by_fireants = (_endpoint_error(u, truth) for u in (0 * truth, u_affine, u_fireants))
    assert none > 0.45 and by_affine > 0.9 * none          # a warp that no affine map explains
    assert by_fireants < 0.25 * by_affine and by_fireants < 0.25
    # and it warps the moving image onto the fixed one (regbench's warped(x) = moving(x + u(x)))
    assert _warped_error(fixed, moving, u_fireants) < 0.05 * _warped_error(fixed, moving, u_affine)


def test_a_translation_comes_back_in_voxels_and_array_axis_order():
    """moving(y) = fixed(y - s) for a shift s that differs on every axis of a grid that differs on every axis:
    u = s inside, so no axis is swapped, no sign flipped and no scale (size - 1 against size) off."""
    shape, shift = (48, 40, 36), np.array([2.0, -1.0, 0.5])
    fixed = _known_warp(shape, seed=2)[0]
    moving = map_coordinates(fixed, np.indices(shape) - shift.reshape(3, 1, 1, 1), order=3, mode="nearest")
    method = plugins.load_method("fireants")
    pair = [torch.from_numpy(x.astype(np.float32))[None, None] for x in (fixed, moving)]
    u = method.register(None, *pair, method.recipe("quick", {"iterations": [30, 20, 10]}))[0].numpy()
    mean = u[_inner(shape, 8)].reshape(3, -1).mean(1)
    np.testing.assert_allclose(mean, shift, atol=0.1)


def test_the_grid_conversion_is_grid_sample_s_inverse():
    """A known displacement written as torch's normalised grid (align_corners=True, (x, y[, z]) order) converts back
    exactly, and that grid samples an image as regbench's warp does: the convention, without any registration."""
    from regbench.blocks.spatial import warp

    for shape in [(9, 7), (6, 8, 5)]:
        ndim = len(shape)
        rng = np.random.default_rng(ndim)
        truth = torch.from_numpy(rng.normal(scale=1.5, size=(1, ndim, *shape)))
        index = torch.from_numpy(np.indices(shape).astype(np.float64))[None]
        size = torch.tensor(shape, dtype=torch.float64).view(1, ndim, *([1] * ndim))
        grid = (2 * (index + truth) / (size - 1) - 1).movedim(1, -1).flip(-1)
        np.testing.assert_allclose(MODULE.displacement_from_grid(grid, shape).numpy(), truth.numpy(), atol=1e-12)
        image = torch.from_numpy(rng.random((1, 1, *shape)))
        sampled = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                                                  align_corners=True)
        np.testing.assert_allclose(sampled.numpy(), warp(image, truth).numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="does not fit a moving image"):
        MODULE.displacement_from_grid(torch.zeros(1, 5, 4, 3), (5, 4))


def test_fireants_is_deterministic_on_one_thread_and_runs_once():
    fixed, moving, _ = _known_warp((56, 48), seed=1)
    pair = [torch.from_numpy(x)[None, None] for x in (fixed, moving)]
    method = plugins.load_method("fireants")
    recipe = method.recipe("quick", {"iterations": [40, 20, 5]})
    threads = torch.get_num_threads()
    first, again = (method.register(None, *pair, recipe) for _ in range(2))
    assert torch.equal(first, again) and first.abs().max() > 0.5
    assert torch.get_num_threads() == threads            # the caller's thread count comes back
    # a batch is registered pair by pair: a pair's field does not depend on the others in its batch
    batch = method.register(None, torch.cat([pair[0], pair[1]]), torch.cat([pair[1], pair[0]]), recipe)
    assert torch.equal(batch[:1], first)
    assert not method.seeded and not method.trainable and method.recipe_for_seed(recipe, 3) == recipe


def test_recipes_are_the_values_they_document_and_bad_ones_are_refused():
    method = plugins.load_method("fireants")
    paper, quick = method.recipe("paper"), method.recipe("quick")
    # FireANTs' quickstart greedy run; the library's defaults where it sets nothing
    assert paper["scales"] == [4, 2, 1] and paper["iterations"] == [200, 100, 25]
    assert (paper["cc_kernel_size"], paper["smooth_grad_sigma"], paper["lr"]) == (5, 1.0, 0.5)
    assert (paper["smooth_warp_sigma"], paper["beta1"], paper["beta2"]) == (0.5, 0.9, 0.99)
    assert (paper["deformation"], paper["loss"], paper["tolerance"], paper["tolerance_window"]) == (
        "compositive", "cc", 1e-6, 10)
    assert {k: v for k, v in quick.items() if v != paper[k]} == {"iterations": [100, 50, 10]}
    assert set(method.search_space) == {"lr", "smooth_grad_sigma", "smooth_warp_sigma"}
    assert method.departures("quick")[-1].recipes == ("quick",) and method.budget_keys == ()
    pair = [torch.rand(1, 1, 40, 36) for _ in range(2)]
    for overrides, message in [({"scales": [1, 2, 4]}, "decreasing"), ({"iterations": [10, 10]}, "of one length"),
                               ({"cc_kernel_size": 4}, "odd number"), ({"deformation": "bspline"}, "compositive")]:
        with pytest.raises(ValueError, match=message):
            method.register(None, *pair, method.recipe("quick", overrides))
    with pytest.raises(ValueError, match="at least 32 voxels an axis"):
        method.register(None, torch.rand(1, 1, 40, 20), torch.rand(1, 1, 40, 20), quick)
    with pytest.raises(ValueError, match="single-channel"):
        method.register(None, torch.rand(1, 1, 40, 36), torch.rand(1, 1, 40, 40), quick)


def test_without_the_package_the_error_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "fireants.io.image", None)   # what an interpreter without fireants sees
    method = plugins.load_method("fireants")
    pair = [torch.rand(1, 1, 40, 36) for _ in range(2)]
    with pytest.raises(ImportError, match="needs the fireants package .*Python < 3.12"):
        method.register(None, *pair, method.recipe("quick"))
