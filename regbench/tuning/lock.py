"""The lock file of a tuning: per method, the values chosen on one dataset's val split, with the trials behind them.

``config/tuned/<dataset>.yaml`` is written by rule ``lock_<dataset>`` (``snakemake --cores all tune``) from every
method's choice.json, reviewed and checked in; a config names it (``tuned: {<dataset>: <file>}``) and its runs
train with those values (a config's own overrides still win). A lock file of another dataset, or one that names a
key a method's recipe does not have, stops the run with one error naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from regbench.io import InputError, write_text

HEADER = ("# regbench tuning lock file: the values the runs that name it train with, chosen on the val split with the\n"
          "# same budget for every method (spec/protocol.md, section 2). Written by `snakemake --cores all tune`;\n"
          "# review the change, then commit it.\n")


def read_lock(path, dataset_id: str) -> dict[str, Any]:
    """The lock file at ``path``, checked to be a lock file of ``dataset_id``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tuning lock file not found (regenerate it with `snakemake --cores all tune`)")
    try:
        lock = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not readable YAML ({err})") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("methods"), dict):
        raise InputError(f"{path}: not a tuning lock file (expected a mapping with 'dataset' and 'methods')")
    if lock.get("dataset") != dataset_id:
        raise InputError(f"{path}: a lock file of dataset {lock.get('dataset')!r}, named for dataset {dataset_id!r}")
    for method_id, entry in lock["methods"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("chosen"), dict):
            raise InputError(f"{path}: methods > {method_id}: expected a mapping with 'chosen' values")
        for key, value in entry["chosen"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{path}: methods > {method_id} > chosen > {key}: {value!r} is not a number")
    return lock


def chosen_values(lock: dict[str, Any], method_id: str) -> dict[str, float]:
    """The values a method trains with from a lock file ({} when the lock file does not tune it)."""
    entry = lock["methods"].get(method_id)
    return dict(entry["chosen"]) if entry else {}


def write_lock(path, dataset_id: str, choices: list[dict[str, Any]], made: dict[str, Any]) -> dict[str, Any]:
    """``path`` from the tuning's choice.json records (one a method); returns what was written."""
    budgets = {tuple(sorted((k, v) for k, v in c["budget"].items() if k not in ("iterations",))) for c in choices}
    if len(budgets) > 1:
        raise ValueError(f"{path}: the methods were tuned with different budgets {budgets}; every method gets the same")
    budget = {k: v for k, v in choices[0]["budget"].items() if k != "iterations"} if choices else {}
    lock = {
        "dataset": dataset_id,
        "made": made,
        "budget": {**budget, "val_pairs": choices[0]["val_pairs"] if choices else 0},
        "methods": {
            c["method"]: {
                "chosen": {k: _round(v) for k, v in c["chosen"].items()}, "val_dice": _round(c["val_dice"]), "val_fold_pct": _round(c["val_fold_pct"]),
                "status": c["status"], "trial": c["trial"], "search_space": c["search_space"],
                "iterations": c["budget"].get("iterations", {}), "seconds": round(float(c["seconds"]), 1),
                "trials": [{k: (_round(v) if isinstance(v, float) else v) for k, v in row.items()}
                           for row in c["trials"]],
                **({"made": dict(c["made"])} if "made" in c else {}),  # tuned before this write (kept by an update)
            } for c in choices
        },
    }
    write_text(path, HEADER + yaml.safe_dump(lock, sort_keys=False, width=118))
    return lock


def choices_in_lock(lock: dict[str, Any]) -> list[dict[str, Any]]:
    """The choice.json records a lock file was written from, each with the ``made`` of the write that tuned it:
    what an update (``regbench lock --update``) keeps for the methods it does not tune again."""
    budget = {k: v for k, v in lock["budget"].items() if k != "val_pairs"}
    return [{"method": method_id, "chosen": entry["chosen"], "val_dice": entry["val_dice"],
             "val_fold_pct": entry["val_fold_pct"], "status": entry["status"], "trial": entry["trial"],
             "search_space": entry["search_space"], "budget": {**budget, "iterations": entry["iterations"]},
             "val_pairs": lock["budget"]["val_pairs"], "seconds": entry["seconds"], "trials": entry["trials"],
             "made": entry.get("made", lock["made"])}
            for method_id, entry in lock["methods"].items()]


def _round(value: float) -> float:
    """Six significant digits: a lock file a person reads and diffs."""
    return float(f"{value:.6g}") if value == value else value
