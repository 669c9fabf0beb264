"""The whole workflow on a tiny config: prepare -> train -> register -> aggregate -> report."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from regbench.evaluation.aggregate import TIMING_COLUMNS

ROOT = Path(__file__).resolve().parents[1]

TINY = """
seed: 0
torch_threads: 1
datasets:
  embedded2d: {n_train: 4}
methods:
  identity: {}
  voxelmorph:
    overrides: {iterations: 30, batch_size: 2, checkpoint_every: 10}
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
    results = tiny_runs[0] / "results"
    for method in ("identity", "voxelmorph"):
        for name in ("pairs.csv", "labels.csv", "eval.json"):
            assert (results / "embedded2d" / method / name).exists()
    for name in ("model.pt", "train_log.csv", "train.json"):
        assert (results / "embedded2d" / "voxelmorph" / name).exists()
    assert len(re.findall(r"^\| identity( ◆)? \|", (results / "leaderboard.md").read_text(), re.M)) == 1
    assert (results / "report" / "index.html").exists()
    assert (results / "report" / "embedded2d" / "dice_per_structure.png").stat().st_size > 10_000


def test_leaderboard_has_one_row_per_method_and_the_contracted_columns(tiny_runs):
    board = pd.read_csv(tiny_runs[0] / "results" / "embedded2d" / "leaderboard.csv")
    assert sorted(board["method"]) == ["identity", "voxelmorph"]
    pairs = pd.read_csv(tiny_runs[0] / "results" / "embedded2d" / "identity" / "pairs.csv")
    assert len(pairs) >= 20
    assert list(board.columns[:1]) == ["method"]
    for metric in ("dice", "hd95", "fold_pct", "sdlogj", "epe", "runtime_s"):
        for stat in ("mean", "std", "median"):
            assert f"{metric}_{stat}" in board.columns
    assert (board["n_pairs"] == len(pairs)).all()
    identity = board.set_index("method").loc["identity"]
    # no registration: no folding, log-Jacobian exactly 0, and Dice well below 1
    assert identity["fold_pct_mean"] == 0 and identity["sdlogj_mean"] == 0
    assert 0.3 < identity["dice_mean"] < 0.95
    # identity's EPE is the mean length of the true displacement: several voxels for these subjects
    assert identity["epe_mean"] > 1.0


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
    assert re.search(r"train: TrainingDiverged: voxelmorph: loss term '\w+' is (nan|inf)", summary["failed"]["voxelmorph"])
    assert "Failed (not ranked): **voxelmorph** (train: TrainingDiverged" in \
        (tmp_path / "results" / "leaderboard.md").read_text()
