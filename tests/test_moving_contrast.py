"""A method made for a second contrast gets it as its moving image, in training and evaluation, where the
dataset serves it; the primary image elsewhere; the outputs say which."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from regbench.data.prepared import PreparedDataset, training_batch
from regbench.dataset import write_prepared
from regbench.evaluation import aggregate
from regbench.layout import run_dir
from regbench.evaluation.scoring import evaluate_method
from regbench.io import save_nifti
from regbench.method import RegistrationMethod


def make_dataset(root, with_t2: bool) -> PreparedDataset:
    """Four 16 x 16 subjects; the T2 image is 1 - T1 inside the image (so either is recognisable)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        image = rng.uniform(0.1, 0.9, (16, 16)).astype(np.float32)
        save_nifti(root / f"t1_{i}.nii.gz", image, (1, 1))
        save_nifti(root / f"t2_{i}.nii.gz", 1 - image, (1, 1))
        save_nifti(root / f"seg_{i}.nii.gz", (image > 0.5).astype(np.int16), (1, 1))
        row = {"subject": f"s{i}", "split": "train" if i < 3 else "test", "image": f"t1_{i}.nii.gz",
               "seg": f"seg_{i}.nii.gz"}
        if with_t2:
            row["image_t2"] = f"t2_{i}.nii.gz"
        rows.append(row)
    write_prepared(root, name="tiny", ndim=2, shape=(16, 16), spacing=(1, 1), subjects=pd.DataFrame(rows),
                   labels=pd.DataFrame({"label": [1], "name": ["bright"]}),
                   pairs=pd.DataFrame({"split": ["test"], "fixed": ["s3"], "moving": ["s0"]}))
    return PreparedDataset(root)


class RecordsItsMoving(RegistrationMethod):
    """No registration; keeps the moving image it was given."""
    name = "records_its_moving"
    trainable = False
    moving_contrast = "t2"
    recipes = {"quick": {}}

    def register(self, net, fixed, moving, recipe):
        self.seen = moving.clone()
        return torch.zeros(fixed.shape[0], 2, *fixed.shape[2:])


@pytest.fixture()
def two_contrasts(tmp_path):
    return make_dataset(tmp_path / "t1t2", with_t2=True)


def test_the_served_contrast_is_chosen_and_a_missing_one_falls_back(two_contrasts, tmp_path):
    one_contrast = make_dataset(tmp_path / "t1", with_t2=False)
    method = RecordsItsMoving()
    assert two_contrasts.contrasts == ["t2"] and one_contrast.contrasts == []
    assert two_contrasts.moving_contrast(method) == "t2"
    assert one_contrast.moving_contrast(method) is None
    method.moving_contrast = "flair"
    assert two_contrasts.moving_contrast(method) is None
    assert two_contrasts.moving_contrast(RegistrationMethod()) is None


def test_training_batches_pair_a_t1_fixed_with_a_t2_moving(two_contrasts):
    t1 = training_batch(two_contrasts, iteration=5, batch_size=3, seed=0)
    t2 = training_batch(two_contrasts, iteration=5, batch_size=3, seed=0, contrast="t2")
    torch.testing.assert_close(t2["fixed"], t1["fixed"], rtol=0, atol=0)          # same pairs, same fixed T1
    torch.testing.assert_close(t2["moving"], 1 - t1["moving"], rtol=0, atol=1e-6)  # the moving subjects' T2
    torch.testing.assert_close(t2["moving_seg"], t1["moving_seg"], rtol=0, atol=0)


@pytest.mark.parametrize("with_t2", [True, False])
def test_evaluation_registers_the_served_contrast_and_says_so(tmp_path, with_t2):
    dataset = make_dataset(tmp_path / "data", with_t2)
    method = RecordsItsMoving()
    method_dir = run_dir(tmp_path / "results", "tiny", method.name, 0)
    evaluate_method(method, {}, dataset, method_dir, runtime_repeats=1)
    moving = torch.from_numpy(dataset.image("s0"))[None, None]
    torch.testing.assert_close(method.seen, 1 - moving if with_t2 else moving, rtol=0, atol=1e-6)
    contrast = "t2" if with_t2 else "image"
    assert json.loads((method_dir / "eval.json").read_text())["moving_contrast"] == contrast
    board = aggregate.write_leaderboard(tmp_path / "results", "tiny", [method.name])
    assert board.loc[0, "moving_contrast"] == contrast
    label = aggregate.method_label(board.iloc[0])
    assert label == ("records_its_moving (moving: t2)" if with_t2 else "records_its_moving")
