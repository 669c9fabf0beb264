"""The tuning protocol: search spaces checked, trials on the val split, diverging trials lose, resumes are exact,
the lock file records the choice and the runs train with it."""
from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import torch
import yaml

from regbench import RegistrationMethod, SearchRange
from regbench.blocks.losses import mse
from regbench.blocks.spatial import warp
from regbench.io import read_json
from regbench.training import loop
from regbench.tuning import study as tuning
from regbench.tuning.lock import read_lock, write_lock
from regbench.tuning.space import check_search_space
from regbench.workflow.config import ConfigError, check_config, job_settings


class Translation(torch.nn.Module):
    def __init__(self, ndim):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(ndim))

    def forward(self, fixed):
        return self.shift.view(1, -1, *([1] * (fixed.dim() - 2))).expand(fixed.shape[0], -1, *fixed.shape[2:])


class Shift(RegistrationMethod):
    """A toy learned method: one translation for every pair, trained by MSE; a rate above ``diverge_above``
    gives a NaN loss (a diverging training)."""

    name = "shift"
    recipes = {"quick": {"iterations": 4, "batch_size": 1, "lr": 1e-2, "weight": 1.0, "diverge_above": 10.0,
                         "checkpoint_every": 100}}
    search_space = {"lr": SearchRange(1e-3, 1.0, "log"), "weight": SearchRange(0.5, 2.0, "linear")}

    def build(self, ndim, recipe):
        return Translation(ndim)

    def loss_terms(self, net, batch, recipe):
        loss = recipe["weight"] * mse(batch["fixed"], warp(batch["moving"], net(batch["fixed"])))
        if recipe["lr"] > recipe["diverge_above"]:
            loss = loss * float("nan")
        return {"similarity": (1.0, loss)}

    def register(self, net, fixed, moving, recipe):
        return net(fixed).detach()


def test_search_spaces_are_checked_naming_the_method_and_the_key():
    check_search_space(Shift())

    def broken(**space):
        method = Shift()
        method.search_space = space
        return method

    for space, message in [({"alpha": SearchRange(0.1, 1.0)}, "'alpha' is not a key"),
                           ({"lr": SearchRange(1e-2, 1e-3)}, "'lr' has an empty or reversed range"),
                           ({"lr": SearchRange(1e-2, 1e-2)}, "'lr' has an empty or reversed range"),
                           ({"weight": SearchRange(0.0, 1.0, "log")}, "'weight' is on a log scale"),
                           ({"weight": SearchRange(0.1, 1.0, "cubic")}, "'weight' has scale 'cubic'")]:
        with pytest.raises(ValueError, match=f"method 'shift': search_space: {message}"):
            check_search_space(broken(**space))


def test_every_method_file_declares_a_valid_search_space():
    from regbench.plugins import load_method, method_ids

    for method_id in method_ids():
        method = load_method(method_id)
        check_search_space(method)
        if method_id in {"identity", "affine", "external"}:
            assert not method.search_space, method_id
        else:
            assert method.search_space, f"methods/{method_id}.py declares no search_space"
        if method.trainable and method.search_space:
            assert "lr" in method.search_space, method_id


def _tune(dataset, out, trials=3, **recipe):
    method = Shift()
    return tuning.tune(method, method.recipe("quick", recipe), dataset, out, trials=trials, seed=0)


def test_trials_train_on_train_and_score_on_val(four_val_pairs, tmp_path):
    choice = _tune(four_val_pairs, tmp_path / "study", trials=3)
    trials = pd.read_csv(tmp_path / "study" / "trials.csv")
    assert list(trials["trial"]) == [0, 1, 2] and set(trials["status"]) == {"feasible"}
    assert (trials["lr"].between(1e-3, 1.0) & trials["weight"].between(0.5, 2.0)).all()
    val_pairs = four_val_pairs.split_pairs("val")
    scored = pd.read_csv(tmp_path / "study" / "trials" / "000" / "pairs.csv")
    assert list(zip(scored["fixed"], scored["moving"])) == list(zip(val_pairs["fixed"], val_pairs["moving"]))
    # a trial's objective is the mean over its val pairs, as the benchmark scores them
    assert len(scored) == 4 and scored["dice"].nunique() == 4
    assert trials.loc[0, "val_dice"] == pytest.approx(scored["dice"].mean(), rel=1e-9)
    assert trials.loc[0, "val_fold_pct"] == pytest.approx(scored["fold_pct"].mean(), abs=1e-12)
    assert trials.loc[choice["trial"], "val_dice"] == pytest.approx(trials["val_dice"].max())
    assert choice["chosen"]["lr"] == pytest.approx(trials.loc[choice["trial"], "lr"])
    assert not (tmp_path / "study" / "trials" / "000" / "model.pt").exists()
    assert read_json(tmp_path / "study" / "trials" / "000" / "eval.json")["split"] == "val"


def test_a_diverging_trial_is_recorded_and_loses(small_embedded2d, tmp_path):
    choice = _tune(small_embedded2d, tmp_path / "study", trials=6, diverge_above=0.03)
    trials = pd.read_csv(tmp_path / "study" / "trials.csv")
    diverged = trials[trials["status"] == "diverged"]
    assert len(diverged) >= 1 and (diverged["lr"] > 0.03).all()
    # every trial above the rate diverged, no other did; a diverged trial has no score
    assert ((trials["status"] == "diverged") == (trials["lr"] > 0.03)).all()
    assert diverged["val_dice"].isna().all() and diverged["val_fold_pct"].isna().all()
    assert len(trials) == 6                      # the tuning went on after it
    assert choice["status"] == "feasible" and choice["chosen"]["lr"] <= 0.03


def test_an_infeasible_trial_loses_to_every_feasible_one():
    rows = pd.DataFrame({"trial": [0, 1, 2, 3], "val_dice": [0.9, 0.7, 0.8, float("nan")],
                         "val_fold_pct": [2.0, 0.1, 0.4, float("nan")],
                         "status": ["infeasible", "feasible", "feasible", "diverged"]})
    assert tuning.choose(rows) == 2
    nothing_feasible = rows.assign(status=["infeasible", "infeasible", "infeasible", "diverged"])
    assert tuning.choose(nothing_feasible) == 1  # the one that folds least


def test_ties_go_to_the_earliest_trial_and_diverged_trials_come_last():
    """The docstring's tie rules: equal val Dice among feasible trials, or equal folds among infeasible ones, choose
    the earlier trial; a diverged trial is chosen only when every trial diverged (then the first)."""
    rows = pd.DataFrame({"trial": [0, 1, 2, 3], "val_dice": [0.6, 0.8, 0.8, 0.9],
                         "val_fold_pct": [0.1, 0.2, 0.3, 0.0],
                         "status": ["feasible", "feasible", "feasible", "infeasible"]})
    assert tuning.choose(rows) == 1                      # trials 1 and 2 tie at 0.8; 3 is better but infeasible
    infeasible = pd.DataFrame({"trial": [0, 1, 2, 3], "val_dice": [0.5, 0.9, 0.7, float("nan")],
                               "val_fold_pct": [3.0, 1.0, 1.0, float("nan")],
                               "status": ["infeasible", "infeasible", "infeasible", "diverged"]})
    assert tuning.choose(infeasible) == 1                # 1 and 2 fold 1 % each: the earlier one
    diverged = pd.DataFrame({"trial": [0, 1, 2], "val_dice": [float("nan")] * 3, "val_fold_pct": [float("nan")] * 3,
                             "status": ["diverged"] * 3})
    assert tuning.choose(diverged) == 0


def test_startup_trials_are_a_third_of_the_budget_at_least_four():
    """min(trials, max(4, trials // 3)): 2 -> 2 (all of a small budget), 12 -> 4, 14 -> 4, 17 -> 5 (rounded down)."""
    assert [tuning.startup_trials(n) for n in (1, 2, 4, 12, 14, 15, 17, 30)] == [1, 2, 4, 4, 4, 5, 5, 10]


def test_trials_train_the_fraction_of_the_budget(small_embedded2d, tmp_path):
    """With fraction 0.5 a trial of the 4-iteration recipe trains round(4 x 0.5) = 2 steps, and the choice records
    that budget (3 trials: all of them random start-up trials)."""
    method = Shift()
    choice = tuning.tune(method, method.recipe("quick"), small_embedded2d, tmp_path / "study", trials=3,
                         fraction=0.5, seed=0)
    for index in range(3):
        trained = read_json(tmp_path / "study" / "trials" / f"{index:03d}" / "train.json")
        assert trained["iterations"] == 2
    assert len(pd.read_csv(tmp_path / "study" / "trials" / "000" / "train_log.csv")) == 2
    assert choice["budget"]["iterations"] == {"iterations": 2} and choice["budget"]["fraction"] == 0.5
    assert choice["budget"]["startup_trials"] == 3


def test_the_fold_bound_is_inclusive_and_a_violation_makes_every_trial_infeasible(small_embedded2d, tmp_path):
    """A translation folds no voxel (fold_pct 0). Bound 0: every trial is feasible (folds <= bound); bound -0.1:
    every trial is infeasible, and the choice is the one that folds least, on a tie the first (trial 0)."""
    method = Shift()
    recipe = method.recipe("quick")
    at_bound = tuning.tune(method, recipe, small_embedded2d, tmp_path / "zero", trials=2, max_fold_pct=0.0, seed=0)
    trials = pd.read_csv(tmp_path / "zero" / "trials.csv")
    assert (trials["val_fold_pct"] == 0).all() and set(trials["status"]) == {"feasible"}
    assert at_bound["status"] == "feasible"
    below = tuning.tune(method, recipe, small_embedded2d, tmp_path / "below", trials=2, max_fold_pct=-0.1, seed=0)
    assert set(pd.read_csv(tmp_path / "below" / "trials.csv")["status"]) == {"infeasible"}
    assert below["status"] == "infeasible" and below["trial"] == 0
    assert below["val_fold_pct"] == 0.0 and below["budget"]["max_fold_pct"] == -0.1


def test_a_killed_tuning_resumes_and_ends_with_the_same_choice(small_embedded2d, tmp_path, monkeypatch):
    whole = _tune(small_embedded2d, tmp_path / "whole", trials=3)
    calls = {"n": 0}
    real_train = loop.train

    def killed_in_second_trial(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tuning, "train", killed_in_second_trial)
    with pytest.raises(KeyboardInterrupt):
        _tune(small_embedded2d, tmp_path / "resumed", trials=3)
    assert len(pd.read_csv(tmp_path / "resumed" / "trials.csv")) == 1
    monkeypatch.setattr(tuning, "train", real_train)
    resumed = _tune(small_embedded2d, tmp_path / "resumed", trials=3)
    assert resumed["chosen"] == whole["chosen"] and resumed["trial"] == whole["trial"]
    keep = ["trial", "lr", "weight", "val_dice", "val_fold_pct", "status"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed" / "trials.csv")[keep],
                                  pd.read_csv(tmp_path / "whole" / "trials.csv")[keep])


def test_the_lock_file_records_the_choice_and_is_checked(small_embedded2d, tmp_path):
    choice = _tune(small_embedded2d, tmp_path / "study", trials=2)
    lock_path = tmp_path / "tuned" / "embedded2d.yaml"
    write_lock(lock_path, "embedded2d", [choice], {"commit": "abc", "date": "today"})
    lock = read_lock(lock_path, "embedded2d")
    entry = lock["methods"]["shift"]
    assert entry["chosen"] == {k: pytest.approx(v, rel=1e-5) for k, v in choice["chosen"].items()}
    assert len(entry["trials"]) == 2 and lock["budget"]["trials"] == 2
    assert entry["search_space"] == {"lr": [1e-3, 1.0, "log"], "weight": [0.5, 2.0, "linear"]}
    with pytest.raises(Exception, match="a lock file of dataset 'embedded2d', named for dataset 'oasis'"):
        read_lock(lock_path, "oasis")


def test_runs_train_with_the_lock_file_and_a_bad_one_stops_the_run(tmp_path):
    (tmp_path / "tuned").mkdir()
    lock = {"dataset": "embedded2d", "methods": {"voxelmorph": {"chosen": {"lr": 0.002, "smoothness_weight": 0.5}}}}
    (tmp_path / "tuned" / "embedded2d.yaml").write_text(yaml.safe_dump(lock))
    config = {"datasets": {"embedded2d": {}}, "methods": {"voxelmorph": {"overrides": {"smoothness_weight": 2.0}}},
              "tuned": {"embedded2d": "tuned/embedded2d.yaml"}}
    resolved = check_config(config, config_dir=tmp_path)
    settings = job_settings(resolved, "embedded2d", "voxelmorph")
    assert settings["recipe"]["lr"] == 0.002              # the lock file's value
    assert settings["recipe"]["smoothness_weight"] == 2.0  # the config's own override wins
    assert settings["tuned"] == {"file": "tuned/embedded2d.yaml", "values": {"lr": 0.002, "smoothness_weight": 0.5},
                                 "overridden": ["smoothness_weight"]}
    assert job_settings(resolved, "embedded2d", "voxelmorph", tuned=False)["recipe"]["lr"] == 1e-3  # tuning
    lock["methods"]["voxelmorph"]["chosen"]["alpha"] = 1.0
    (tmp_path / "tuned" / "embedded2d.yaml").write_text(yaml.safe_dump(lock))
    with pytest.raises(ConfigError, match="embedded2d.yaml: method 'voxelmorph' has no recipe key 'alpha'"):
        check_config(config, config_dir=tmp_path)
    (tmp_path / "tuned" / "embedded2d.yaml").write_text(yaml.safe_dump({**lock, "dataset": "oasis"}))
    with pytest.raises(ConfigError, match="a lock file of dataset 'oasis', named for dataset 'embedded2d'"):
        check_config(config, config_dir=tmp_path)
    with pytest.raises(ConfigError, match="missing.yaml: tuning lock file not found"):
        check_config({**config, "tuned": {"embedded2d": "missing.yaml"}}, config_dir=tmp_path)
    # a chosen value that is not a number (a quoted one, or a YAML boolean) names the method and the key
    for bad in ("0.002", True):
        broken = {**lock, "methods": {"voxelmorph": {"chosen": {"lr": bad}}}}
        (tmp_path / "tuned" / "embedded2d.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(ConfigError, match=f"embedded2d.yaml: methods > voxelmorph > chosen > lr: {bad!r} is not a"):
            check_config(config, config_dir=tmp_path)
    json.dumps(settings)  # the settings stay JSON for the command line


TINY = """
seed: 0
torch_threads: 1
datasets:
  embedded2d: {n_train: 3, n_val: 2, n_test: 2}
methods:
  identity: {}
  syn: {overrides: {syn_iterations: [10, 0, 0]}}
  voxelmorph: {overrides: {iterations: 3, checkpoint_every: 100}}
tuning: {trials: 2, fraction: 0.5, max_fold_pct: 0.5, seed: 0}
evaluation: {runtime_repeats: 1}
"""


def test_snakemake_tune_writes_the_lock_file_and_a_run_trains_with_it(tmp_path):
    """The documented command, on a tiny config: every method with a search space gets the same two trials, the
    lock file lands beside the config (tuned/<dataset>.yaml), and a config that names it trains with its values."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = tmp_path / "config" / "tiny.yaml"
    config.parent.mkdir()
    config.write_text(TINY)

    def snakemake(*targets):
        result = subprocess.run([sys.executable, "-m", "snakemake", *targets, "--cores", "2", "-s",
                                 str(root / "Snakefile"), "--directory", str(tmp_path / "work"), "--configfile",
                                 str(config)], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    snakemake("tune")
    lock = read_lock(tmp_path / "config" / "tuned" / "embedded2d.yaml", "embedded2d")
    assert set(lock["methods"]) == {"syn", "voxelmorph"}            # identity declares nothing to tune
    assert {len(entry["trials"]) for entry in lock["methods"].values()} == {2}
    assert lock["budget"]["trials"] == 2 and lock["budget"]["fraction"] == 0.5
    assert lock["methods"]["voxelmorph"]["iterations"] == {"iterations": 2}   # round(3 x 0.5)
    chosen = lock["methods"]["voxelmorph"]["chosen"]
    config.write_text(TINY + "tuned: {embedded2d: tuned/embedded2d.yaml}\n")
    snakemake()
    train = json.loads((tmp_path / "work" / "results" / "embedded2d" / "voxelmorph" / "seed0" / "train.json")
                       .read_text())
    assert train["recipe"]["lr"] == pytest.approx(chosen["lr"])
    assert train["recipe"]["smoothness_weight"] == pytest.approx(chosen["smoothness_weight"])
    assert train["recipe"]["iterations"] == 3                          # the full budget, not the trials'


def test_the_lock_file_s_own_change_does_not_mark_the_commit_dirty(tmp_path):
    from regbench.runtime import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "lock.yaml").write_text("a: 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    (tmp_path / "lock.yaml").unlink()   # as snakemake does before the lock job rewrites it
    clean = git_commit(tmp_path, ignoring=(tmp_path / "lock.yaml",))
    assert len(clean) == 40 and git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path, ignoring=(tmp_path / "lock.yaml",)).endswith("-dirty")


def test_an_update_tunes_one_method_into_a_lock_and_keeps_the_others_as_tuned(small_embedded2d, tmp_path, capsys):
    from regbench.workflow.cli import main

    choice = _tune(small_embedded2d, tmp_path / "study", trials=2)
    lock_path = tmp_path / "embedded2d.yaml"
    write_lock(lock_path, "embedded2d", [choice], {"commit": "abc", "date": "yesterday"})
    added = {**choice, "method": "added", "chosen": {"lr": 0.5, "weight": 1.5}}
    (tmp_path / "added.json").write_text(json.dumps(added))
    assert main(["lock", "--dataset", "embedded2d", "--out", str(lock_path), "--update",
                 str(tmp_path / "added.json")]) == 0
    lock = read_lock(lock_path, "embedded2d")
    assert list(lock["methods"]) == ["shift", "added"]
    assert lock["methods"]["shift"]["made"] == {"commit": "abc", "date": "yesterday"}   # tuned by the earlier write
    assert lock["methods"]["shift"]["chosen"] == {k: pytest.approx(v, rel=1e-5) for k, v in choice["chosen"].items()}
    assert "made" not in lock["methods"]["added"] and lock["made"]["commit"] != "abc"
    assert lock["methods"]["added"]["chosen"] == {"lr": 0.5, "weight": 1.5}
    # a method tuned with another budget cannot join the lock, which stays as it was
    (tmp_path / "other.json").write_text(json.dumps({**added, "method": "other",
                                                     "budget": {**added["budget"], "trials": 5}}))
    before = lock_path.read_text()
    assert main(["lock", "--dataset", "embedded2d", "--out", str(lock_path), "--update",
                 str(tmp_path / "other.json")]) == 2
    assert "different budgets" in capsys.readouterr().err and lock_path.read_text() == before
