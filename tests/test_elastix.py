"""elastix (itk-elastix) as a classical anchor: its displacement follows regbench's convention, it recovers a
known smooth warp better than ANTs' affine, and it is deterministic on CPU."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

pytest.importorskip("itk", reason="the elastix anchor needs itk-elastix")

from regbench import plugins  # noqa: E402


def _known_warp(shape, seed=0, amplitude=3.0):
    """Smooth random blobs (fixed) and a moving image ``moving(y) = fixed(y - u(y))`` for a smooth random u of at
    most ``amplitude`` voxels, so that ``moving(x + u(x))`` is close to ``fixed(x)`` (u is the warp to recover, to
    first order)."""
    rng = np.random.default_rng(seed)
    fixed = gaussian_filter(rng.normal(size=shape), 2.5)
    fixed = ((fixed - fixed.min()) / (fixed.max() - fixed.min())).astype(np.float32)
    u = np.stack([gaussian_filter(rng.normal(size=shape), 6) for _ in shape])
    u *= amplitude / np.abs(u).max()
    grid = np.indices(shape).astype(np.float64)
    moving = map_coordinates(fixed, grid - u, order=3, mode="nearest").astype(np.float32)
    return fixed, moving


def _warped_error(fixed, moving, u):
    """Mean squared difference between fixed and moving(x + u(x)), away from the border."""
    grid = np.indices(fixed.shape).astype(np.float64)
    warped = map_coordinates(moving, grid + u, order=1, mode="nearest")
    inner = tuple(slice(6, -6) for _ in fixed.shape)
    return float(np.mean((warped - fixed)[inner] ** 2))


@pytest.mark.parametrize("shape", [(72, 64), (32, 36, 28)])
def test_elastix_recovers_a_smooth_warp_better_than_affine(shape):
    fixed, moving = _known_warp(shape)
    as_tensor = [torch.from_numpy(x)[None, None] for x in (fixed, moving)]
    elastix, affine = plugins.load_method("elastix"), plugins.load_method("affine")
    u_elastix = elastix.register(None, *as_tensor, elastix.recipe("quick"))[0].numpy()
    u_affine = affine.register(None, *as_tensor, affine.recipe("quick"))[0].numpy()
    assert u_elastix.shape == (len(shape),) + shape
    none, by_affine, by_elastix = (_warped_error(fixed, moving, u) for u in (np.zeros_like(u_elastix), u_affine,
                                                                                u_elastix))
    # the displacement is in regbench's convention (warped(x) = moving(x + u(x))): it undoes most of the warp
    assert by_elastix < 0.3 * none
    assert by_elastix < 0.5 * by_affine


def test_elastix_is_deterministic_and_its_seed_is_the_run_s(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed, moving = _known_warp((48, 40), seed=1)
    pair = [torch.from_numpy(x)[None, None] for x in (fixed, moving)]
    method = plugins.load_method("elastix")
    recipe = method.recipe("quick", {"iterations": 20})
    first, again = (method.register(None, *pair, recipe) for _ in range(2))
    assert torch.equal(first, again)
    seed_one = method.recipe_for_seed(recipe, 1)
    assert seed_one["random_seed"] == recipe["random_seed"] + 1 and method.seeded and not method.trainable
    assert not torch.equal(first, method.register(None, *pair, seed_one))   # another sample of voxels
    assert list(tmp_path.iterdir()) == []   # nothing written where the job runs (transformix's field file)


def test_the_parameter_map_carries_the_recipe_and_refuses_empty_schedules():
    module = type(plugins.load_method("elastix"))
    import sys

    parameter_map = sys.modules[module.__module__].parameter_map
    recipe = plugins.load_method("elastix").recipe("quick", {"final_grid_spacing": 7.5, "bending_weight": 0.3})
    values = parameter_map(recipe)
    assert values["FinalGridSpacingInPhysicalUnits"] == ("7.5",) and values["Metric1Weight"] == ("0.3",)
    assert values["Transform"] == ("BSplineTransform",) and values["NumberOfResolutions"] == ("3",)
    assert [float(v) for v in values["GridSpacingSchedule"]] == pytest.approx([2.0, 2 ** 0.5, 1.0])
    with pytest.raises(ValueError, match="resolutions and iterations must be >= 1"):
        parameter_map({**recipe, "resolutions": 0})
