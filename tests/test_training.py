"""The training loop: resumes to identical weights, trains stages with earlier ones frozen, stops on NaN; its
batches come from a DataLoader that serves what the loop alone would."""
import functools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from regbench.data.loader import batch_loader, worker_count
from regbench.data.prepared import PreparedDataset, to_device, training_batch
from regbench.dataset import write_prepared
from regbench.io import save_nifti
from regbench.blocks.losses import mse
from regbench.method import RegistrationMethod, TrainingStage
from regbench.blocks.spatial import warp
from regbench.runtime import in_memory_format, memory_format
from regbench.training.loop import TrainingDiverged, load_trained, train


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "prepared"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        image = rng.random((16, 16)).astype(np.float32)
        seg = (image > 0.5).astype(np.int16)
        save_nifti(root / f"i{i}.nii.gz", image, (1, 1))
        save_nifti(root / f"s{i}.nii.gz", seg, (1, 1))
        rows.append({"subject": f"n{i}", "split": "train" if i < 3 else "test", "image": f"i{i}.nii.gz",
                     "seg": f"s{i}.nii.gz"})
    write_prepared(root, name="tiny", ndim=2, shape=(16, 16), spacing=(1, 1), subjects=pd.DataFrame(rows),
                   labels=pd.DataFrame({"label": [1], "name": ["bright"]}),
                   pairs=pd.DataFrame({"split": ["test"], "fixed": ["n3"], "moving": ["n0"]}))
    return PreparedDataset(root)


class TwoStageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(2, 2, 3, padding=1)
        self.second = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, moving, fixed):
        return self.second(self.first(torch.cat([moving, fixed], 1)))


class TwoStages(RegistrationMethod):
    """A toy two-stage method: stage 'first' trains one conv, stage 'second' the other."""
    name = "two_stages"
    recipes = {"quick": {"iterations": 0, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 2, "log_every": 1,
                         "first": 4, "second": 4}}

    def __init__(self, fail_at=None, nan_at=None):
        self.fail_at, self.nan_at, self.calls, self.snapshots = fail_at, nan_at, 0, {}

    def build(self, ndim, recipe):
        torch.manual_seed(0)
        return TwoStageNet()

    def training_stages(self, net, recipe):
        return [TrainingStage("first", recipe["first"], list(net.first.parameters())),
                TrainingStage("second", recipe["second"], list(net.second.parameters()))]

    def start_stage(self, net, index, recipe):
        self.snapshots[index] = {k: v.clone() for k, v in net.state_dict().items()}

    def loss_terms(self, net, batch, recipe):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        u = net(batch["moving"], batch["fixed"])
        similarity = mse(batch["fixed"], warp(batch["moving"], u))
        if self.nan_at is not None and self.calls >= self.nan_at:
            similarity = similarity * float("nan")
        return {"similarity": (1.0, similarity), "smoothness": (0.1, (u ** 2).mean())}

    def register(self, net, fixed, moving, recipe):
        return net(moving, fixed)


def test_stages_freeze_the_other_parameters(tiny_dataset, tmp_path):
    method = TwoStages()
    recipe = method.recipe("quick")
    train(method, recipe, tiny_dataset, tmp_path)
    net, _ = load_trained(method, tmp_path / "model.pt")
    start, middle = method.snapshots[0], method.snapshots[1]
    final = net.state_dict()
    # during 'first' only the first conv moved; during 'second' only the second
    assert not torch.equal(start["first.weight"], middle["first.weight"])
    assert torch.equal(start["second.weight"], middle["second.weight"])
    assert torch.equal(middle["first.weight"], final["first.weight"])
    assert not torch.equal(middle["second.weight"], final["second.weight"])
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log["stage"]) == ["first"] * 4 + ["second"] * 4
    assert set(log.columns) >= {"iteration", "loss", "similarity", "smoothness"}
    np.testing.assert_allclose(log["loss"], log["similarity"] + 0.1 * log["smoothness"], rtol=1e-5)


@pytest.mark.parametrize("killed_at", [3, 6])  # inside the first stage, and inside the second
def test_a_killed_training_resumes_to_the_same_weights(tiny_dataset, tmp_path, killed_at):
    recipe = TwoStages().recipe("quick")
    train(TwoStages(), recipe, tiny_dataset, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(TwoStages(fail_at=killed_at), recipe, tiny_dataset, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoint.pt").exists() and not (tmp_path / "resumed" / "model.pt").exists()
    resumed = TwoStages()
    train(resumed, recipe, tiny_dataset, tmp_path / "resumed")
    assert resumed.calls == 8 - (killed_at - 1) // 2 * 2  # it went on from the last checkpoint, not from 0
    summary = json.loads((tmp_path / "resumed" / "train.json").read_text())
    assert summary["resumed_from"] == (killed_at - 1) // 2 * 2
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)["net"]
    again = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["net"]
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "straight" / "train_log.csv"),
                                  pd.read_csv(tmp_path / "resumed" / "train_log.csv"))


def test_a_nan_loss_stops_with_the_method_iteration_and_term(tiny_dataset, tmp_path):
    method = TwoStages(nan_at=4)
    with pytest.raises(TrainingDiverged, match=r"two_stages: loss term 'similarity' is nan at iteration 3"):
        train(method, method.recipe("quick"), tiny_dataset, tmp_path)
    assert (tmp_path / "checkpoint.pt").exists()  # the last good checkpoint (iteration 2) is kept
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["iteration"] == 2
    assert not (tmp_path / "model.pt").exists()


class AmsgradStages(TwoStages):
    """The same toy with the second stage on AMSGrad (as DLIR's stages are)."""

    def training_stages(self, net, recipe):
        first, second = super().training_stages(net, recipe)
        return [first, second._replace(adam={"amsgrad": True})]


def test_a_stage_passes_its_adam_options_and_changes_the_result(tiny_dataset, tmp_path):
    train(TwoStages(), TwoStages().recipe("quick"), tiny_dataset, tmp_path / "adam")
    train(AmsgradStages(), AmsgradStages().recipe("quick"), tiny_dataset, tmp_path / "amsgrad")
    adam = torch.load(tmp_path / "adam" / "model.pt", weights_only=False)["net"]
    amsgrad = torch.load(tmp_path / "amsgrad" / "model.pt", weights_only=False)["net"]
    assert torch.equal(adam["first.weight"], amsgrad["first.weight"])  # the first stage is plain Adam in both
    assert not torch.equal(adam["second.weight"], amsgrad["second.weight"])


def test_train_json_records_step_time_memory_and_precision(tiny_dataset, tmp_path):
    method = TwoStages()
    summary = train(method, method.recipe("quick"), tiny_dataset, tmp_path, mixed_precision=True)
    assert summary["precision"] == "fp32"  # mixed precision applies on CUDA, to methods that allow it
    assert 0 < summary["step_time_s"] <= summary["train_time_s"]
    assert summary["peak_mem_mb"] > 10  # the process's peak resident set, MiB
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["precision"] == "fp32" and saved["step_time_s"] == pytest.approx(summary["step_time_s"])
    # 4 + 4 steps; two 2 -> 2 convolutions of 3 x 3 with bias: 2 x (2 x 2 x 9 + 2) = 76 parameters
    assert saved["iterations"] == 8 and saved["parameters"] == 76 and saved["resumed_from"] == 0
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert saved["final_loss"] == pytest.approx(log["loss"].iloc[-1]) and log["iteration"].iloc[-1] == 7


def test_adam_steps_as_adam_by_hand_with_a_stage_s_options():
    """Two steps at rate 0.1 (betas 0.9 and 0.999, eps 1e-8) from w = [1, -2] with the gradients [0.5, -4], then
    [1, 0.1]: the moments and their bias corrections written out. The second entry's second moment falls at the
    second step, where AMSGrad keeps the larger one (a step about 1e-5 shorter than Adam's)."""
    from regbench.training.loop import adam

    gradients = [np.array([0.5, -4.0]), np.array([1.0, 0.1])]
    for amsgrad in (False, True):
        weight = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        optimiser = adam([weight], 0.1, {"amsgrad": True} if amsgrad else None)
        assert optimiser.defaults["amsgrad"] == amsgrad
        expected, m, v, v_max = np.array([1.0, -2.0]), 0.0, 0.0, 0.0
        for step, gradient in enumerate(gradients, start=1):
            weight.grad = torch.from_numpy(gradient.copy())
            optimiser.step()
            m = 0.9 * m + 0.1 * gradient
            v = 0.999 * v + 0.001 * gradient ** 2
            v_max = np.maximum(v_max, v) if amsgrad else v
            expected = expected - 0.1 * (m / (1 - 0.9 ** step)) / (np.sqrt(v_max / (1 - 0.999 ** step)) + 1e-8)
            np.testing.assert_allclose(weight.detach().numpy(), expected, rtol=0, atol=1e-12)


def test_adam_gives_the_loop_s_numbers_to_the_bit():
    """The multi-tensor update changes no result: five steps over tensors of several shapes (AMSGrad and weight
    decay included) end on exactly the weights of torch's loop over tensors."""
    from regbench.training.loop import adam

    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (2, 8, 1, 1), (5, 7)]
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    gradients = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(5)]
    for options in (None, {"amsgrad": True}, {"weight_decay": 1e-3}):
        ends = []
        for ours in (True, False):
            weights = [nn.Parameter(w.clone()) for w in start]
            optimiser = (adam(weights, 1e-2, options) if ours
                         else torch.optim.Adam(weights, lr=1e-2, foreach=False, **(options or {})))
            for step in gradients:
                for weight, gradient in zip(weights, step):
                    weight.grad = gradient.clone()
                optimiser.step()
            ends.append(weights)
        assert ends[0][0].sub(start[0]).abs().max() > 1e-3   # the weights moved
        assert all(torch.equal(a, b) for a, b in zip(*ends)), options


class DecayedStages(TwoStages):
    """The toy with the first stage's rate dropped to zero after its second step."""

    def training_stages(self, net, recipe):
        first, second = super().training_stages(net, recipe)
        return [first._replace(lr_decay=([2], 0.0)), second]


def test_a_stage_decays_its_rate_at_its_milestones(tiny_dataset, tmp_path):
    decayed = DecayedStages()
    train(decayed, decayed.recipe("quick"), tiny_dataset, tmp_path / "decayed")
    short = TwoStages()
    train(short, short.recipe("quick", {"first": 2}), tiny_dataset, tmp_path / "short")
    # after its milestone the first stage's rate is 0: its weights stay those of a two-step stage
    torch.testing.assert_close(decayed.snapshots[1]["first.weight"], short.snapshots[1]["first.weight"])
    assert not torch.equal(decayed.snapshots[0]["first.weight"], decayed.snapshots[1]["first.weight"])


def test_the_rate_is_the_stage_s_own_times_gamma_per_milestone_passed():
    """Milestones [4, 2] (either order), gamma 0.5, the stage's rate 0.1 over the recipe's 1.0: steps 0-1 at 0.1,
    2-3 at 0.05, 4-5 at 0.025 (MultiStepLR: the milestone step itself has the decayed rate); without a rate of its
    own the stage decays the recipe's."""
    from regbench.training.loop import _set_learning_rate

    weight = nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.Adam([weight], lr=123.0)
    rates = {}
    for lr, expected in [(0.1, [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]), (None, [1.0, 1.0, 0.5, 0.5, 0.25, 0.25])]:
        stage = TrainingStage("s", 6, [weight], lr=lr, lr_decay=([4, 2], 0.5))
        rates[lr] = []
        for step in range(6):
            _set_learning_rate(optimiser, stage, {"lr": 1.0}, step)
            rates[lr].append(optimiser.param_groups[0]["lr"])
        assert rates[lr] == pytest.approx(expected), lr
    _set_learning_rate(optimiser, TrainingStage("s", 6, [weight], lr=0.1), {"lr": 1.0}, 5)
    assert optimiser.param_groups[0]["lr"] == 0.25   # no decay: the rate is left as the optimiser has it


class FrozenRateStages(TwoStages):
    """The toy with a rate of 0 of the first stage's own (the recipe's rate is 1e-2)."""

    def training_stages(self, net, recipe):
        first, second = super().training_stages(net, recipe)
        return [first._replace(lr=0.0), second]


def test_a_stage_trains_at_its_own_rate_over_the_recipe_s(tiny_dataset, tmp_path):
    method = FrozenRateStages()
    train(method, method.recipe("quick"), tiny_dataset, tmp_path)
    start, middle = method.snapshots[0], method.snapshots[1]
    assert torch.equal(start["first.weight"], middle["first.weight"])     # 4 steps at rate 0
    final = load_trained(method, tmp_path / "model.pt")[0].state_dict()
    assert not torch.equal(middle["second.weight"], final["second.weight"])  # the recipe's rate


def test_the_log_keeps_every_log_every_th_step_and_the_last(tiny_dataset, tmp_path):
    """log_every 3 over 8 steps: iterations 0, 3, 6 and the last one, 7."""
    method = TwoStages()
    train(method, method.recipe("quick", {"log_every": 3}), tiny_dataset, tmp_path)
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log["iteration"]) == [0, 3, 6, 7] and list(log["stage"]) == ["first", "first", "second", "second"]


# ------------------------------------------------------------------ batches from the DataLoader


def test_the_loader_s_workers_serve_the_loop_s_batches_in_order(tiny_dataset):
    make_batch = functools.partial(training_batch, tiny_dataset, compact=True)
    for workers in (0, 2):
        loaded = list(batch_loader(make_batch, range(3, 8), batch_size=2, seed=5, workers=workers))
        assert len(loaded) == 5
        for iteration, batch in zip(range(3, 8), loaded):
            assert batch["fixed_seg"].dtype == torch.uint8   # stored type until it reaches the device
            on_device = to_device(batch, "cpu")
            expected = training_batch(tiny_dataset, iteration, 2, 5)
            assert on_device.keys() == expected.keys()
            for key, value in expected.items():
                assert on_device[key].dtype == value.dtype and torch.equal(on_device[key], value), (workers, key)


def test_the_loader_leaves_torch_s_random_stream_alone(tiny_dataset):
    # a DataLoader draws its workers' seed: from torch's global generator it would shift a training's random
    # augmentation, and differently in a resumed run
    make_batch = functools.partial(training_batch, tiny_dataset, compact=True)
    state = torch.get_rng_state()
    for workers in (0, 2):
        list(batch_loader(make_batch, range(4), batch_size=1, seed=0, workers=workers))
    assert torch.equal(torch.get_rng_state(), state)


def test_training_with_loader_workers_ends_with_the_weights_of_training_without(tiny_dataset, tmp_path):
    method = TwoStages()
    recipe = method.recipe("quick")
    weights = []
    for workers in (0, 2):
        summary = train(method, recipe, tiny_dataset, tmp_path / f"w{workers}", seed=3, data_workers=workers)
        assert summary["data_workers"] == workers
        weights.append(torch.load(tmp_path / f"w{workers}" / "model.pt", weights_only=False)["net"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert worker_count("auto", torch.device("cpu")) == 0 and worker_count("auto", torch.device("cuda")) == 4


class LayoutProbe(TwoStages):
    """TwoStages that records the layout of what its loss sees (``channels_last``: the class attribute under test)."""

    def loss_terms(self, net, batch, recipe):
        self.seen = net.first.weight.is_contiguous(memory_format=torch.channels_last)  # 2 x 2 x 3 x 3: one layout only
        return super().loss_terms(net, batch, recipe)


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_loop_trains_channels_last_on_cpu_unless_the_method_opts_out(tiny_dataset, tmp_path, channels_last):
    method = LayoutProbe()
    method.channels_last = channels_last
    train(method, method.recipe("quick"), tiny_dataset, tmp_path, seed=1)
    assert method.seen == channels_last


def test_a_batch_goes_channels_last_in_its_image_shaped_tensors_only():
    batch = {"supervision": torch.rand(1, 3, 4, 5, 6), "labels": torch.arange(1, 4)}
    moved = in_memory_format(batch, memory_format(torch.device("cpu"), 3), 3)
    assert moved["supervision"].stride()[1] == 1 and torch.equal(moved["supervision"], batch["supervision"])
    assert moved["labels"] is batch["labels"]
    assert memory_format(torch.device("cpu"), 2, channels_last=False) == torch.contiguous_format


def test_the_layout_changes_no_result_beyond_rounding(tiny_dataset, tmp_path):
    weights = {}
    for channels_last in (True, False):
        method = TwoStages()
        method.channels_last = channels_last
        summary = train(method, method.recipe("quick"), tiny_dataset, tmp_path / str(channels_last), seed=2)
        weights[channels_last] = torch.load(tmp_path / str(channels_last) / "model.pt", weights_only=False)["net"]
        assert summary["final_loss"] > 0
    for key in weights[True]:
        torch.testing.assert_close(weights[True][key].contiguous(), weights[False][key], rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(weights[True][k], TwoStages().build(2, {}).state_dict()[k]) for k in weights[True])


def test_seeding_asks_for_deterministic_kernels_without_importing_the_compiler():
    """Training and registering jobs seed first: deterministic kernels on (warn-only), and no import of torch's
    compiler configuration, which use_deterministic_algorithms brings in (about a second of each job's start)."""
    import subprocess
    import sys

    code = ("import sys, torch; from regbench.runtime import seed_everything; seed_everything(3); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
            "'torch._inductor.config' in sys.modules, torch.initial_seed())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False", "3"]
