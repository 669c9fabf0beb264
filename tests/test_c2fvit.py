"""C2FViT: the official network's layers, the decoupled affine, every recipe term, learning a known affine, and the
workflow's training path."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regbench import WorkingGrid
from regbench.blocks.decoupled_affine import (affine_warp, center_of_mass, center_of_mass_translation,
                                              decode_parameters, decoupled_affine_matrix, matrix_to_displacement,
                                              parameter_count, rotation_matrix)
from regbench.blocks.losses import local_ncc, multiscale_local_ncc, one_hot, soft_dice_loss
from regbench.blocks.spatial import identity_grid, warp
from regbench.blocks.transformer import Attention, ConvPatchEmbedding, FeedForward, tokens_to_grid
from regbench.data.prepared import PreparedDataset
from regbench.method import TRAINING_KEYS, parameter_count as network_parameters
from regbench.plugins import load_dataset, load_method
from regbench.training.loop import adam, optimiser_step, weighted_loss
from short_training import short_training, test_pairs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def c2fvit():
    return load_method("c2fvit")


def build(method, ndim, which="quick", **overrides):
    torch.manual_seed(0)
    recipe = method.recipe(which, overrides)
    return method.build(ndim, recipe), recipe


def identity_heads(net):
    """Zero the last layer of every affine head: theta = 0, each stage's affine the identity."""
    with torch.no_grad():
        for head in net.heads:
            head[2].weight.zero_()


def blob(shape, centre, radius):
    """A soft ball of intensity 1 (``1 x 1 x *shape``)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    distance = (grid - torch.tensor(centre, dtype=torch.float32).view(-1, *([1] * len(shape)))).norm(dim=0)
    return torch.sigmoid(radius - distance)[None, None]


# ---------------------------------------------------------------- recipes and network


def test_recipes_hold_the_papers_numbers(c2fvit):
    paper, quick = c2fvit.recipe("paper"), c2fvit.recipe("quick")
    assert set(TRAINING_KEYS) <= set(paper) and set(paper) == set(quick)
    assert (paper["levels"], paper["patch_kernels"], paper["patch_strides"]) == (3, [3, 7, 15], [2, 4, 8])
    assert (paper["width"], paper["depth"], paper["heads"], paper["mlp_ratio"]) == (256, 4, 2, 2.0)
    assert (paper["qkv_bias"], paper["norm"], paper["com_init"]) == (False, "identity", True)
    assert paper["working_size"] == 128
    assert (paper["translation_range"], paper["rotation_range"]) == (1.0, math.pi)
    assert (paper["shear_range"], paper["scaling_range"]) == (math.pi, 0.5)
    assert (paper["supervision"], paper["ncc_windows"], paper["ncc_weights"]) == ("final_multiscale", [7, 5, 3],
                                                                                  [1.0, 0.5, 0.25])
    assert (paper["ncc_eps"], paper["dice_weight"]) == (1e-5, 0.0)
    assert (paper["lr"], paper["batch_size"], paper["iterations"]) == (1e-4, 1, 160_000)
    assert paper["augment_affine"] == 0.0
    # the quick recipe shrinks the grid, the network and the budget and adds the blocks' LayerNorm, never changes
    # the loss
    for key in ("supervision", "ncc_windows", "ncc_weights", "ncc_eps", "dice_weight", "patch_kernels",
                "patch_strides", "levels", "heads", "mlp_ratio", "qkv_bias", "com_init",
                "translation_range", "rotation_range", "shear_range", "scaling_range", "augment_affine"):
        assert quick[key] == paper[key], key
    assert (quick["width"], quick["depth"], quick["norm"], quick["working_size"]) == (32, 2, "layernorm", 88)
    # the quick recipe's LayerNorm is listed among the deviations, for the quick recipe only
    norms = [d for d in c2fvit.deviations if "LayerNorm" in d.what]
    assert len(norms) == 1 and norms[0].recipes == ("quick",) and norms[0].changes_results
    # the paper's model selection: the best checkpoint on validation, in both recipes
    assert paper["model_selection"] == quick["model_selection"] == "val_dice"
    assert paper["checkpoint_every"] == 1000


def test_paper_network_has_the_official_layers(c2fvit):
    # C2F_ViT_stage(embed_dims=256, depths=4, heads=2, mlp_ratio=2, 12 outputs), 3D, counted layer by layer
    width, hidden = 256, 512
    block = (width * width                    # q, no bias
             + width * 2 * width              # kv, no bias
             + width * width + width          # proj
             + width * hidden + hidden        # fc1
             + hidden * 27                    # depth-wise 3^3, no bias
             + hidden * width + width)        # fc2
    head = width * 128 + 128 * 12             # no biases
    embeddings = sum(2 * width * k ** 3 + width for k in (3, 7, 15))
    squeezes = 2 * (width * width * 27 + width)
    expected = embeddings + 3 * (4 * block + head) + squeezes
    net = c2fvit.build(3, c2fvit.recipe("paper"))
    assert network_parameters(net) == expected
    # 2D: the same layers with 2D kernels and 6 outputs
    net2d = c2fvit.build(2, c2fvit.recipe("paper"))
    block2d = block - hidden * 27 + hidden * 9
    expected2d = (sum(2 * width * k ** 2 + width for k in (3, 7, 15)) + 3 * (4 * block2d + width * 128 + 128 * 6)
                  + 2 * (width * width * 9 + width))
    assert network_parameters(net2d) == expected2d


@pytest.mark.parametrize("ndim, size, tokens", [(3, 128, 16), (2, 88, 11)])
def test_every_stage_sees_the_same_token_grid(c2fvit, ndim, size, tokens):
    # 128^3 input: pyramid 32/64/128, kernels 3/7/15, strides 2/4/8 -> 16^3 tokens at every stage
    recipe = c2fvit.recipe("paper")
    for level, (k, s) in enumerate(zip(recipe["patch_kernels"], recipe["patch_strides"])):
        embed = ConvPatchEmbedding(ndim, 2, 8, k, s)
        level_size = size // 2 ** (2 - level)
        tokens_out, shape = embed(torch.zeros(1, 2, *([level_size] * ndim)))
        assert shape == (tokens,) * ndim and tokens_out.shape == (1, tokens ** ndim, 8)


def test_attention_is_scaled_dot_product_over_all_tokens():
    torch.manual_seed(0)
    attention = Attention(2, dim=8, heads=2)
    x = torch.randn(2, 12, 8)
    q = attention.q(x).reshape(2, 12, 2, 4).transpose(1, 2)
    k, v = attention.kv(x).reshape(2, 12, 2, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 12, 8))
    torch.testing.assert_close(attention(x, (3, 4)), expected)
    assert attention.q.bias is None and attention.kv.bias is None  # qkv_bias=False


def test_feed_forward_has_a_depthwise_conv_between_two_gelus():
    torch.manual_seed(0)
    mlp = FeedForward(2, dim=4, hidden=8)
    x = torch.randn(1, 12, 4)
    hidden = F.gelu(mlp.fc1(x))
    conv = F.conv2d(tokens_to_grid(hidden, (3, 4)), mlp.dwconv.weight, padding=1, groups=8)
    expected = mlp.fc2(F.gelu(conv.flatten(2).transpose(1, 2)))
    torch.testing.assert_close(mlp(x, (3, 4)), expected)
    assert mlp.dwconv.weight.shape == (8, 1, 3, 3) and mlp.dwconv.bias is None


# ---------------------------------------------------------------- decoupled affine


@pytest.mark.parametrize("ndim", [2, 3])
def test_zero_parameters_give_the_identity(ndim):
    theta = torch.zeros(3, parameter_count(ndim))
    center = torch.rand(3, ndim) - 0.5
    matrix = decoupled_affine_matrix(theta, center)
    torch.testing.assert_close(matrix, torch.eye(ndim + 1).expand(3, -1, -1))
    shape = (9, 11, 7)[:ndim]
    assert matrix_to_displacement(matrix, shape).abs().max() < 1e-6


def test_parameter_count_and_order():
    assert (parameter_count(2), parameter_count(3)) == (6, 12)
    theta = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    params = decode_parameters(theta)  # (t_x, t_y, r, sh_xy, s_x, s_y)
    torch.testing.assert_close(params["translation"], torch.tensor([[0.1, 0.2]]))
    torch.testing.assert_close(params["rotation"], torch.tensor([[0.3 * math.pi]]))
    torch.testing.assert_close(params["shear"], torch.tensor([[0.4 * math.pi]]))
    torch.testing.assert_close(params["scaling"], torch.tensor([[1.25, 1.3]]))


def test_a_rotation_parameter_gives_a_rotation_about_the_center():
    angle = 0.25  # theta, times pi: 45 degrees
    theta = torch.tensor([[0.0, 0.0, angle, 0.0, 0.0, 0.0]])
    center = torch.tensor([[0.2, -0.3]])
    matrix = decoupled_affine_matrix(theta, center)[0]
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    torch.testing.assert_close(matrix[:2, :2], torch.tensor([[c, -s], [s, c]]))
    assert torch.linalg.det(matrix[:2, :2]).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(matrix[:2, :2] @ center[0] + matrix[:2, 2], center[0])  # the centre stays put


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_3d_rotation_parameter_is_a_rotation_about_its_axis(axis):
    theta = torch.zeros(1, 12)
    theta[0, 3 + axis] = 0.3
    linear = decoupled_affine_matrix(theta)[0, :3, :3]
    torch.testing.assert_close(linear @ linear.T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.linalg.det(linear).item() == pytest.approx(1.0, abs=1e-6)
    unit = torch.eye(3)[axis]
    torch.testing.assert_close(linear @ unit, unit)  # the axis is fixed
    assert linear.trace().item() == pytest.approx(1 + 2 * math.cos(0.3 * math.pi), abs=1e-6)
    # all three together: R = Rz Ry Rx, still a rotation
    angles = torch.tensor([[0.3, -0.7, 1.1]])
    rotation = rotation_matrix(angles)[0]
    per_axis = [rotation_matrix(angles * torch.eye(3)[i])[0] for i in range(3)]
    torch.testing.assert_close(rotation, per_axis[2] @ per_axis[1] @ per_axis[0])
    assert torch.linalg.det(rotation).item() == pytest.approx(1.0, abs=1e-6)


def test_3d_shears_fill_the_upper_triangle_row_major_and_scales_the_diagonal():
    theta = torch.zeros(1, 12)
    theta[0, 6:9] = torch.tensor([0.1, -0.2, 0.05])   # shears (0, 1), (0, 2), (1, 2), times pi
    theta[0, 9:12] = torch.tensor([1.0, -0.5, 0.2])   # scales 1 + 0.5 theta
    linear = decoupled_affine_matrix(theta)[0, :3, :3]
    a, b, c = 0.1 * math.pi, -0.2 * math.pi, 0.05 * math.pi
    expected = torch.tensor([[1.0, a, b], [0.0, 1.0, c], [0.0, 0.0, 1.0]]) @ torch.diag(torch.tensor([1.5, 0.75, 1.1]))
    torch.testing.assert_close(linear, expected)


def test_composition_order_is_center_shear_scale_rotation_center_translation():
    # A = C+ Sh S R C- T with a hand-made case: rotation 90 degrees, scales (2, 0.5), shear 0.3, t = (0.1, -0.2)
    theta = torch.tensor([[0.1, -0.2, 0.5, 0.3 / math.pi, 1.0, -1.0]])
    center = torch.tensor([[0.4, 0.1]])
    matrix = decoupled_affine_matrix(theta, center)[0]
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    scale = torch.diag(torch.tensor([1.5, 0.5]))
    shear = torch.tensor([[1.0, 0.3], [0.0, 1.0]])
    point = torch.tensor([0.3, -0.6])
    expected = center[0] + shear @ scale @ rotation @ (point + torch.tensor([0.1, -0.2]) - center[0])
    torch.testing.assert_close(matrix[:2, :2] @ point + matrix[:2, 2], expected, atol=1e-6, rtol=0)


def test_tanh_head_keeps_every_parameter_in_its_range(c2fvit):
    net, recipe = build(c2fvit, 2, width=16, depth=1)
    with torch.no_grad():
        for head in net.heads:
            head[2].weight.mul_(1e8)  # a saturated head
    out = net(torch.rand(4, 1, 64, 64), torch.rand(4, 1, 64, 64))
    for theta in out.parameters:
        assert theta.abs().max() <= 1.0 and theta.abs().max() > 0.99
        params = decode_parameters(theta)
        assert params["translation"].abs().max() <= 1.0
        assert params["rotation"].abs().max() <= math.pi and params["shear"].abs().max() <= math.pi
        assert params["scaling"].min() >= 0.5 and params["scaling"].max() <= 1.5
    extremes = decode_parameters(torch.tensor([[1.0] * 6, [-1.0] * 6]))
    torch.testing.assert_close(extremes["scaling"], torch.tensor([[1.5, 1.5], [0.5, 0.5]]))
    torch.testing.assert_close(extremes["rotation"], torch.tensor([[math.pi], [-math.pi]]))
    # ranges are recipe keys
    narrow = decode_parameters(torch.ones(1, 6), rotation_range=0.1, scaling_range=0.2)
    assert narrow["rotation"].item() == pytest.approx(0.1) and narrow["scaling"].max().item() == pytest.approx(1.2)


@pytest.mark.parametrize("shape", [(37, 50), (9, 11, 13)])
def test_matrix_displacement_warps_as_affine_grid_does(shape):
    torch.manual_seed(0)
    ndim = len(shape)
    theta = 0.3 * (2 * torch.rand(2, parameter_count(ndim)) - 1)
    image = torch.rand(2, 1, *shape)
    matrix = decoupled_affine_matrix(theta, center_of_mass(image))
    u = matrix_to_displacement(matrix, shape)
    assert u.shape == (2, ndim, *shape)
    torch.testing.assert_close(warp(image, u), affine_warp(image, matrix), atol=1e-4, rtol=0)
    # a translation of 1 (normalised) along x is half the field of view along the last array axis
    theta = torch.zeros(1, parameter_count(ndim))
    theta[0, 0] = 1.0
    u = matrix_to_displacement(decoupled_affine_matrix(theta), shape)
    assert torch.allclose(u[0, -1], torch.tensor((shape[-1] - 1) / 2)) and u[0, :-1].abs().max() == 0


def test_center_of_mass_and_its_initialisation():
    shape = (40, 48)
    image = torch.zeros(1, 1, *shape)
    image[0, 0, 10, 36] = 2.0
    # normalised xyz: x along the last axis, -1 at voxel 0, +1 at voxel S-1
    torch.testing.assert_close(center_of_mass(image), torch.tensor([[36 / 47 * 2 - 1, 10 / 39 * 2 - 1]]))
    assert center_of_mass(torch.zeros(1, 1, *shape)).abs().max() == 0  # no mass: the grid centre
    fixed, moving = blob(shape, (18, 20), 6.0), blob(shape, (22, 26), 6.0)
    moved = affine_warp(moving, center_of_mass_translation(moving, fixed))
    torch.testing.assert_close(center_of_mass(moved), center_of_mass(fixed), atol=1e-3, rtol=0)
    assert (moved - fixed).abs().max() < 0.01


# ---------------------------------------------------------------- the working grid: the official isotropic cube


class FixedParameters(nn.Module):
    """An affine head that gives every pair the same ``theta`` (``1 x P``)."""

    def __init__(self, theta):
        super().__init__()
        self.theta = theta

    def forward(self, tokens):
        return self.theta.expand(tokens.shape[0], -1)


def dataset_positions_mm(u, spacing) -> tuple[torch.Tensor, torch.Tensor]:
    """Every voxel centre of the dataset's grid and where ``u`` (``1 x d x *shape``, voxels) maps it, in mm
    (``N x d`` each, float64): ``x * spacing`` and ``(x + u(x)) * spacing``."""
    shape = u.shape[2:]
    mm = torch.tensor(spacing, dtype=torch.float64).view(-1, *([1] * len(shape)))
    grid = identity_grid(shape, dtype=torch.float64)
    before, after = grid * mm, (grid + u[0].double()) * mm
    return before.flatten(1).T, after.flatten(1).T


def least_squares_affine(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine that maps the points ``before`` nearest to ``after`` (``N x d`` each), by least squares: its
    ``(d + 1) x d`` solution (the linear part's transpose over the translation) and the residual, ``N x d``."""
    design = torch.cat([before, torch.ones(before.shape[0], 1, dtype=before.dtype)], 1)
    solution = torch.linalg.lstsq(design, after).solution
    return solution, after - design @ solution


def test_the_working_grid_is_the_official_isotropic_cube(c2fvit):
    # the official pipeline shrinks 256^3 volumes to 128^3; the same key gives 128^2 in 2D, 88^2 in the quick recipe
    for ndim in (2, 3):
        assert c2fvit.working_grid(ndim, c2fvit.recipe("paper")) == WorkingGrid((128,) * ndim)
        assert c2fvit.working_grid(ndim, c2fvit.recipe("quick")) == WorkingGrid((88,) * ndim)
        assert c2fvit.working_grid(ndim, c2fvit.recipe("paper", {"working_size": 0})) is None
    # OASIS, 160 x 192 x 224 at 1 mm: the longest axis spans the cube, in voxels of 223/127 mm
    adapter = c2fvit.grid_adapter((160, 192, 224), (1.0, 1.0, 1.0), c2fvit.recipe("paper"))
    assert adapter.shape == (128, 128, 128) and adapter.spacing == pytest.approx((223 / 127,) * 3)
    # embedded2d, 176 x 176 at 1 mm: the quick recipe's network sees the image shrunk x0.5 (175/87 mm voxels)
    adapter = c2fvit.grid_adapter((176, 176), (1.0, 1.0), c2fvit.recipe("quick"))
    image = torch.rand(1, 1, 176, 176)
    shrunk = F.interpolate(image, scale_factor=0.5, mode="bilinear", align_corners=True)
    torch.testing.assert_close(adapter.image(image), shrunk, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ndim, which, overrides", [(2, "paper", {}), (2, "quick", {}),
                                                    (3, "quick", {"working_size": 32})])
def test_a_decoded_rotation_is_rigid_in_mm_on_a_non_cubic_anisotropic_grid(c2fvit, ndim, which, overrides):
    # a pure rotation from the last stage's head, registered through the method's grid adapter onto the dataset's
    # grid: every distance between voxel centres is kept in mm, and the map's trace is the rotation's
    shape, spacing = ((60, 36), (1.0, 2.5)) if ndim == 2 else ((30, 20, 24), (1.2, 2.0, 1.5))
    net, recipe = build(c2fvit, ndim, which, width=16, depth=1, **overrides)
    theta = torch.zeros(1, parameter_count(ndim))
    angles = torch.tensor([[1 / 6]]) if ndim == 2 else torch.tensor([[0.1, -0.15, 0.2]])   # times pi
    theta[:, ndim:ndim + angles.shape[1]] = angles
    net.heads[-1] = FixedParameters(theta)
    centres = [tuple(0.45 * n for n in shape), tuple(0.55 * n for n in shape)]
    fixed, moving = (blob(shape, centre, min(shape) / 4) for centre in centres)
    adapter = c2fvit.grid_adapter(shape, spacing, recipe)
    u = c2fvit.register_on_dataset_grid(net, fixed, moving, recipe, adapter)
    assert u.shape == (1, ndim, *shape)
    before, after = dataset_positions_mm(u, spacing)
    sample = torch.randperm(before.shape[0], generator=torch.Generator().manual_seed(0))[:600]
    distances_before = torch.cdist(before[sample], before[sample])
    distances_after = torch.cdist(after[sample], after[sample])
    assert distances_before.max() > 50
    assert (distances_after - distances_before).abs().max() < 2e-3   # mm; rotating the normalised square: 19 mm
    # the map p -> p + u(p) in mm, fitted by least squares: a rotation of the decoded angles
    linear = least_squares_affine(before, after)[0][:ndim].T
    torch.testing.assert_close(linear @ linear.T, torch.eye(ndim, dtype=torch.float64), atol=1e-4, rtol=0)
    rotation = rotation_matrix(math.pi * angles.double())[0]
    assert linear.trace().item() == pytest.approx(rotation.trace().item(), abs=1e-4)


def test_a_translation_parameter_is_one_length_in_mm_along_every_axis(c2fvit):
    # 59 x 87.5 mm on 1 x 2.5 mm voxels: the fitted cube's side is 87.5 mm, so a translation of 0.5 is 21.875 mm
    # along both axes (on the dataset's grid, normalised units would make it 14.75 mm along axis 0)
    shape, spacing = (60, 36), (1.0, 2.5)
    net, recipe = build(c2fvit, 2, width=16, depth=1, com_init=False)
    net.heads[-1] = FixedParameters(torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0]]))
    fixed, moving = blob(shape, (30, 18), 12.0), blob(shape, (28, 20), 12.0)
    u = c2fvit.register_on_dataset_grid(net, fixed, moving, recipe, c2fvit.grid_adapter(shape, spacing, recipe))
    before, after = dataset_positions_mm(u, spacing)
    torch.testing.assert_close(after - before, torch.full_like(before, 0.5 * 87.5 / 2), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the network's flow


def test_progressive_transformation_and_final_output(c2fvit):
    torch.manual_seed(2)
    net, recipe = build(c2fvit, 2, width=16, depth=1)
    with torch.no_grad():
        for head in net.heads:
            head[2].weight.normal_(0, 0.3)  # stages predict visibly different affines
    inputs = []
    hook = net.embeddings[1].register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    moving, fixed = blob((64, 64), (30, 34), 12.0) * torch.rand(1, 1, 64, 64), blob((64, 64), (32, 30), 12.0)
    out = net(moving, fixed)
    hook.remove()
    # network input: the CoM-initialised moving image (on the working grid already), pyramid 16/32/64 coarse first
    assert [m.shape[-1] for m in out.moving] == [16, 32, 64] and [f.shape[-1] for f in out.fixed] == [16, 32, 64]
    initial = center_of_mass_translation(moving, fixed)
    torch.testing.assert_close(out.moving[-1], affine_warp(moving, initial))
    # stage 1's affine (about the CoM of what it warps) warps the level-2 moving image: stage 2's input
    expected = decoupled_affine_matrix(out.parameters[0], center_of_mass(out.moving[1]))
    torch.testing.assert_close(out.stage_matrices[0], expected)
    torch.testing.assert_close(inputs[0][:, :1], affine_warp(out.moving[1], out.stage_matrices[0]))
    torch.testing.assert_close(inputs[0][:, 1:], out.fixed[1])
    # the output is the last stage's affine alone (not a product over stages), after the CoM translation, about
    # the CoM of the CoM-initialised moving image
    last = decoupled_affine_matrix(out.parameters[-1], center_of_mass(affine_warp(moving, initial)))
    torch.testing.assert_close(out.matrix, initial @ last)
    torch.testing.assert_close(out.matrix, initial @ out.stage_matrices[-1])
    torch.testing.assert_close(out.warped, affine_warp(out.moving[-1], out.stage_matrices[-1]))
    assert not torch.allclose(out.stage_matrices[0], out.stage_matrices[-1], atol=1e-3)
    u = c2fvit.register(net, fixed, moving, recipe)
    torch.testing.assert_close(u, matrix_to_displacement(out.matrix, (64, 64)))


@pytest.mark.parametrize("shape", [(64, 80), (37, 50), (32, 32, 24)])
def test_displacement_has_the_fixed_image_shape_in_2d_and_3d(c2fvit, shape):
    ndim = len(shape)
    net, recipe = build(c2fvit, ndim, width=16, depth=1)
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    u = c2fvit.register(net, fixed, moving, recipe)
    assert u.shape == (2, ndim, *shape) and torch.isfinite(u).all()
    terms = c2fvit.loss_terms(net, {"fixed": fixed, "moving": moving}, recipe)
    assert all(torch.isfinite(value) for _, value in terms.values())


def test_pairs_of_a_batch_are_registered_independently(c2fvit):
    # the official code decodes batch element 0 only and pools one CoM over the batch; here each pair is its own
    net, recipe = build(c2fvit, 2, width=16, depth=1)
    with torch.no_grad():
        for head in net.heads:
            head[2].weight.normal_(0, 0.3)
    fixed = torch.cat([blob((48, 48), (20, 24), 10.0), blob((48, 48), (26, 22), 8.0)])
    moving = torch.cat([blob((48, 48), (24, 20), 9.0), blob((48, 48), (20, 28), 11.0)])
    together = c2fvit.register(net, fixed, moving, recipe)
    alone = torch.cat([c2fvit.register(net, fixed[i:i + 1], moving[i:i + 1], recipe) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_center_of_mass_initialisation_registers_a_translation(c2fvit):
    net, recipe = build(c2fvit, 2, width=16, depth=1)
    identity_heads(net)
    fixed, moving = blob((64, 64), (30, 28), 10.0), blob((64, 64), (36, 24), 10.0)
    u = c2fvit.register(net, fixed, moving, recipe)
    torch.testing.assert_close(u.mean(dim=(2, 3))[0], torch.tensor([6.0, -4.0]), atol=0.05, rtol=0)
    assert (warp(moving, u) - fixed).abs().max() < 0.02
    net_off, recipe_off = build(c2fvit, 2, width=16, depth=1, com_init=False)
    identity_heads(net_off)
    assert c2fvit.register(net_off, fixed, moving, recipe_off).abs().max() < 1e-5


# ---------------------------------------------------------------- loss terms, each on a case computed by hand


def test_multiscale_ncc_by_hand():
    # 1D, windows (3, 3), weights (1, 1/2), eps 0. Scale 0, window 3 with zero padding, N = 3: at each voxel
    # cross = S(IJ) - S(I)S(J)/3, var = S(I^2) - S(I)^2/3, cc = cross^2 / (var_I var_J):
    #   I = [1, 2, 3, 4], J = [0, 1, 5, 2] -> cc = 3/4, 25/28, 3/52, 100/247
    # D halves by a 3-average (stride 2, padding not counted): I -> [(1+2)/2, (2+3+4)/3] = [3/2, 3],
    #   J -> [1/2, 8/3]; both windows hold (0, 3/2, 3) and (0, 1/2, 8/3): cross = 4, var_I = 9/2,
    #   var_J = 217/54 -> cc = 1728/1953 at both voxels
    fixed = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    warped = torch.tensor([[[0.0, 1.0, 5.0, 2.0]]], dtype=torch.float64)
    scale0 = (3 / 4 + 25 / 28 + 3 / 52 + 100 / 247) / 4
    scale1 = 1728 / 1953
    loss = multiscale_local_ncc(fixed, warped, windows=(3, 3), weights=(1.0, 0.5), eps=0.0)
    assert loss.item() == pytest.approx(-(scale0 + 0.5 * scale1), abs=1e-12)
    # default: windows 7/5/3, weights 1, 1/2, 1/4; identical images with variance in every window
    # correlate perfectly at every scale: -(1 + 1/2 + 1/4)
    torch.manual_seed(0)
    image = 20 * torch.rand(2, 1, 64, 64)  # variance large against eps in every window
    assert multiscale_local_ncc(image, image).item() == pytest.approx(-1.75, abs=1e-3)
    assert multiscale_local_ncc(image, image, weights=(1.0, 0.0, 0.0)).item() == pytest.approx(-1.0, abs=1e-3)
    # against a blank image (no variance in any window, the zero padding included) every covariance is 0
    assert multiscale_local_ncc(image, torch.zeros_like(image)).item() == 0.0
    with pytest.raises(ValueError, match="same length"):
        multiscale_local_ncc(image, image, windows=(7, 5, 3), weights=(1.0, 0.5))


def test_dice_term_by_hand(c2fvit):
    # identity network, no CoM shift: the Dice of the two label maps as they are
    net, recipe = build(c2fvit, 2, width=16, depth=1, com_init=False, dice_weight=0.5)
    identity_heads(net)
    fixed_seg = torch.zeros(1, 1, 32, 32, dtype=torch.int64)
    moving_seg = torch.zeros_like(fixed_seg)
    fixed_seg[..., 4:12, 4:14] = 3      # 80 voxels
    moving_seg[..., 6:12, 4:14] = 3     # 60 voxels, all inside: Dice 120 / 140
    fixed_seg[..., 20:30, 20:30] = 7    # 100 voxels
    moving_seg[..., 25:30, 20:24] = 7   # 20 voxels, all inside: Dice 40 / 120
    batch = {"fixed": torch.rand(1, 1, 32, 32), "moving": torch.rand(1, 1, 32, 32), "fixed_seg": fixed_seg,
             "moving_seg": moving_seg, "labels": torch.tensor([3, 7])}
    terms = c2fvit.loss_terms(net, batch, recipe)
    assert terms["dice"][0] == 0.5
    assert terms["dice"][1].item() == pytest.approx(-(120 / 140 + 40 / 120) / 2, abs=1e-5)


def test_similarity_by_hand(c2fvit):
    # identity network, no CoM shift, moving = fixed: -(1 + 1/2 + 1/4) on the x0.5 images
    net, recipe = build(c2fvit, 2, width=16, depth=1, com_init=False)
    identity_heads(net)
    image = 20 * torch.rand(1, 1, 128, 128)
    terms = c2fvit.loss_terms(net, {"fixed": image, "moving": image}, recipe)
    assert set(terms) == {"similarity"} and terms["similarity"][0] == 1.0
    assert terms["similarity"][1].item() == pytest.approx(-1.75, abs=2e-3)


def test_loss_is_every_recipe_term_with_its_weight(c2fvit):
    # fails if a scale of the similarity, the Dice term or the final-stage warp were dropped or swapped
    torch.manual_seed(3)
    net, recipe = build(c2fvit, 2, width=16, depth=1, dice_weight=0.5)
    with torch.no_grad():
        for head in net.heads:
            head[2].weight.normal_(0, 0.1)
    shape = (64, 64)
    fixed_seg = (blob(shape, (30, 30), 14.0) > 0.5).long() * 2 + (blob(shape, (26, 34), 6.0) > 0.5).long()
    moving_seg = (blob(shape, (33, 28), 13.0) > 0.5).long() * 2 + (blob(shape, (30, 30), 7.0) > 0.5).long()
    batch = {"fixed": fixed_seg.float() / 3 + 0.1 * torch.rand(1, 1, *shape),
             "moving": moving_seg.float() / 3 + 0.1 * torch.rand(1, 1, *shape),
             "fixed_seg": fixed_seg, "moving_seg": moving_seg, "labels": torch.tensor([1, 2, 3])}
    terms = c2fvit.loss_terms(net, batch, recipe)
    assert {name: weight for name, (weight, _) in terms.items()} == {"similarity": 1.0, "dice": 0.5}
    out = net(batch["moving"], batch["fixed"])
    fixed, warped = out.fixed[-1], affine_warp(out.moving[-1], out.stage_matrices[-1])
    scales = []
    for j, window in enumerate((7, 5, 3)):
        scales.append(0.5 ** j * local_ncc(fixed, warped, window))
        fixed, warped = (F.avg_pool2d(x, 3, 2, 1, count_include_pad=False) for x in (fixed, warped))
    torch.testing.assert_close(terms["similarity"][1], sum(scales))
    assert all(scale.item() < -0.05 for scale in scales)  # each scale counts
    labels = batch["labels"]
    warped_onehot = affine_warp(one_hot(moving_seg, labels), out.matrix)  # full resolution, linear
    torch.testing.assert_close(terms["dice"][1], soft_dice_loss(one_hot(fixed_seg, labels), warped_onehot))
    # the Dice term moves the gradient; without dice_weight it is not there
    def gradient(dice_weight):
        net_, recipe_ = build(c2fvit, 2, width=16, depth=1, dice_weight=dice_weight)
        net_.load_state_dict(net.state_dict())
        found = c2fvit.loss_terms(net_, batch, recipe_)
        sum(weight * value for weight, value in found.values()).backward()
        return set(found), net_.heads[-1][2].weight.grad.clone()
    names, without = gradient(0.0)
    assert names == {"similarity"}
    _, with_dice = gradient(0.5)
    assert not torch.allclose(without, with_dice)


def test_per_stage_supervision_scores_each_stage_at_its_level(c2fvit):
    torch.manual_seed(4)
    net, recipe = build(c2fvit, 2, width=16, depth=1, supervision="per_stage")
    with torch.no_grad():
        for head in net.heads:
            head[2].weight.normal_(0, 0.1)
    batch = {"fixed": torch.rand(1, 1, 64, 64), "moving": torch.rand(1, 1, 64, 64)}
    terms = c2fvit.loss_terms(net, batch, recipe)
    assert {name: weight for name, (weight, _) in terms.items()} == {
        "similarity_stage1": 0.25, "similarity_stage2": 0.5, "similarity_stage3": 1.0}
    out = net(batch["moving"], batch["fixed"])
    for i, window in enumerate((3, 5, 7)):
        expected = local_ncc(out.fixed[i], affine_warp(out.moving[i], out.stage_matrices[i]), window)
        torch.testing.assert_close(terms[f"similarity_stage{i + 1}"][1], expected)
    with pytest.raises(ValueError, match="supervision"):
        c2fvit.loss_terms(net, batch, c2fvit.recipe("quick", {"supervision": "deep"}))


def test_affine_augmentation_warps_the_moving_image_in_training_only(c2fvit):
    net, recipe = build(c2fvit, 2, width=16, depth=1, augment_affine=0.2, dice_weight=0.5)
    shape = (48, 48)
    fixed_seg = (blob(shape, (24, 24), 12.0) > 0.5).long()
    moving_seg = (blob(shape, (26, 22), 11.0) > 0.5).long()
    batch = {"fixed": fixed_seg.float(), "moving": moving_seg.float(), "fixed_seg": fixed_seg,
             "moving_seg": moving_seg, "labels": torch.tensor([1])}
    net.train()
    torch.manual_seed(5)
    terms = c2fvit.loss_terms(net, batch, recipe)
    torch.manual_seed(5)
    augmentation = decoupled_affine_matrix(0.2 * (2 * torch.rand(1, 6) - 1))  # about the grid centre
    out = net(affine_warp(batch["moving"], augmentation), batch["fixed"])
    torch.testing.assert_close(terms["similarity"][1], multiscale_local_ncc(out.fixed[-1], out.warped))
    # the labels follow the augmented image: augmentation first, then the predicted affine
    labels = batch["labels"]
    warped_onehot = affine_warp(one_hot(moving_seg, labels), augmentation @ out.matrix)
    expected = soft_dice_loss(one_hot(fixed_seg, labels), warped_onehot)
    torch.testing.assert_close(terms["dice"][1], expected)
    net.eval()
    plain = net(batch["moving"], batch["fixed"])
    evaluated = c2fvit.loss_terms(net, batch, recipe)
    torch.testing.assert_close(evaluated["similarity"][1], multiscale_local_ncc(plain.fixed[-1], plain.warped))


def test_dice_needs_segmentations(c2fvit):
    net, recipe = build(c2fvit, 2, width=16, depth=1, dice_weight=0.5)
    with pytest.raises(ValueError, match="segmentations"):
        c2fvit.loss_terms(net, {"fixed": torch.rand(1, 1, 32, 32), "moving": torch.rand(1, 1, 32, 32)}, recipe)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def embedded2d(tmp_path_factory):
    """A small embedded2d: 8 training subjects per template; 6 test subjects per template (16 test pairs)."""
    root = tmp_path_factory.mktemp("embedded2d")
    source = load_dataset("embedded2d")
    source.prepare(root / "raw", root / "prepared", source.resolve_options({"n_train": 8, "n_val": 1, "n_test": 6}))
    return PreparedDataset(root / "prepared")


def test_learns_a_known_affine_of_one_pair(c2fvit, embedded2d):
    """Trained on one pair whose moving image is the fixed one under a known affine (rotated by 8 degrees, 4 %
    larger, shifted by 3 and 2 % of the field of view), the whole network (centre of mass, three stages, the decoded
    affine, multi-scale NCC) learns to undo it from every seed. Measured: the mean intensity error falls from 0.083
    (no registration) and 0.068 (the untrained network: its centre-of-mass step) to 0.008 in 150 steps, seeds 0, 1
    and 2 alike."""
    recipe = c2fvit.recipe("quick")
    size = recipe["working_size"]
    pair = test_pairs(embedded2d)[0]
    fixed = F.interpolate(pair["fixed"], size=(size, size), mode="area")   # an image on the working grid
    theta = torch.tensor([[0.06, -0.04, 8 / 180, 0.0, 0.08, 0.08]])   # translation, rotation / pi, shear, scale
    ranges = c2fvit.build(2, recipe).ranges                            # the recipe's, as the network decodes them
    moving = warp(fixed, matrix_to_displacement(decoupled_affine_matrix(theta, **ranges), (size, size)))
    batch = {"fixed": fixed, "moving": moving}

    def error(net):
        net.eval()
        return float((warp(moving, c2fvit.register(net, fixed, moving, recipe)) - fixed).abs().mean())

    unregistered = float((moving - fixed).abs().mean())
    for seed in range(3):
        torch.manual_seed(seed)
        net = c2fvit.build(2, recipe)
        untrained = error(net)
        net.train()
        optimiser = adam(net.parameters(), recipe["lr"])
        for _ in range(150):
            optimiser_step(weighted_loss(c2fvit, net, batch, recipe, torch.device("cpu"))[1], optimiser)
        trained = error(net)
        assert trained < 0.2 * unregistered and trained < 0.25 * untrained, (seed, unregistered, untrained, trained)


def test_short_training_selects_on_val_and_registers_on_the_dataset_grid(c2fvit, embedded2d, tmp_path):
    """The workflow's path: the quick recipe trains on its 88 x 88 working grid, keeps its best checkpoint on the val
    pairs, and registers the test pairs on the dataset's 176 x 176 grid through the grid adapter.

    No gain over no registration is asserted: at this budget C2FViT does not reliably learn the data's small
    affine part. Measured with 1000 steps, seeds 0, 1 and 2: test Dice 0.624, 0.581, 0.569 against 0.609
    unregistered (0.590 for the untrained network, its centre-of-mass step); the default run's leaderboard says the
    same. What it learns from a clear affine, :func:`test_learns_a_known_affine_of_one_pair` shows."""
    recipe = c2fvit.recipe("quick", {"iterations": 400})
    run = short_training(c2fvit, recipe, embedded2d, tmp_path / "run")
    assert len(run.pairs) == 16
    assert run.saved_recipe == recipe and run.summary["iterations"] == 400
    selection = run.summary["model_selection"]
    assert selection["criterion"] == "val_dice"
    assert [s["iteration"] for s in selection["scores"]] == [200, 400]
    best = max(selection["scores"], key=lambda s: s["val_dice"])   # the first of equal scores
    assert selection["kept_iteration"] == best["iteration"]
    # brought back from the working cube (which holds the whole field of view), the field is still one affine,
    # now in the dataset's voxels: a least-squares affine fit over every voxel leaves nothing (mm: 1 mm voxels)
    u = c2fvit.register_on_dataset_grid(run.net, run.pairs[0]["fixed"], run.pairs[0]["moving"], recipe,
                                        c2fvit.grid_adapter(embedded2d.shape, embedded2d.spacing, recipe))
    assert u.shape == (1, 2, *embedded2d.shape)
    before, after = dataset_positions_mm(u, embedded2d.spacing)
    moved, residual = (after - before).abs().max(), least_squares_affine(before, after)[1].abs().max()
    assert moved > 0.05 and residual < 1e-3, (moved, residual)
