"""ANTs baselines: the conversion of ANTs' transforms to regbench's displacement, SyN and affine on the
embedded pairs, determinism, and the SyN supervision files."""
import json
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

ants_module = pytest.importorskip("ants", reason="the classical baselines need antspyx")

from regbench.blocks import ants as rba  # noqa: E402
from regbench import plugins  # noqa: E402
from regbench.data.prepared import PreparedDataset  # noqa: E402
from regbench.evaluation.metrics import dice_per_label, pair_metrics  # noqa: E402
from regbench.blocks.spatial import warp, warp_labels  # noqa: E402

TRANSMORPH = sys.modules[type(plugins.load_method("syn")).__module__].TRANSMORPH

# a few test pairs of the embedded data: two within a template, two across
PAIRS = [("fsaverage_test_00", "fsaverage_test_01"), ("xhemi_test_03", "xhemi_test_04"),
         ("fsaverage_test_00", "xhemi_test_00"), ("xhemi_test_05", "fsaverage_test_05")]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded2d")
    source = plugins.load_dataset("embedded2d")
    source.prepare(root / "raw", root / "prepared", source.resolve_options({"n_train": 2}))
    return PreparedDataset(root / "prepared")


def _rotation(ndim, angle):
    r = np.eye(ndim)
    r[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return r


def _phantom_3d(shape=(28, 32, 24), seed=0, n_labels=5):
    """Smooth random label regions inside an ellipsoid, an image of them, and a smoothly deformed copy."""
    rng = np.random.default_rng(seed)
    fields = np.stack([gaussian_filter(rng.normal(size=shape), 3) for _ in range(n_labels)])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    labels = np.where((grid ** 2).sum(0) < 0.75, fields.argmax(0) + 1, 0)
    image = gaussian_filter(np.linspace(0.2, 1.0, n_labels + 1)[labels], 0.7).astype(np.float32)
    u = np.stack([gaussian_filter(rng.normal(size=shape), 4) for _ in shape])
    coords = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")) + 2.0 * u / np.abs(u).max()
    moving = map_coordinates(image, coords, order=1).astype(np.float32)
    moving_labels = map_coordinates(labels, coords, order=0)
    return image, moving, moving_labels, np.arange(1, n_labels + 1)


def _inside(u):
    """Where x + u(x) falls inside the moving grid: there both warps interpolate the same voxels (outside,
    ITK continues the border half a voxel further where grid_sample pads with zeros)."""
    shape = np.array(u.shape[1:]).reshape(-1, *([1] * (u.ndim - 1)))
    position = np.indices(u.shape[1:]) + u
    return np.all((position >= 0) & (position <= shape - 1), axis=0)


def _case(ndim, embedded):
    """(fixed, moving, moving labels, label values, fixed geometry, moving geometry, stages)."""
    if ndim == 2:
        fixed, moving = embedded.image("fsaverage_test_00"), embedded.image("xhemi_test_00")
        moving_labels, labels = embedded.seg("xhemi_test_00"), embedded.label_values
        # moving: another origin and a direction with a reflection (any orthonormal matrix is allowed)
        fixed_geometry = dict(spacing=(0.9, 1.6), origin=(10.0, -5.0), direction=_rotation(2, 0.5))
        moving_geometry = dict(spacing=(1.0, 1.5), origin=(14.0, -8.0),
                               direction=_rotation(2, 0.7) @ np.diag([1.0, -1.0]))
        affine_levels, syn_levels = ((100, 50, 0), (4, 2, 1), (2, 1, 0)), ((40, 10, 0), (4, 2, 1), (2, 1, 0))
    else:
        fixed, moving, moving_labels, labels = _phantom_3d()
        fixed_geometry = dict(spacing=(1.2, 0.8, 2.0), origin=(-30.0, 12.0, 5.0), direction=_rotation(3, 0.4))
        moving_geometry = dict(spacing=(1.2, 0.8, 2.0), origin=(-28.0, 10.0, 6.0), direction=_rotation(3, 0.45))
        affine_levels, syn_levels = ((30, 0), (2, 1), (1, 0)), ((20, 0), (2, 1), (1, 0))
    stages = [rba.Stage("Affine", (0.25,), "Mattes", 32, *affine_levels, sampling="Regular", sampling_rate=0.3),
              rba.Stage("SyN", (0.25, 3, 0), "CC", 2, *syn_levels)]
    return fixed, moving, moving_labels, labels, fixed_geometry, moving_geometry, stages


@pytest.mark.parametrize("ndim", [2, 3])
def test_converted_displacement_warps_like_antspy_apply_transforms(ndim, embedded):
    fixed, moving, moving_labels, labels, fixed_geometry, moving_geometry, stages = _case(ndim, embedded)
    fixed_image, moving_image = rba.to_ants(fixed, **fixed_geometry), rba.to_ants(moving, **moving_geometry)
    with tempfile.TemporaryDirectory() as tmp:
        transforms = rba.registration(fixed_image, moving_image, stages, f"{tmp}/reg_",
                                      initial_transform="center_of_mass")
        assert [p.rsplit("reg_", 1)[1] for p in transforms] == ["1Warp.nii.gz", "0GenericAffine.mat"]
        u = rba.displacement_from_transforms(transforms, fixed_image, moving_image)
        label_image = rba.to_ants(moving_labels.astype(np.float32), **moving_geometry)
        expected_labels = ants_module.apply_transforms(fixed_image, label_image, transforms,
                                                       interpolator="nearestNeighbor").numpy()
        expected_image = ants_module.apply_transforms(fixed_image, moving_image, transforms).numpy()
    assert u.shape == (ndim, *fixed.shape)
    assert np.abs(u).mean() > 0.2  # the transforms are not the identity (an affine part and a warp)
    warped = warp_labels(torch.from_numpy(moving_labels)[None, None], torch.from_numpy(u)[None])[0, 0].numpy()
    dice = dice_per_label(np.rint(expected_labels).astype(np.int64), warped, labels)
    present = ~np.isnan(dice)
    assert present.sum() >= 5 and dice[present].min() >= 0.98
    warped_image = warp(torch.from_numpy(moving.astype(np.float64))[None, None], torch.from_numpy(u)[None])[0, 0]
    inside = _inside(u)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(warped_image.numpy()[inside], expected_image[inside], atol=1e-4)


def test_conversion_handles_linear_transforms_of_any_type(tmp_path):
    """A rigid (Euler) .mat is read by probing it, and agrees with ANTs' own resampling."""
    fixed = np.random.default_rng(0).random((20, 24)).astype(np.float32)
    geometry = dict(spacing=(1.5, 0.7), origin=(3.0, -2.0), direction=_rotation(2, 0.3))
    image = rba.to_ants(fixed, **geometry)
    rigid = ants_module.create_ants_transform(transform_type="Euler2DTransform", dimension=2,
                                              center=(10.0, 5.0), translation=(1.3, -0.4))
    rigid.set_parameters(np.array([0.1, 1.3, -0.4]))
    path = str(tmp_path / "rigid.mat")
    ants_module.write_transform(rigid, path)
    u = rba.displacement_from_transforms([path], image, image)
    expected = ants_module.apply_transforms(image, image, [path]).numpy()
    warped = warp(torch.from_numpy(fixed.astype(np.float64))[None, None], torch.from_numpy(u)[None])[0, 0].numpy()
    inside = _inside(u)
    assert inside.mean() > 0.5 and np.abs(u).max() > 1
    np.testing.assert_allclose(warped[inside], expected[inside], atol=1e-4)


def test_identical_images_give_a_near_zero_displacement(embedded):
    batch = embedded.pair("xhemi_test_02", "xhemi_test_02")
    syn, affine = plugins.load_method("syn"), plugins.load_method("affine")
    u_syn = syn.register(None, batch["fixed"], batch["fixed"], syn.recipe("quick"))
    u_affine = affine.register(None, batch["fixed"], batch["fixed"], affine.recipe("quick"))
    assert u_syn.shape == (1, 2, *embedded.shape) and u_syn.dtype == torch.float32
    assert u_syn.abs().max() < 0.01
    assert u_affine.abs().max() < 0.25  # the sampled metric moves it a little


def test_syn_and_affine_beat_identity_on_embedded_test_pairs(embedded):
    syn, affine = plugins.load_method("syn"), plugins.load_method("affine")
    scores = {"identity": [], "affine": [], "syn": []}
    for fixed_id, moving_id in PAIRS:
        batch = embedded.pair(fixed_id, moving_id)
        fields = {"identity": np.zeros((2, *embedded.shape)),
                  "affine": affine.register(None, batch["fixed"], batch["moving"], affine.recipe("quick"))[0].numpy(),
                  "syn": syn.register(None, batch["fixed"], batch["moving"], syn.recipe("quick"))[0].numpy()}
        for name, u in fields.items():
            result, _ = pair_metrics(embedded.seg(fixed_id), embedded.seg(moving_id), u, embedded.label_values,
                                     embedded.spacing)
            scores[name].append(result["dice"])
        assert result["fold_pct"] < 0.1  # SyN is diffeomorphic
    identity, affine_dice, syn_dice = (np.array(scores[k]) for k in ("identity", "affine", "syn"))
    assert np.all(syn_dice > identity + 0.1), scores
    assert affine_dice.mean() > identity.mean(), scores


_RERUN = """
import hashlib, sys, torch
from regbench import plugins
from regbench.data.prepared import PreparedDataset
batch = PreparedDataset(sys.argv[1]).pair(sys.argv[2], sys.argv[3])
syn = plugins.load_method("syn")
u = syn.register(None, batch["fixed"], batch["moving"], syn.recipe("quick", {"linear_transform": "Affine"}))
print(hashlib.sha256(u.numpy().tobytes()).hexdigest())
"""


def test_syn_is_deterministic_within_and_across_processes(embedded):
    """Same pair, same recipe: bit-identical displacements, also from a fresh process (a rerun). The
    recipe includes the linear stage, whose metric samples voxels at random."""
    import hashlib

    fixed_id, moving_id = PAIRS[2]
    batch = embedded.pair(fixed_id, moving_id)
    syn = plugins.load_method("syn")
    recipe = syn.recipe("quick", {"linear_transform": "Affine"})
    first = syn.register(None, batch["fixed"], batch["moving"], recipe)
    second = syn.register(None, batch["fixed"], batch["moving"], recipe)
    assert torch.equal(first, second)
    result = subprocess.run([sys.executable, "-c", _RERUN, str(embedded.root), fixed_id, moving_id],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(first.numpy().tobytes()).hexdigest()


def test_recipes_are_the_command_lines_they_document():
    """paper: VoxelMorph's SyN (CC, step 0.25, Gauss[9, 0.2], 201 iterations at three scales); the
    TransMorph setting swaps in as overrides; threads and seed are fixed in every recipe."""
    syn, affine = plugins.load_method("syn"), plugins.load_method("affine")
    paper = syn.recipe("paper")
    assert syn.stages(paper)[0].args("F", "M") == [
        "--transform", "SyN[0.25,9,0.2]", "--metric", "CC[F,M,1,4]", "--convergence", "[201x201x201,1e-06,10]",
        "--shrink-factors", "4x2x1", "--smoothing-sigmas", "2x1x0vox"]
    assert syn.stages(syn.recipe("quick"))[0].transform_parameters == (0.25, 9.0, 0.2)  # the paper's regularisation
    transmorph = syn.stages(syn.recipe("paper", dict(TRANSMORPH)))[0].args("F", "M")
    assert transmorph[1] == "SyN[0.2,3,0]" and transmorph[3] == "MeanSquares[F,M,1,32]"
    assert transmorph[5] == "[160x80x40,1e-07,8]"
    assert affine.stages(affine.recipe("paper"))[0].args("F", "M")[:4] == [
        "--transform", "Affine[0.25]", "--metric", "Mattes[F,M,1,32,Regular,0.2]"]
    for method in (syn, affine):
        for name in ("paper", "quick"):
            options = rba.registration_options(method.recipe(name))
            assert options["threads"] == 1 and options["random_seed"] > 0


def test_bad_settings_get_one_clear_error():
    with pytest.raises(ValueError, match="one entry per level"):
        rba.Stage("SyN", (0.25, 3, 0), "CC", 2, (40, 10), (4, 2, 1), (2, 1, 0))
    with pytest.raises(ValueError, match="metric must be one of"):
        rba.Stage("SyN", (0.25, 3, 0), "NCC", 2, (40,), (1,), (0,))
    with pytest.raises(ValueError, match="SyN takes 3 parameter"):
        rba.Stage("SyN", (0.25,), "CC", 2, (40,), (1,), (0,))
    image = rba.to_ants(np.ones((8, 8), np.float32))
    stage = rba.Stage("Affine", (0.25,), "Mattes", 32, (1,), (1,), (0,))
    with pytest.raises(ValueError, match="random_seed must be a positive integer"):
        rba.registration(image, image, [stage], "unused_", random_seed=0)
    with pytest.raises(RuntimeError, match="thread count is fixed once per process"):
        rba.load_ants(rba.ants_threads() + 1)
    with pytest.raises(ValueError, match="unknown recipe key"):
        plugins.load_method("syn").recipe("quick", {"syn_radius": 3})
    with pytest.raises(ValueError, match="NaN"):
        rba.to_ants(np.full((4, 4), np.nan))


def test_supervision_pairs_are_a_seeded_prefix_stable_sample():
    from regbench.training.supervision import supervision_pairs

    subjects = [f"s{i}" for i in range(6)]
    every = supervision_pairs(subjects, 0, seed=0)
    assert len(every) == 30 and len(set(every)) == 30 and all(f != m for f, m in every)
    assert supervision_pairs(subjects, 7, seed=0) == every[:7]
    assert supervision_pairs(subjects, 7, seed=1) != every[:7]


def test_supervision_files_are_written_read_and_kept_on_rerun(embedded, tmp_path):
    from regbench.workflow.config import check_config, job_settings
    from regbench.learn2reg import read_displacement
    from regbench.training.supervision import Supervision, compute_supervision, supervised_batch

    config = check_config({"datasets": {"embedded2d": {"n_train": 2}}, "methods": {"identity": {}}})
    settings = job_settings(config, "embedded2d", "syn")  # syn need not be listed among the methods
    settings["recipe"]["syn_iterations"] = [20, 0, 0]
    out = tmp_path / "syn_supervision"
    index = compute_supervision(embedded.root, out, settings, n_pairs=3, workers=1)
    assert list(index.columns) == ["index", "fixed", "moving", "file", "seconds"] and len(index) == 3
    assert pd.read_csv(out / "index.csv")[["fixed", "moving"]].equals(index[["fixed", "moving"]])
    summary = json.loads((out / "supervision.json").read_text())
    assert summary["n_pairs"] == 3 and summary["all_ordered_pairs"] == 12 and summary["ants_threads"] == 1
    u = read_displacement(out / index.at[0, "file"], embedded.shape)
    assert u.shape == (2, *embedded.shape) and np.abs(u).mean() > 0.1
    supervision = Supervision(out)
    batch = supervised_batch(embedded, supervision, iteration=0, batch_size=2, seed=0)
    assert batch["supervision"].shape == (2, 2, *embedded.shape) and batch["fixed"].shape == (2, 1, *embedded.shape)
    stamps = [(out / f).stat().st_mtime_ns for f in index["file"]]
    compute_supervision(embedded.root, out, settings, n_pairs=3, workers=1)  # same settings: nothing redone
    assert [(out / f).stat().st_mtime_ns for f in index["file"]] == stamps
