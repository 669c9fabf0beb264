"""DLIR: the loss terms on hand cases, the affine and B-spline stages, stage-wise training, and a short run."""
import pytest
import torch

from regbench.blocks.affine import affine_displacement
from regbench.blocks.bspline import bspline_displacement, cubic_bspline
from regbench.blocks.losses import bending_energy, global_ncc
from regbench.method import TRAINING_KEYS
from regbench.plugins import load_method
from regbench.blocks.spatial import compose_displacements, identity_grid, warp
from short_training import registered_dice, short_training

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dlir():
    return load_method("dlir")


def build(method, ndim, **overrides):
    torch.manual_seed(0)
    recipe = method.recipe("quick", overrides)
    return method.build(ndim, recipe), recipe


def set_affine_heads(affine, translation=None, rotation=None, scaling=None, shear=None):
    """Zero the affine heads' weights and set their biases (zero where not given): a chosen transform."""
    with torch.no_grad():
        for head, bias in ((affine.translation, translation), (affine.rotation, rotation),
                           (affine.scaling, scaling), (affine.shear, shear)):
            head.weight.zero_()
            head.bias.copy_(torch.zeros_like(head.bias) if bias is None else torch.as_tensor(bias))


def perturb(module, std=0.05, seed=1):
    """Give a zero-initialised output layer some weight, so the stage predicts a non-trivial transform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)


def test_recipes_hold_the_recipe(dlir):
    paper, quick = dlir.recipe("paper"), dlir.recipe("quick")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(quick)
    assert (paper["affine"], paper["spacings"], paper["combine"]) == (True, [32, 16, 8], "compose")
    assert (paper["similarity_weight"], paper["bending_weight"]) == (1.0, 1.0)
    assert (paper["lr"], paper["batch_size"], paper["amsgrad"]) == (1e-3, 32, True)
    assert (paper["affine_kernels"], paper["deformable_kernels"], paper["dense_features"]) == (32, 32, 64)
    assert paper["normalise_inputs"] and quick["normalise_inputs"]
    # TorchIR's example budget: 10,000 steps for each of the 4 stages
    net, _ = build(dlir, 2, **{k: paper[k] for k in ("spacings", "stage_iterations", "iterations")})
    assert [s.iterations for s in dlir.training_stages(net, paper)] == [10_000] * 4
    # quick: every stage of the paper's recipe but the coarsest spacing, most steps to the B-spline stages
    assert (quick["affine"], quick["spacings"], quick["bending_weight"], quick["amsgrad"]) == (True, [16, 8], 1.0, True)
    net, _ = build(dlir, 2)
    assert [s.iterations for s in dlir.training_stages(net, quick)] == [100, 300, 300]


def test_stage_shares_must_fit_the_stages(dlir):
    with pytest.raises(ValueError, match="one positive share per stage"):
        build(dlir, 2, stage_iterations=[1, 1])
    with pytest.raises(ValueError, match="one positive share per stage"):
        build(dlir, 2, stage_iterations=[1, 0, 1])
    with pytest.raises(ValueError, match="without a step"):
        build(dlir, 2, iterations=2)


# --- the loss terms on cases computed by hand ------------------------------------------------------

def test_global_ncc_is_minus_one_for_an_affine_intensity_change():
    image = torch.rand(2, 1, 30, 26, dtype=torch.float64)
    assert global_ncc(image, 2.5 * image + 0.3).item() == pytest.approx(-1.0, abs=1e-7)  # eps sits under the root
    assert global_ncc(image, -0.5 * image + 1.0).item() == pytest.approx(1.0, abs=1e-7)
    other = torch.rand(2, 1, 30, 26, dtype=torch.float64)
    assert abs(global_ncc(image, other).item()) < 0.1


@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 14)])
def test_bending_energy_of_an_affine_field_is_zero(shape):
    ndim = len(shape)
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(2, ndim, ndim, generator=generator, dtype=torch.float64)
    b = torch.randn(2, ndim, generator=generator, dtype=torch.float64)
    assert bending_energy(affine_displacement(W, b, shape)).item() == pytest.approx(0.0, abs=1e-12)


def test_bending_energy_of_quadratic_fields_is_averaged_over_the_components():
    # TorchIR averages over the field's components: 2D, u_0 = a x^2 + b x y, u_1 = 0 -> ((2a)^2 + 2 b^2) / 2
    x, y = identity_grid((20, 30), dtype=torch.float64)
    a, b = 0.3, 0.5
    u = torch.stack([a * x ** 2 + b * x * y, torch.zeros_like(x)])[None]
    assert bending_energy(u).item() == pytest.approx((4 * a ** 2 + 2 * b ** 2) / 2)
    # 3D, three components: u_1 = c z^2 (axis 2), u_2 = d x z  ->  ((2c)^2 + 2 d^2) / 3
    x, y, z = identity_grid((8, 9, 10), dtype=torch.float64)
    c, d = 0.2, -0.7
    u = torch.stack([torch.zeros_like(x), c * z ** 2, d * x * z])[None]
    assert bending_energy(u).item() == pytest.approx((4 * c ** 2 + 2 * d ** 2) / 3)


def test_bending_energy_takes_torchirs_forward_stencils_on_the_first_s_minus_2_voxels():
    # a unit spike at the origin of component 0 on 6 x 7 voxels: D_00 = D_11 = 1 and D_01 = 1 at (0, 0), all
    # else 0, averaged over 2 components x 4 x 5 voxels: (1 + 1 + 2 * 1) / 40
    u = torch.zeros(1, 2, 6, 7, dtype=torch.float64)
    u[0, 0, 0, 0] = 1.0
    assert bending_energy(u).item() == pytest.approx(4 / 40)
    # the far corner is in no stencil of the first S - 2 voxels: nothing
    u = torch.zeros(1, 2, 6, 7, dtype=torch.float64)
    u[0, 1, 5, 6] = 1.0
    assert bending_energy(u).item() == 0.0


def test_bending_energy_of_a_random_bspline_field_is_positive():
    control = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    assert bending_energy(bspline_displacement(control, (40, 40), 5)).item() > 0


# --- the stages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 48), (32, 32, 24)])
def test_untrained_bspline_stages_are_the_identity_in_2d_and_3d(dlir, shape):
    ndim = len(shape)
    net, recipe = build(dlir, ndim)
    assert net.stage_names == ["affine", "bspline16", "bspline8"]
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    u = dlir.register(net, fixed, moving, recipe)
    # the B-spline stages' zero-initialised outputs add nothing to the affine stage's transform
    torch.testing.assert_close(u, net(fixed, moving, upto=1)[0])
    assert u.shape == (2, ndim, *shape)
    deformable, recipe = build(dlir, ndim, affine=False, stage_iterations=[1, 1])
    assert deformable.stage_names == ["bspline16", "bspline8"]
    assert dlir.register(deformable, fixed, moving, recipe).abs().max().item() == 0.0
    terms = dlir.loss_terms(net, {"fixed": fixed, "moving": moving}, recipe)
    assert all(torch.isfinite(value) for _, value in terms.values())


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_affine_heads_keep_pytorchs_default_initialisation(dlir, ndim):
    # TorchIR's AIRNet leaves its heads as nn.Linear makes them: weights and biases uniform in +-1/sqrt(64)
    net, _ = build(dlir, ndim)
    affine = net.stages[0]
    for head in (affine.translation, affine.rotation, affine.scaling, affine.shear):
        assert head.in_features == 64
        assert 1 / 16 < head.weight.abs().max() <= 1 / 8 and (head.weight != 0).all()
        assert head.bias.abs().max() <= 1 / 8 and (head.bias != 0).all()
    # so the untrained stage is a transform near, not at, the identity
    shape = (32,) * ndim
    u = affine(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
    assert 0.01 < u.abs().max() < 0.5 * 32


@pytest.mark.parametrize("ndim, count", [(2, 6), (3, 12)])
def test_the_affine_stage_has_the_papers_parameters(dlir, ndim, count):
    net, _ = build(dlir, ndim)
    affine = net.stages[0]
    heads = (affine.translation, affine.rotation, affine.scaling, affine.shear)
    assert sum(head.out_features for head in heads) == count
    # bounded heads: rotation tanh * pi/2, scaling 2^tanh, shear tan(tanh * pi/4)
    planes = ndim * (ndim - 1) // 2
    set_affine_heads(affine, translation=torch.arange(1.0, ndim + 1), rotation=[100.0] * planes,
                     scaling=[-100.0] * ndim, shear=[100.0] * planes)
    image = torch.rand(1, 1, *([16] * ndim))
    A, t = affine.parameters_of(image, image)
    torch.testing.assert_close(t, torch.arange(1.0, ndim + 1)[None])
    # 2D: A = diag(1/2) [[1, 1], [0, 1]] R(pi/2)
    if ndim == 2:
        expected = torch.tensor([[0.5, 0.0], [0.0, 0.5]]) @ torch.tensor([[1.0, 1.0], [0.0, 1.0]]) @ \
            torch.tensor([[0.0, -1.0], [1.0, 0.0]])
        torch.testing.assert_close(A[0], expected, atol=1e-6, rtol=0)
    # the field is the map about the grid centre: at the centre it is the translation
    shape = (33,) * ndim
    u = affine(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
    torch.testing.assert_close(u[(0, slice(None)) + (16,) * ndim], torch.arange(1.0, ndim + 1), atol=1e-5, rtol=0)


def test_rotations_are_rotations_in_3d(dlir):
    net, _ = build(dlir, 3)
    affine = net.stages[0]
    set_affine_heads(affine, rotation=[0.3, -0.8, 1.2])
    A, _ = affine.parameters_of(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    torch.testing.assert_close(A[0] @ A[0].T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.linalg.det(A[0]).item() == pytest.approx(1.0, abs=1e-6)


def test_a_bspline_stage_predicts_torchirs_control_grid_at_its_spacing(dlir):
    net, _ = build(dlir, 2)
    stage = net.stages[2]  # spacing 8
    fixed, moving = torch.rand(1, 1, 64, 44), torch.rand(1, 1, 64, 44)
    control = stage.control_points(fixed, moving)
    assert control.shape == (1, 2, 64 // 8, 44 // 8)  # the pooled grid, nothing added around it
    # TorchIR's DIRNet: the 1x1 "dense" layers as wide as the convolutions (16 kernels in the quick recipe)
    assert [m.out_channels for m in stage.dense if isinstance(m, torch.nn.Conv2d)] == [16, 16]
    assert stage.output.in_channels == 16
    # a constant control grid, points at voxels 3, 11, ..., 59 (and 3, ..., 35): the constant between the second
    # and the second-to-last point; past the grid the controls are zero, so the field falls off to the border
    with torch.no_grad():
        stage.output.bias.copy_(torch.tensor([1.5, -2.0]))
    u = stage(fixed, moving)[0]
    torch.testing.assert_close(u[:, 11:52, 11:28], torch.tensor([1.5, -2.0]).view(2, 1, 1).expand(2, 41, 17))
    # voxel 63 is half a spacing past the last point (59): beta(1/2) + beta(3/2) = 1/2; voxel 0 sees points 3 and 11
    edge = cubic_bspline(torch.tensor(3 / 8)) + cubic_bspline(torch.tensor(11 / 8))
    torch.testing.assert_close(u[:, 63, 20], torch.tensor([0.75, -1.0]))
    torch.testing.assert_close(u[:, 0, 20], torch.tensor([1.5, -2.0]) * edge)
    with pytest.raises(ValueError, match="power of 2"):
        build(dlir, 2, spacings=[12])


def test_training_stages_are_the_stage_modules_in_order(dlir):
    net, recipe = build(dlir, 2)
    stages = dlir.training_stages(net, recipe)
    assert [s.name for s in stages] == ["affine", "bspline16", "bspline8"]
    assert all(s.lr is None and s.adam == {"amsgrad": True} for s in stages)
    assert sum(s.iterations for s in stages) == recipe["iterations"]
    groups = [{id(p) for p in s.parameters} for s in stages]
    for group, module in zip(groups, net.stages):
        assert group == {id(p) for p in module.parameters()}
    assert set().union(*groups) == {id(p) for p in net.parameters()}
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # disjoint
    dlir.start_stage(net, 1, recipe)
    assert net.training_stage == 1


def test_earlier_stages_feed_later_ones_and_the_stages_compose(dlir):
    net, recipe = build(dlir, 2)
    perturb(net.stages[1])
    set_affine_heads(net.stages[0], translation=[2.0, -1.5])
    seen = {}
    net.stages[1].register_forward_hook(lambda module, inputs, output: seen.update(moving=inputs[1], u=output))
    fixed, moving = torch.rand(1, 1, 48, 48), torch.rand(1, 1, 48, 48)
    dlir.start_stage(net, 1, recipe)
    total, fields = net(fixed, moving, upto=2)
    u_affine = torch.tensor([2.0, -1.5]).view(1, 2, 1, 1).expand(1, 2, 48, 48)
    torch.testing.assert_close(fields[0], u_affine)
    # the ConvNets see intensities in [-1, 1]
    torch.testing.assert_close(seen["moving"], warp(2 * moving - 1, u_affine, padding_mode="border"))
    assert seen["u"].abs().max() > 0.01
    torch.testing.assert_close(total, compose_displacements(u_affine, seen["u"]))
    # the paper's variant adds the fields
    net.combine = "add"
    torch.testing.assert_close(net(fixed, moving, upto=2)[0], u_affine + seen["u"])


def test_each_stage_trains_on_the_stack_so_far_with_every_recipe_term(dlir):
    net, recipe = build(dlir, 2, bending_weight=0.5)
    for stage in net.stages:
        perturb(stage)
    batch = {"fixed": torch.rand(2, 1, 48, 48), "moving": torch.rand(2, 1, 48, 48)}
    for index in range(3):
        dlir.start_stage(net, index, recipe)
        terms = dlir.loss_terms(net, batch, recipe)
        assert set(terms) == {"similarity", "bending"}
        total, fields = net(batch["fixed"], batch["moving"], upto=index + 1)
        assert terms["similarity"][0] == 1.0
        torch.testing.assert_close(terms["similarity"][1],
                                   global_ncc(batch["fixed"], warp(batch["moving"], total, padding_mode="border")))
        assert terms["bending"][0] == (0.0 if index == 0 else 0.5)  # the affine stage: NCC alone
        torch.testing.assert_close(terms["bending"][1], bending_energy(fields[-1]))
    assert terms["bending"][1] > 0

    def gradient(bending_weight):
        net_, recipe_ = build(dlir, 2, bending_weight=bending_weight)
        for stage in net_.stages:
            perturb(stage)
        dlir.start_stage(net_, 2, recipe_)
        terms_ = dlir.loss_terms(net_, batch, recipe_)
        sum(w * v for w, v in terms_.values()).backward()
        return net_.stages[2].output.weight.grad.clone()

    assert not torch.allclose(gradient(0.0), gradient(1.0))


# --- a short training on the embedded data ------------------------------------------------------


def test_short_training_lowers_the_loss_and_beats_identity(dlir, small_embedded2d, tmp_path, monkeypatch):
    recipe = dlir.recipe("quick", SHORT)
    # the weights as each stage starts: an earlier stage must not move once a later one trains
    snapshots = []
    start_stage = dlir.start_stage

    def recording_start_stage(net, index, recipe_):
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        start_stage(net, index, recipe_)

    monkeypatch.setattr(dlir, "start_stage", recording_start_stage)
    run = short_training(dlir, recipe, small_embedded2d, tmp_path / "run")
    net = run.net
    assert run.saved_recipe == recipe and run.summary["iterations"] == recipe["iterations"]
    assert net.training_stage == 2  # a loaded network registers with every stage

    final = net.state_dict()
    snapshots.append(final)
    for index, prefix in enumerate(["stages.0.", "stages.1.", "stages.2."]):
        keys = [k for k in final if k.startswith(prefix)]
        before, after = snapshots[index], snapshots[index + 1]
        assert any(not torch.equal(before[k], after[k]) for k in keys), f"stage {index} did not train"
        for later in snapshots[index + 1:]:  # frozen from then on
            assert all(torch.equal(after[k], later[k]) for k in keys), f"stage {index} moved after its turn"

    assert run.trained_loss < run.untrained_loss - 0.01, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.05, (run.identity_dice, run.trained_dice)
    # the B-spline stages do the work (the data's affine part is small): each improves on the stack before it
    dice_by_stage = [registered_dice(dlir, net, recipe, run.pairs,
                                     lambda n, b, k=k: n(b["fixed"], b["moving"], upto=k)[0]) for k in (1, 2, 3)]
    assert dice_by_stage[0] < dice_by_stage[1] < dice_by_stage[2], dice_by_stage


# 600 steps: +0.12 Dice over identity in either memory layout (420 gave +0.04 to +0.06, at the mercy of rounding)
SHORT = {"iterations": 600, "checkpoint_every": 1000}
