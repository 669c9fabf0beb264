"""Aggregation over seeds and pairs: seed-averaged scores, between-seed spread, bootstrap intervals, ranks, classes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from regbench.evaluation import aggregate, uncertainty
from regbench.io import InputError, write_csv, write_json
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


def test_seed_matrix_averages_a_pair_scored_twice_and_leaves_a_hole_where_a_seed_did_not_score_it():
    """Seed 0 scored pair 0 twice (1.0 and 3.0: their mean, 2.0; a third, NaN score is no score) and pair 1 once;
    seed 1 only pair 1 and a pair outside the list."""
    table = pd.DataFrame({"seed": [0, 0, 0, 0, 1, 1], "fixed": ["f0", "f0", "f0", "f1", "f1", "f9"],
                          "moving": ["m0", "m0", "m0", "m1", "m1", "m9"], "dice": [1.0, 3.0, np.nan, 5.0, 7.0, 9.0]})
    matrix = uncertainty.seed_matrix(table, "dice", PAIRS)
    np.testing.assert_array_equal(matrix, [[2.0, 5.0], [np.nan, 7.0]])


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
    assert 0.88 <= covered / 200 <= 0.99   # (an interval far too wide would cover the mean every time)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.05 / np.sqrt(40), rel=0.15)   # the normal theory width
    matrix = 0.7 + rng.normal(0, 0.05, size=(3, 40))
    first = uncertainty.bootstrap_means({"m": matrix}, resamples=100, seed=0)["m"]
    np.testing.assert_array_equal(first, uncertainty.bootstrap_means({"m": matrix}, resamples=100, seed=0)["m"])


def test_the_bootstrap_interval_resamples_the_seeds():
    """Two seeds that score 0.6 and 0.8 on every one of 40 pairs: a replicate that draws seed 0 twice has mean 0.6
    (a quarter of them), seed 1 twice 0.8 (a quarter), else 0.7, so the 95 % interval is (0.6, 0.8); averaging the
    seeds first would give (0.7, 0.7)."""
    matrix = np.vstack([np.full(40, 0.6), np.full(40, 0.8)])
    means = uncertainty.bootstrap_means({"m": matrix}, resamples=1000, seed=0)["m"]
    assert uncertainty.confidence_interval(means) == pytest.approx((0.6, 0.8))
    assert np.mean(np.isclose(means, 0.7)) == pytest.approx(0.5, abs=0.05)


def test_the_confidence_interval_is_the_percentile_interval_of_the_finite_samples():
    """0 to 100 (and NaN replicates, which hold no score): the 2.5th and 97.5th percentiles are 2.5 and 97.5."""
    samples = np.concatenate([np.arange(101.0), [np.nan, np.nan]])
    assert uncertainty.confidence_interval(samples) == pytest.approx((2.5, 97.5))
    assert uncertainty.confidence_interval(samples, level=0.5) == pytest.approx((25.0, 75.0))
    assert np.isnan(uncertainty.confidence_interval(np.full(5, np.nan))).all()


def test_bootstrap_means_refuses_methods_scored_on_different_pairs():
    with pytest.raises(ValueError, match=r"same pairs; pair counts \[2, 3\]"):
        uncertainty.bootstrap_means({"a": np.zeros((1, 2)), "b": np.zeros((2, 3))}, resamples=10, seed=0)


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
    assert summary.at["a", "p_first"] == summary.at["b", "p_first"] == 0.0
    distribution = uncertainty.rank_distribution(uncertainty.bootstrap_ranks(means)).set_index(["method", "rank"])
    assert distribution.loc["winner"].to_dict("index") == {1: {"share": 1.0}}
    # every replicate puts exactly one twin second
    assert distribution.at[("a", 2), "share"] + distribution.at[("b", 2), "share"] == pytest.approx(1.0)


def test_the_bootstrap_draws_the_same_pairs_for_every_method():
    """b is a plus 0.001 on every pair (one seed each): on the same drawn pairs b's mean is above a's in every
    replicate, though 0.001 is far below the spread of either mean over drawn pairs (0.05 / sqrt(30), about 0.009)."""
    a = np.random.default_rng(1).normal(0.7, 0.05, size=(1, 30))
    means = uncertainty.bootstrap_means({"a": a, "b": a + 0.001}, 1000, seed=0)
    summary = uncertainty.rank_summary(uncertainty.bootstrap_ranks(means)).set_index("method")
    assert summary.at["b", "p_first"] == 1.0 and (summary.at["b", "rank_low"], summary.at["b", "rank_high"]) == (1, 1)
    assert summary.at["a", "p_first"] == 0.0 and (summary.at["a", "rank_low"], summary.at["a", "rank_high"]) == (2, 2)


def _write_run(results, method, seed, dice, supervision="none", pairs=PAIRS):
    folder = run_dir(results, "toy", method, seed)
    write_csv(folder / "pairs.csv", pd.DataFrame({"fixed": [f for f, _ in pairs], "moving": [m for _, m in pairs],
                                                  "dice": dice, "fold_pct": [0.0] * len(pairs)}))
    write_json(folder / "eval.json", {"supervision": supervision, "recipe_name": "quick", "deviations": []})


def test_the_leaderboard_averages_seeds_and_ranks_within_classes(tmp_path):
    """Two pairs. "supervised" scores 0.9 and 0.8 with every seed, "tool" and "weaker" (both classical, one run each)
    0.6 and 0.5, 0.4 and 0.3: a replicate draws pair 0 twice (a quarter of them), pair 1 twice (a quarter) or both,
    so their 95 % intervals are exactly (0.8, 0.9), (0.5, 0.6) and (0.3, 0.4). "learned" (seed-averaged pairs 0.82,
    0.72) trails "supervised" by 0.06 to 0.10 in every replicate and leads "tool" by far: every rank is certain."""
    results = tmp_path / "results"
    for seed, dice in zip([0, 1, 2], [[0.80, 0.70], [0.84, 0.74], [0.82, 0.72]]):
        _write_run(results, "learned", seed, dice)
    for seed, dice in zip([0, 1, 2], [[0.90, 0.80], [0.90, 0.80], [0.90, 0.80]]):
        _write_run(results, "supervised", seed, dice, "labels")
    _write_run(results, "tool", 0, [0.60, 0.50], "classical")
    _write_run(results, "weaker", 0, [0.40, 0.30], "classical")
    board = aggregate.write_leaderboard(results, "toy", {"learned": [0, 1, 2], "supervised": [0, 1, 2],
                                                         "tool": [0], "weaker": [0]}, resamples=500).set_index("method")
    assert board.at["learned", "dice_mean"] == pytest.approx(0.77)       # pairs 0.82 and 0.72, over seeds
    assert board.at["learned", "dice_seed_std"] == pytest.approx(0.02)   # seed means 0.75, 0.79, 0.77
    assert board.at["supervised", "dice_seed_std"] == 0.0
    assert np.isnan(board.at["tool", "dice_seed_std"])                   # one run: no spread over seeds
    assert board.at["learned", "n_seeds"] == 3 and board.at["tool", "n_seeds"] == 1
    # 0.3 quantile of the seed-averaged pair Dice: 0.72 + 0.3 x (0.82 - 0.72)
    assert board["dsc30"].to_dict() == pytest.approx({"supervised": 0.83, "learned": 0.75, "tool": 0.53,
                                                      "weaker": 0.33})
    for method, (low, high) in {"supervised": (0.8, 0.9), "tool": (0.5, 0.6), "weaker": (0.3, 0.4)}.items():
        assert (board.at[method, "dice_ci_low"], board.at[method, "dice_ci_high"]) == pytest.approx((low, high))
    # learned: within its lowest and highest possible replicate means (0.70 and 0.84), and wider than resampling the
    # pairs alone would make it (0.72, 0.82): its seeds (0.00, +0.04, +0.02 on both pairs) are resampled too
    assert 0.70 <= board.at["learned", "dice_ci_low"] < 0.72 and 0.82 < board.at["learned", "dice_ci_high"] <= 0.84
    assert board["rank"].to_dict() == {"supervised": 1, "learned": 2, "tool": 3, "weaker": 4}
    assert (board["rank_low"] == board["rank"]).all() and (board["rank_high"] == board["rank"]).all()
    assert board["p_first"].to_dict() == {"supervised": 1.0, "learned": 0.0, "tool": 0.0, "weaker": 0.0}
    assert dict(board["supervision"]) == {"supervised": "labels", "learned": "none", "tool": "classical",
                                          "weaker": "classical"}
    # within the classes: tool is first of the classical ones, weaker second
    assert board["class_rank"].to_dict() == {"supervised": 1, "learned": 1, "tool": 1, "weaker": 2}
    assert (board["class_rank_low"] == board["class_rank"]).all()
    assert (board["class_rank_high"] == board["class_rank"]).all()
    assert board["class_p_first"].to_dict() == {"supervised": 1.0, "learned": 1.0, "tool": 1.0, "weaker": 0.0}
    scores = pd.read_csv(results / "toy" / "scores.csv")
    assert len(scores) == 3 * 2 + 3 * 2 + 2 + 2 and set(scores["seed"]) == {0, 1, 2}
    ranks = pd.read_csv(results / "toy" / "ranks.csv")
    assert set(ranks["scope"]) == {"overall", "none", "labels", "classical"}
    classical = ranks[ranks["scope"] == "classical"].set_index("method")
    assert classical["rank"].to_dict() == {"tool": 1, "weaker": 2} and (classical["share"] == 1.0).all()


def test_the_leaderboard_refuses_runs_scored_on_different_pairs(tmp_path):
    """A seed scored on other pairs than the method's first seed, or a method on other pairs than the first
    method: one InputError naming the pairs.csv and the problem."""
    results = tmp_path / "results"
    other = [("f0", "m0"), ("f2", "m2")]
    _write_run(results, "a", 0, [0.8, 0.7])
    _write_run(results, "a", 1, [0.8, 0.7], pairs=other)
    with pytest.raises(InputError, match=r"a/seed1/pairs\.csv: its test pairs differ from seed 0's"):
        aggregate.leaderboard(results, "toy", {"a": [0, 1]}, resamples=10)
    _write_run(results, "b", 0, [0.8, 0.7], pairs=other)
    _write_run(results, "b", 1, [0.8, 0.7], pairs=other)
    with pytest.raises(InputError, match=r"b/seed0/pairs\.csv: its test pairs differ from a's; methods must be "
                                         r"scored on the same pairs"):
        aggregate.leaderboard(results, "toy", {"a": [0], "b": [0, 1]}, resamples=10)


@pytest.mark.parametrize("method_id, overrides, expected", [
    ("voxelmorph", {}, "none"), ("voxelmorph", {"dice_weight": 0.01}, "labels"),
    ("pyramid", {}, "labels"), ("pyramid", {"dice_weight": 0.0}, "none"),
    ("birnet", {}, "teacher"), ("syn", {}, "classical"), ("identity", {}, "classical"),
    ("c2fvit", {}, "none"), ("c2fvit", {"dice_weight": 0.5}, "labels")])
def test_the_supervision_class_follows_the_resolved_recipe(method_id, overrides, expected):
    method = load_method(method_id)
    assert method.supervision(method.recipe("quick", overrides)) == expected
