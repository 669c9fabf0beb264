"""Uncertainty over training seeds and test pairs: seed-averaged scores, bootstrap intervals, rank stability.

spec/protocol.md, section 3. Every learned method is trained and scored once per seed; a score table holds one row
per (seed, pair). From it:

- the seed-averaged score of each test pair (the unit of the paired tests, as one run's scores were before);
- the between-seed standard deviation of the method's mean: the spread that training alone causes;
- a 95 % bootstrap confidence interval of the mean, resampling test pairs and seeds (two-level: the same resampled
  pairs for every method, since methods are compared on the same pairs; each method's seeds resampled on their own);
- rank stability, the analysis challengeR (Wiesenfarth et al., Scientific Reports 2021) made standard: in every
  bootstrap replicate the methods are ranked by their mean, which gives each method a rank distribution, a 95 %
  rank interval and the probability that it ranks first.

A deterministic method scored once has one seed: its seed resampling changes nothing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

PAIR_KEYS = ["fixed", "moving"]


def seed_matrix(table: pd.DataFrame, metric: str, pairs: list[tuple[str, str]]) -> np.ndarray:
    """``seeds x pairs`` array of one metric from a table of (seed, fixed, moving, metric) rows, pairs in the given
    order (NaN where a seed did not score a pair)."""
    seeds = np.sort(table["seed"].unique())
    rows = np.searchsorted(seeds, table["seed"].to_numpy())
    column = {pair: i for i, pair in enumerate(pairs)}
    cols = np.array([column.get(pair, -1) for pair in zip(table["fixed"], table["moving"])], dtype=int)
    values = table[metric].to_numpy(float)
    keep = (cols >= 0) & np.isfinite(values)
    sums, counts = np.zeros((len(seeds), len(pairs))), np.zeros((len(seeds), len(pairs)))
    np.add.at(sums, (rows[keep], cols[keep]), values[keep])   # a (seed, pair) scored twice: the mean of both
    np.add.at(counts, (rows[keep], cols[keep]), 1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def seed_averaged(table: pd.DataFrame) -> pd.DataFrame:
    """One row per test pair: every numeric column averaged over the seeds (pairs in their first order)."""
    numeric = [c for c in table.columns if c not in (*PAIR_KEYS, "seed") and pd.api.types.is_numeric_dtype(table[c])]
    order = table[PAIR_KEYS].drop_duplicates()
    averaged = table.groupby(PAIR_KEYS, sort=False)[numeric].mean().reset_index()
    return order.merge(averaged, on=PAIR_KEYS, how="left")


def between_seed_std(matrix: np.ndarray) -> float:
    """Standard deviation over seeds of the per-seed mean over pairs (NaN with one seed)."""
    counts = np.isfinite(matrix).sum(axis=1)
    per_seed = np.where(np.isfinite(matrix), matrix, 0.0).sum(axis=1) / np.maximum(counts, 1)
    per_seed = per_seed[counts > 0]   # a seed that scored nothing (a metric the method has no value for)
    return float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")


def bootstrap_means(matrices: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, np.ndarray]:
    """``resamples`` bootstrap means per method: test pairs resampled once per replicate for every method (paired),
    then each method's seeds resampled on their own; a replicate's mean is over the resampled seeds and pairs."""
    n_pairs = {m.shape[1] for m in matrices.values()}
    if len(n_pairs) != 1:
        raise ValueError(f"every method must be scored on the same pairs; pair counts {sorted(n_pairs)}")
    n_pairs = n_pairs.pop()
    rng = np.random.default_rng(seed)
    pair_draws = rng.integers(0, n_pairs, size=(resamples, n_pairs))
    means = {}
    for method, matrix in matrices.items():
        seed_draws = rng.integers(0, matrix.shape[0], size=(resamples, matrix.shape[0]))
        means[method] = resampled_means(matrix, seed_draws, pair_draws)
    return means


def resampled_means(matrix: np.ndarray, seed_draws: np.ndarray, pair_draws: np.ndarray) -> np.ndarray:
    """Per replicate, the mean of ``matrix`` (``seeds x pairs``) over the drawn seeds and pairs (``resamples x
    seeds`` and ``resamples x pairs`` indices), skipping NaN; NaN where a replicate holds no score."""
    chosen = np.take_along_axis(matrix[seed_draws], pair_draws[:, None, :], axis=2)   # resamples x seeds x pairs
    counts = np.isfinite(chosen).sum(axis=(1, 2))
    totals = np.where(np.isfinite(chosen), chosen, 0.0).sum(axis=(1, 2))
    return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def confidence_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap samples."""
    tail = (1 - level) / 2 * 100
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return float("nan"), float("nan")
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def bootstrap_ranks(means: dict[str, np.ndarray], higher_is_better: bool = True) -> pd.DataFrame:
    """``resamples x methods`` ranks (1 = best; ties share the best of their places) of bootstrap means."""
    table = pd.DataFrame(means)
    return table.rank(axis=1, ascending=not higher_is_better, method="min").astype(int)


def rank_summary(ranks: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per method: median bootstrap rank, its ``level`` interval and the probability of ranking first."""
    tail = (1 - level) / 2 * 100
    return pd.DataFrame({
        "method": ranks.columns,
        "rank_median": [float(np.median(ranks[m])) for m in ranks.columns],
        "rank_low": [int(np.floor(np.percentile(ranks[m], tail))) for m in ranks.columns],
        "rank_high": [int(np.ceil(np.percentile(ranks[m], 100 - tail))) for m in ranks.columns],
        "p_first": [float((ranks[m] == 1).mean()) for m in ranks.columns],
    })


def rank_distribution(ranks: pd.DataFrame) -> pd.DataFrame:
    """Long table (method, rank, share of the replicates): what the blob plot draws."""
    rows = []
    for method in ranks.columns:
        counts = ranks[method].value_counts(normalize=True)
        rows += [{"method": method, "rank": int(rank), "share": float(share)} for rank, share in counts.items()]
    return pd.DataFrame(rows, columns=["method", "rank", "share"]).sort_values(["method", "rank"], kind="stable")


def bootstrap_difference(first: np.ndarray, second: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` bootstrap samples of mean(first) - mean(second), one method scored on two sets of pairs
    (``seeds x pairs`` each, the same seeds in the same rows, e.g. a model's own test pairs and another dataset's):
    per replicate the seeds are drawn once for both (a seed is one trained model), the pairs of each set on their own."""
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"the two score matrices need the same seeds; {first.shape[0]} and {second.shape[0]} rows")
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, first.shape[0], size=(resamples, first.shape[0]))
    means = [resampled_means(matrix, seed_draws, rng.integers(0, matrix.shape[1], size=(resamples, matrix.shape[1])))
             for matrix in (first, second)]
    return means[0] - means[1]
