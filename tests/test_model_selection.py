"""Model selection on val (regbench.evaluation.selection, the training loop's checkpoint_score): a run with
``model_selection: val_dice`` keeps the network that scores best on the val pairs, scored exactly as rule register
scores pairs; a killed run resumes to the same choice; the default keeps the last network."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from regbench.data.prepared import PreparedDataset
from regbench.dataset import write_prepared
from regbench.evaluation.scoring import evaluate_method
from regbench.io import InputError, save_nifti
from regbench.method import RegistrationMethod
from regbench.training.loop import load_trained, train
from regbench.evaluation.selection import val_scorer


class Shift(nn.Module):
    """One displacement for every voxel, in voxels (array-axis order)."""

    def __init__(self, ndim: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(ndim))

    def forward(self, moving, fixed):
        shape = (moving.shape[0], len(self.shift), *moving.shape[2:])
        return self.shift.view(1, -1, *[1] * (len(shape) - 2)).expand(shape)


class Drift(RegistrationMethod):
    """A toy whose loss pulls its shift ever further along the first axis: Adam at rate 1 moves it one voxel a
    step, so the network after k steps shifts every pair by about k voxels, and its val Dice falls with k."""
    name = "drift"
    recipes = {"quick": {"iterations": 4, "batch_size": 1, "lr": 1.0, "checkpoint_every": 1, "log_every": 1,
                         "model_selection": "val_dice"}}

    def __init__(self, fail_at=None):
        self.fail_at, self.calls = fail_at, 0

    def build(self, ndim, recipe):
        return Shift(ndim)

    def loss_terms(self, net, batch, recipe):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return {"drift": (1.0, -net.shift[0] + 0 * batch["moving"].mean())}

    def register(self, net, fixed, moving, recipe):
        return net(moving, fixed)


def _summary(folder):
    return json.loads((folder / "train.json").read_text())


def test_the_best_val_checkpoint_is_kept_and_scored_as_register_scores(small_embedded2d, tmp_path):
    dataset = small_embedded2d.without_test()
    method = Drift()
    recipe = method.recipe("quick")
    train(method, recipe, dataset, tmp_path / "run", checkpoint_score=val_scorer(method, dataset, recipe))
    selection = _summary(tmp_path / "run")["model_selection"]
    scores = [row["val_dice"] for row in selection["scores"]]
    assert [row["iteration"] for row in selection["scores"]] == [1, 2, 3, 4]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1] + 0.01  # further is worse
    assert selection["criterion"] == "val_dice" and selection["kept_iteration"] == 1
    net, _ = load_trained(method, tmp_path / "run" / "model.pt")
    assert net.shift[0].item() == pytest.approx(1.0, abs=1e-3)          # one Adam step, not four
    # the score the run recorded is the val Dice rule register would give that network
    table = evaluate_method(method, recipe, dataset, tmp_path / "scored", net=net, runtime_repeats=0, split="val")
    assert scores[0] == pytest.approx(table["dice"].mean(), abs=1e-12)
    assert val_scorer(method, dataset, recipe)(net) == pytest.approx(scores[0], abs=1e-12)
    # with the evaluation's other label warp, the score follows it as register's does
    linear = evaluate_method(method, recipe, dataset, tmp_path / "linear", net=net, runtime_repeats=0, split="val",
                             label_warp="linear")
    assert val_scorer(method, dataset, recipe, label_warp="linear")(net) == pytest.approx(linear["dice"].mean(),
                                                                                         abs=1e-12)
    assert val_scorer(method, dataset, method.recipe("quick", {"model_selection": "last"})) is None


def test_the_score_is_the_mean_over_every_val_pair_with_the_evaluations_label_warp(four_val_pairs, tmp_path):
    """A shift of half a voxel on each axis: linear and nearest label warps then disagree (at a whole voxel they
    coincide), so each scorer must follow its own; the score is the mean over all four val pairs, not the first."""
    method, recipe, dataset = Drift(), Drift().recipe("quick"), four_val_pairs.without_test()
    net = Shift(2)
    with torch.no_grad():
        net.shift.copy_(torch.tensor([1.5, 0.5]))
    assert len(dataset.split_pairs("val")) == 4
    scores = {}
    for warp in ("nearest", "linear"):
        table = evaluate_method(method, recipe, dataset, tmp_path / warp, net=net, runtime_repeats=0,
                                split="val", label_warp=warp)
        assert len(table) == 4 and table["dice"].std() > 0.001        # pairs that score differently
        scores[warp] = val_scorer(method, dataset, recipe, label_warp=warp)(net)
        assert scores[warp] == pytest.approx(table["dice"].mean(), abs=1e-12)
        assert abs(scores[warp] - table["dice"].iloc[0]) > 1e-4       # not the first pair's alone
    assert abs(scores["nearest"] - scores["linear"]) > 1e-3
    # the network goes back to the mode it was in: training mode after a checkpoint's scoring
    scorer = val_scorer(method, dataset, recipe)
    net.train()
    scorer(net)
    assert net.training
    net.eval()
    scorer(net)
    assert not net.training


def test_the_first_of_equal_scores_is_kept(small_embedded2d, tmp_path):
    """Scores 0.5, 0.7, 0.7, 0.6 after steps 1 to 4: the network after two steps (a later equal does not displace it)."""
    scores = iter([0.5, 0.7, 0.7, 0.6])
    method = Drift()
    train(method, method.recipe("quick"), small_embedded2d.without_test(), tmp_path,
          checkpoint_score=lambda net, precision: next(scores))
    assert _summary(tmp_path)["model_selection"]["kept_iteration"] == 2
    net, _ = load_trained(method, tmp_path / "model.pt")
    assert net.shift[0].item() == pytest.approx(2.0, abs=1e-2)


def test_the_default_keeps_the_last_network(small_embedded2d, tmp_path):
    method = Drift()
    recipe = method.recipe("quick", {"model_selection": "last"})
    train(method, recipe, small_embedded2d.without_test(), tmp_path)
    assert _summary(tmp_path)["model_selection"] == {"criterion": "last", "kept_iteration": 4, "scores": []}
    net, _ = load_trained(method, tmp_path / "model.pt")
    assert net.shift[0].item() == pytest.approx(4.0, abs=1e-2)


def test_a_killed_run_resumes_to_the_same_choice(small_embedded2d, tmp_path):
    dataset = small_embedded2d.without_test()
    recipe = Drift().recipe("quick")
    score = val_scorer(Drift(), dataset, recipe)
    train(Drift(), recipe, dataset, tmp_path / "straight", checkpoint_score=score)
    with pytest.raises(KeyboardInterrupt):   # after the checkpoints at 1 and 2
        train(Drift(fail_at=3), recipe, dataset, tmp_path / "resumed", checkpoint_score=score)
    resumed = Drift()
    train(resumed, recipe, dataset, tmp_path / "resumed", checkpoint_score=score)
    assert resumed.calls == 2 and _summary(tmp_path / "resumed")["resumed_from"] == 2
    assert _summary(tmp_path / "resumed")["model_selection"] == _summary(tmp_path / "straight")["model_selection"]
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)["net"]
    again = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["net"]
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_a_bad_selection_a_missing_score_and_a_dataset_without_val_pairs_are_one_error_each(small_embedded2d,
                                                                                          tmp_path):
    method = Drift()
    with pytest.raises(ValueError, match="drift: model_selection must be one of"):
        train(method, method.recipe("quick", {"model_selection": "best"}), small_embedded2d, tmp_path / "a")
    with pytest.raises(ValueError, match="drift: model_selection val_dice needs its val score, checkpoint_score"):
        train(method, method.recipe("quick"), small_embedded2d, tmp_path / "a")
    assert not (tmp_path / "a").exists()   # nothing written before the error
    root = tmp_path / "no_val"
    rows = []
    rng = np.random.default_rng(0)
    for i in range(3):
        save_nifti(root / f"i{i}.nii.gz", rng.random((8, 8)).astype(np.float32), (1, 1))
        save_nifti(root / f"s{i}.nii.gz", np.eye(8, dtype=np.int16), (1, 1))
        rows.append({"subject": f"n{i}", "split": "train" if i < 2 else "test", "image": f"i{i}.nii.gz",
                     "seg": f"s{i}.nii.gz"})
    write_prepared(root, name="no_val", ndim=2, shape=(8, 8), spacing=(1, 1), subjects=pd.DataFrame(rows),
                   labels=pd.DataFrame({"label": [1], "name": ["line"]}),
                   pairs=pd.DataFrame({"split": ["test"], "fixed": ["n2"], "moving": ["n0"]}))
    with pytest.raises(InputError, match=r"pairs.csv: no val pairs to choose a checkpoint on \(drift"):
        val_scorer(method, PreparedDataset(root).without_test(), method.recipe("quick"))


def test_a_config_may_ask_any_learned_method_to_select_on_val():
    from regbench.plugins import load_method

    assert load_method("voxelmorph").recipe("quick", {"model_selection": "val_dice"})["model_selection"] == "val_dice"
    assert "model_selection" not in load_method("voxelmorph").recipe("quick")      # its paper keeps the last
    with pytest.raises(ValueError, match="unknown recipe key 'model_selection'"):
        load_method("syn").recipe("quick", {"model_selection": "val_dice"})        # nothing to select from


def test_a_network_whose_score_is_nan_loses_to_any_number(small_embedded2d, tmp_path):
    """The score is the caller's (a scorer that says NaN, 0.5, 0.4, NaN in turn): the second network is kept."""
    method, calls = Drift(), iter([float("nan"), 0.5, 0.4, float("nan")])
    train(method, method.recipe("quick"), small_embedded2d.without_test(), tmp_path,
          checkpoint_score=lambda net, precision: next(calls))
    assert _summary(tmp_path)["model_selection"]["kept_iteration"] == 2
    net, _ = load_trained(method, tmp_path / "model.pt")
    assert net.shift[0].item() == pytest.approx(2.0, abs=1e-2)
