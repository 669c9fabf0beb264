"""`regbench plan`: a config's cost from a short calibration, before the run."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from regbench import RegistrationMethod
from regbench.blocks.spatial import warp
from regbench.data.prepared import PreparedDataset
from regbench.io import InputError
from regbench.method import TrainingStage
from regbench.plugins import load_dataset, load_method
from regbench.training.loop import train
from regbench.workflow import cli
from regbench.workflow import plan as plan_module
from regbench.workflow.plan import calibrate, dataset_grid

ITERATIONS = 7


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    source = load_dataset("embedded2d")
    options = {"n_train": 3, "n_val": 2, "n_test": 3}
    source.prepare(data / "embedded2d" / "raw", data / "embedded2d" / "prepared", source.resolve_options(options))
    return data, options


def write_config(path, data, datasets, seeds=(0, 1)):
    path.write_text(yaml.safe_dump({
        "data_dir": str(data), "seeds": list(seeds), "torch_threads": 1, "datasets": datasets,
        "methods": {"identity": {}, "voxelmorph": {"overrides": {"iterations": ITERATIONS, "working_size": 32}}},
        "tuning": {"trials": 6, "fraction": 0.25},   # 1.5 trainings: not the 2 seeds
    }))
    return path


def test_the_plan_multiplies_calibrated_seconds_by_the_config_s_steps_seeds_trials_and_pairs(data_dir, tmp_path,
                                                                                             capsys):
    data, options = data_dir
    config = write_config(tmp_path / "config.yaml", data, {"embedded2d": options})
    assert cli.main(["plan", "--configfile", str(config), "--steps", "2", "--csv", str(tmp_path / "plan.csv")]) == 0
    printed = capsys.readouterr().out
    assert "voxelmorph" in printed and "total on cpu: training" in printed
    table = pd.read_csv(tmp_path / "plan.csv").set_index("method")
    identity, vxm = table.loc["identity"], table.loc["voxelmorph"]
    assert identity["steps"] == 0 and pd.isna(identity["train_h"])   # nothing to train, nothing estimated
    assert vxm["steps"] == ITERATIONS and vxm["seeds"] == 2 and vxm["grid"] == "176x176"
    assert vxm["step_s"] > 0 and vxm["register_s"] > 0
    one_seed = ITERATIONS * vxm["step_s"] / 3600
    assert vxm["train_h"] == pytest.approx(2 * one_seed)
    assert vxm["tune_h"] == pytest.approx(6 * 0.25 * one_seed)   # trials x fraction of one training
    n_test = len(PreparedDataset(data / "embedded2d" / "prepared").split_pairs("test"))
    assert vxm["register_h"] == pytest.approx(2 * n_test * vxm["register_s"] / 3600)


def test_the_plan_counts_evaluate_on_targets_and_instance_optimisation(data_dir, tmp_path):
    data, options = data_dir
    config = write_config(tmp_path / "config.yaml", data, {"embedded2d": options})
    raw = yaml.safe_load(config.read_text())
    shift = load_dataset("embedded2d_shift")
    shift_options = {"n_train": 2, "n_val": 1, "n_test": 2}
    shift.prepare(data / "embedded2d_shift" / "raw", data / "embedded2d_shift" / "prepared",
                  shift.resolve_options(shift_options))
    raw.update(evaluate_on={"embedded2d": {"embedded2d_shift": shift_options}},
               instance_optimisation={"methods": ["voxelmorph"], "steps": 10})
    config.write_text(yaml.safe_dump(raw))
    assert cli.main(["plan", "--configfile", str(config), "--steps", "2", "--csv", str(tmp_path / "plan.csv")]) == 0
    vxm = pd.read_csv(tmp_path / "plan.csv").set_index("method").loc["voxelmorph"]
    n_test = len(PreparedDataset(data / "embedded2d" / "prepared").split_pairs("test"))
    shift_pairs = len(PreparedDataset(data / "embedded2d_shift" / "prepared").split_pairs("test"))
    assert shift_pairs == 4                      # n - 1 within each template, n across
    per_pair = 2 * vxm["register_s"] + 10 * vxm["step_s"]   # the plain row's call, the +io row's steps and call
    assert vxm["register_h"] == pytest.approx(2 * (n_test + shift_pairs) * per_pair / 3600)


def test_an_unprepared_dataset_plans_from_its_plugin_s_grid_or_says_to_prepare_it(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", tmp_path / "nothing", {"oasis2d": {}}, seeds=(0,))
    assert cli.main(["plan", "--configfile", str(config), "--steps", "1", "--csv", str(tmp_path / "plan.csv")]) == 0
    vxm = pd.read_csv(tmp_path / "plan.csv").set_index("method").loc["voxelmorph"]
    assert vxm["grid"] == "160x192"   # neurite's 2D slices, before any download
    assert vxm["register_h"] == pytest.approx(38 * vxm["register_s"] / 3600)   # Learn2Reg's 38 test pairs
    config = write_config(tmp_path / "lpba.yaml", tmp_path / "nothing", {"lpba40": {}}, seeds=(0,))
    assert cli.main(["plan", "--configfile", str(config)]) == 2
    error = capsys.readouterr().err
    assert "lpba40/prepared/dataset.json: not prepared" in error and "prepare it first" in error
    with pytest.raises(InputError, match="cannot say its grid before preparation"):
        dataset_grid({"data_dir": str(tmp_path), "datasets": {"lpba40": {}}}, "lpba40")


class Clock:
    """A stand-in for the time module whose clock moves only when a loss is computed."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class SlowSecondStage(RegistrationMethod):
    """Two stages: a step of the first takes 10 ms of ``clock``, a step of the second 50 ms; the first step of each
    stage (the warm-up) takes 1 s more, its third 0.3 s more (a hiccup the median ignores)."""
    name = "slow_second_stage"
    recipes = {"quick": {"iterations": 0, "batch_size": 1, "lr": 1e-3, "first": 3, "second": 1}}

    def __init__(self, clock):
        self.clock = clock

    def build(self, ndim, recipe):
        net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
        net.slow = False
        return net

    def training_stages(self, net, recipe):
        return [TrainingStage("first", recipe["first"], list(net[0].parameters())),
                TrainingStage("second", recipe["second"], list(net[1].parameters()))]

    def start_stage(self, net, index, recipe):
        net.slow, net.calls = index == 1, 0

    def loss_terms(self, net, batch, recipe):
        self.clock.now += (0.05 if net.slow else 0.01) + {0: 1.0, 2: 0.3}.get(net.calls, 0.0)
        net.calls += 1
        u = net(torch.cat([batch["moving"], batch["fixed"]], 1))
        return {"similarity": (1.0, ((warp(batch["moving"], u) - batch["fixed"]) ** 2).mean())}

    def register(self, net, fixed, moving, recipe):
        return net(torch.cat([moving, fixed], 1))


def test_calibration_times_every_stage_and_weights_it_by_its_steps(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(plan_module, "time", clock)
    grid = {"ndim": 2, "shape": (16, 16), "spacing": (1.0, 1.0), "labels": 2, "test_pairs": 1}
    method = SlowSecondStage(clock)
    cost = calibrate(method, method.recipe("quick"), grid, torch.device("cpu"), steps=3)
    assert cost["steps"] == 4
    # 3 steps of 10 ms and 1 of 50 ms: 20 ms a step (first stage alone 10, last alone 50, stages unweighted 30);
    # the mean of the timed steps would add the hiccup's 0.1 s
    assert cost["step_s"] == pytest.approx(0.02)
    # one timed step after the warm-up: with the warm-up's, the medians would be 0.51 and 0.55 s
    one_step = calibrate(method, method.recipe("quick"), grid, torch.device("cpu"), steps=1)
    assert one_step["step_s"] == pytest.approx(0.02)


def test_calibration_agrees_with_the_training_loop_s_own_step_time(data_dir, tmp_path):
    data, _ = data_dir
    dataset = PreparedDataset(data / "embedded2d" / "prepared").without_test()
    method = load_method("voxelmorph")
    recipe = {**method.recipe("quick"), "iterations": 12, "working_size": 64, "checkpoint_every": 100}
    grid = dataset_grid({"data_dir": str(data), "datasets": {"embedded2d": {}}}, "embedded2d")
    torch.set_num_threads(1)
    trained = train(method, recipe, dataset, tmp_path / "vxm")
    cost = calibrate(method, recipe, grid, torch.device("cpu"), steps=5)
    # the same step on the same grid: within a factor of 2 of what training measured (its median)
    assert 0.5 < cost["step_s"] / trained["step_time_s"] < 2.0
