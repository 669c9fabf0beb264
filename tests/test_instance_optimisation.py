"""Instance optimisation: a few steps of the method's own loss on the test pair improve its registration, start from
the trained weights for every pair, leave the trained network as it was, and use no labels or teacher."""
import pytest
import torch
import torch.nn.functional as F

from regbench.blocks.spatial import warp
from regbench.plugins import load_method
from regbench.training.instance import (check_instance_optimisation, instance_optimised_registration,
                                        unsupervised_recipe)


def smooth_pair(shape=(64, 64), shift=3):
    """A blurred random image and the same image shifted by ``shift`` voxels along the last axis."""
    torch.manual_seed(0)
    fixed = F.avg_pool2d(torch.rand(1, 1, *shape), 7, 1, 3)
    fixed = F.avg_pool2d(fixed, 7, 1, 3)
    return fixed, torch.roll(fixed, shift, -1)


def voxelmorph():
    method = load_method("voxelmorph")
    recipe = method.recipe("quick", {"similarity": "mse", "smoothness_weight": 0.01, "working_size": 0})
    torch.manual_seed(1)
    net = method.build(2, recipe)
    net.eval()
    return method, recipe, net


def test_fine_tuning_on_the_pair_registers_it_better_and_leaves_the_network_alone():
    method, recipe, net = voxelmorph()
    fixed, moving = smooth_pair()
    adapter = method.grid_adapter(fixed.shape[2:], (1.0, 1.0), recipe)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        plain = method.register_on_dataset_grid(net, fixed, moving, recipe, adapter)
    tuned = instance_optimised_registration(method, net, fixed, moving, recipe, adapter, steps=20, lr=1e-3)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # away from the rolled border
    error = {name: F.mse_loss(warp(moving, u)[inner], fixed[inner]).item() for name, u in
             (("plain", plain), ("tuned", tuned))}
    assert error["tuned"] < 0.05 * error["plain"]  # measured: 2.9e-6 against 3.6e-4
    # the shift is +3 voxels along the last axis (measured: 3.03; the untrained network's field is ~0)
    assert 2.7 < tuned[0, 1][inner[2:]].mean().item() < 3.3
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.requires_grad for p in net.parameters())


def test_every_pair_starts_from_the_trained_weights():
    method, recipe, net = voxelmorph()
    fixed, moving = smooth_pair()
    adapter = method.grid_adapter(fixed.shape[2:], (1.0, 1.0), recipe)
    first = instance_optimised_registration(method, net, fixed, moving, recipe, adapter, steps=5, lr=1e-3)
    instance_optimised_registration(method, net, moving, fixed, recipe, adapter, steps=5, lr=1e-3)  # another pair
    again = instance_optimised_registration(method, net, fixed, moving, recipe, adapter, steps=5, lr=1e-3)
    assert torch.equal(first, again)


def test_label_terms_are_off_so_the_pair_needs_no_segmentation():
    method = load_method("pyramid")
    recipe = method.recipe("quick")
    assert recipe["dice_weight"] > 0 and unsupervised_recipe(method, recipe)["dice_weight"] == 0
    net = method.build(2, recipe)
    fixed, moving = smooth_pair()
    adapter = method.grid_adapter(fixed.shape[2:], (1.0, 1.0), recipe)
    u = instance_optimised_registration(method, net, fixed, moving, recipe, adapter, steps=2, lr=1e-4)
    assert u.shape == (1, 2, 64, 64) and torch.isfinite(u).all()


@pytest.mark.parametrize("method_id, settings, problem", [
    ("birnet", {"steps": 5, "lr": 1e-4}, "teacher"),
    ("syn", {"steps": 5, "lr": 1e-4}, "does not train"),
    ("voxelmorph", {"steps": 0, "lr": 1e-4}, "steps must be >= 1"),
    ("voxelmorph", {"steps": 5, "lr": 0.0}, "lr > 0"),
])
def test_what_cannot_be_instance_optimised_is_an_error_naming_the_method(method_id, settings, problem):
    with pytest.raises(ValueError, match=problem):
        check_instance_optimisation(load_method(method_id), settings)
    check_instance_optimisation(load_method("voxelmorph"), None)
