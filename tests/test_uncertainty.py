"""Aggregation over seeds and pairs: seed-averaged scores, between-seed spread, bootstrap intervals, ranks, classes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from regbench.evaluation import aggregate, uncertainty
from regbench.io import write_csv, write_json
from regbench.layout import run_dir
from regbench.plugins import load_method

PAIRS = [("f0", "m0"), ("f1", "m1")]


def long_table(values: dict[int, list[float]]) -> pd.DataFrame:
    """Rows (seed, fixed, moving, dice) from {seed: [dice of each pair of PAIRS]}."""
    return pd.DataFrame([{"seed": s, "fixed": f, "moving": m, "dice": d}
                         for s, scores in values.items() for (f, m), d in zip(PAIRS, scores)])


def test_seed_averaged_scores_and_the_between_seed_std_by_hand():
    table = long_table({0: [1.0, 2.0], 1: [3.0, 4.0]})
    averaged = uncertainty.seed_averaged(table)
    assert averaged["dice"].tolist() == [2.0, 3.0]                 # each pair's mean over the two seeds
    matrix = uncertainty.seed_matrix(table, "dice", PAIRS)
    np.testing.assert_array_equal(matrix, [[1.0, 2.0], [3.0, 4.0]])
    # per-seed means 1.5 and 3.5: their std (ddof 1) is sqrt(2)
    assert uncertainty.between_seed_std(matrix) == pytest.approx(np.sqrt(2))
    assert np.isnan(uncertainty.between_seed_std(matrix[:1]))     # one seed: no training variance to report


def test_the_bootstrap_interval_covers_a_known_mean():
    """Scores 0.7 + pair effect + noise over 40 pairs and 3 seeds: the 95 % interval covers the true mean 0.7 in
    about 95 % of 200 simulated benchmarks (a percentile bootstrap is a little narrow for 40 pairs)."""
    rng = np.random.default_rng(7)
    covered, widths = 0, []
    for simulation in range(200):
        pair_effect = rng.normal(0, 0.05, size=(1, 40))
        matrix = 0.7 + pair_effect + rng.normal(0, 0.01, size=(3, 40))
        low, high = uncertainty.confidence_interval(
            uncertainty.bootstrap_means({"m": matrix}, resamples=500, seed=simulation)["m"])
        covered += low < 0.7 < high
        widths.append(high - low)
    assert 0.88 <= covered / 200 <= 1.0
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.05 / np.sqrt(40), rel=0.15)   # the normal theory width
    matrix = 0.7 + rng.normal(0, 0.05, size=(3, 40))
    first = uncertainty.bootstrap_means({"m": matrix}, resamples=100, seed=0)["m"]
    np.testing.assert_array_equal(first, uncertainty.bootstrap_means({"m": matrix}, resamples=100, seed=0)["m"])


def test_ranks_of_indistinguishable_methods_are_wide_and_of_a_clear_winner_narrow():
    rng = np.random.default_rng(0)
    pairs = rng.normal(0.7, 0.05, size=30)
    twin_a = pairs + rng.normal(0, 0.01, size=(3, 30))
    twin_b = pairs + rng.normal(0, 0.01, size=(3, 30))
    winner = pairs + 0.1 + rng.normal(0, 0.01, size=(3, 30))
    means = uncertainty.bootstrap_means({"a": twin_a, "b": twin_b, "winner": winner}, 1000, seed=0)
    summary = uncertainty.rank_summary(uncertainty.bootstrap_ranks(means)).set_index("method")
    assert (summary.at["winner", "rank_low"], summary.at["winner", "rank_high"]) == (1, 1)
    assert summary.at["winner", "p_first"] == 1.0
    for twin in ("a", "b"):   # the data cannot order the twins: both take rank 2 and rank 3
        assert (summary.at[twin, "rank_low"], summary.at[twin, "rank_high"]) == (2, 3)
    distribution = uncertainty.rank_distribution(uncertainty.bootstrap_ranks(means))
    shares = distribution.groupby("method")["share"].sum()
    np.testing.assert_allclose(shares.to_numpy(), 1.0)


def _write_run(results, method, seed, dice, supervision="none"):
    folder = run_dir(results, "toy", method, seed)
    write_csv(folder / "pairs.csv", pd.DataFrame({"fixed": [f for f, _ in PAIRS], "moving": [m for _, m in PAIRS],
                                                  "dice": dice, "fold_pct": [0.0, 0.0]}))
    write_json(folder / "eval.json", {"supervision": supervision, "recipe_name": "quick", "deviations": []})


def test_the_leaderboard_averages_seeds_and_ranks_within_classes(tmp_path):
    results = tmp_path / "results"
    for seed, dice in zip([0, 1, 2], [[0.80, 0.70], [0.84, 0.74], [0.82, 0.72]]):
        _write_run(results, "learned", seed, dice)
    for seed, dice in zip([0, 1, 2], [[0.90, 0.80], [0.90, 0.80], [0.90, 0.80]]):
        _write_run(results, "supervised", seed, dice, "labels")
    _write_run(results, "tool", 0, [0.60, 0.50], "classical")
    board = aggregate.write_leaderboard(results, "toy", {"learned": [0, 1, 2], "supervised": [0, 1, 2],
                                                         "tool": [0]}, resamples=500).set_index("method")
    assert board.at["learned", "dice_mean"] == pytest.approx(0.77)       # pairs 0.82 and 0.72, over seeds
    assert board.at["learned", "dice_seed_std"] == pytest.approx(0.02)   # seed means 0.75, 0.79, 0.77
    assert board.at["learned", "n_seeds"] == 3 and board.at["tool", "n_seeds"] == 1
    assert board.at["learned", "dice_ci_low"] <= 0.77 <= board.at["learned", "dice_ci_high"]
    assert list(board["rank"].sort_values().index) == ["supervised", "learned", "tool"]
    assert dict(board["supervision"]) == {"supervised": "labels", "learned": "none", "tool": "classical"}
    assert (board["class_rank"] == 1).all()                  # each alone in its class: first there
    scores = pd.read_csv(results / "toy" / "scores.csv")
    assert len(scores) == 3 * 2 + 3 * 2 + 2 and set(scores["seed"]) == {0, 1, 2}
    ranks = pd.read_csv(results / "toy" / "ranks.csv")
    assert set(ranks["scope"]) == {"overall", "none", "labels", "classical"}


@pytest.mark.parametrize("method_id, overrides, expected", [
    ("voxelmorph", {}, "none"), ("voxelmorph", {"dice_weight": 0.01}, "labels"),
    ("pyramid", {}, "labels"), ("pyramid", {"dice_weight": 0.0}, "none"),
    ("birnet", {}, "teacher"), ("syn", {}, "classical"), ("identity", {}, "classical"),
    ("c2fvit", {}, "none"), ("c2fvit", {"dice_weight": 0.5}, "labels")])
def test_the_supervision_class_follows_the_resolved_recipe(method_id, overrides, expected):
    method = load_method(method_id)
    assert method.supervision(method.recipe("quick", overrides)) == expected
