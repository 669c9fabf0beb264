"""The training data path at OASIS size: loader throughput and training's peak memory for 10 and 100 subjects.

Builds a fake prepared dataset of 100 OASIS-size subjects (160 x 192 x 224 float32 images, 35-label maps, the
prepared layout with its uncompressed arrays; uncompressed NIfTI beside them), then prints

- the loader's pairs per second (``regbench.data.loader.batch_loader`` at batch 1, from the page cache, after
  a read of every training volume that warms it), with 0 and with 2 worker processes;
- the peak resident memory of a training run (``regbench.training.loop.train``, 40 iterations at batch 1) on the
  first 10 and on all 100 subjects, summed over the training process and its loader workers, sampled every
  20 ms. The network is a small one (a 4x-pooled convolution) so that the data path's memory is what is
  measured: a real method adds its activations, which do not depend on the number of subjects.

Targets on a 2-core machine: at least 10 pairs/s; the same peak memory for 10 and 100 subjects. It needs about
7 GB of disk in the temporary folder and a few minutes.

    python benchmarks/data_loader.py [--subjects 100] [--keep DIR] [--readme README.md]

With --readme, the figures go into the README between its ``<!-- data-loader -->`` markers.
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from readme_figures import write_between_markers

from regbench.runtime import git_commit

SHAPE = (160, 192, 224)
LABELS = 35

TRAIN = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from regbench.data.prepared import PreparedDataset
    from regbench.method import RegistrationMethod
    from regbench.blocks.spatial import warp
    from regbench.training.loop import train

    class PooledConv(RegistrationMethod):
        name = "pooled_conv"
        recipes = {"quick": {"iterations": 40, "batch_size": 1, "lr": 1e-3, "checkpoint_every": 1000,
                             "log_every": 10}}

        def build(self, ndim, recipe):
            return nn.Sequential(nn.AvgPool3d(4), nn.Conv3d(2, 3, 3, padding=1), nn.Upsample(scale_factor=4))

        def loss_terms(self, net, batch, recipe):
            u = net(torch.cat([batch["moving"], batch["fixed"]], 1))
            fixed_labels = (batch["fixed_seg"] > 0).float().mean()   # the label maps reach the device as int64
            return {"similarity": (1.0, ((warp(batch["moving"], u) - batch["fixed"]) ** 2).mean()),
                    "labels": (0.0, fixed_labels)}

        def register(self, net, fixed, moving, recipe):
            return net(torch.cat([moving, fixed], 1))

    torch.set_num_threads(1)
    method = PooledConv()
    train(method, method.recipe("quick"), PreparedDataset(sys.argv[1]).without_test(), sys.argv[2],
          data_workers=int(sys.argv[3]))
""")


def fake_subject(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like OASIS-size subject: an ellipsoid of 35 labelled slabs, intensities from the labels, noise."""
    rng = np.random.default_rng(index)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in SHAPE], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.8 + 0.05 * rng.random()
    seg = np.where(inside, 1 + ((grid[0] + 1) * 17 + (grid[1] > 0) * 0.5).astype(np.uint8) % LABELS, 0)
    image = (seg * (0.7 / LABELS) + 0.05 * rng.standard_normal(SHAPE, dtype=np.float32)).astype(np.float32)
    return np.clip(image, 0, 1), seg.astype(np.int16)


def build_dataset(root: Path, n_subjects: int) -> Path:
    """A prepared folder of ``n_subjects`` (all train but two test), written as preparation writes one."""
    from regbench.dataset import write_prepared
    from regbench.io import save_nifti

    prepared = root / f"prepared{n_subjects}"
    rows = []
    for index in range(n_subjects):
        image, seg = fake_subject(index)
        save_nifti(prepared / "images" / f"s{index:03d}.nii", image, (1, 1, 1))
        save_nifti(prepared / "segs" / f"s{index:03d}.nii", seg, (1, 1, 1))
        rows.append({"subject": f"s{index:03d}", "split": "test" if index >= n_subjects - 2 else "train",
                     "image": f"images/s{index:03d}.nii", "seg": f"segs/s{index:03d}.nii"})
    last = [r["subject"] for r in rows[-2:]]
    write_prepared(prepared, name="fake_oasis", ndim=3, shape=SHAPE, spacing=(1, 1, 1), subjects=pd.DataFrame(rows),
                   labels=pd.DataFrame({"label": range(1, LABELS + 1), "name": [f"l{k}" for k in range(1, 36)]}),
                   pairs=pd.DataFrame({"split": ["test"], "fixed": [last[0]], "moving": [last[1]]}))
    return prepared


def pairs_per_second(prepared: Path, workers: int, n_batches: int = 60) -> float:
    from regbench.data.loader import batch_loader
    from regbench.data.prepared import PreparedDataset, training_batch

    dataset = PreparedDataset(prepared).without_test()
    make_batch = functools.partial(training_batch, dataset, compact=True)
    # batches as the loader hands them to the training (label maps in their stored type, made int64 on the device)
    for subject in dataset.split_subjects("train"):   # warms the page cache
        dataset.image(subject), dataset.seg(subject, None)
    start = time.perf_counter()
    for _ in batch_loader(make_batch, range(n_batches), 1, 0, workers=workers):
        pass
    return n_batches / (time.perf_counter() - start)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MB (Linux /proc)."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def peak_training_memory(prepared: Path, out: Path, workers: int) -> float:
    job = subprocess.Popen([sys.executable, "-c", TRAIN, str(prepared), str(out), str(workers)])
    peak = 0.0

    def sample():
        nonlocal peak
        while job.poll() is None:
            peak = max(peak, tree_rss_mb(job.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    job.wait()
    sampler.join()
    if job.returncode:
        raise SystemExit(f"the training run failed (exit {job.returncode})")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="build the datasets here and keep them")
    parser.add_argument("--readme", type=Path, help="write the figures into this README")
    args = parser.parse_args()
    figures = []
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        start = time.perf_counter()
        small, large = build_dataset(root, 10), build_dataset(root, args.subjects)
        print(f"built 10 and {args.subjects} OASIS-size subjects {SHAPE} in {time.perf_counter() - start:.0f} s")
        for workers in (0, 2):
            rate = pairs_per_second(large, workers)
            print(f"loader, {workers} workers: {rate:.1f} pairs/s (batch 1, page cache)")
            figures.append(f"{rate:.1f} pairs/s with {workers} workers")
        for workers in (0, 2):
            peaks = []
            for prepared, n in ((small, 10), (large, args.subjects)):
                peaks.append(peak_training_memory(prepared, root / f"train{n}w{workers}", workers))
                print(f"training, {n:3d} subjects, {workers} workers: peak resident memory {peaks[-1]:.0f} MB")
            figures.append(f"peak memory {peaks[0]:.0f} MB (10 subjects) and {peaks[1]:.0f} MB "
                           f"({args.subjects}) with {workers} workers")
    if args.readme:
        commit = git_commit(Path(__file__).resolve().parents[1])
        write_between_markers(args.readme, "data-loader", "; ".join(figures) + f" (commit `{commit[:12]}`)",
                              inline=True)
        print(f"wrote the figures into {args.readme}")


if __name__ == "__main__":
    main()
