"""One GPU per job on a machine with several: each job holds a slot, a lock on one of the visible GPUs.

A local ``snakemake --cores all`` starts as many jobs as it has cores; without this, every job with
``device: auto`` would use ``cuda:0``. A job that resolves ``auto`` to CUDA takes the first visible GPU
that no other job on this machine holds, or waits until one is released. A slot is an exclusive
``flock`` on a file named after the GPU: the kernel releases it when the job exits, however it exits,
so a killed job never keeps its GPU. Under a scheduler that gives each job its own GPUs (SLURM sets
``SLURM_JOB_ID``), the scheduler's choice is kept and no slot is taken.

The GPUs are those of ``CUDA_VISIBLE_DEVICES`` when it is set (indices or UUIDs, the names the lock files
carry), else ``0 .. torch.cuda.device_count() - 1``; a job on GPU ``visible[k]`` runs on ``cuda:k``.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from pathlib import Path

#: the locks of the jobs of this machine (every user's jobs share a GPU, so the folder is not per user)
DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "regbench-gpu-slots"

#: per lock folder, the slot this process holds: (its index, the open lock file, never closed, which would
#: release it)
_held: dict[str, tuple[int, int]] = {}


def visible_gpus(device_count: int, environ=os.environ) -> list[str]:
    """The GPUs a job may use, by the names ``CUDA_VISIBLE_DEVICES`` gives them (or their indices)."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(k) for k in range(device_count)]
    names = [name.strip() for name in listed.split(",") if name.strip()]
    return names[:device_count] if device_count else names


def acquire_gpu_slot(gpus: list[str], lock_dir: Path = DEFAULT_LOCK_DIR, poll_s: float = 1.0,
                     timeout_s: float | None = None) -> int:
    """Hold the first of ``gpus`` that no other process holds and return its index in ``gpus``.

    Waits (polling every ``poll_s`` seconds) while every GPU is held; ``timeout_s`` bounds the wait
    (``TimeoutError``). A process holds one slot: a second call returns the same index.
    """
    if not gpus:
        raise ValueError("acquire_gpu_slot: no GPU to choose from")
    key = str(Path(lock_dir).resolve())
    if key in _held:
        return _held[key][0]
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        lock_dir.chmod(0o1777)   # shared by every user's jobs, like /tmp
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        for index, gpu in enumerate(gpus):
            path = lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held[key] = (index, fd)
            return index
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"every GPU of {gpus} is held by another job (locks in {lock_dir})")
        time.sleep(poll_s)


def under_a_scheduler(environ=os.environ) -> bool:
    """True in a SLURM job: its GPUs were chosen for it."""
    return "SLURM_JOB_ID" in environ

