"""One GPU per job: concurrent jobs get distinct GPUs, a dead job's GPU is free again, SLURM's choice is kept.

Several GPUs are simulated: the slots are locks named after the GPUs, so processes that each ask for one of
``["0", "1", "2"]`` behave as jobs on a three-GPU machine would, with or without CUDA.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from regbench import runtime
from regbench.gpu_slots import acquire_gpu_slot, visible_gpus

HOLD = textwrap.dedent("""
    import sys, time
    from regbench.gpu_slots import acquire_gpu_slot
    print(acquire_gpu_slot(sys.argv[2].split(","), sys.argv[1], poll_s=0.05), flush=True)
    time.sleep(600)
""")


def hold_a_slot(lock_dir, gpus):
    """A job that takes a slot and keeps it until killed; returns (process, its slot index)."""
    job = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_dir), ",".join(gpus)], stdout=subprocess.PIPE,
                           text=True)
    return job, int(job.stdout.readline())


def test_concurrent_jobs_get_distinct_gpus_and_a_killed_job_releases_its_own(tmp_path):
    gpus = ["0", "1", "2"]
    jobs = [hold_a_slot(tmp_path, gpus) for _ in gpus]
    try:
        assert sorted(slot for _, slot in jobs) == [0, 1, 2]
        # every GPU is held: a fourth job waits
        with pytest.raises(TimeoutError, match="held by another job"):
            acquire_gpu_slot(gpus, tmp_path, poll_s=0.05, timeout_s=0.3)
        killed, slot = jobs[1]
        killed.kill()
        killed.wait()
        # the kernel released the dead job's lock: the next job gets exactly that GPU
        job, new_slot = hold_a_slot(tmp_path, gpus)
        jobs.append((job, new_slot))
        assert new_slot == slot == 1
    finally:
        for job, _ in jobs:
            job.kill()
            job.wait()


def test_a_job_holds_one_slot_and_cuda_visible_devices_names_the_gpus(tmp_path):
    assert acquire_gpu_slot(["GPU-aa", "GPU-bb"], tmp_path) == acquire_gpu_slot(["GPU-aa", "GPU-bb"], tmp_path)
    assert (tmp_path / "gpu-GPU-aa.lock").exists()
    assert visible_gpus(4, {}) == ["0", "1", "2", "3"]
    assert visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "3,1"}) == ["3", "1"]
    with pytest.raises(ValueError, match="no GPU"):
        acquire_gpu_slot([], tmp_path / "none")


def test_auto_gives_each_job_its_own_cuda_device_and_leaves_slurm_s_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("REGBENCH_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    other, slot = hold_a_slot(tmp_path, ["5", "7"])   # another job holds GPU 5
    try:
        assert slot == 0
        assert runtime.select_device("auto") == torch.device("cuda:1")   # GPU 7, the second visible one
        assert (tmp_path / "gpu-7.lock").read_text().strip() != str(other.pid)
    finally:
        other.kill()
        other.wait()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert runtime.select_device("auto") == torch.device("cuda")
    assert runtime.select_device("cpu") == torch.device("cpu")
