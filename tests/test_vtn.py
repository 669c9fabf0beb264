"""VTN: the cascade composes flows exactly, every recipe term is in the loss, gradients flow as the paper says,
and a short training registers."""
import math

import pytest
import torch

from regbench.blocks.affine import (affine_displacement, affine_matrix, compose_affine, determinant_loss,
                                    orthogonality_loss)
from regbench.blocks.cascade import (AffineStem, CascadeNet, VTNFlow, _cubic_bspline_basis, correlation_loss,
                                     random_ffd, stage_smoothness, uniform_scaling_init_)
from regbench.blocks.losses import invertibility_loss
from regbench.blocks.spatial import compose_displacements, warp
from regbench.geometry import WorkingGrid
from regbench.method import TRAINING_KEYS, parameter_count
from regbench.plugins import load_method
from short_training import short_training


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the recipes quote their training times per thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vtn():
    return load_method("vtn")


def build(method, ndim, **overrides):
    torch.manual_seed(0)
    recipe = method.recipe("quick", overrides)
    return method.build(ndim, recipe), recipe


def small(method, ndim=2, **overrides):
    """A small cascade for fast tests: width 4, 3 levels, non-trivial flows."""
    net, recipe = build(method, ndim, width=4, affine_width=4, levels=3, **overrides)
    with torch.no_grad():
        for stage in net.stages:
            stage.final.weight.normal_(0, 0.02)
        net.affine.matrix.weight.normal_(0, 1e-3)
        net.affine.translation.weight.normal_(0, 1e-2)
    return net, recipe


def conv_parameters(ndim, channels_in, channels_out, kernel=3, bias=True):
    return kernel ** ndim * channels_in * channels_out + (channels_out if bias else 0)


def test_recipes_hold_the_codes_numbers(vtn):
    paper = vtn.recipe("paper")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(vtn.recipe("quick"))
    assert (paper["n_cascades"], paper["width"], paper["levels"], paper["affine_width"], paper["flow_scale"]) == \
        (3, 16, 6, 16, 20.0)
    assert (paper["similarity_weight"], paper["affine_similarity_weight"], paper["smoothness_weight"]) == \
        (1.0, 0.0, 1.0)
    assert (paper["det_weight"], paper["ortho_weight"], paper["inverse_weight"]) == (0.1, 0.1, 0.0)
    assert (paper["lr"], paper["batch_size"], paper["iterations"], paper["lr_halvings"]) == \
        (1e-4, 4, 100_000, [0.6, 0.8])
    assert (paper["augmentation"], paper["warp_gradient"]) == (0.4, True)
    # the paper's cube, the code's initialisation
    assert (paper["working_size"], paper["head_init"]) == (128, "uniform_scaling")
    quick = vtn.recipe("quick")
    assert (quick["working_size"], quick["head_init"], quick["inverse_weight"]) == (128, "near_identity", 0.0)


def test_paper_schedule_halves_the_rate_after_epochs_3_and_4(vtn):
    net, _ = build(vtn, 2, width=4, affine_width=4, levels=3)
    stages = vtn.training_stages(net, vtn.recipe("paper"))
    # one stage (one Adam, its moments kept, as the code), the rate halved at 60k and 80k
    assert [(s.iterations, s.lr, s.lr_decay) for s in stages] == [(100_000, 1e-4, ([60_000, 80_000], 0.5))]
    assert len(stages[0].parameters) == len(list(net.parameters()))
    # the quick recipe keeps the schedule on its own budget; no halvings is a constant rate
    quick = vtn.training_stages(net, vtn.recipe("quick", {"iterations": 500}))
    assert [(s.iterations, s.lr, s.lr_decay) for s in quick] == [(500, 1e-3, ([300, 400], 0.5))]
    flat = vtn.training_stages(net, vtn.recipe("quick", {"lr_halvings": []}))
    assert [(s.name, s.iterations, s.lr, s.lr_decay) for s in flat] == [
        ("all", vtn.recipe("quick")["iterations"], 1e-3, None)]


def test_dense_subnetwork_has_the_codes_layers():
    # 2D, c = 16, 6 levels: encoder conv1 ... conv6_1, then for each level 6 -> 2: pred (3x3, bias),
    # upsamp (4x4 transposed, ndim -> ndim, no bias), deconv (4x4 transposed, no bias), then the last 4x4
    # transposed conv from concat1 = [conv1, deconv1, upsamp] (16 + 16 + 2) to the 2 flow channels.
    ndim, encoder = 2, [(2, 16), (16, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                        (256, 512), (512, 512)]
    expected = sum(conv_parameters(ndim, i, o) for i, o in encoder)
    concat = 512
    for skip in (256, 128, 64, 32, 16):
        expected += conv_parameters(ndim, concat, ndim)                             # pred
        expected += conv_parameters(ndim, ndim, ndim, kernel=4, bias=False)         # upsamp
        expected += conv_parameters(ndim, concat, skip, kernel=4, bias=False)       # deconv
        concat = 2 * skip + ndim
    assert concat == 34
    expected += conv_parameters(ndim, concat, ndim, kernel=4, bias=False)
    assert parameter_count(VTNFlow(2, width=16, levels=6)) == expected
    # 3D: the same code, concat1 has 16 + 16 + 3 = 35 channels
    flow3d = VTNFlow(3, width=16, levels=6)
    assert flow3d.final.weight.shape == (35, 3, 4, 4, 4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_stem_has_the_codes_layers_and_12_or_6_parameters(ndim):
    stem = AffineStem(ndim, width=16, levels=6)
    encoder = [(2, 16), (16, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512),
               (512, 512)]
    head = 512 * 2 ** ndim   # the code's 'valid' conv over the 2^d map left of a 128^d input
    expected = sum(conv_parameters(ndim, i, o) for i, o in encoder) + head * (ndim * ndim + ndim)
    assert parameter_count(stem) == expected
    shape = (64,) * ndim if ndim == 2 else (32,) * 3
    W, b = stem(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    assert W.shape == (2, ndim, ndim) and b.shape == (2, ndim)
    near_identity = AffineStem(ndim, width=16, levels=6, init_std=1e-5)
    W, b = near_identity(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    assert W.abs().max() < 1e-3 and b.abs().max() < 1e-3     # init_std: an untrained stem is nearly the identity


def test_the_heads_start_from_tflearns_uniform_scaling_as_the_code():
    # the affine head (the code's 'valid' convolution over the 2^2 x 512 map: n = 2048 inputs) and the dense
    # subnetwork's last layer (a 4 x 4 transposed convolution to 2 channels: n = 16 * 2) are drawn from
    # U(-sqrt(3 / n), sqrt(3 / n)) like every other layer, not from near zero
    stem, flow = AffineStem(2, width=16, levels=6), VTNFlow(2, width=16, levels=6)
    for weight, n in ((stem.matrix.weight, 2048), (stem.translation.weight, 2048), (flow.final.weight, 32)):
        bound = math.sqrt(3 / n)
        assert 0.9 * bound < weight.abs().max() <= bound
    layer = uniform_scaling_init_(torch.nn.Linear(300, 7))
    assert 0.9 * math.sqrt(3 / 300) < layer.weight.abs().max() <= math.sqrt(3 / 300)
    # so an untrained cascade predicts a random field of voxels, as the code's; with the quick recipe's
    # "near_identity" (N(0, 1e-5)) it is nearly the identity
    fixed, moving = smooth((64, 64), 1.0, 20)[:, :1], smooth((64, 64), 1.0, 21)[:, :1]
    official, _ = build(load_method("vtn"), 2, head_init="uniform_scaling")
    near_identity, _ = build(load_method("vtn"), 2)
    with torch.no_grad():
        assert official(fixed, moving).displacement.abs().mean() > 0.5
        assert near_identity(fixed, moving).displacement.abs().max() < 0.05


@pytest.mark.parametrize("recipe_name", ["paper", "quick"])
def test_the_network_runs_on_the_papers_cube(vtn, recipe_name):
    recipe = vtn.recipe(recipe_name)
    assert vtn.working_grid(3, recipe) == WorkingGrid((128, 128, 128))
    assert vtn.working_grid(2, recipe) == WorkingGrid((128, 128))        # the same key in 2D
    assert vtn.working_grid(2, dict(recipe, working_size=0)) is None     # 0: the dataset's grid
    # on a non-cubic, anisotropic dataset grid the network sees the cube, the displacement comes back
    adapter = vtn.grid_adapter((40, 30), (1.0, 2.0), recipe)
    assert adapter.shape == (128, 128) and adapter.spacing == pytest.approx((58 / 127,) * 2)
    # at 128^d the paper's 6 stride-2 levels leave the 2^d map the code's 'valid' affine head needs
    stem = AffineStem(3, width=2, levels=vtn.recipe("paper")["levels"])
    assert stem.encoder(torch.zeros(1, 2, 128, 128, 128))[-1].shape[2:] == (2, 2, 2)
    net, recipe = small(vtn, working_size=32)
    fixed, moving = torch.rand(1, 1, 40, 30), torch.rand(1, 1, 40, 30)
    u = vtn.register_on_dataset_grid(net, fixed, moving, recipe, vtn.grid_adapter((40, 30), (1.0, 2.0), recipe))
    assert u.shape == (1, 2, 40, 30)


def test_uniform_scaling_initialisation_is_tflearns():
    layer = torch.nn.Conv2d(8, 16, 3)
    uniform_scaling_init_(layer)
    bound = math.sqrt(3 / (9 * 8))
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() == 0
    transposed = torch.nn.ConvTranspose2d(8, 4, 4)   # TF kernel [4, 4, out, in]: fan = 16 * out
    uniform_scaling_init_(transposed)
    assert transposed.weight.abs().max() <= math.sqrt(3 / (16 * 4))


@pytest.mark.parametrize("shape", [(64, 80), (37, 50), (176, 176), (20, 24, 18)])
def test_displacement_has_the_fixed_image_shape(vtn, shape):
    ndim = len(shape)
    net, recipe = build(vtn, ndim, **({} if ndim == 2 else {"width": 4, "affine_width": 4, "levels": 3}))
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    u = vtn.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape)
    assert u.abs().max() < 0.05   # an untrained cascade is close to the identity
    terms = vtn.loss_terms(net, {"fixed": fixed, "moving": moving}, recipe)
    assert all(torch.isfinite(value) for _, value in terms.values())


class Fixed(torch.nn.Module):
    """A stage that returns a given field and records its inputs."""

    def __init__(self, field):
        super().__init__()
        self.field, self.inputs = field, []

    def forward(self, fixed, moving):
        self.inputs.append(moving)
        return self.field


class FixedAffine(torch.nn.Module):
    def __init__(self, W, b):
        super().__init__()
        self.W, self.b = W, b

    def forward(self, fixed, moving):
        return self.W, self.b


def smooth(shape, amplitude, seed):
    field = torch.randn(1, len(shape), 5, 5, generator=torch.Generator().manual_seed(seed)) * amplitude
    return torch.nn.functional.interpolate(field, size=shape, mode="bicubic", align_corners=True)


def test_cascade_composes_the_flows_and_warps_the_original_image_once():
    shape = (40, 44)
    image = smooth(shape, 1.0, 0)[:, :1]
    W, b = torch.tensor([[[0.03, -0.05], [0.04, 0.02]]]), torch.tensor([[1.5, -0.7]])
    u1, u2 = smooth(shape, 2.0, 1), smooth(shape, 2.0, 2)
    stages = [Fixed(u1), Fixed(u2)]
    out = CascadeNet(stages, FixedAffine(W, b))(torch.zeros_like(image), image)
    U0 = affine_displacement(W, b, shape)
    U1 = compose_affine(W, U0, u1)                          # u_aff + (I + W) u_1
    U2 = compose_displacements(U1, u2)                      # u_2 + U_1(x + u_2(x))
    for got, expected in zip(out.fields, [U0, U1, U2]):
        torch.testing.assert_close(got, expected)
    assert out.displacement is out.fields[-1] and len(out.flows) == 2
    torch.testing.assert_close(out.flows[0], u1)
    # each stage sees the moving image warped by the composition so far, always from the original image
    for stage, field in zip(stages, [U0, U1]):
        torch.testing.assert_close(stage.inputs[0], warp(image, field, padding_mode="border"))
    torch.testing.assert_close(out.warped[2], warp(image, U2, padding_mode="border"))
    # ... which is warping stage by stage, up to the interpolation the composition saves, away from the border
    stepwise = warp(warp(warp(image, U0, padding_mode="border"), u1, padding_mode="border"), u2, padding_mode="border")
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert (stepwise - out.warped[2])[inner].abs().max() < 0.05 * image.abs().max()


def stage_gradients(net, term):
    net.zero_grad(set_to_none=True)
    term.backward(retain_graph=True)
    norms = {"affine": sum(p.grad.abs().sum().item() for p in net.affine.parameters() if p.grad is not None)}
    for k, stage in enumerate(net.stages, start=1):
        norms[k] = sum(p.grad.abs().sum().item() for p in stage.parameters() if p.grad is not None)
    return norms


def test_loss_terms_are_the_recipes_terms_with_their_weights(vtn):
    net, recipe = small(vtn, n_cascades=3, smoothness_weight=0.5, det_weight=0.2, ortho_weight=0.3,
                        similarity_weight=0.9)
    net.eval()
    batch = {"fixed": smooth((48, 48), 1.0, 3)[:, :1], "moving": smooth((48, 48), 1.0, 4)[:, :1]}
    terms = vtn.loss_terms(net, batch, recipe)
    assert {name: weight for name, (weight, _) in terms.items()} == {
        "similarity_1": 0.9, "similarity_2": 0.9, "similarity_3": 0.9,
        "smoothness_1": 0.5, "smoothness_2": 0.5, "smoothness_3": 0.5, "det": 0.2, "ortho": 0.3}
    out = net(batch["fixed"], batch["moving"])
    for k in (1, 2, 3):   # 1 - CC of every dense stage's output; the regulariser on each stage's own flow
        torch.testing.assert_close(terms[f"similarity_{k}"][1], correlation_loss(batch["fixed"], out.warped[k]))
        torch.testing.assert_close(terms[f"smoothness_{k}"][1], stage_smoothness(out.flows[k - 1]))
        assert terms[f"smoothness_{k}"][1] > 0
    A = affine_matrix(out.W)
    torch.testing.assert_close(terms["det"][1], determinant_loss(A))
    torch.testing.assert_close(terms["ortho"][1], orthogonality_loss(A))
    assert terms["det"][1] > 0 and terms["ortho"][1] > 0
    # the registered displacement is the composed one the last similarity scored
    u = vtn.register(net, batch["fixed"], batch["moving"], recipe)
    torch.testing.assert_close(correlation_loss(batch["fixed"], warp(batch["moving"], u, padding_mode="border")),
                               terms["similarity_3"][1])


def test_gradients_flow_between_cascades_as_the_paper_says(vtn):
    net, recipe = small(vtn)
    batch = {"fixed": smooth((48, 48), 1.0, 5)[:, :1], "moving": smooth((48, 48), 1.0, 6)[:, :1]}
    terms = vtn.loss_terms(net, batch, recipe)
    last = stage_gradients(net, terms["similarity_2"][1])
    assert last["affine"] > 0 and last[1] > 0 and last[2] > 0        # the last output trains every stage
    first = stage_gradients(net, terms["similarity_1"][1])
    assert first["affine"] > 0 and first[1] > 0 and first[2] == 0     # an output trains only the stages before it
    for name in ("det", "ortho"):
        affine_only = stage_gradients(net, terms[name][1])
        assert affine_only["affine"] > 0 and affine_only[1] == 0 and affine_only[2] == 0
    # the second stage's regulariser reaches the first stage and the stem through its warped input ...
    assert min(stage_gradients(net, terms["smoothness_2"][1]).values()) > 0
    # ... unless warp_gradient stops it there; the similarity still reaches them through the composition
    recipe = dict(recipe, warp_gradient=False)
    terms = vtn.loss_terms(net, batch, recipe)
    stopped = stage_gradients(net, terms["smoothness_2"][1])
    assert stopped[2] > 0 and stopped[1] == 0 and stopped["affine"] == 0
    assert min(stage_gradients(net, terms["similarity_2"][1]).values()) > 0


def test_dropping_a_term_changes_the_gradient(vtn):
    batch = {"fixed": smooth((48, 48), 1.0, 7)[:, :1], "moving": smooth((48, 48), 1.0, 8)[:, :1]}

    def gradient(**weights):
        net, recipe = small(vtn, **weights)
        net.eval()
        terms = vtn.loss_terms(net, batch, recipe)
        sum(w * v for w, v in terms.values()).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    full = gradient()
    for key in ("similarity_weight", "smoothness_weight", "det_weight", "ortho_weight"):
        assert not torch.allclose(gradient(**{key: 0.0}), full), key


def test_optional_terms_affine_similarity_and_invertibility(vtn):
    net, recipe = small(vtn, affine_similarity_weight=0.5, inverse_weight=0.25)
    net.eval()
    batch = {"fixed": smooth((40, 40), 1.0, 9)[:, :1], "moving": smooth((40, 40), 1.0, 10)[:, :1]}
    terms = vtn.loss_terms(net, batch, recipe)
    assert terms["similarity_affine"][0] == 0.5 and terms["inverse"][0] == 0.25
    out = net(batch["fixed"], batch["moving"])
    torch.testing.assert_close(terms["similarity_affine"][1], correlation_loss(batch["fixed"], out.warped[0]))
    backward = net(batch["moving"], batch["fixed"])
    torch.testing.assert_close(terms["inverse"][1], invertibility_loss(out.displacement, backward.displacement))
    assert terms["inverse"][1] > 0
    assert "inverse" not in vtn.loss_terms(net, batch, vtn.recipe("quick"))


def test_the_papers_invertibility_scores_the_backward_registration_too(vtn):
    # the paper's variant: the pair registered both ways, the backward direction (moving -> fixed) scored with
    # every term of the forward one, and both round trips penalised
    net, recipe = small(vtn, inverse_weight=0.25, similarity_weight=0.9, smoothness_weight=0.5)
    net.eval()
    batch = {"fixed": smooth((40, 40), 1.0, 13)[:, :1], "moving": smooth((40, 40), 1.0, 14)[:, :1]}
    terms = vtn.loss_terms(net, batch, recipe)
    forward = ["similarity_1", "similarity_2", "smoothness_1", "smoothness_2", "det", "ortho"]
    assert sorted(terms) == sorted(forward + [name + "_backward" for name in forward] + ["inverse"])
    backward = net(batch["moving"], batch["fixed"])
    for k in (1, 2):   # 1 - CC of the backward warped images against the moving image, as the code would score them
        torch.testing.assert_close(terms[f"similarity_{k}_backward"][1],
                                   correlation_loss(batch["moving"], backward.warped[k]))
        torch.testing.assert_close(terms[f"smoothness_{k}_backward"][1], stage_smoothness(backward.flows[k - 1]))
        assert terms[f"similarity_{k}_backward"][0] == 0.9 and terms[f"smoothness_{k}_backward"][0] == 0.5
    torch.testing.assert_close(terms["det_backward"][1], determinant_loss(affine_matrix(backward.W)))
    assert not torch.isclose(terms["similarity_2_backward"][1], terms["similarity_2"][1])
    # without the invertibility loss the pair is registered one way only
    assert not any(name.endswith("_backward") for name in vtn.loss_terms(net, batch, dict(recipe, inverse_weight=0.0)))


def test_invertibility_loss_by_hand():
    t = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(1, 2, 12, 10)
    assert invertibility_loss(t, -t).item() == pytest.approx(0.0, abs=1e-10)   # a shift and its inverse
    # a shift and the identity: both round trips miss by |t|^2 = 6.25
    assert invertibility_loss(t, torch.zeros_like(t)).item() == pytest.approx(2 * 6.25)
    with pytest.raises(ValueError, match="forward"):
        invertibility_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_correlation_loss_by_hand():
    # F = (0, 1, 2, 3): var F = 1.25; M = 2 F + 1: cov 2.5, var M 5, CC = 2.5 / sqrt((1.25 + eps)(5 + eps)), 1 up to eps
    F = torch.arange(4.0).view(1, 1, 2, 2)
    eps = 1e-6
    expected = 1 - 2.5 / math.sqrt((1.25 + eps) * (5 + eps))
    assert correlation_loss(F, 2 * F + 1).item() == pytest.approx(expected, abs=1e-7)
    assert correlation_loss(F, 2 * F + 1).item() == pytest.approx(0.0, abs=1e-6)
    assert correlation_loss(F, 3 - F).item() == pytest.approx(2.0, abs=1e-6)      # anti-correlated
    assert correlation_loss(F, torch.full_like(F, 0.7)).item() == 1.0              # a constant: CC = 0
    # per image, then the batch mean: (0 + 2) / 2
    batch = torch.cat([F, F])
    assert correlation_loss(batch, torch.cat([F, -F])).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        correlation_loss(F, F[..., :1])


def test_stage_smoothness_by_hand():
    n, s = 10, 0.3
    u = torch.zeros(2, 2, n, n)
    u[:, 0] = s * torch.arange(n, dtype=torch.float32).view(n, 1)   # a ramp along axis 0 in channel 0
    # 1/2 sum of squared differences / (|Omega| d) = 1/2 s^2 (n - 1) n / (2 n^2)
    assert stage_smoothness(u).item() == pytest.approx(0.5 * s ** 2 * (n - 1) * n / (2 * n * n))
    assert stage_smoothness(torch.ones(1, 3, 4, 5, 6)).item() == 0.0


def test_random_ffd_is_the_codes_bounded_bspline_field():
    basis = _cubic_bspline_basis(128, 5)
    assert basis.shape == (128, 7)
    torch.testing.assert_close(basis.sum(1), torch.ones(128))      # a partition of unity
    assert (basis >= 0).all() and ((basis > 0).sum(1) <= 4).all()
    field = random_ffd(3, (64, 48), generator=torch.Generator().manual_seed(0))
    assert field.shape == (3, 2, 64, 48)
    # channel k at most 0.4 * (n_k // 4) voxels
    assert field[:, 0].abs().max() <= 0.4 * 16 and field[:, 1].abs().max() <= 0.4 * 12
    assert field[:, 0].abs().max() > 0.5
    again = random_ffd(3, (64, 48), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(field, again)
    assert random_ffd(1, (16, 12, 20)).shape == (1, 3, 16, 12, 20)


def test_augmentation_deforms_the_moving_image_in_training_only(vtn):
    net, recipe = small(vtn, augmentation=0.4)
    batch = {"fixed": smooth((48, 48), 1.0, 11)[:, :1], "moving": smooth((48, 48), 1.0, 12)[:, :1]}
    net.eval()
    reference = vtn.loss_terms(net, batch, recipe)["similarity_2"][1]
    net.train()
    torch.manual_seed(1)
    augmented = vtn.loss_terms(net, batch, recipe)["similarity_2"][1]
    torch.manual_seed(1)
    assert vtn.loss_terms(net, batch, recipe)["similarity_2"][1] == augmented   # reproducible
    assert augmented != reference
    assert vtn.loss_terms(net, batch, dict(recipe, augmentation=0.0))["similarity_2"][1] == reference


def test_short_training_lowers_the_loss_and_beats_identity(vtn, small_embedded2d, tmp_path):
    recipe = vtn.recipe("quick", {"iterations": 250})
    run = short_training(vtn, recipe, small_embedded2d, tmp_path / "run")
    assert run.saved_recipe == recipe and run.summary["iterations"] == 250
    assert run.trained_loss < run.untrained_loss - 0.005, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.03, (run.identity_dice, run.trained_dice)


def test_the_papers_full_method_is_a_recipe_and_the_baseline_says_it_is_not(vtn):
    full = vtn.recipe("paper_invertible")
    assert full["inverse_weight"] > 0 and {k: v for k, v in full.items() if k != "inverse_weight"} == \
        {k: v for k, v in vtn.recipe("paper").items() if k != "inverse_weight"}
    baseline = [d.what for d in vtn.departures("paper")]
    assert any("no invertibility loss" in what for what in baseline)
    assert not any("no invertibility loss" in what for what in (d.what for d in vtn.departures("paper_invertible")))
    assert any("invertibility loss, when on" in d.what for d in vtn.departures("paper_invertible"))
