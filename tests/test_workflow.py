"""The whole workflow on a tiny config: prepare -> train -> register -> aggregate -> report."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from regbench.evaluation.aggregate import TIMING_COLUMNS

ROOT = Path(__file__).resolve().parents[1]

TINY = """
seed: 0
seeds: [0, 1]
torch_threads: 1
datasets:
  embedded2d: {n_train: 4}
methods:
  identity: {}
  voxelmorph:
    overrides: {iterations: 30, batch_size: 2, checkpoint_every: 10}
instance_optimisation: {methods: [voxelmorph], steps: 5}
evaluation:
  runtime_repeats: 1
"""


def run_workflow(workdir: Path) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tiny.yaml").write_text(TINY)
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(ROOT / "Snakefile"),
         "--directory", str(workdir), "--configfile", str(workdir / "tiny.yaml")],
        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    runs = []
    for name in ("first", "second"):
        workdir = tmp_path_factory.mktemp(name)
        result = run_workflow(workdir)
        assert result.returncode == 0, result.stderr[-4000:]
        runs.append(workdir)
    return runs


def test_every_contracted_file_is_written(tiny_runs):
    """One folder per run: a learned method trains once per seed, a deterministic one runs once."""
    results = tiny_runs[0] / "results"
    for method, seeds in (("identity", [0]), ("voxelmorph", [0, 1])):
        assert sorted(p.name for p in (results / "embedded2d" / method).iterdir()) == [f"seed{s}" for s in seeds]
        for seed in seeds:
            for name in ("pairs.csv", "labels.csv", "eval.json"):
                assert (results / "embedded2d" / method / f"seed{seed}" / name).exists()
    for seed in (0, 1):
        for name in ("model.pt", "train_log.csv", "train.json"):
            assert (results / "embedded2d" / "voxelmorph" / f"seed{seed}" / name).exists()
    first, second = (json.loads((results / "embedded2d" / "voxelmorph" / f"seed{s}" / "train.json").read_text())
                     for s in (0, 1))
    assert (first["seed"], second["seed"]) == (0, 1) and first["final_loss"] != second["final_loss"]
    for name in ("leaderboard.csv", "stats.csv", "scores.csv", "ranks.csv"):
        assert (results / "embedded2d" / name).exists()
    assert len(re.findall(r"^\| [^|]+ \| identity( ◆)?( †)? \|", (results / "leaderboard.md").read_text(), re.M)) == 1
    page = (results / "report" / "index.html").read_text()
    assert re.search(r"MI\(intensity; labels\) \d\.\d\d bits \(test\)", page)   # from dataset.json, per split
    assert (results / "report" / "embedded2d" / "dice_per_structure.png").stat().st_size > 10_000


def test_every_job_leaves_a_benchmark_record_of_its_wall_time(tiny_runs):
    """results/benchmarks/ mirrors results/logs/: one Snakemake record a job, read back per step."""
    from regbench.workflow.job_times import read_job_times, time_by_step

    results = tiny_runs[0] / "results"
    logs = {p.relative_to(results / "logs").with_suffix("").as_posix() for p in (results / "logs").rglob("*.log")}
    jobs = read_job_times(results)
    assert set(jobs["job"]) == logs
    steps = time_by_step(jobs)
    # identity once; voxelmorph and voxelmorph+io once a seed
    assert steps.loc["train", "jobs"] == 2 and steps.loc["register", "jobs"] == 5
    assert (jobs["wall_s"] > 0).all()


def test_leaderboard_has_one_row_per_method_and_the_contracted_columns(tiny_runs):
    board = pd.read_csv(tiny_runs[0] / "results" / "embedded2d" / "leaderboard.csv")
    assert sorted(board["method"]) == ["identity", "voxelmorph", "voxelmorph+io"]
    pairs = pd.read_csv(tiny_runs[0] / "results" / "embedded2d" / "identity" / "seed0" / "pairs.csv")
    assert len(pairs) >= 20
    assert list(board.columns[:1]) == ["method"]
    for metric in ("dice", "hd95", "fold_pct", "sdlogj", "epe", "runtime_s"):
        for stat in ("mean", "std", "median"):
            assert f"{metric}_{stat}" in board.columns
    assert (board["n_pairs"] == len(pairs)).all()
    assert dict(zip(board["method"], board["n_seeds"])) == {"identity": 1, "voxelmorph": 2, "voxelmorph+io": 2}
    for column in ("dice_ci_low", "dice_ci_high", "dice_seed_std", "rank", "rank_low", "rank_high", "p_first",
                   "supervision", "class_rank"):
        assert column in board.columns, column
    identity = board.set_index("method").loc["identity"]
    # no registration: no folding, log-Jacobian exactly 0, and Dice well below 1
    assert identity["fold_pct_mean"] == 0 and identity["sdlogj_mean"] == 0
    assert 0.3 < identity["dice_mean"] < 0.95
    # identity's EPE is the mean length of the true displacement: several voxels for these subjects
    assert identity["epe_mean"] > 1.0


def test_the_instance_optimised_row_registers_with_its_method_s_runs_fine_tuned_on_each_pair(tiny_runs):
    import torch

    from regbench.data.prepared import PreparedDataset
    from regbench.evaluation import metrics
    from regbench.plugins import load_method
    from regbench.training.instance import instance_optimised_registration
    from regbench.training.loop import load_trained

    results = tiny_runs[0] / "results" / "embedded2d"
    row = results / "voxelmorph+io" / "seed1"
    assert sorted(p.name for p in row.iterdir()) == ["eval.json", "labels.csv", "pairs.csv"]   # it trains nothing
    evaluation = json.loads((row / "eval.json").read_text())
    assert evaluation["method"] == "voxelmorph+io" and evaluation["supervision"] == "none"
    assert evaluation["instance_optimisation"] == {"steps": 5, "lr": 1e-3, "method": "voxelmorph"}
    # one pair again, directly: seed 1's trained network fine-tuned on it gives the scores in pairs.csv
    dataset = PreparedDataset(tiny_runs[0] / "data" / "embedded2d" / "prepared")
    pairs = pd.read_csv(row / "pairs.csv")
    pair = pairs.iloc[3]
    method = load_method("voxelmorph")
    net, recipe = load_trained(method, results / "voxelmorph" / "seed1" / "model.pt")
    batch = dataset.pair(pair["fixed"], pair["moving"])
    torch.set_num_threads(1)
    u = instance_optimised_registration(method, net, batch["fixed"], batch["moving"], recipe,
                                        method.grid_adapter(dataset.shape, dataset.spacing, recipe), 5, 1e-3)
    scores, _ = metrics.pair_metrics(dataset.seg(pair["fixed"]), dataset.seg(pair["moving"]),
                                     u[0].double().numpy(), dataset.label_values, dataset.spacing)
    assert scores["dice"] == pytest.approx(pair["dice"], abs=1e-9)
    plain = pd.read_csv(results / "voxelmorph" / "seed1" / "pairs.csv")
    assert not np.allclose(plain["dice"], pairs["dice"])
    # the fine-tuning is part of the registration's time
    assert pairs["runtime_s"].median() > plain["runtime_s"].median()


def test_two_runs_give_identical_numbers_apart_from_timings(tiny_runs):
    first, second = (pd.read_csv(run / "results" / "embedded2d" / "leaderboard.csv") for run in tiny_runs)
    keep = [c for c in first.columns if not c.startswith(TIMING_COLUMNS)]
    pd.testing.assert_frame_equal(first[keep], second[keep])


FAILING = """
seed: 0
torch_threads: 1
on_failure: skip
datasets:
  embedded2d: {n_train: 4, n_test: 3}
methods:
  identity: {}
  voxelmorph:
    overrides: {iterations: 40, lr: 1.0e+12}
evaluation:
  runtime_repeats: 1
"""


def test_a_diverging_method_is_reported_and_the_rest_finishes(tmp_path):
    """With on_failure: skip, a NaN loss is recorded and the leaderboard ranks the other methods."""
    (tmp_path / "failing.yaml").write_text(FAILING)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(tmp_path / "failing.yaml")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    board = pd.read_csv(tmp_path / "results" / "embedded2d" / "leaderboard.csv")
    assert list(board["method"]) == ["identity"]
    summary = json.loads((tmp_path / "results" / "embedded2d" / "leaderboard.json").read_text())
    assert list(summary["failed"]) == ["voxelmorph"]
    assert re.search(r"seed 0, train: TrainingDiverged: voxelmorph: loss term '\w+' is (nan|inf)",
                     summary["failed"]["voxelmorph"])
    assert "Failed (not ranked): **voxelmorph** (seed 0, train: TrainingDiverged" in \
        (tmp_path / "results" / "leaderboard.md").read_text()
