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
        raw.append(expected.pvalue)
    np.testing.assert_allclose(tests["p_holm"], stats.holm(raw))


def test_not_worse_than_best_marks_the_tied_methods():
    rng = np.random.default_rng(1)
    best = rng.normal(0.8, 0.05, 20)
    tables = {"best": table(best), "tied": table(best + rng.normal(0, 0.002, 20)),
              "worse": table(best - 0.1 + rng.normal(0, 0.01, 20))}
    board = pd.DataFrame({"method": list(tables), "dice_mean": [t["dice"].mean() for t in tables.values()]})
    tests = stats.paired_tests(tables, ["dice"])
    verdict = stats.not_worse_than_best(board, tests)
    assert verdict[board.loc[board.dice_mean.idxmax(), "method"]]
    assert verdict["best"] and verdict["tied"] and not verdict["worse"]


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
    assert stats.better_than_reference(board, stats.paired_tests(hd, ["hd95"]), "hd95", "identity")["good"]
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
