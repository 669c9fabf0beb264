"""A killed run resumes: SIGKILL to snakemake and every job it started, while it prepares the data, in the middle
of training and in the middle of evaluation; `snakemake` again completes with the leaderboard of an uninterrupted
run (timings aside), and training goes on from its last checkpoint to the same weights. Every output is written
atomically, so an interrupted write never leaves a file that a rerun takes as done.

A kill leaves Snakemake's lock behind (.snakemake/locks): the rerun needs `snakemake --unlock` first, as a user's
does (README, Reliability). The phases are told by the files the jobs write, not by waiting fixed times.
"""
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from regbench.data.prepared import PreparedDataset
from regbench.evaluation.aggregate import TIMING_COLUMNS
from regbench.io import InputError

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 40

SEEDS = (0, 1)
CONFIG = f"""
seed: 0
seeds: [{SEEDS[0]}, {SEEDS[1]}]
torch_threads: 1
datasets:
  embedded2d: {{n_train: 4, n_test: 3}}
methods:
  identity: {{}}
  voxelmorph:
    overrides: {{iterations: {ITERATIONS}, batch_size: 2, checkpoint_every: 10}}
evaluation:
  runtime_repeats: 1
"""


def snakemake(workdir: Path, *extra: str) -> list[str]:
    """The user's command (``extra``: targets or flags; before --configfile, which takes several values)."""
    return [sys.executable, "-m", "snakemake", *extra, "--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory",
            str(workdir), "--configfile", str(workdir / "config.yaml")]


def complete(workdir: Path, *targets: str) -> None:
    result = subprocess.run(snakemake(workdir, *targets), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def kill_when(workdir: Path, ready, phase: str) -> None:
    """Run the workflow until ``ready()`` holds, then SIGKILL snakemake and its jobs (one process group)."""
    with open(workdir / "snakemake.log", "a") as log:
        process = subprocess.Popen(snakemake(workdir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the workflow ended or stalled before {phase}:\n"
                            + (workdir / "snakemake.log").read_text()[-3000:])
            time.sleep(0.05)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def unlock(workdir: Path) -> None:
    """What a user does after a kill: the lock of the killed run would stop the rerun."""
    assert any((workdir / ".snakemake" / "locks").iterdir())
    result = subprocess.run(snakemake(workdir, "--unlock"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def mtimes(paths) -> dict:
    return {path: path.stat().st_mtime_ns for path in paths}


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["net"]


def test_a_run_killed_while_preparing_training_and_evaluating_resumes_to_the_same_leaderboard(tmp_path):
    """Two training seeds: the killed run resumes each seed's training where it stopped and ends with the
    uninterrupted run's weights for both, and its leaderboard (means over seeds, intervals, ranks)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for workdir in (straight, killed):
        workdir.mkdir()
        (workdir / "config.yaml").write_text(CONFIG)
    complete(straight, "results/embedded2d/leaderboard.csv")

    prepared = killed / "data" / "embedded2d" / "prepared"
    runs = {seed: killed / "results" / "embedded2d" / "voxelmorph" / f"seed{seed}" for seed in SEEDS}

    # 1. while preparing the data: some subjects written, the tables not
    kill_when(killed, lambda: len(list((prepared / "images").glob("*.nii.gz"))) >= 3, "data preparation")
    assert not (prepared / "dataset.json").exists()
    unlock(killed)

    # 2. in the middle of training: a checkpoint of one seed written, its model not
    kill_when(killed, lambda: any((run / "checkpoint.pt").exists() for run in runs.values()), "the first checkpoint")
    seed = next(s for s, run in runs.items() if (run / "checkpoint.pt").exists())
    method = runs[seed]
    assert not (method / "model.pt").exists()
    resumed_from = torch.load(method / "checkpoint.pt", weights_only=False)["iteration"]
    assert 0 < resumed_from < ITERATIONS
    kept = mtimes(prepared / name for name in ("subjects.csv", "labels.csv", "pairs.csv", "dataset.json"))
    unlock(killed)

    # 3. in the middle of evaluation: scoring the test pairs, nothing written yet
    logs = killed / "results" / "logs" / "embedded2d" / "voxelmorph" / f"seed{seed}"
    register_log = logs / "register.log"
    kill_when(killed, lambda: register_log.exists() and "register voxelmorph" in register_log.read_text(),
              "the evaluation")
    assert not (method / "pairs.csv").exists() and not (method / "eval.json").exists()
    # training went on from the checkpoint: its progress bar counted the remaining iterations only
    train_log = (logs / "train.log").read_text()
    assert re.findall(r"(\d+)/(\d+) \[", train_log)[-1] == (str(ITERATIONS - resumed_from),) * 2
    reference = weights(straight / "results" / "embedded2d" / "voxelmorph" / f"seed{seed}" / "model.pt")
    again = weights(method / "model.pt")
    assert all(torch.equal(reference[key], again[key]) for key in reference)
    kept.update(mtimes([method / "model.pt", method / "train.json"]))
    unlock(killed)

    # 4. the rerun completes, recomputing nothing that was done
    complete(killed)
    assert mtimes(kept) == kept
    for other in SEEDS:   # both seeds' weights are the uninterrupted run's
        reference = weights(straight / "results" / "embedded2d" / "voxelmorph" / f"seed{other}" / "model.pt")
        assert all(torch.equal(reference[k], v) for k, v in weights(runs[other] / "model.pt").items())
    first, second = (pd.read_csv(run / "results" / "embedded2d" / "leaderboard.csv") for run in (straight, killed))
    keep = [column for column in first.columns if not column.startswith(TIMING_COLUMNS)]
    pd.testing.assert_frame_equal(first[keep], second[keep])
    assert (killed / "results" / "report" / "index.html").exists()


def test_the_default_profile_is_found_so_a_rerun_redoes_incomplete_jobs():
    """A job killed between two of its outputs leaves one behind; Snakemake stops on it unless the rerun has
    --rerun-incomplete, which the workflow profile sets: it must be found from the repository root."""
    from snakemake.cli import parse_args

    _, args = parse_args(["-s", str(ROOT / "Snakefile"), "--cores", "1"])
    assert args.rerun_incomplete


def test_a_write_killed_midway_leaves_the_previous_file_and_no_new_one(tmp_path):
    (tmp_path / "done.csv").write_text("the previous run's\n")
    script = textwrap.dedent(f"""
        import time
        from regbench.io import atomic_path
        with atomic_path({str(tmp_path / "done.csv")!r}) as old, atomic_path({str(tmp_path / "new.csv")!r}) as new:
            old.write_text("half of it")
            new.write_text("half of it")
            print("writing", flush=True)
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    process.kill()
    process.wait()
    assert (tmp_path / "done.csv").read_text() == "the previous run's\n"
    assert not (tmp_path / "new.csv").exists()
    # what is left: hidden temporary files, which nothing reads and a rerun replaces
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "done.csv")
    assert len(left) == 2 and left[0].startswith(".done.") and left[1].startswith(".new.")


#: Calls that write a file, by method name (any receiver) or as module.function.
WRITING_METHODS = {"to_csv", "to_json", "to_parquet", "to_html", "to_excel", "savefig", "to_filename", "write_text",
                   "write_bytes", "tofile"}
WRITING_FUNCTIONS = {("torch", "save"), ("np", "save"), ("np", "savez"), ("np", "savez_compressed"), ("nib", "save"),
                     ("json", "dump"), ("yaml", "dump"), ("yaml", "safe_dump"), ("pickle", "dump"),
                     ("shutil", "copy"), ("shutil", "copy2"), ("shutil", "copyfile"), ("shutil", "move")}
#: Deliberate exceptions: a download goes to <file>.part (resumed by the next run) and is renamed when complete.
NOT_ATOMIC = {("regbench/data/download.py", "open(self.part_path, mode)")}


def unguarded_writes(source: str) -> list[str]:
    """Calls that write a file outside a ``with atomic_path(...)`` block."""
    found = []

    def writes(call: ast.Call) -> bool:
        f = call.func
        if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "yaml"
                and len(call.args) < 2 and not any(k.arg == "stream" for k in call.keywords)):
            return False  # yaml.dump(data) without a stream returns the text
        if isinstance(f, ast.Attribute) and (f.attr in WRITING_METHODS or (
                isinstance(f.value, ast.Name) and (f.value.id, f.attr) in WRITING_FUNCTIONS)):
            return True
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        opens = (isinstance(f, ast.Name) and f.id == "open") or (
            isinstance(f, ast.Attribute) and f.attr == "open" and not (isinstance(f.value, ast.Name) and f.value.id == "os"))
        return opens and mode is not None and not (isinstance(mode, ast.Constant) and not set(str(mode.value)) & set("wax+"))

    def visit(node, guarded):
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and "atomic_path" in ast.unparse(item.context_expr.func)
                for item in node.items):
            guarded = True
        if isinstance(node, ast.Call) and not guarded and writes(node):
            found.append(ast.unparse(node))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source), False)
    return found


def test_every_output_is_written_through_an_atomic_path():
    assert unguarded_writes("frame.to_csv(path)\ntorch.save(net, path)\nopen(path, 'w')") == [
        "frame.to_csv(path)", "torch.save(net, path)", "open(path, 'w')"]
    assert unguarded_writes("with atomic_path(path) as tmp:\n    frame.to_csv(tmp)\nopen(path)") == []
    assert unguarded_writes("text = yaml.safe_dump(data)\nyaml.safe_dump(data, stream)") == ["yaml.safe_dump(data, stream)"]
    found = {(str(path.relative_to(ROOT)), call)
             for folder in ("regbench", "methods", "datasets") for path in sorted((ROOT / folder).rglob("*.py"))
             for call in unguarded_writes(path.read_text())}
    assert found == NOT_ATOMIC


def test_a_folder_prepared_before_the_arrays_is_prepared_again_not_misread(tmp_path):
    """Layout 1 (no arrays/, no layout in dataset.json), as an earlier regbench left it: the next run rebuilds it."""
    (tmp_path / "config.yaml").write_text(CONFIG)
    target = "data/embedded2d/prepared/dataset.json"   # what every later job reads: dataset.json, the arrays
    later = "results/embedded2d/identity/seed0/pairs.csv"
    complete(tmp_path, target)
    prepared = tmp_path / "data" / "embedded2d" / "prepared"
    expected = {path.name: path.read_bytes() for path in (prepared / "arrays").iterdir()}
    shutil.rmtree(prepared / "arrays")
    record = json.loads((prepared / "dataset.json").read_text())
    del record["layout"]
    (prepared / "dataset.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="prepared in layout 1, without the uncompressed arrays of layout 2"):
        PreparedDataset(prepared)
    result = subprocess.run(snakemake(tmp_path, later), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"rule prepare:.*?Missing output files: data/embedded2d/prepared/arrays/index\.csv",
                     result.stdout + result.stderr, re.S)
    assert {path.name: path.read_bytes() for path in (prepared / "arrays").iterdir()} == expected
    assert PreparedDataset(prepared).info["layout"] == 2
