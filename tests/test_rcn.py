"""RCN: similarity on the final warped image only, regularisation on every cascade, configurable and
repeatable cascades, and a short training that registers."""
import math

import pytest
import torch

from regbench.blocks.affine import affine_matrix, determinant_loss, orthogonality_loss
from regbench.blocks.cascade import CascadeNet, VTNFlow, correlation_loss, stage_smoothness, voxelmorph_flow
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
def rcn():
    return load_method("rcn")


def small(method, ndim=2, **overrides):
    """A small cascade for fast tests: width 4, 3 levels, non-trivial flows."""
    torch.manual_seed(0)
    options = {"width": 4, "affine_width": 4, "levels": 3, **overrides}
    recipe = method.recipe("quick", options)
    net = method.build(ndim, recipe)
    with torch.no_grad():
        for stage in net.stages:
            last = stage.final if isinstance(stage, VTNFlow) else stage.flow
            last.weight.normal_(0, 0.02)
        net.affine.translation.weight.normal_(0, 1e-2)
        net.affine.matrix.weight.normal_(0, 1e-3)
    return net, recipe


def smooth(shape, seed):
    field = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(field, size=shape, mode="bicubic", align_corners=True)


def batch_of(shape=(48, 48), seeds=(1, 2)):
    return {"fixed": smooth(shape, seeds[0]), "moving": smooth(shape, seeds[1])}


def conv_parameters(ndim, channels_in, channels_out, kernel=3):
    return kernel ** ndim * channels_in * channels_out + channels_out


def test_recipes_hold_the_codes_numbers(rcn):
    paper = rcn.recipe("paper")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(rcn.recipe("quick"))
    assert (paper["base_network"], paper["n_cascades"], paper["rep"], paper["test_rep"]) == ("vtn", 10, 1, 1)
    assert (paper["width"], paper["levels"], paper["affine_width"], paper["flow_scale"]) == (16, 6, 16, None)
    assert (paper["similarity_weight"], paper["smoothness_weight"], paper["det_weight"], paper["ortho_weight"]) == \
        (1.0, 1.0, 0.1, 0.1)
    assert (paper["lr"], paper["batch_size"], paper["iterations"], paper["lr_halvings"]) == \
        (1e-4, 4, 100_000, [0.6, 0.8])
    assert (paper["augmentation"], paper["warp_gradient"]) == (0.4, True)
    # the paper's cube, the code's initialisation
    assert (paper["working_size"], paper["head_init"]) == (128, "uniform_scaling")
    quick = rcn.recipe("quick")
    assert (quick["working_size"], quick["head_init"], quick["rep"], quick["test_rep"]) == \
        (128, "near_identity", 1, 1)
    assert [(s.iterations, s.lr, s.lr_decay) for s in rcn.training_stages(small(rcn)[0], paper)] == \
        [(100_000, 1e-4, ([60_000, 80_000], 0.5))]


def test_similarity_is_on_the_final_warped_image_only(rcn):
    net, recipe = small(rcn, n_cascades=3, smoothness_weight=0.5, det_weight=0.2, ortho_weight=0.3)
    net.eval()
    batch = batch_of()
    terms = rcn.loss_terms(net, batch, recipe)
    assert {name: weight for name, (weight, _) in terms.items()} == {
        "similarity": 1.0, "smoothness_1": 0.5, "smoothness_2": 0.5, "smoothness_3": 0.5, "det": 0.2, "ortho": 0.3}
    out = net(batch["fixed"], batch["moving"])
    torch.testing.assert_close(terms["similarity"][1], correlation_loss(batch["fixed"], out.warped[-1]))
    for k in (1, 2, 3):   # each cascade's own flow, not the composed field
        torch.testing.assert_close(terms[f"smoothness_{k}"][1], stage_smoothness(out.flows[k - 1]))
        assert terms[f"smoothness_{k}"][1] > 0
    A = affine_matrix(out.W)
    torch.testing.assert_close(terms["det"][1], determinant_loss(A))
    torch.testing.assert_close(terms["ortho"][1], orthogonality_loss(A))
    # the registered displacement is the one the similarity scored
    u = rcn.register(net, batch["fixed"], batch["moving"], recipe)
    torch.testing.assert_close(terms["similarity"][1],
                               correlation_loss(batch["fixed"], warp(batch["moving"], u, padding_mode="border")))
    # the intermediate outputs are not scored: VTN's loss (every stage) would differ
    vtn_style = sum(correlation_loss(batch["fixed"], w) for w in out.warped[1:])
    assert not torch.isclose(vtn_style, terms["similarity"][1])


def test_dropping_a_term_changes_the_gradient(rcn):
    batch = batch_of(seeds=(5, 6))

    def gradient(**weights):
        net, recipe = small(rcn, n_cascades=2, **weights)
        net.eval()
        terms = rcn.loss_terms(net, batch, recipe)
        sum(w * v for w, v in terms.values()).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    full = gradient()
    for key in ("similarity_weight", "smoothness_weight", "det_weight", "ortho_weight"):
        assert not torch.allclose(gradient(**{key: 0.0}), full), key


def test_the_final_similarity_trains_every_cascade_end_to_end(rcn):
    net, recipe = small(rcn, n_cascades=3)
    terms = rcn.loss_terms(net, batch_of(), recipe)
    terms["similarity"][1].backward()
    for module in [net.affine, *net.stages]:
        assert sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None) > 0


def test_cascades_are_configurable_and_scaled_by_one_over_n(rcn):
    counts = {}
    for n in (1, 2, 4):
        net, _ = small(rcn, n_cascades=n)
        counts[n] = parameter_count(net)
        assert len(net.stages) == n and all(stage.flow_scale == pytest.approx(20.0 / n) for stage in net.stages)
    per_cascade = counts[2] - counts[1]
    assert counts[4] - counts[1] == 3 * per_cascade == 3 * parameter_count(VTNFlow(2, 4, 3))
    net, _ = small(rcn, n_cascades=4, base_network="voxelmorph")
    assert all(stage.flow_scale == pytest.approx(0.25) for stage in net.stages)


def test_voxelmorph_base_is_the_codes_network():
    # encoder 16, 32, 32, 32 (stride 2); decoder 32 at 1/16; 32 at 1/8, 1/4 after the skips; 32, 32 at 1/2;
    # 16, 16 at full size after concatenating the input; flow 16 -> 2 from N(0, 1e-5)
    layers = [(2, 16), (16, 32), (32, 32), (32, 32), (32, 32), (64, 32), (64, 32), (48, 32), (32, 32), (34, 16),
              (16, 16), (16, 2)]
    net = voxelmorph_flow(2, width=16, flow_scale=0.5)
    assert parameter_count(net) == sum(conv_parameters(2, i, o) for i, o in layers)
    assert net.flow.weight.std().item() == pytest.approx(1e-5, rel=0.2)
    u = net(torch.rand(1, 1, 48, 64), torch.rand(1, 1, 48, 64))
    assert u.shape == (1, 2, 48, 64) and u.abs().max() < 1e-3


class Fixed(torch.nn.Module):
    def __init__(self, field):
        super().__init__()
        self.field, self.calls = field, 0

    def forward(self, fixed, moving):
        self.calls += 1
        return self.field


def test_shared_weight_repetition_composes_each_cascade_again():
    field = 1.5 * smooth((32, 36), 3).expand(1, 2, 32, 36).clone()
    stages = [Fixed(field), Fixed(-0.5 * field)]
    net = CascadeNet(stages)
    out = net(torch.zeros(1, 1, 32, 36), smooth((32, 36), 4), rep=2)
    assert [stage.calls for stage in stages] == [2, 2] and len(out.flows) == 4
    expected = field
    for u in (field, -0.5 * field, -0.5 * field):   # each cascade twice in a row: a a b b
        expected = compose_displacements(expected, u)
    torch.testing.assert_close(out.displacement, expected)


def test_training_repetition_scores_every_repeat_of_the_last_cascade_as_the_code(rcn):
    # n = 2 cascades, rep = 2: stages a a b b (warped images M_1 ... M_4). The code's repeats of a cascade share
    # one loss entry, and the last cascade's scores the similarity: M_3 and M_4, not M_1 and M_2.
    net, recipe = small(rcn, n_cascades=2, rep=2, similarity_weight=0.7)
    net.eval()
    batch = batch_of()
    terms = rcn.loss_terms(net, batch, recipe)
    assert sorted(name for name in terms if name.startswith("smoothness")) == [f"smoothness_{k}" for k in range(1, 5)]
    assert sorted(name for name in terms if name.startswith("similarity")) == ["similarity_3", "similarity_4"]
    out = net(batch["fixed"], batch["moving"], rep=2)
    for k in (3, 4):
        assert terms[f"similarity_{k}"][0] == 0.7
        torch.testing.assert_close(terms[f"similarity_{k}"][1], correlation_loss(batch["fixed"], out.warped[k]))
    assert not torch.isclose(terms["similarity_3"][1], terms["similarity_4"][1])
    # the first repeat's similarity trains the last cascade through M_3 (and the first, through the composition)
    net.zero_grad(set_to_none=True)
    terms["similarity_3"][1].backward()
    assert all(sum(p.grad.abs().sum() for p in stage.parameters()) > 0 for stage in net.stages)
    # rep = 1 (the paper): one similarity, on the final image
    assert [name for name in rcn.loss_terms(net, batch, dict(recipe, rep=1)) if name.startswith("similarity")] == \
        ["similarity"]


def test_test_time_repetition(rcn):
    batch = batch_of()
    # at test time: more cascades from the same weights, no new parameters
    net, recipe = small(rcn, n_cascades=2)
    once = rcn.register(net, batch["fixed"], batch["moving"], recipe)
    twice = rcn.register(net, batch["fixed"], batch["moving"], dict(recipe, test_rep=2))
    torch.testing.assert_close(twice, net(batch["fixed"], batch["moving"], rep=2).displacement)
    assert not torch.allclose(once, twice)
    assert parameter_count(small(rcn, n_cascades=2, test_rep=3)[0]) == parameter_count(net)
    with pytest.raises(ValueError, match="rep"):
        net(batch["fixed"], batch["moving"], rep=0)


@pytest.mark.parametrize("recipe_name", ["paper", "quick"])
def test_the_network_runs_on_the_papers_cube(rcn, recipe_name):
    recipe = rcn.recipe(recipe_name)
    assert rcn.working_grid(3, recipe) == WorkingGrid((128, 128, 128))
    assert rcn.working_grid(2, recipe) == WorkingGrid((128, 128))        # the same key in 2D
    assert rcn.working_grid(2, dict(recipe, working_size=0)) is None     # 0: the dataset's grid
    net, recipe = small(rcn, n_cascades=2, working_size=32)
    adapter = rcn.grid_adapter((40, 30), (1.0, 2.0), recipe)
    assert adapter.shape == (32, 32)
    u = rcn.register_on_dataset_grid(net, torch.rand(1, 1, 40, 30), torch.rand(1, 1, 40, 30), recipe, adapter)
    assert u.shape == (1, 2, 40, 30)


def test_the_heads_start_from_tflearns_uniform_scaling_as_the_code(rcn):
    torch.manual_seed(0)
    official = rcn.build(2, rcn.recipe("quick", {"head_init": "uniform_scaling"}))
    bound = math.sqrt(3 / official.affine.matrix.in_features)
    assert 0.9 * bound < official.affine.matrix.weight.abs().max() <= bound
    assert official.stages[0].final.weight.abs().max() > 0.9 * math.sqrt(3 / (16 * 2))
    near_identity = rcn.build(2, rcn.recipe("quick"))
    assert near_identity.affine.matrix.weight.abs().max() < 1e-4 and near_identity.stages[0].final.weight.std() < 1e-4
    with pytest.raises(ValueError, match="head_init"):
        rcn.build(2, rcn.recipe("quick", {"head_init": "zeros"}))


@pytest.mark.parametrize("base_network", ["vtn", "voxelmorph"])
@pytest.mark.parametrize("shape", [(37, 50), (24, 20, 16)])
def test_2d_and_3d_through_the_same_code(rcn, base_network, shape):
    ndim = len(shape)
    net, recipe = small(rcn, ndim, base_network=base_network, n_cascades=2)
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    u = rcn.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape)
    terms = rcn.loss_terms(net, {"fixed": fixed, "moving": moving}, recipe)
    assert all(torch.isfinite(value) for _, value in terms.values())


def test_short_training_lowers_the_loss_and_beats_identity(rcn, small_embedded2d, tmp_path):
    recipe = rcn.recipe("quick", {"iterations": 300})
    run = short_training(rcn, recipe, small_embedded2d, tmp_path / "run")
    assert run.saved_recipe == recipe and run.summary["iterations"] == 300
    assert run.trained_loss < run.untrained_loss - 0.005, (run.untrained_loss, run.trained_loss)
    assert run.trained_dice > run.identity_dice + 0.03, (run.identity_dice, run.trained_dice)
