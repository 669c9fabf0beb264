"""Statistics between methods: paired tests (stats.csv) and Learn2Reg's overall rank.

Paired tests: for every metric and every pair of methods, a Wilcoxon signed-rank test over the test
pairs both scored (scipy.stats.wilcoxon, two-sided, zero differences dropped), then Holm's
step-down correction within each metric (the family is that metric's comparisons).

Learn2Reg rank (their ranking code, reimplemented): per metric, method i beats method j when a
Wilcoxon rank-sum test (scipy.stats.ranksums, unpaired) finds i's values better with p < 0.05; a
method's wins are ranked from worst to best onto linspace(0.1, 1, N), tied wins sharing the mean of
their places; the overall score is the geometric mean over DSC, DSC30, HD95, SDlogJ and runtime
(higher is better; rank 1 is the highest score).
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy import stats

#: metric -> True when higher values are better
HIGHER_IS_BETTER = {
    "dice": True, "dsc30": True, "hd95": False, "hd95_vox": False, "fold_pct": False, "fold_pct_mask": False,
    "sdlogj": False, "sdlogj_l2r": False, "ndv": False, "epe": False, "runtime_s": False, "peak_mem_mb": False,
}
#: the metrics of Learn2Reg's overall rank, with the per-pair column each is computed from
L2R_RANK_METRICS = {"dice": "dice", "dsc30": "dice", "hd95": "hd95", "sdlogj": "sdlogj_l2r", "runtime_s": "runtime_s"}
ALPHA = 0.05


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def paired_tests(tables: dict[str, pd.DataFrame], metrics: list[str]) -> pd.DataFrame:
    """One row per (metric, method_a, method_b): n, Wilcoxon statistic, p, Holm-adjusted p, and
    the median of the paired differences a - b. ``tables`` are pairs.csv tables keyed by method."""
    rows = []
    for metric in metrics:
        # pairs x methods, aligned on (fixed, moving) once; a comparison uses the pairs both methods scored
        wide = pd.concat({m: t.set_index(["fixed", "moving"])[metric] for m, t in tables.items()}, axis=1)
        block = []
        for a, b in itertools.combinations(tables, 2):
            both = wide[[a, b]].dropna().to_numpy(float)
            diff = both[:, 0] - both[:, 1]
            statistic, p = np.nan, np.nan
            if np.any(diff != 0):
                result = stats.wilcoxon(both[:, 0], both[:, 1])
                statistic, p = float(result.statistic), float(result.pvalue)
            elif len(diff):
                p = 1.0  # identical on every pair: no evidence of a difference
            block.append({"metric": metric, "method_a": a, "method_b": b, "n": len(diff),
                          "statistic": statistic, "p_value": p,
                          "median_difference": float(np.median(diff)) if len(diff) else np.nan})
        adjusted = holm([row["p_value"] for row in block])
        for row, p_holm in zip(block, adjusted):
            row["p_holm"] = p_holm
        rows += block
    return pd.DataFrame(rows, columns=["metric", "method_a", "method_b", "n", "statistic", "p_value", "p_holm",
                                       "median_difference"])


def not_worse_than_best(board: pd.DataFrame, tests: pd.DataFrame, metric: str = "dice") -> dict[str, bool]:
    """For each method: True when it is the best by mean ``metric`` or not significantly worse (Holm p >= 0.05)."""
    higher = HIGHER_IS_BETTER[metric]
    means = board.set_index("method")[f"{metric}_mean"]
    best = means.idxmax() if higher else means.idxmin()
    verdict = {}
    for method in means.index:
        if method == best:
            verdict[method] = True
            continue
        row = tests[(tests["metric"] == metric) & (
            ((tests["method_a"] == method) & (tests["method_b"] == best)) |
            ((tests["method_a"] == best) & (tests["method_b"] == method)))]
        verdict[method] = bool(len(row) and not (row["p_holm"].iloc[0] < ALPHA))
    return verdict


def p_against(tests: pd.DataFrame, metric: str, reference: str) -> dict[str, float]:
    """For each method tested against ``reference`` on ``metric``: the Holm-adjusted p of that paired test."""
    rows = tests[(tests["metric"] == metric) & ((tests["method_a"] == reference) | (tests["method_b"] == reference))]
    return {(row.method_b if row.method_a == reference else row.method_a): float(row.p_holm)
            for row in rows.itertuples()}


def better_than_reference(board: pd.DataFrame, tests: pd.DataFrame, metric: str = "dice",
                          reference: str = "identity") -> dict[str, bool]:
    """For each method but ``reference`` (no registration, the floor of every table): True when its mean ``metric``
    is better than the reference's and the paired test says so (Holm p < 0.05), else False; empty when the board has
    no ``reference`` row."""
    means = board.set_index("method")[f"{metric}_mean"]
    if reference not in means.index:
        return {}
    p = p_against(tests, metric, reference)
    higher = HIGHER_IS_BETTER[metric]
    return {method: bool(method in p and p[method] < ALPHA
                         and (mean > means[reference] if higher else mean < means[reference]))
            for method, mean in means.items() if method != reference}


def _wins(samples: list[np.ndarray], higher: bool) -> np.ndarray:
    """Number of methods each method beats (rank-sum test, p < ALPHA, in the better direction)."""
    n = len(samples)
    wins = np.zeros(n, dtype=int)
    for i, j in itertools.product(range(n), repeat=2):
        if i == j or len(samples[i]) == 0 or len(samples[j]) == 0:
            continue
        statistic, p = stats.ranksums(samples[i], samples[j])
        better = statistic > 0 if higher else statistic < 0
        if better and p < ALPHA:
            wins[i] += 1
    return wins


def rank_scores(wins: np.ndarray) -> np.ndarray:
    """Wins onto linspace(0.1, 1, N) from fewest to most, ties sharing the mean of their places."""
    wins = np.asarray(wins)
    places = np.empty(len(wins))
    places[np.argsort(wins, kind="stable")] = np.linspace(0.1, 1.0, len(wins))
    return np.array([places[wins == w].mean() for w in wins])


def learn2reg_rank(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per method: the rank score of each Learn2Reg metric, their geometric mean and the overall rank.

    DSC30's sample is each method's worst 30 % of pairs by Dice (at or below the 0.3 quantile).
    """
    methods = list(tables)
    result = pd.DataFrame({"method": methods})
    for name, column in L2R_RANK_METRICS.items():
        samples = []
        for method in methods:
            values = tables[method][column].dropna().to_numpy(float) if column in tables[method] else np.array([])
            if name == "dsc30" and len(values):
                values = values[values <= np.quantile(values, 0.3)]
            samples.append(values)
        result[f"l2r_{name}"] = rank_scores(_wins(samples, HIGHER_IS_BETTER[name]))
    score_columns = [f"l2r_{name}" for name in L2R_RANK_METRICS]
    result["l2r_score"] = np.exp(np.log(result[score_columns]).mean(axis=1))
    result["l2r_rank"] = result["l2r_score"].rank(ascending=False, method="min").astype(int)
    return result
