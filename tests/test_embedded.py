"""The embedded dataset: layout, labels, pairs, true displacements, no folding, determinism, bad files."""
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from regbench.data.prepared import PreparedDataset
from regbench.io import InputError, load_nifti
from regbench.plugins import load_dataset
from regbench.blocks.spatial import compose_displacements, warp, warp_labels

SMALL = {"n_train": 2, "n_val": 1, "n_test": 2}


def embedded_module():
    """The plugin module (loaded by path, like the workflow loads it)."""
    import sys

    load_dataset("embedded2d")
    return sys.modules["regbench_plugins.datasets.embedded"]


@pytest.fixture(scope="module")
def prepared2d(tmp_path_factory):
    """embedded2d with its default options."""
    folder = tmp_path_factory.mktemp("embedded2d")
    load_dataset("embedded2d").prepare(None, folder, {})
    return PreparedDataset(folder)


@pytest.fixture(scope="module")
def prepared3d(tmp_path_factory):
    """A small embedded3d: two test subjects per template, nothing else."""
    folder = tmp_path_factory.mktemp("embedded3d")
    load_dataset("embedded3d").prepare(None, folder, {"n_train": 0, "n_val": 0, "n_test": 2})
    return PreparedDataset(folder)


def mean_dice(a, b, labels):
    scores = [2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels
              if np.sum(a == v) + np.sum(b == v) > 0]
    return float(np.mean(scores))


def jacobian_determinant(u):
    """det(d(id + u)/dx) by central differences; u is ndim x *spatial (voxels, channels in axis order)."""
    ndim = u.shape[0]
    jacobian = np.stack([np.stack(np.gradient(u[i]), axis=0) for i in range(ndim)], axis=0)
    jacobian = jacobian + np.eye(ndim).reshape(ndim, ndim, *([1] * ndim))
    return np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))


def test_layout_2d(prepared2d):
    ds = prepared2d
    assert ds.name == "embedded2d" and ds.ndim == 2
    assert ds.shape == (176, 176) and ds.spacing == (1.0, 1.0)
    assert all(size % 16 == 0 for size in ds.shape)
    counts = ds.subjects.groupby(["template", "split"]).size()
    for template in ("fsaverage", "xhemi"):
        assert (counts[template, "train"], counts[template, "val"], counts[template, "test"]) == (20, 5, 8)
    has_gt = ds.subjects["gt_transform"].notna()
    assert (has_gt == (ds.subjects["split"] != "train")).all()
    image = ds.image("xhemi_test_03")
    assert image.dtype == np.float32 and image.shape == ds.shape
    assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.7
    _, spacing = load_nifti(ds.root / ds.subjects.at["fsaverage_train_00", "seg"], kind="labels")
    assert spacing == (1.0, 1.0)


def test_labels_2d(prepared2d):
    ds = prepared2d
    labels = dict(zip(ds.labels["label"], ds.labels["name"]))
    assert len(labels) == 23
    for value, name in [(2, "Left-Cerebral-White-Matter"), (10, "Left-Thalamus"), (12, "Left-Putamen"),
                        (17, "Left-Hippocampus"), (53, "Right-Hippocampus"), (43, "Right-Lateral-Ventricle")]:
        assert labels[value] == name
    # not anatomical structures, or too small in this slice
    assert not {30, 31, 62, 63, 77, 85, 11, 50} & set(labels)
    for subject in ds.subjects["subject"]:
        assert set(np.unique(ds.seg(subject))) <= set(labels) | {0}
    # every evaluation label is present in every test subject
    for subject in ds.split_subjects("test"):
        assert set(np.unique(ds.seg(subject))) == set(labels) | {0}


def test_pairs(prepared2d):
    ds = prepared2d
    assert set(ds.pairs["split"]) == {"val", "test"}
    test = ds.split_pairs("test")
    assert len(test) >= 20 and len(test) == 7 + 7 + 8
    val = ds.split_pairs("val")
    assert len(val) >= 12 and len(val) == 4 + 4 + 5   # drawn like the test pairs: within and across templates
    assert sum(ds.has_ground_truth(f, m) for f, m in zip(val["fixed"], val["moving"])) == 8
    assert not set(val["fixed"]) & set(test["fixed"]) and not set(val["moving"]) & set(test["moving"])
    gt = [ds.has_ground_truth(f, m) for f, m in zip(test["fixed"], test["moving"])]
    assert sum(gt) == 14
    template = ds.subjects["template"]
    for (f, m), known in zip(zip(test["fixed"], test["moving"]), gt):
        assert known == (template[f] == template[m])
        assert ds.subjects.at[f, "split"] == ds.subjects.at[m, "split"] == "test"
    assert set(test["fixed"]) | set(test["moving"]) == set(ds.split_subjects("test"))


def test_templates_are_one_real_inter_anatomy_pair():
    module = embedded_module()
    for ndim, expected in ((2, 0.85), (3, 0.87)):
        templates = module.load_templates(ndim)
        a, b = templates.segs["fsaverage"], templates.segs["xhemi"]
        assert not np.array_equal(a, b)
        # xhemi's labels follow image space: a left structure lies on the same side in both templates
        for value in (17, 53):
            assert abs(np.argwhere(a == value)[:, 0].mean() - np.argwhere(b == value)[:, 0].mean()) < 2
        assert mean_dice(a, b, templates.labels) == pytest.approx(expected, abs=0.01)


def check_true_displacements(ds, templates, pairs, min_dice):
    """Warping the moving subject by the stored truth lands on the fixed subject (images and labels)."""
    for fixed, moving in pairs:
        u = ds.true_displacement(fixed, moving)
        template = torch.from_numpy(templates.images[ds.subjects.at[fixed, "template"]])[None, None]
        clean = {s: warp(template, torch.from_numpy(ds._transform(s)["to_template"])[None]) for s in (fixed, moving)}
        before = (clean[moving] - clean[fixed]).abs().mean()
        after = (warp(clean[moving], u) - clean[fixed]).abs().mean()
        assert after < 0.25 * before
        fixed_seg = ds.seg(fixed)
        warped_seg = warp_labels(torch.from_numpy(ds.seg(moving))[None, None], u)[0, 0].numpy()
        dice_before = mean_dice(ds.seg(moving), fixed_seg, ds.label_values)
        dice_after = mean_dice(warped_seg, fixed_seg, ds.label_values)
        assert dice_after > min_dice and dice_after > dice_before + 0.15
        # with noise, bias and gamma too, the truth brings the images closer
        noisy_before = np.abs(ds.image(moving) - ds.image(fixed)).mean()
        noisy_after = np.abs(warp(torch.from_numpy(ds.image(moving))[None, None], u)[0, 0].numpy()
                             - ds.image(fixed)).mean()
        assert noisy_after < 0.95 * noisy_before


def test_true_displacement_warps_moving_onto_fixed_2d(prepared2d):
    test = prepared2d.split_pairs("test")
    pairs = [(f, m) for f, m in zip(test["fixed"], test["moving"]) if prepared2d.has_ground_truth(f, m)]
    check_true_displacements(prepared2d, embedded_module().load_templates(2), pairs, min_dice=0.9)


def test_true_displacement_warps_moving_onto_fixed_3d(prepared3d):
    ds = prepared3d
    assert ds.shape == (96, 96, 112) and ds.spacing == (2.0, 2.0, 2.0)
    assert len(ds.labels) == 37
    assert len(ds.split_pairs("test")) == 1 + 1 + 2 and len(ds.split_pairs("val")) == 0
    check_true_displacements(ds, embedded_module().load_templates(3), [("xhemi_test_00", "xhemi_test_01")],
                             min_dice=0.8)


@pytest.mark.parametrize("which", ["prepared2d", "prepared3d"])
def test_deformations_are_diffeomorphic_and_inverse(which, request):
    ds = request.getfixturevalue(which)
    for subject in ds.subjects.index[ds.subjects["gt_transform"].notna()]:
        transform = ds._transform(subject)
        for key in ("to_template", "from_template"):
            assert transform[key].dtype == np.float32 and transform[key].shape == (ds.ndim, *ds.shape)
            assert jacobian_determinant(transform[key]).min() > 0.2, (subject, key)
        # psi^-1 o psi = id inside the brain, up to interpolation
        roundtrip = compose_displacements(outer=torch.from_numpy(transform["from_template"])[None],
                                          inner=torch.from_numpy(transform["to_template"])[None])[0]
        error = roundtrip.norm(dim=0).numpy()[ds.image(subject) > 0]
        assert error.mean() < 0.03 and error.max() < 0.15


@pytest.mark.parametrize("which", ["prepared2d", "prepared3d"])
def test_second_contrast_is_the_same_anatomy_t2_weighted(which, request):
    """image_t2: the subject's anatomy (one brain mask, aligned structures), with T2's order of intensities."""
    ds = request.getfixturevalue(which)
    assert ds.contrasts == ["t2"]
    for subject in ds.split_subjects("test")[:2]:
        t1, t2, seg = ds.image(subject), ds.image(subject, "t2"), ds.seg(subject)
        assert t2.dtype == np.float32 and 0 <= t2.min() and t2.max() <= 1
        brain_t1, brain_t2 = t1 > 0, t2 > 0   # one brain (noise clipped to 0 makes a few voxels differ)
        assert 2 * (brain_t1 & brain_t2).sum() / (brain_t1.sum() + brain_t2.sum()) > 0.98
        mean = {name: (t1[np.isin(seg, labels)].mean(), t2[np.isin(seg, labels)].mean())
                for name, labels in (("white matter", [2, 41]), ("cortex", [3, 42]), ("ventricles", [4, 43]))}
        # T1: white matter > cortex > CSF; T2: the reverse
        assert mean["white matter"][0] > mean["cortex"][0] > mean["ventricles"][0], mean
        assert mean["ventricles"][1] > mean["cortex"][1] > mean["white matter"][1] + 0.15, mean


def test_prepare_is_deterministic_and_test_subjects_do_not_depend_on_n_train(tmp_path, prepared2d):
    source = load_dataset("embedded2d")
    first, second = tmp_path / "first", tmp_path / "second"
    source.prepare(None, first, SMALL)
    source.prepare(None, second, SMALL)
    for name in ("subjects.csv", "labels.csv", "pairs.csv"):
        assert (first / name).read_text() == (second / name).read_text()
    a, b = PreparedDataset(first), PreparedDataset(second)
    for subject in a.subjects["subject"]:
        assert np.array_equal(a.image(subject), b.image(subject))
        assert np.array_equal(a.image(subject, "t2"), b.image(subject, "t2"))
        assert np.array_equal(a.seg(subject), b.seg(subject))
    for path in (first / "transforms").iterdir():
        assert path.read_bytes() == (second / "transforms" / path.name).read_bytes()
    # the default run (20 train subjects) made the same test subject as this one (2 train subjects)
    assert np.array_equal(a.image("xhemi_test_01"), prepared2d.image("xhemi_test_01"))
    # another seed gives other subjects
    third = tmp_path / "third"
    source.prepare(None, third, {**SMALL, "seed": 1})
    assert not np.array_equal(PreparedDataset(third).image("xhemi_test_01"), a.image("xhemi_test_01"))


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n_subjects"):
        load_dataset("embedded2d").prepare(None, tmp_path, {"n_subjects": 3})


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_shipped_file_is_named(tmp_path, monkeypatch, damage):
    module = embedded_module()
    data_dir = tmp_path / "embedded"
    shutil.copytree(module.DATA_DIR, data_dir)
    target = data_dir / "xhemi_2d.npz"
    if damage == "corrupt":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    else:
        target.unlink()
    source = load_dataset("embedded2d")
    monkeypatch.setattr(source, "data_dir", data_dir)
    prepared = tmp_path / "prepared"
    with pytest.raises(InputError, match=str(target)):
        source.prepare(None, prepared, SMALL)
    assert not prepared.exists()


def test_shipped_files_match_their_checksums():
    module = embedded_module()
    expected = json.loads((module.DATA_DIR / "checksums.json").read_text())
    assert sorted(expected) == sorted(f"{t}_{n}d.npz" for t in ("fsaverage", "xhemi") for n in (2, 3))
    total = 0
    for name, digest in expected.items():
        path = module.DATA_DIR / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        total += path.stat().st_size
    assert total < 2_000_000
    for notice in ("NOTICE.md", "LICENSE-FreeSurfer.txt"):
        assert (module.DATA_DIR / notice).stat().st_size > 1000
    assert "PART B" in (module.DATA_DIR / "LICENSE-FreeSurfer.txt").read_text()


def test_subjects_table_round_trips(prepared2d):
    table = pd.read_csv(prepared2d.root / "subjects.csv")
    assert list(table.columns) == ["subject", "split", "image", "seg", "image_t2", "template", "gt_transform"]
    info = json.loads((prepared2d.root / "dataset.json").read_text())
    assert info["provenance"]["shipped_sha256"].keys() == {"fsaverage_2d.npz", "xhemi_2d.npz"}


@pytest.fixture(scope="module")
def shifted2d(tmp_path_factory):
    """embedded2d_shift with its default options."""
    folder = tmp_path_factory.mktemp("embedded2d_shift")
    load_dataset("embedded2d_shift").prepare(None, folder, {})
    return PreparedDataset(folder)


def identity_dice(ds) -> np.ndarray:
    """Each test pair's mean Dice without registration."""
    return np.array([mean_dice(ds.seg(p.moving), ds.seg(p.fixed), ds.label_values)
                     for p in ds.split_pairs("test").itertuples()])


def test_the_shifted_variant_has_embedded2d_s_grid_labels_and_pairs_and_t2_like_images(shifted2d, prepared2d):
    """A model trained on embedded2d applies as it is: one grid, one label set, the same pair design."""
    assert (shifted2d.shape, shifted2d.spacing) == (prepared2d.shape, prepared2d.spacing) == ((176, 176), (1.0, 1.0))
    assert shifted2d.label_values.tolist() == prepared2d.label_values.tolist()
    assert shifted2d.split_pairs("test")[["fixed", "moving"]].equals(prepared2d.split_pairs("test")[["fixed", "moving"]])
    assert shifted2d.contrasts == []   # the primary image is the T2-like one; no second contrast
    for subject in shifted2d.split_subjects("test")[:3]:
        image, seg = shifted2d.image(subject), shifted2d.seg(subject)
        mean = {name: image[np.isin(seg, labels)].mean()
                for name, labels in (("white matter", [2, 41]), ("cortex", [3, 42]), ("ventricles", [4, 43]))}
        assert mean["ventricles"] > mean["cortex"] > mean["white matter"] + 0.1, mean   # T2's order
        # new subjects (its own seed), not embedded2d's relabelled
        assert not np.array_equal(seg, prepared2d.seg(subject))


def test_the_shift_is_measured_harder_than_embedded2d(shifted2d, prepared2d):
    """Unregistered Dice 0.567 (embedded2d 0.602), structures further apart, noisier, less MI(i; s)."""
    shifted, home = identity_dice(shifted2d), identity_dice(prepared2d)
    assert len(shifted) == len(home) == 22
    assert 0.55 < shifted.mean() < 0.585 and 0.59 < home.mean() < 0.615
    assert shifted.mean() < home.mean() - 0.02

    def true_length(ds):   # mean |true u| over the fixed brain, pairs within a template
        lengths = [ds.true_displacement(p.fixed, p.moving)[0].norm(dim=0).numpy()[ds.seg(p.fixed) > 0].mean()
                   for p in ds.split_pairs("test").itertuples() if ds.has_ground_truth(p.fixed, p.moving)]
        return float(np.mean(lengths))

    assert true_length(shifted2d) > 1.1 * true_length(prepared2d)

    def white_matter_spread(ds):   # intensity std within white matter relative to its mean: noise and bias
        values = [ds.image(s)[np.isin(ds.seg(s), [2, 41])] for s in ds.split_subjects("test")]
        return float(np.mean([v.std() / v.mean() for v in values]))

    assert white_matter_spread(shifted2d) > 1.5 * white_matter_spread(prepared2d)
    from regbench.evaluation.information import dataset_mi

    assert dataset_mi(shifted2d)["splits"]["test"] < dataset_mi(prepared2d)["splits"]["test"] - 0.1


def test_the_shifted_variant_s_true_displacements_warp_moving_onto_fixed(shifted2d):
    test = shifted2d.split_pairs("test")
    pairs = [(f, m) for f, m in zip(test["fixed"], test["moving"]) if shifted2d.has_ground_truth(f, m)][:4]
    check_true_displacements(shifted2d, embedded_module().load_templates(2), pairs, min_dice=0.88)


def test_bspline_basis_has_the_cubic_b_spline_s_values_and_sums_to_one():
    """17 points, spacing 8: 2 intervals of 8, 5 control points (one beyond each end). At grid point 0 (a control
    point) the weights are B(1), B(0), B(1) = 1/6, 2/3, 1/6; at point 4, half-way between two control points,
    B(1.5), B(0.5), B(0.5), B(1.5) = 1/48, 23/48, 23/48, 1/48 (B(t) = 2/3 - t^2 + t^3/2 below 1, (2 - t)^3/6
    below 2); every row sums to 1, so a constant field is reproduced."""
    basis = embedded_module().bspline_matrix(17, 8.0)
    assert basis.shape == (17, 5)
    np.testing.assert_allclose(basis[0], [1 / 6, 2 / 3, 1 / 6, 0, 0], atol=1e-12)
    np.testing.assert_allclose(basis[4], [1 / 48, 23 / 48, 23 / 48, 1 / 48, 0], atol=1e-12)
    np.testing.assert_allclose(basis[16], [0, 0, 1 / 6, 2 / 3, 1 / 6], atol=1e-12)
    np.testing.assert_allclose(basis.sum(axis=1), 1.0, atol=1e-12)
    # 18 points: round(17 / 8) = 2 intervals of 8.5 (the control points span the grid exactly):
    # point 17 is the last control point inside the grid, as point 0 is the first
    np.testing.assert_allclose(embedded_module().bspline_matrix(18, 8.0)[17], [0, 0, 1 / 6, 2 / 3, 1 / 6], atol=1e-12)


def test_smooth_field_s_largest_vector_has_the_asked_length():
    """The scale is set on the vectors' length over the channels, not per channel."""
    field = embedded_module().smooth_field(np.random.default_rng(0), 2, (33, 40), 8.0, 5.0)
    assert field.shape == (2, 33, 40)
    assert np.sqrt((field ** 2).sum(axis=0)).max() == pytest.approx(5.0)
    assert np.abs(field).max() < 5.0   # neither channel alone reaches it


def test_the_affine_acts_about_the_grid_centre():
    """c + M (p - c) + t on a 5 x 5 grid (c = (2, 2)) with M a quarter turn [[0, -1], [1, 0]] and t = (1, 0):
    p = (4, 2) gives c + (0, 2) + t = (3, 4); the centre goes to c + t = (3, 2)."""
    module = embedded_module()
    moved = module._apply_affine(np.array([[0.0, -1.0], [1.0, 0.0]]), np.array([1.0, 0.0]),
                                 module.identity_grid((5, 5), dtype=torch.float64))
    assert moved[:, 4, 2].tolist() == [3.0, 4.0] and moved[:, 2, 2].tolist() == [3.0, 2.0]


def test_stored_displacements_are_rounded_to_the_nearest_64th_of_a_voxel():
    """0.01 * 64 = 0.64 rounds to 1, -0.02 * 64 = -1.28 to -1, 0.5 stays (32/64): 1/64, -1/64, 0.5."""
    quantized = embedded_module().quantize(torch.tensor([0.01, -0.02, 0.5], dtype=torch.float64))
    assert quantized.dtype == torch.float32 and quantized.tolist() == [1 / 64, -1 / 64, 0.5]


def test_pairs_are_consecutive_within_a_template_then_across_with_the_fixed_side_alternating():
    """One val and two test subjects per template: val has no within-template pair and one across (fsaverage
    fixed); test has 00 -> 01 in each template, then 00 across with fsaverage fixed and 01 with xhemi fixed."""
    pairs = [(p["split"], p["fixed"], p["moving"]) for p in embedded_module().make_pairs({"train": 0, "val": 1, "test": 2})]
    assert pairs == [("val", "fsaverage_val_00", "xhemi_val_00"),
                     ("test", "fsaverage_test_00", "fsaverage_test_01"), ("test", "xhemi_test_00", "xhemi_test_01"),
                     ("test", "fsaverage_test_00", "xhemi_test_00"), ("test", "xhemi_test_01", "fsaverage_test_01")]
