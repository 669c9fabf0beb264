"""The test split is out of reach of every choice: training sees a view without it, registering reads it."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from regbench.data.prepared import PreparedDataset
from regbench.dataset import array_path
from regbench.io import InputError
from regbench.plugins import load_dataset, load_method
from regbench.tuning.study import tune
from regbench.workflow import cli
from regbench.workflow.config import check_config, job_settings

CONFIG = {"datasets": {"embedded2d": {"n_train": 3, "n_val": 2, "n_test": 2}},
          "methods": {"voxelmorph": {"overrides": {"iterations": 3, "checkpoint_every": 100}}},
          "torch_threads": 1}


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A prepared embedded2d whose every test image and label map is garbage (NaN, or not a label map)."""
    root = tmp_path_factory.mktemp("poisoned")
    source = load_dataset("embedded2d")
    source.prepare(root / "raw", root / "prepared", source.resolve_options(CONFIG["datasets"]["embedded2d"]))
    prepared = root / "prepared"
    subjects = PreparedDataset(prepared).subjects
    for _, row in subjects[subjects["split"] == "test"].iterrows():
        for column in ("image", "image_t2", "seg"):
            path = prepared / row[column]
            header = nib.load(path)
            nib.save(nib.Nifti1Image(np.full(header.shape, np.nan, np.float32), header.affine), path)
            np.save(prepared / array_path(row["subject"], column), np.full(header.shape, np.nan, np.float32))
    return prepared


def test_the_training_view_has_no_test_pair_and_refuses_a_test_subject(poisoned):
    view = PreparedDataset(poisoned).without_test()
    assert set(view.pairs["split"]) == {"val"} and len(view.split_pairs("val")) > 0
    with pytest.raises(InputError, match="test split is out of reach"):
        view.split_pairs("test")
    test_subject = PreparedDataset(poisoned).split_subjects("test")[0]
    with pytest.raises(InputError, match=f"subject {test_subject} is in the test split"):
        view.image(test_subject)
    with pytest.raises(InputError, match="test split"):
        view.seg(test_subject)
    assert view.split_subjects("test") == []
    view.image(view.split_subjects("val")[0])   # val and train subjects load


def test_training_succeeds_on_poisoned_test_data_and_registering_names_a_test_file(poisoned, tmp_path, capsys):
    config = check_config(CONFIG)
    settings = json.dumps(job_settings(config, "embedded2d", "voxelmorph"))
    out = tmp_path / "voxelmorph"
    assert cli.main(["train", "--prepared", str(poisoned), "--out", str(out), "--settings", settings]) == 0
    assert (out / "model.pt").exists()
    assert cli.main(["register", "--prepared", str(poisoned), "--out", str(out), "--settings", settings]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("regbench: error:") and "_test_" in error and ".npy" in error, error
    assert "NaN" in error or "not finite" in error, error
    assert not (out / "pairs.csv").exists()
    shutil.rmtree(out)


def test_tuning_succeeds_on_poisoned_test_data(poisoned, tmp_path):
    """Tuning reads train and val only, even when handed the whole dataset."""
    method = load_method("voxelmorph")
    recipe = method.recipe("quick", {"iterations": 3})
    choice = tune(method, recipe, PreparedDataset(poisoned), tmp_path / "tuning", trials=2, seed=0)
    assert choice["status"] == "feasible" and len(choice["trials"]) == 2
    assert all(0 < row["val_dice"] <= 1 for row in choice["trials"])
