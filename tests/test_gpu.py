"""The CUDA path: training, registration, synchronised timing, peak GPU memory and mixed precision.

Skipped where CUDA is absent. On a GPU machine: ``python -m pytest -q tests/test_gpu.py``.
"""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from regbench.data.prepared import PreparedDataset
from regbench.evaluation.scoring import evaluate_method, measure
from regbench.plugins import load_dataset, load_method
from regbench.runtime import training_precision
from regbench.training.loop import load_trained, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def embedded2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded2d")
    source = load_dataset("embedded2d")
    source.prepare(root / "raw", root / "prepared", source.resolve_options({"n_train": 8, "n_val": 1, "n_test": 2}))
    return PreparedDataset(root / "prepared")


@pytest.fixture(scope="module")
def trained(embedded2d, tmp_path_factory):
    """VoxelMorph trained on the GPU for 300 steps (float32)."""
    method = load_method("voxelmorph")
    recipe = method.recipe("quick", {"iterations": 300, "checkpoint_every": 1000})
    out = tmp_path_factory.mktemp("vm_cuda")
    summary = train(method, recipe, embedded2d, out, seed=0, device=CUDA)
    return method, out, summary


def test_measure_waits_for_the_gpu_and_counts_its_memory():
    """A call that queues ~50 ms of matrix products and allocates 256 MiB is timed and counted in full."""
    a = torch.randn(4096, 4096, device=CUDA)

    def call():
        out = torch.empty(64, 2**20, device=CUDA)  # 256 MiB
        for _ in range(20):
            b = a @ a
        return out.sum() + b.sum()

    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    gpu_seconds = start.elapsed_time(end) / 1000
    _, seconds, peak_mb = measure(call, CUDA, repeats=3)
    assert seconds >= 0.9 * gpu_seconds  # without synchronisation the call returns long before the GPU ends
    assert peak_mb >= 256


def test_training_on_cuda_records_device_step_time_and_peak_memory(trained):
    method, out, summary = trained
    saved = json.loads((out / "train.json").read_text())
    assert saved["device"] == "cuda" and saved["precision"] == "fp32"
    assert 0 < saved["step_time_s"] < saved["train_time_s"]
    assert 1 < saved["peak_mem_mb"] < 4096  # MiB: VoxelMorph on a 176x176 slice
    loss = pd.read_csv(out / "train_log.csv")["loss"].to_numpy()
    assert loss[-5:].mean() < loss[:5].mean()


def test_registration_on_cuda_matches_cpu_and_beats_identity(trained, embedded2d, tmp_path):
    method, out, _ = trained
    net_gpu, recipe = load_trained(method, out / "model.pt", CUDA)
    net_cpu, _ = load_trained(method, out / "model.pt", "cpu")
    pair = embedded2d.split_pairs("test").iloc[0]
    batch = embedded2d.pair(pair.fixed, pair.moving)
    with torch.no_grad():
        u_gpu = method.register(net_gpu, batch["fixed"].to(CUDA), batch["moving"].to(CUDA), recipe).cpu()
        u_cpu = method.register(net_cpu, batch["fixed"], batch["moving"], recipe)
    assert u_gpu.abs().max() > 0.5  # it moves something
    torch.testing.assert_close(u_gpu, u_cpu, atol=2e-3, rtol=0)  # voxels (TF32 convolutions allowed)

    table = evaluate_method(method, recipe, embedded2d, tmp_path / "eval", net=net_gpu, device=CUDA,
                            runtime_repeats=3)
    identity = evaluate_method(load_method("identity"), {}, embedded2d, tmp_path / "identity")
    assert table["dice"].mean() > identity["dice"].mean() + 0.05
    assert (table["runtime_s"] > 0).all() and (table["runtime_s"] < 1).all()
    assert (table["peak_mem_mb"] > 0).all()
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["device"] == "cuda"


def test_mixed_precision_trains_and_registers_close_to_float32(trained, embedded2d, tmp_path):
    method, out, summary = trained
    assert training_precision(CUDA, True, method.allows_mixed_precision) in ("bf16", "fp16")
    assert training_precision(CUDA, True, False) == "fp32"  # a method that does not allow it
    recipe = method.recipe("quick", {"iterations": 300, "checkpoint_every": 1000})
    amp = train(method, recipe, embedded2d, tmp_path / "amp", seed=0, device=CUDA, mixed_precision=True)
    assert amp["precision"] in ("bf16", "fp16")
    assert np.isfinite(amp["final_loss"])
    assert abs(amp["final_loss"] - summary["final_loss"]) < 0.1 * abs(summary["final_loss"])

    net, recipe = load_trained(method, out / "model.pt", CUDA)
    fp32 = evaluate_method(method, recipe, embedded2d, tmp_path / "fp32", net=net, device=CUDA)
    mixed = evaluate_method(method, recipe, embedded2d, tmp_path / "mixed", net=net, device=CUDA,
                            mixed_precision=True)
    assert json.loads((tmp_path / "mixed" / "eval.json").read_text())["precision"] in ("bf16", "fp16")
    assert np.abs(mixed["dice"].to_numpy() - fp32["dice"].to_numpy()).max() < 0.02


def test_the_field_metrics_on_cuda_give_numpy_s_numbers():
    from regbench.evaluation.metrics.field_torch import field_pass
    from regbench.evaluation.metrics.jacobian import _field_pass

    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.standard_normal((1, 3, 8, 10, 12)))
    u = (torch.nn.functional.interpolate(coarse, size=(64, 80, 96), mode="trilinear", align_corners=True)[0] * 4
         + torch.from_numpy(rng.standard_normal((3, 64, 80, 96))) * 0.3).numpy()
    mask = np.zeros(u.shape[1:], bool)
    mask[8:-8, 8:-8, 8:-8] = True
    expected = _field_pass(u, mask=mask, want_ndv=True)
    got = field_pass(torch.from_numpy(u).to(CUDA), torch.from_numpy(mask).to(CUDA))
    assert expected["n_fold"] > 0
    assert (got["n_fold"], got["n_fold_mask"], got["n_mask"]) == (expected["n_fold"], expected["n_fold_mask"],
                                                                  expected["n_mask"])
    for key in ("sdlogj", "sdlogj_l2r", "ndv"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key
