"""Statistics between methods against scipy and by hand."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from regbench.evaluation import stats


def table(values, metric="dice"):
    return pd.DataFrame({"fixed": [f"f{i}" for i in range(len(values))],
                         "moving": [f"m{i}" for i in range(len(values))], metric: values})


def test_holm_by_hand():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04, kept monotone)
    np.testing.assert_allclose(stats.holm([0.04, 0.01, 0.02]), [0.04, 0.03, 0.04])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])
    # clipped at 1: 0.6 x2 = 1.2 (then 0.7 x1 = 0.7, raised to the 1.2 before it) would exceed any probability
    np.testing.assert_allclose(stats.holm([0.6, 0.7]), [1.0, 1.0])
    # monotone below 1: 0.01 x3 = 0.03, 0.04 x2 = 0.08, 0.045 x1 = 0.045 raised to the 0.08 before it
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.045]), [0.03, 0.08, 0.08])
    assert np.isnan(stats.holm([np.nan, 0.01])[0]) and stats.holm([np.nan, 0.01])[1] == 0.01


def test_paired_tests_match_scipy_and_are_holm_corrected():
    rng = np.random.default_rng(0)
    a = rng.normal(0.7, 0.05, 15)
    b = a - 0.03 + rng.normal(0, 0.01, 15)
    c = a + rng.normal(0, 0.02, 15)
    tables = {"a": table(a), "b": table(b), "c": table(c)}
    tests = stats.paired_tests(tables, ["dice"])
    assert len(tests) == 3
    raw = []
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        expected = scipy_stats.wilcoxon(tables[x]["dice"], tables[y]["dice"])
        row = tests[(tests.method_a == x) & (tests.method_b == y)].iloc[0]
        assert row["p_value"] == pytest.approx(expected.pvalue)
        assert row["statistic"] == pytest.approx(expected.statistic)
        assert row["median_difference"] == pytest.approx(np.median(tables[x]["dice"] - tables[y]["dice"]))
        assert row["n"] == 15
        raw.append(expected.pvalue)
    np.testing.assert_allclose(tests["p_holm"], stats.holm(raw))


def test_paired_tests_align_pairs_and_drop_the_ones_a_method_did_not_score():
    """b's rows come shuffled, one of its pairs is NaN and one is missing: a and b are compared on the 13 pairs both
    scored, matched by (fixed, moving), not by row."""
    rng = np.random.default_rng(4)
    a = table(rng.normal(0.7, 0.05, 15))
    b = a.assign(dice=a["dice"] - 0.02 + rng.normal(0, 0.01, 15))
    b.loc[3, "dice"] = np.nan
    b = b.drop(index=7).sample(frac=1, random_state=0)
    row = stats.paired_tests({"a": a, "b": b}, ["dice"]).iloc[0]
    both = [i for i in range(15) if i not in (3, 7)]
    expected = scipy_stats.wilcoxon(a["dice"].to_numpy()[both], b.sort_index()["dice"].dropna().to_numpy())
    assert row["n"] == 13
    assert row["p_value"] == pytest.approx(expected.pvalue) and row["statistic"] == pytest.approx(expected.statistic)
    assert row["median_difference"] == pytest.approx(np.median(a["dice"].to_numpy()[both]
                                                               - b.sort_index()["dice"].dropna().to_numpy()))


def test_identical_methods_are_not_different():
    """Every paired difference is zero: Wilcoxon has nothing to rank (no statistic), the docstring's p is 1."""
    a = table(np.linspace(0.5, 0.8, 10))
    row = stats.paired_tests({"a": a, "copy": a.copy()}, ["dice"]).iloc[0]
    assert row["n"] == 10 and np.isnan(row["statistic"])
    assert (row["p_value"], row["p_holm"], row["median_difference"]) == (1.0, 1.0, 0.0)


def test_holm_s_family_is_one_metric_s_comparisons():
    """Two metrics, three methods: each metric's p_holm is Holm over its own 3 raw p, not over all 6."""
    rng = np.random.default_rng(5)
    a = rng.normal(0.7, 0.05, 15)
    values = {"a": a, "b": a - 0.03 + rng.normal(0, 0.01, 15), "c": a + rng.normal(0, 0.02, 15)}
    tables = {m: table(v).assign(hd95=1 - v) for m, v in values.items()}
    tests = stats.paired_tests(tables, ["dice", "hd95"])
    assert list(tests["metric"]) == ["dice"] * 3 + ["hd95"] * 3
    for metric in ("dice", "hd95"):
        block = tests[tests["metric"] == metric]
        np.testing.assert_allclose(block["p_holm"], stats.holm(block["p_value"]))
    # the 6 raw p as one family would give other values (so the check above can fail)
    assert not np.allclose(tests["p_holm"], stats.holm(tests["p_value"]))


def test_not_worse_than_best_marks_the_tied_methods():
    rng = np.random.default_rng(1)
    best = rng.normal(0.8, 0.05, 20)
    tables = {"best": table(best), "tied": table(best + rng.normal(0, 0.002, 20)),
              "worse": table(best - 0.1 + rng.normal(0, 0.01, 20))}
    board = pd.DataFrame({"method": list(tables), "dice_mean": [t["dice"].mean() for t in tables.values()]})
    tests = stats.paired_tests(tables, ["dice"])
    verdict = stats.not_worse_than_best(board, tests)
    assert verdict["best"] and verdict["tied"] and not verdict["worse"]


def test_not_worse_than_best_reads_the_holm_p_either_way_round_and_needs_a_test():
    """Tests written by hand: "close" has raw p 0.01 but Holm p 0.06 (not worse), "tied" Holm p 0.5 (not worse),
    "far" Holm p 0.03 (worse), the best in either column; "untested" has no Dice test against the best (its only
    test is of HD95), so nothing shows it is as good: False."""
    board = pd.DataFrame({"method": ["best", "close", "tied", "far", "untested"],
                          "dice_mean": [0.8, 0.79, 0.78, 0.7, 0.6]})
    tests = pd.DataFrame({"metric": ["dice", "dice", "dice", "hd95"], "method_a": ["close", "best", "far", "best"],
                          "method_b": ["best", "tied", "best", "untested"], "p_value": [0.01, 0.4, 0.01, 0.5],
                          "p_holm": [0.06, 0.5, 0.03, 0.5]})
    assert stats.not_worse_than_best(board, tests) == {"best": True, "close": True, "tied": True, "far": False,
                                                       "untested": False}


def test_not_worse_than_best_takes_the_lowest_mean_where_lower_is_better():
    """HD95: "a" has the smallest mean, so it is the best; "b" differs from it (Holm p 0.01), "c" does not (0.2)."""
    board = pd.DataFrame({"method": ["b", "a", "c"], "hd95_mean": [4.0, 2.0, 2.5]})
    tests = pd.DataFrame({"metric": ["hd95", "hd95", "hd95"], "method_a": ["a", "a", "b"],
                          "method_b": ["b", "c", "c"], "p_value": [0.01, 0.2, 0.01], "p_holm": [0.01, 0.2, 0.01]})
    assert stats.not_worse_than_best(board, tests, "hd95") == {"b": False, "a": True, "c": True}


def test_p_against_finds_the_reference_on_either_side_of_the_metric_s_tests():
    tests = pd.DataFrame({"metric": ["dice", "dice", "dice", "hd95"],
                          "method_a": ["identity", "syn", "syn", "identity"],
                          "method_b": ["voxelmorph", "identity", "voxelmorph", "syn"],
                          "p_holm": [0.0004, 0.03, 0.5, 0.9]})
    assert stats.p_against(tests, "dice", "identity") == {"voxelmorph": 0.0004, "syn": 0.03}
    assert stats.p_against(tests, "hd95", "identity") == {"syn": 0.9}


def test_better_than_no_registration_needs_a_higher_mean_and_a_significant_test():
    rng = np.random.default_rng(3)
    floor = rng.normal(0.6, 0.05, 22)
    tables = {"identity": table(floor), "good": table(floor + 0.05 + rng.normal(0, 0.01, 22)),
              "same": table(floor + rng.normal(0, 0.01, 22)), "bad": table(floor - 0.05 + rng.normal(0, 0.01, 22))}
    board = pd.DataFrame({"method": list(tables), "dice_mean": [t["dice"].mean() for t in tables.values()]})
    tests = stats.paired_tests(tables, ["dice"])
    verdict = stats.better_than_reference(board, tests, "dice", "identity")
    # significantly different from the floor is not enough: "bad" is, and lies below it
    assert stats.p_against(tests, "dice", "identity")["bad"] < 0.05
    assert verdict == {"good": True, "same": False, "bad": False}
    # lower is better for HD95: a method with smaller distances than the floor's beats it
    hd = {m: table(5 - 4 * t["dice"].to_numpy(), "hd95") for m, t in tables.items()}
    board["hd95_mean"] = [t["hd95"].mean() for t in hd.values()]
    assert stats.better_than_reference(board, stats.paired_tests(hd, ["hd95"]), "hd95", "identity") == {
        "good": True, "same": False, "bad": False}
    # a board without the floor has nothing to say
    assert stats.better_than_reference(board[board.method != "identity"], tests, "dice", "identity") == {}


def test_rank_scores_share_ties():
    # wins 0, 2, 2, 1: places 0.1 (0 wins), 0.4 (1 win), 0.7 and 1.0 shared by the two with 2 wins
    np.testing.assert_allclose(stats.rank_scores([0, 2, 2, 1]), [0.1, 0.85, 0.85, 0.4])


def test_learn2reg_rank_orders_a_dominant_method_first():
    rng = np.random.default_rng(2)
    n = 30
    good = pd.DataFrame({"fixed": range(n), "moving": range(n), "dice": rng.normal(0.8, 0.02, n),
                         "hd95": rng.normal(2, 0.1, n), "sdlogj_l2r": rng.normal(0.05, 0.01, n),
                         "runtime_s": rng.normal(0.1, 0.01, n)})
    bad = good.assign(dice=good.dice - 0.2, hd95=good.hd95 + 2, sdlogj_l2r=good.sdlogj_l2r + 0.1,
                      runtime_s=good.runtime_s + 1)
    ranked = stats.learn2reg_rank({"bad": bad, "good": good}).set_index("method")
    assert ranked.loc["good", "l2r_rank"] == 1 and ranked.loc["bad", "l2r_rank"] == 2
    assert ranked.loc["good", "l2r_score"] == pytest.approx(1.0)
    assert ranked.loc["bad", "l2r_score"] == pytest.approx(0.1)


def _l2r_table(dice, hd95, sdlogj, runtime):
    n = len(dice)
    return pd.DataFrame({"fixed": range(n), "moving": range(n), "dice": dice, "hd95": hd95, "sdlogj_l2r": sdlogj,
                         "runtime_s": runtime})


def test_learn2reg_score_is_the_geometric_mean_of_the_rank_scores():
    """"fast" wins runtime only, "accurate" the other four (Dice, DSC30, HD95, SDlogJ): two methods score 1.0 (the
    winner) or 0.1 per metric, so fast's score is (1 x 0.1^4)^(1/5) = 0.1^0.8 and accurate's 0.1^0.2 (an arithmetic
    mean would give 0.28 and 0.82)."""
    n = 30
    spread = np.linspace(-0.01, 0.01, n)
    accurate = _l2r_table(0.8 + spread, 2 + spread, 0.05 + spread / 10, 1 + spread)
    fast = _l2r_table(0.6 + spread, 4 + spread, 0.15 + spread / 10, 0.1 + spread / 10)
    ranked = stats.learn2reg_rank({"fast": fast, "accurate": accurate}).set_index("method")
    columns = ["l2r_dice", "l2r_dsc30", "l2r_hd95", "l2r_sdlogj", "l2r_runtime_s"]
    assert ranked.loc["fast", columns].tolist() == pytest.approx([0.1, 0.1, 0.1, 0.1, 1.0])
    assert ranked.loc["accurate", columns].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1])
    assert ranked.loc["fast", "l2r_score"] == pytest.approx(0.1 ** 0.8)
    assert ranked.loc["accurate", "l2r_score"] == pytest.approx(0.1 ** 0.2)
    assert ranked.loc["accurate", "l2r_rank"] == 1 and ranked.loc["fast", "l2r_rank"] == 2


def test_learn2reg_dsc30_ranks_the_worst_pairs():
    """"risky" registers 30 of 40 pairs at Dice about 0.9 and fails 10 at about 0.5 (mean 0.8), "steady" every pair
    at about 0.7: risky wins Dice, but its worst 30 % (12 pairs: the 10 failures and 2 of the 0.9s) lose to steady's
    worst 12 (rank-sum p < 0.01), so steady wins DSC30. The other metrics are the same for both (ties: 0.55 each)."""
    steady = np.linspace(0.69, 0.71, 40)
    risky = np.concatenate([np.linspace(0.88, 0.92, 30), np.linspace(0.48, 0.52, 10)])
    same = np.linspace(1.0, 2.0, 40)
    ranked = stats.learn2reg_rank({"steady": _l2r_table(steady, same, same, same),
                                   "risky": _l2r_table(risky, same, same, same)}).set_index("method")
    assert (ranked.loc["risky", "l2r_dice"], ranked.loc["steady", "l2r_dice"]) == pytest.approx((1.0, 0.1))
    assert (ranked.loc["steady", "l2r_dsc30"], ranked.loc["risky", "l2r_dsc30"]) == pytest.approx((1.0, 0.1))
    assert ranked.loc["steady", "l2r_hd95"] == ranked.loc["risky", "l2r_hd95"] == pytest.approx(0.55)
