"""Tuning one method on one dataset's val split, with the same budget as every other method (spec/protocol.md, 2).

A trial takes values from the method's search space (Optuna's TPE sampler), trains the recipe with them for the
common fraction of its budget on the training split (nothing of the test split is in reach: the dataset is a
``without_test`` view), registers the val pairs and scores them with the benchmark's own metrics. Objective: the
mean val Dice, subject to a regularity bound (mean % of folded voxels <= ``max_fold_pct``). A trial whose training
diverges (a NaN loss) or whose fields fold too much is recorded as such and loses to every feasible trial; the
tuning goes on. The choice is the feasible trial with the best val Dice (the earliest on a tie); when no trial is
feasible, the one that folds least.

Reproducible and resumable: every trial draws from a sampler seeded by (seed, index of the trial), and the study
lives in an Optuna journal file beside the outputs, so a killed tuning resumes at the trial it was in (a trial cut
short is recorded as failed and run again) and ends with the choice of an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from regbench.data.prepared import PreparedDataset
from regbench.evaluation.scoring import evaluate_method
from regbench.evaluation.selection import val_scorer
from regbench.io import write_csv, write_json
from regbench.method import RegistrationMethod
from regbench.training.loop import TrainingDiverged, load_trained, train
from regbench.tuning.space import check_search_space, describe, distributions

log = logging.getLogger("regbench")

#: what a trial's outcome is called in trials.csv and the lock file
FEASIBLE, INFEASIBLE, DIVERGED = "feasible", "infeasible", "diverged"
#: the constraint value of a diverged trial (Optuna wants a finite number; any positive one is infeasible)
_DIVERGED_VIOLATION = 1e6


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the results: a third of the budget, at least 4 (all of it when smaller)."""
    return min(trials, max(4, trials // 3))


def tune(method: RegistrationMethod, recipe: dict[str, Any], dataset: PreparedDataset, out_dir, *, trials: int,
         fraction: float = 1.0, max_fold_pct: float = 0.5, seed: int = 0, device="cpu",
         label_warp: str = "nearest", supervision_folder=None, provenance: dict | None = None) -> dict[str, Any]:
    """Run (or resume) the study; write trials.csv and choice.json into ``out_dir``; return the choice."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    check_search_space(method)
    if not method.search_space:
        raise ValueError(f"method {method.name!r} declares no search_space: nothing to tune")
    if trials < 1 or not 0 < fraction <= 1:
        raise ValueError(f"tuning needs trials >= 1 and 0 < fraction <= 1, got {trials} and {fraction}")
    if dataset.splits is None or "test" in dataset.splits:
        dataset = dataset.without_test()
    if dataset.split_pairs("val").empty:
        raise ValueError(f"{dataset.root / 'pairs.csv'}: no val pairs to tune on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out_dir / "study.journal")))
    study = optuna.create_study(study_name=f"{dataset.name}-{method.name}", storage=storage, direction="maximize",
                                load_if_exists=True)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # cut short by a kill
        study.tell(stale.number, state=TrialState.FAIL)
    space = distributions(method.search_space)

    def completed():
        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    while len(completed()) < trials:
        index = len(completed())
        study.sampler = optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]),
                                                   n_startup_trials=startup_trials(trials))
        trial = study.ask(space)
        values = {key: float(trial.params[key]) for key in method.search_space}
        outcome = run_trial(method, {**recipe, **values}, dataset, out_dir / "trials" / f"{index:03d}",
                            fraction=fraction, max_fold_pct=max_fold_pct, seed=seed, device=device,
                            label_warp=label_warp, supervision_folder=supervision_folder)
        for key, value in {**outcome, "index": index, "values": values}.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("fold_pct", outcome["violation"])  # > 0: infeasible, loses to every feasible trial
        study.tell(trial, outcome["val_dice"] if outcome["status"] != DIVERGED else 0.0)
        log.info("%s trial %d/%d: %s -> val Dice %.4f, folds %.3f %% (%s, %.0f s)", method.name, index + 1,
                 trials, values, outcome["val_dice"], outcome["val_fold_pct"], outcome["status"], outcome["seconds"])
        write_csv(out_dir / "trials.csv", trial_table(completed(), method))

    rows = trial_table(completed(), method)[:trials]
    choice = choose(rows)
    record = {
        "method": method.name, "dataset": dataset.name, "search_space": describe(method.search_space),
        "chosen": {key: float(rows.loc[choice, key]) for key in method.search_space},
        "val_dice": float(rows.loc[choice, "val_dice"]), "val_fold_pct": float(rows.loc[choice, "val_fold_pct"]),
        "status": rows.loc[choice, "status"], "trial": int(rows.loc[choice, "trial"]),
        "budget": {"trials": trials, "fraction": fraction, "max_fold_pct": max_fold_pct, "seed": seed,
                   "iterations": _budget(method, recipe, fraction), "startup_trials": startup_trials(trials),
                   "sampler": "optuna TPESampler, seeded per trial"},
        "val_pairs": len(dataset.split_pairs("val")), "seconds": float(rows["seconds"].sum()),
        "trials": rows.to_dict(orient="records"), "provenance": provenance or {},
    }
    write_csv(out_dir / "trials.csv", rows)
    write_json(out_dir / "choice.json", record)
    return record


def run_trial(method: RegistrationMethod, recipe: dict[str, Any], dataset: PreparedDataset, trial_dir: Path, *,
              fraction: float, max_fold_pct: float, seed: int, device, label_warp: str,
              supervision_folder=None) -> dict[str, Any]:
    """Train ``recipe`` for ``fraction`` of its budget (a learned method), score the val pairs; the trial's outcome.

    The trial's folder keeps train.json, train_log.csv and the val pairs.csv; the model is removed.
    """
    start = time.perf_counter()
    if trial_dir.exists():  # a trial cut short before: start it again from nothing
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True)
    device = torch.device(device)
    net, status = None, FEASIBLE
    try:
        if method.trainable:
            scaled = method.scale_budget(recipe, fraction)
            train(method, scaled, dataset, trial_dir, seed=seed, device=device, supervision_folder=supervision_folder,
                  checkpoint_score=val_scorer(method, dataset, scaled, device, label_warp))
            net, recipe = load_trained(method, trial_dir / "model.pt", device)
        table = evaluate_method(method, recipe, dataset, trial_dir, net=net, device=device, runtime_repeats=0,
                                label_warp=label_warp, split="val")
        dice, folds = float(table["dice"].mean()), float(table["fold_pct"].mean())
        if not (math.isfinite(dice) and math.isfinite(folds)):
            status = DIVERGED
    except TrainingDiverged as err:
        log.warning("%s: a trial diverged (%s); it is recorded and loses to every feasible trial", method.name, err)
        dice, folds, status = float("nan"), float("nan"), DIVERGED
    finally:
        (trial_dir / "model.pt").unlink(missing_ok=True)
        (trial_dir / "checkpoint.pt").unlink(missing_ok=True)
    if status != DIVERGED and folds > max_fold_pct:
        status = INFEASIBLE
    violation = _DIVERGED_VIOLATION if status == DIVERGED else folds - max_fold_pct
    return {"status": status, "val_dice": dice, "val_fold_pct": folds, "violation": violation,
            "seconds": time.perf_counter() - start}


def trial_table(trials, method: RegistrationMethod) -> pd.DataFrame:
    """One row a completed trial, in the order they ran: trial, each tuned value, val Dice, folds, status, seconds."""
    rows = []
    for trial in sorted(trials, key=lambda t: t.user_attrs["index"]):
        attrs = trial.user_attrs
        rows.append({"trial": attrs["index"], **attrs["values"], "val_dice": attrs["val_dice"],
                     "val_fold_pct": attrs["val_fold_pct"], "status": attrs["status"], "seconds": attrs["seconds"]})
    return pd.DataFrame(rows, columns=["trial", *method.search_space, "val_dice", "val_fold_pct", "status", "seconds"])


def choose(rows: pd.DataFrame) -> int:
    """Row index of the choice: the best val Dice among feasible trials (earliest on a tie); when none is feasible,
    the trial that folds least (diverged trials last)."""
    feasible = rows[rows["status"] == FEASIBLE]
    if not feasible.empty:
        return int(feasible["val_dice"].idxmax())
    ranked = rows.assign(order=rows["status"].map({INFEASIBLE: 0, DIVERGED: 1}))
    return int(ranked.sort_values(["order", "val_fold_pct", "trial"], na_position="last").index[0])


def _budget(method: RegistrationMethod, recipe: dict[str, Any], fraction: float) -> dict[str, int]:
    """The step counts a trial trains with (the recipe's budget keys times the fraction)."""
    if not method.trainable:
        return {}
    scaled = method.scale_budget(recipe, fraction)
    return {key: int(scaled[key]) for key in method.budget_keys if key in scaled}
