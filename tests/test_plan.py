"""`regbench plan`: a config's cost from a short calibration, before the run."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from regbench.data.prepared import PreparedDataset
from regbench.io import InputError
from regbench.plugins import load_dataset
from regbench.workflow import cli
from regbench.workflow.plan import dataset_grid

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
        "tuning": {"trials": 4, "fraction": 0.5},
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
    assert vxm["tune_h"] == pytest.approx(4 * 0.5 * one_seed)
    n_test = len(PreparedDataset(data / "embedded2d" / "prepared").split_pairs("test"))
    assert vxm["register_h"] == pytest.approx(2 * n_test * vxm["register_s"] / 3600)


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
