"""Where a run's files live: one folder per (dataset, method, seed) under the results folder.

results/<dataset>/<method>/seed<seed>/ holds one training run and its scores (model.pt, train_log.csv, train.json,
pairs.csv, labels.csv, eval.json); a deterministic method without training is run once, under its first seed.
results/<dataset>/ holds what joins them (scores.csv, leaderboard.csv, stats.csv, ranks.csv, leaderboard.json).
A method's instance-optimised row (config ``instance_optimisation``) has its own folders,
results/<dataset>/<method>+io/seed<seed>/, with scores only: it registers with the method's trained runs.
A run that also registers another dataset's test pairs (config ``evaluate_on``) scores them in its folder's
on_<target>/ (pairs.csv, labels.csv, eval.json); results/<dataset>/on_<target>/ joins those (the same tables as
results/<dataset>/), and results/<dataset>/generalization.csv compares every target with the dataset itself.
"""
from __future__ import annotations

from pathlib import Path

#: the suffix of a method's instance-optimised row (config ``instance_optimisation``): ``voxelmorph+io``
IO_SUFFIX = "+io"


def plugin_id(row_id: str) -> str:
    """The method plugin behind a result row: ``voxelmorph`` for ``voxelmorph`` and ``voxelmorph+io``."""
    return row_id[:-len(IO_SUFFIX)] if row_id.endswith(IO_SUFFIX) else row_id


def run_dir(results_dir, dataset_id: str, method_id: str, seed: int) -> Path:
    """results/<dataset>/<method>/seed<seed>: one training run of a method and its test scores."""
    return Path(results_dir) / dataset_id / method_id / f"seed{int(seed)}"


def supervision_dir(results_dir, dataset_id: str) -> Path:
    """results/<dataset>/syn_supervision: SyN's fields of the training pairs, for methods that learn from them."""
    return Path(results_dir) / dataset_id / "syn_supervision"


def target_run_dir(results_dir, dataset_id: str, method_id: str, seed: int, target_id: str) -> Path:
    """results/<dataset>/<method>/seed<seed>/on_<target>: that run's scores on another dataset's test pairs."""
    return run_dir(results_dir, dataset_id, method_id, seed) / f"on_{target_id}"


def target_dir(results_dir, dataset_id: str, target_id: str) -> Path:
    """results/<dataset>/on_<target>: the leaderboard of the runs trained on ``dataset_id``, on ``target_id``."""
    return Path(results_dir) / dataset_id / f"on_{target_id}"
