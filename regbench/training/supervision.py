"""SyN supervision: ANTs SyN displacements between training subjects, for methods that learn from an
existing registration tool's deformations (BIRNet).

Which pairs
    Ordered pairs (fixed, moving) of distinct training subjects (subjects.csv order), all of them,
    shuffled by a generator seeded with ``(seed, PAIR_STREAM)`` and cut to the first ``n_pairs``
    (:func:`supervision_pairs`). All ordered pairs grow as n^2 (40 embedded2d training subjects: 1560;
    OASIS: ~160k), so the list is a fixed, documented sample; a shorter list is a prefix of a longer one,
    so a method that asks for fewer pairs trains on the first ones of the same list.

What is written (``results/<dataset>/syn_supervision/``)
    ``index.csv``: one row per pair, in list order: ``index, fixed, moving, file, seconds``.
    ``disp_<fixed>_<moving>.npz``: the displacement in Learn2Reg's layout (``X x Y [x Z] x ndim``, float32,
    voxels, on the fixed grid, ``warped(x) = moving(x + u(x))``); :func:`regbench.learn2reg.read_displacement`
    (or :class:`Supervision`) reads it back as ``ndim x *shape``.
    ``supervision.json``: the syn recipe, the pair count, ANTs version and threads, provenance.
    ``settings.json``: the hash of what made the files; a rerun with the same hash keeps the pairs already
    written (each file is written atomically) and registers only the rest.

Each pair runs in a worker process with one ITK thread, so the displacements do not depend on how many
workers there are, and a rerun gives identical files.

    python -m regbench.training.supervision --prepared data/<ds>/prepared --out results/<ds>/syn_supervision \
        --settings '<job settings JSON of method syn>' --pairs 200 --workers 2
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import logging
import multiprocessing
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from regbench.io import InputError, read_json, write_csv, write_json

log = logging.getLogger("regbench.training.supervision")

#: the method whose displacements supervise
SUPERVISOR = "syn"
#: how many pairs when no supervised method's recipe says (``supervision_pairs``)
DEFAULT_PAIRS = 200
#: second seed of the pair shuffle, so that it is independent of every other use of the config's seed
PAIR_STREAM = 5


def supervision_pairs(subjects: list[str], n_pairs: int, seed: int) -> list[tuple[str, str]]:
    """The first ``n_pairs`` ordered pairs of distinct ``subjects`` in a seeded shuffle (all when
    ``n_pairs`` <= 0 or more than there are)."""
    n = len(subjects)
    if n < 2:
        raise InputError(f"SyN supervision needs at least two training subjects, got {n}")
    total = n * (n - 1)
    order = np.random.default_rng([int(seed), PAIR_STREAM]).permutation(total)
    if 0 < n_pairs < total:
        order = order[:n_pairs]
    pairs = []
    for k in order.tolist():  # k -> (i, j), i != j: row i of the n x (n - 1) table of moving subjects
        i, r = divmod(k, n - 1)
        j = r + (r >= i)
        pairs.append((subjects[i], subjects[j]))
    return pairs


def file_name(fixed: str, moving: str) -> str:
    return f"disp_{fixed}_{moving}.npz"


class Supervision:
    """A written supervision folder: its pairs, and each pair's displacement as a tensor."""

    def __init__(self, folder, shape: tuple[int, ...] | None = None):
        self.folder = Path(folder)
        index = self.folder / "index.csv"
        if not index.exists():
            raise InputError(f"{index}: not found; the SyN supervision was not computed "
                             "(rule syn_supervision, for methods with needs_supervision = True)")
        self.pairs = pd.read_csv(index)
        missing = {"fixed", "moving", "file"} - set(self.pairs.columns)
        if missing:
            raise InputError(f"{index}: missing columns {sorted(missing)}")
        self.shape = shape

    def __len__(self) -> int:
        return len(self.pairs)

    def displacement(self, row: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Row ``row``'s displacement, ``1 x ndim x *shape`` float32 (voxels, fixed grid)."""
        from regbench.learn2reg import read_displacement

        shape = shape or self.shape
        path = self.folder / self.pairs.at[row, "file"]
        if shape is None:
            with np.load(path) as npz:
                shape = npz[npz.files[0]].shape[:-1]
        return torch.from_numpy(read_displacement(path, tuple(shape)).astype(np.float32))[None]


def supervised_batch(dataset, supervision: Supervision, iteration: int, batch_size: int, seed: int,
                     n_pairs: int | None = None, contrast: str | None = None,
                     compact: bool = False) -> dict[str, torch.Tensor]:
    """A training batch of supervised pairs: :func:`regbench.data.prepared.training_batch`'s keys plus
    ``supervision`` (``B x ndim x *spatial``, the SyN displacement of each pair).

    Pairs are drawn uniformly from the first ``n_pairs`` rows of the list (all rows if None), by a
    generator seeded with ``(seed, iteration)``: a resumed run sees the pairs an uninterrupted one sees.
    ``contrast``, ``compact``: the moving images' contrast and the label maps' type, as in
    :func:`regbench.data.prepared.training_batch`.
    """
    from regbench.data.prepared import stack_pairs

    available = len(supervision) if n_pairs is None else min(int(n_pairs), len(supervision))
    if available < 1:
        raise InputError(f"{supervision.folder / 'index.csv'}: no supervised pairs")
    rng = np.random.default_rng([int(seed), int(iteration)])
    rows = rng.integers(available, size=batch_size).tolist()
    items = []
    for row in rows:
        item = dataset.pair(supervision.pairs.at[row, "fixed"], supervision.pairs.at[row, "moving"], contrast, compact)
        item["supervision"] = supervision.displacement(row, dataset.shape)
        items.append(item)
    return stack_pairs(items)


def supervision_dir(out_dir) -> Path:
    """Where a training run in ``results/<dataset>/<method>/seed<k>`` (or ``results/<dataset>/<method>``) finds its
    dataset's SyN supervision: ``results/<dataset>/syn_supervision`` (the output folder of rule syn_supervision)."""
    out_dir = Path(out_dir)
    method_dir = out_dir.parent if re.fullmatch(r"seed\d+", out_dir.name) else out_dir
    return method_dir.parent / "syn_supervision"


def training_batches(method, dataset, out_dir, recipe: dict[str, Any], supervision_folder=None):
    """The batch function ``(iteration, batch_size, seed) -> batch`` of a training run in ``out_dir``.

    :func:`regbench.data.prepared.training_batch` for most methods; for a method with ``needs_supervision``,
    :func:`supervised_batch` over ``supervision_folder`` (default :func:`supervision_dir`), cut to the recipe's
    ``supervision_pairs`` (all written pairs when the recipe has no such key).
    """
    from regbench.data.prepared import training_batch

    contrast = dataset.moving_contrast(method)  # both kinds of batch serve the method's moving contrast
    # partials, not closures: a DataLoader's worker processes receive them (regbench.data.loader); label maps
    # stay in their stored type until they reach the device
    if not getattr(method, "needs_supervision", False):
        return functools.partial(training_batch, dataset, contrast=contrast, compact=True)
    supervision = Supervision(supervision_folder or supervision_dir(out_dir), dataset.shape)
    n_pairs = recipe.get("supervision_pairs")
    if n_pairs is not None and len(supervision) < int(n_pairs):
        raise InputError(f"{supervision.folder / 'index.csv'}: {len(supervision)} supervised pairs, but method "
                         f"{method.name!r} asks for {n_pairs} (recipe key supervision_pairs); rerun rule syn_supervision")
    return functools.partial(supervised_batch, dataset, supervision, n_pairs=n_pairs, contrast=contrast, compact=True)


# --------------------------------------------------------------------------------------------- computing


_worker_state: dict[str, Any] = {}


def _init_worker(prepared: str, recipe: dict, threads: int) -> None:
    from regbench import plugins
    from regbench.blocks.ants import load_ants, registration_options
    from regbench.data.prepared import PreparedDataset

    torch.set_num_threads(1)
    load_ants(threads)
    method = plugins.load_method(SUPERVISOR)
    _worker_state.update(dataset=PreparedDataset(prepared).without_test(), stages=method.stages(recipe),
                         options=registration_options(recipe))


def _register_pair(fixed: str, moving: str, path: str) -> float:
    from regbench.blocks.ants import register_arrays
    from regbench.learn2reg import write_displacement

    dataset = _worker_state["dataset"]
    start = time.perf_counter()
    u = register_arrays(dataset.image(fixed), dataset.image(moving), _worker_state["stages"],
                        **_worker_state["options"])
    seconds = time.perf_counter() - start
    write_displacement(path, u)
    return seconds


def compute_supervision(prepared, out_dir, settings: dict[str, Any], n_pairs: int = DEFAULT_PAIRS,
                        workers: int = 1, progress: bool = False) -> pd.DataFrame:
    """Register the supervision pairs with the syn recipe in ``settings``; write the folder's files."""
    from regbench.blocks.ants import ants_version
    from regbench.data.prepared import PreparedDataset
    from regbench.runtime import config_hash, provenance

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = PreparedDataset(prepared).without_test()  # supervision is training: no test subject
    recipe = settings["recipe"]
    if settings.get("method", SUPERVISOR) != SUPERVISOR:
        raise ValueError(f"SyN supervision takes the settings of method {SUPERVISOR!r}, got {settings.get('method')!r}")
    pairs = supervision_pairs(dataset.split_subjects("train"), int(n_pairs), int(settings["seed"]))
    stamp = config_hash({"recipe": recipe, "pairs": pairs, "dataset": dataset.info.get("provenance", {}).get("config_hash"),
                         "shape": list(dataset.shape)})
    marker = out_dir / "settings.json"
    keep = marker.exists() and read_json(marker).get("hash") == stamp
    write_json(marker, {"hash": stamp, "recipe": recipe, "n_pairs": len(pairs)})
    paths = [out_dir / file_name(f, m) for f, m in pairs]
    todo = [i for i, path in enumerate(paths) if not (keep and path.exists())]
    seconds = [float("nan")] * len(pairs)
    threads = int(recipe["threads"])
    workers = max(1, int(workers) // threads)
    log.info("SyN supervision of %s: %d pairs (%d already written), %d worker(s) x %d ITK thread(s)",
             dataset.name, len(pairs), len(pairs) - len(todo), workers, threads)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # a fresh ITK in each worker: its thread count is fixed there
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                                initargs=(str(prepared), recipe, threads)) as pool:
        futures = {pool.submit(_register_pair, *pairs[i], str(paths[i])): i for i in todo}
        done = concurrent.futures.as_completed(futures)
        if progress:
            from tqdm import tqdm

            done = tqdm(done, total=len(futures), desc="syn supervision", mininterval=5.0)
        for future in done:
            seconds[futures[future]] = future.result()
    wall = time.perf_counter() - start
    index = pd.DataFrame({"index": range(len(pairs)), "fixed": [f for f, _ in pairs],
                          "moving": [m for _, m in pairs], "file": [p.name for p in paths], "seconds": seconds})
    n_train = len(dataset.split_subjects("train"))
    write_json(out_dir / "supervision.json", {
        "method": SUPERVISOR, "dataset": dataset.name, "recipe_name": settings.get("recipe_name"), "recipe": recipe,
        "n_pairs": len(pairs), "all_ordered_pairs": n_train * (n_train - 1), "pair_seed": [settings["seed"], PAIR_STREAM],
        "layout": "Learn2Reg npz (X x Y [x Z] x ndim), float32, voxels, fixed grid",
        "antspyx": ants_version(), "ants_threads": threads, "workers": workers, "wall_s": wall,
        "median_seconds_per_pair": float(np.nanmedian(seconds)) if todo else None,
        "provenance": provenance(settings),
    })
    write_csv(out_dir / "index.csv", index)  # last: the rule's output, present only when every pair is
    return index


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m regbench.training.supervision",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, help="the prepared dataset folder")
    parser.add_argument("--out", required=True, help="the output folder (results/<dataset>/syn_supervision)")
    parser.add_argument("--settings", required=True,
                        help="job settings JSON of method syn (regbench.workflow.config.job_settings)")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="number of ordered training pairs (<= 0: all)")
    parser.add_argument("--workers", type=int, default=1, help="processes (cores); each runs ANTs with the recipe's threads")
    args = parser.parse_args(argv)
    try:
        settings = json.loads(args.settings)
    except json.JSONDecodeError as err:
        raise SystemExit(f"regbench.training.supervision: --settings is not valid JSON ({err})")
    try:
        index = compute_supervision(args.prepared, args.out, settings, args.pairs, args.workers, progress=True)
    except InputError as err:
        log.error("%s", err)
        return 1
    log.info("wrote %d SyN displacements to %s", len(index), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
