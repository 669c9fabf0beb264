"""Devices, threads, seeds and provenance: what makes a run reproducible and says how it was made."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import resource
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from regbench.gpu_slots import DEFAULT_LOCK_DIR, acquire_gpu_slot, under_a_scheduler, visible_gpus

PACKAGES = ("regbench", "torch", "numpy", "scipy", "pandas", "nibabel", "snakemake")


def select_device(requested: str = "auto") -> torch.device:
    """``auto``: a GPU of its own when there is one (:mod:`regbench.gpu_slots`: the first visible GPU that no
    other job of this machine holds, waiting for one if all are held; the scheduler's in a SLURM job), else
    CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given. ``REGBENCH_GPU_LOCK_DIR`` moves the slots' lock files."""
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if under_a_scheduler():
            return torch.device("cuda")
        lock_dir = Path(os.environ.get("REGBENCH_GPU_LOCK_DIR", DEFAULT_LOCK_DIR))
        return torch.device(f"cuda:{acquire_gpu_slot(visible_gpus(torch.cuda.device_count()), lock_dir)}")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} asked for in the config, but CUDA is not available")
    return torch.device(requested)


def configure_threads(threads: int) -> None:
    """Fix torch's intra-op threads: on CPU, identical numbers across reruns need the same count."""
    torch.set_num_threads(int(threads))


def training_precision(device: torch.device, mixed_precision: bool, allowed: bool) -> str:
    """``"bf16"``/``"fp16"`` (autocast) or ``"fp32"``.

    Mixed precision is used only on CUDA and only for methods that allow it
    (``RegistrationMethod.allows_mixed_precision``): bf16 where the GPU has it (no loss scaling
    needed), else fp16 with a gradient scaler. On CPU it is off: bf16 autocast is slower there.
    """
    if not (mixed_precision and allowed and device.type == "cuda"):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (a no-op for ``"fp32"``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def memory_format(device: torch.device, ndim: int, channels_last: bool = True) -> torch.memory_format:
    """The layout the training loop keeps images and conv weights in: channels-last on CPU when the method allows it
    (``RegistrationMethod.channels_last``; oneDNN's convolutions run up to a third faster on it,
    benchmarks/memory_format.py), else torch's default (CUDA: not measured).

    Only the layout changes, not the operations: the losses agree with the default layout's to rounding.
    """
    if device.type != "cpu" or not channels_last:
        return torch.contiguous_format
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def in_memory_format(batch: dict[str, torch.Tensor], fmt: torch.memory_format, ndim: int) -> dict[str, torch.Tensor]:
    """``batch`` with its image-shaped tensors (batch, channel and ``ndim`` spatial axes) in layout ``fmt``."""
    if fmt == torch.contiguous_format:
        return batch
    return {key: value.contiguous(memory_format=fmt) if value.dim() == ndim + 2 else value
            for key, value in batch.items()}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: tensors allocated on the GPU, in MiB.

    On CPU: the process's peak resident set (``ru_maxrss``), which includes the data and the
    interpreter; it is an upper bound of what the method needs.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels (a warning where an op has none).

    ``set_deterministic_debug_mode("warn")`` is ``use_deterministic_algorithms(True, warn_only=True)`` without
    the latter's import of torch's compiler configuration (about a second of every job's start-up; regbench does
    not compile)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_deterministic_debug_mode("warn")


def config_hash(obj) -> str:
    """Short SHA-256 of a JSON-serialisable object with sorted keys."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def git_commit(root: Path | None = None, ignoring: tuple = ()) -> str:
    """HEAD's commit, with ``-dirty`` when a tracked file other than those in ``ignoring`` has changed."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        excluded = [f":(exclude){Path(p).resolve()}" for p in ignoring]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."] + excluded,
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def provenance(settings: dict, device: torch.device | None = None) -> dict:
    """What made an output: config hash and seed, versions, device, threads, commit, date."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "config_hash": config_hash(settings),
        "seed": settings.get("seed"),
        "versions": versions,
        "python": platform.python_version(),
        "device": str(device) if device is not None else None,
        "device_name": device_name(device) if device is not None else None,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8],
        "pid": os.getpid(),
    }
