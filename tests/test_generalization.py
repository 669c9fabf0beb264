"""A trained network on another dataset's test pairs (config evaluate_on): the grids, the scores, the workflow."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from regbench.data.prepared import PreparedDataset
from regbench.evaluation.scoring import evaluate_method
from regbench.geometry import GridAdapter
from regbench.learn2reg import displacement_name, read_displacement
from regbench.plugins import load_dataset, load_method
from regbench.training.loop import load_trained, train
from regbench.workflow import cli
from short_training import mean_dice

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wide_shifted(tmp_path_factory):
    """embedded2d_shift on a wider grid (an 18 mm margin: 192 x 192 at 1 mm, embedded2d's 176 x 176 centred in it,
    8 voxels in from each side), two test subjects per template (4 test pairs)."""
    root = tmp_path_factory.mktemp("wide_shifted")
    source = load_dataset("embedded2d_shift")
    source.prepare(None, root, source.resolve_options({"n_train": 0, "n_val": 0, "n_test": 2, "margin_mm": 18.0}))
    return PreparedDataset(root)


@pytest.fixture(scope="module")
def trained_voxelmorph(small_embedded2d, tmp_path_factory):
    """VoxelMorph trained a few steps on the small embedded2d, on its own 176 x 176 grid (no working grid)."""
    method = load_method("voxelmorph")
    recipe = method.recipe("quick", {"iterations": 6, "batch_size": 2, "working_size": 0, "checkpoint_every": 6})
    out = tmp_path_factory.mktemp("voxelmorph")
    train(method, recipe, small_embedded2d, out, seed=0)
    net, recipe = load_trained(method, out / "model.pt")
    return method, net, recipe


def test_a_model_registers_another_grid_s_pairs_on_its_training_grid_and_scores_them_on_the_target_s(
        small_embedded2d, wide_shifted, trained_voxelmorph, tmp_path):
    method, net, recipe = trained_voxelmorph
    assert small_embedded2d.shape == (176, 176) and wide_shifted.shape == (192, 192)
    trained_on = {"id": "embedded2d", "shape": list(small_embedded2d.shape), "spacing": list(small_embedded2d.spacing)}
    out = tmp_path / "on_embedded2d_shift"
    table = evaluate_method(method, recipe, wide_shifted, out, net=net, runtime_repeats=0, trained_on=trained_on,
                            export_dir=out / "displacements")
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["dataset"], summary["trained_on"], summary["working_grid"]) == ("embedded2d_shift", "embedded2d",
                                                                                     "176x176")
    assert len(table) == len(wide_shifted.split_pairs("test")) == 4
    for pair in table.itertuples():
        path = out / "displacements" / displacement_name(pair.fixed, pair.moving)
        u = read_displacement(path, wide_shifted.shape)                # on the target's grid
        assert u.shape == (2, 192, 192)
        # the network saw the central 176 x 176 (the grid it was trained on, 8 voxels in): there, the displacement
        # is the network's own output on the cropped images, voxel for voxel (the same 1 mm spacing)
        batch = wide_shifted.pair(pair.fixed, pair.moving)
        crop = (slice(None), slice(None), slice(8, 184), slice(8, 184))
        with torch.no_grad():
            direct = method.register(net, batch["fixed"][crop], batch["moving"][crop], recipe)[0].double().numpy()
        assert np.abs(direct).max() > 0.05                              # the network moves something
        np.testing.assert_allclose(u[:, 8:184, 8:184], direct, atol=1e-4)
        # and its scores are those of a direct evaluation of that file (`regbench evaluate`)
        segs = {s: wide_shifted.root / wide_shifted.subjects.at[s, "seg"] for s in (pair.fixed, pair.moving)}
        labels = ",".join(str(v) for v in wide_shifted.label_values)
        assert cli.main(["evaluate", "--fixed-seg", str(segs[pair.fixed]), "--moving-seg", str(segs[pair.moving]),
                         "--disp", str(path), "--labels", labels, "--json", str(tmp_path / "one.json")]) == 0
        direct_scores = json.loads((tmp_path / "one.json").read_text())
        for metric in ("dice", "hd95", "fold_pct", "sdlogj", "ndv"):
            assert getattr(pair, metric) == pytest.approx(direct_scores[metric], abs=1e-6), metric


def test_a_model_on_its_own_grid_and_without_training_runs_as_in_domain(small_embedded2d):
    """Where the target's grid is the training grid, nothing is resampled; a network of another dimension is refused."""
    adapter = load_method("voxelmorph").grid_adapter((176, 176), (1.0, 1.0), {"working_size": 128},
                                                      trained_on=((176, 176), (1.0, 1.0)))
    assert adapter.record()["working_grid"] == "128x128"
    assert load_method("identity").grid_adapter((192, 192), (1.0, 1.0), {}).record()["working_grid"] == "dataset"
    onto = GridAdapter((176, 176), (1.0, 1.0), None).onto((192, 192), (1.0, 1.0))
    assert (onto.shape, onto.spacing, onto.source_shape) == ((176, 176), (1.0, 1.0), (192, 192))
    with pytest.raises(ValueError, match="trained on 2D images cannot register 3D"):
        GridAdapter((176, 176), (1.0, 1.0), None).onto((96, 96, 112), (2.0, 2.0, 2.0))


TINY = """
seed: 0
seeds: [0, 1]
torch_threads: 1
datasets:
  embedded2d: {n_train: 4, n_val: 1, n_test: 2}
evaluate_on:
  embedded2d:
    embedded2d_shift: {n_train: 0, n_val: 1, n_test: 3}
methods:
  identity: {}
  affine: {}
  voxelmorph:
    overrides: {iterations: 30, batch_size: 2, checkpoint_every: 10}
evaluation:
  runtime_repeats: 1
bootstrap: {resamples: 200, seed: 0}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generalization")
    (workdir / "tiny.yaml").write_text(TINY)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(ROOT / "Snakefile"),
         "--directory", str(workdir), "--configfile", str(workdir / "tiny.yaml")],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_every_run_is_scored_on_the_target_and_the_table_joins_them(tiny_run):
    results, target = tiny_run / "results" / "embedded2d", PreparedDataset(tiny_run / "data" / "embedded2d_shift" / "prepared")
    n_pairs = len(target.split_pairs("test"))
    assert n_pairs == 7
    for method, seeds in (("identity", [0]), ("affine", [0, 1]), ("voxelmorph", [0, 1])):
        for seed in seeds:
            pairs = pd.read_csv(results / method / f"seed{seed}" / "on_embedded2d_shift" / "pairs.csv")
            assert len(pairs) == n_pairs
            summary = json.loads((results / method / f"seed{seed}" / "on_embedded2d_shift" / "eval.json").read_text())
            assert (summary["dataset"], summary["trained_on"]) == ("embedded2d_shift", "embedded2d")
            # one job a run: its own test pairs, then the target's, from one load of the model
            log_text = (tiny_run / "results" / "logs" / "embedded2d" / method / f"seed{seed}" / "register.log").read_text()
            assert f"{method} on embedded2d: mean Dice" in log_text and f"{method} on embedded2d_shift: mean Dice" in log_text
    assert not list((tiny_run / "results" / "logs").rglob("register_on_*.log"))
    table = pd.read_csv(results / "generalization.csv")
    assert sorted(zip(table["method"], table["evaluated_on"])) == sorted(
        (m, d) for m in ("identity", "affine", "voxelmorph") for d in ("embedded2d", "embedded2d_shift"))
    rows = table.set_index(["method", "evaluated_on"])
    # no registration on the target: the unregistered Dice of its test pairs, computed here from the label maps
    unregistered = [mean_dice(target.seg(p.fixed), target.seg(p.moving), target.label_values)
                    for p in target.split_pairs("test").itertuples()]
    assert rows.at[("identity", "embedded2d_shift"), "dice_mean"] == pytest.approx(np.mean(unregistered))
    # a learned method: each pair averaged over the seeds' runs, then over the pairs; the drop from in domain
    per_seed = [pd.read_csv(results / "voxelmorph" / f"seed{s}" / "on_embedded2d_shift" / "pairs.csv") for s in (0, 1)]
    seed_averaged = (per_seed[0]["dice"].to_numpy() + per_seed[1].set_index(["fixed", "moving"]).loc[
        list(zip(per_seed[0]["fixed"], per_seed[0]["moving"])), "dice"].to_numpy()) / 2
    assert rows.at[("voxelmorph", "embedded2d_shift"), "dice_mean"] == pytest.approx(seed_averaged.mean())
    home = pd.read_csv(results / "leaderboard.csv").set_index("method")
    for method in ("identity", "affine", "voxelmorph"):
        assert rows.at[(method, "embedded2d"), "dice_mean"] == pytest.approx(home.at[method, "dice_mean"])
        drop = rows.at[(method, "embedded2d"), "dice_mean"] - rows.at[(method, "embedded2d_shift"), "dice_mean"]
        assert rows.at[(method, "embedded2d_shift"), "dice_drop"] == pytest.approx(drop)
        low, high = rows.at[(method, "embedded2d_shift"), "dice_drop_ci_low"], rows.at[(method, "embedded2d_shift"),
                                                                                       "dice_drop_ci_high"]
        assert low <= drop <= high and high - low > 0.005
        assert rows.at[(method, "embedded2d_shift"), "n_seeds"] == (1 if method == "identity" else 2)
    # each dataset's MI(intensity; labels): the mean over its test pairs of the prepared pairs.csv's
    target_pairs = pd.read_csv(tiny_run / "data" / "embedded2d_shift" / "prepared" / "pairs.csv")
    assert rows.at[("voxelmorph", "embedded2d_shift"), "pair_mi"] == pytest.approx(
        target_pairs.loc[target_pairs["split"] == "test", "intensity_label_mi"].mean())
    assert rows.at[("voxelmorph", "embedded2d"), "pair_mi"] > rows.at[("voxelmorph", "embedded2d_shift"), "pair_mi"]
    # the target's own leaderboard ranks the same methods on its pairs
    board = pd.read_csv(results / "on_embedded2d_shift" / "leaderboard.csv")
    assert sorted(board["method"]) == ["affine", "identity", "voxelmorph"] and (board["n_pairs"] == n_pairs).all()


def test_the_report_and_the_markdown_show_the_generalization_table(tiny_run):
    page = (tiny_run / "results" / "report" / "index.html").read_text()
    table = pd.read_csv(tiny_run / "results" / "embedded2d" / "generalization.csv")
    assert "Generalization: trained here, tested elsewhere" in page
    for mi in table.drop_duplicates("evaluated_on")["pair_mi"]:
        assert f"MI(i; s) {mi:.2f} bits" in page
    voxelmorph = table.set_index(["method", "evaluated_on"]).loc[("voxelmorph", "embedded2d_shift")]
    assert f"{voxelmorph['dice_drop']:+.3f}" in page
    markdown = (tiny_run / "results" / "leaderboard.md").read_text()
    assert "### Trained on embedded2d, tested elsewhere" in markdown
    line = next(l for l in markdown.split("### Trained on embedded2d")[1].splitlines() if l.startswith("| voxelmorph |"))
    assert line.startswith("| voxelmorph | none | ") and f"| {voxelmorph['dice_drop']:+.3f} (" in line


def test_the_drop_s_bootstrap_draws_each_seed_once_for_both_datasets():
    """Seeds 0 and 1 score 0.6 and 0.8 on each of 5 in-domain pairs and 0.1 less on each of 3 target pairs: with the
    same seeds drawn for both sets, every replicate's drop is 0.1 (seeds drawn apart would give -0.1 to 0.3)."""
    from regbench.evaluation import uncertainty

    first = np.array([[0.6] * 5, [0.8] * 5])
    second = first[:, :3] - 0.1
    samples = uncertainty.bootstrap_difference(first, second, resamples=1000, seed=0)
    assert samples.shape == (1000,)
    assert uncertainty.confidence_interval(samples) == pytest.approx((0.1, 0.1))
    with pytest.raises(ValueError, match="need the same seeds; 2 and 1 rows"):
        uncertainty.bootstrap_difference(first, second[:1], resamples=10, seed=0)


@pytest.mark.parametrize("on, message", [("[{", "--on is not valid JSON"),
                                         ('[{"prepared": "data/x/prepared"}]', "must be a JSON list of")])
def test_a_bad_on_argument_is_one_error_before_anything_is_read_or_written(tmp_path, on, message):
    from regbench.workflow import cli

    settings = {"method": "identity", "torch_threads": 1, "device": "cpu", "recipe": {}}
    with pytest.raises(SystemExit, match=message):
        cli.main(["register", "--prepared", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
                  "--settings", json.dumps(settings), "--on", on])
    assert not (tmp_path / "out").exists()
