"""The workflow on SLURM: what each job asks for comes from the config's `resources:` section, and the tiny
workflow run with `--profile workflow/profiles/slurm` on a real single-node cluster (tests/slurm/cluster.sh:
munged, slurmctld and slurmd on localhost, one fake GPU) gives the same leaderboard as a local run.

The cluster tests need root and Debian's slurm-wlm and munge (`tests/slurm/cluster.sh install`) and
snakemake-executor-plugin-slurm; without them they skip and say which is missing, unless
REGBENCH_REQUIRE_SLURM=1 (CI), where they fail instead.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from regbench.evaluation.aggregate import TIMING_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"

# tests/test_workflow.py's tiny benchmark, with requests that fit the test node and differ per rule and method
TINY = """
seed: 0
torch_threads: 1
datasets:
  embedded2d: {n_train: 4}
methods:
  identity: {}
  voxelmorph:
    overrides: {iterations: 30, batch_size: 2, checkpoint_every: 10}
evaluation:
  runtime_repeats: 1
resources:
  default: {runtime: 10, mem_mb: 1000}
  train: {runtime: 20, mem_mb: 2000, gpu: 1}
  report: {mem_mb: 1200}
  methods:
    identity: {register: {runtime: 15, mem_mb: 1500}}
"""

# (runtime minutes, mem_mb, cpus, gpus) that TINY asks for, per job (rule, method)
EXPECTED = {
    ("prepare", None): (10, 1000, 1, 0),
    ("train", "voxelmorph"): (20, 2000, 1, 1),
    ("register", "identity"): (15, 1500, 1, 0),
    ("register", "voxelmorph"): (10, 1000, 1, 0),
    ("aggregate", None): (10, 1000, 1, 0),
    ("report_dataset", None): (10, 1000, 2, 0),   # torch_threads + 1: the median pair registers in a second process
    ("report", None): (10, 1200, 1, 0),
}


def snakemake(workdir: Path, *args: str, config: str = TINY) -> list[str]:
    """The snakemake command line for the tiny benchmark (written to workdir/tiny.yaml) in workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tiny.yaml").write_text(config)
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "tiny.yaml"), *args]


def dry_run_resources(workdir: Path, config: str = TINY) -> dict:
    """{(rule, method): {resource: value}} as `snakemake --dry-run` plans the jobs."""
    result = subprocess.run(snakemake(workdir, "-n", "--cores", "2", config=config),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = {}
    for block in re.split(r"^(?:local)?rule ", result.stdout + result.stderr, flags=re.M)[1:]:
        rule = block.split(":", 1)[0]
        method = re.search(r"wildcards: .*method=(\w+)", block)
        resources = re.search(r"resources: (.*)", block)
        jobs[(rule, method and method.group(1))] = dict(item.split("=", 1) for item in resources.group(1).split(", "))
    return jobs


def test_every_job_asks_for_what_the_config_says(tmp_path):
    # one more layer than on the cluster below: CPUs set for one method's job
    config = TINY.replace("{register: {runtime: 15, mem_mb: 1500}}", "{register: {runtime: 15, mem_mb: 1500, cpus: 3}}")
    jobs = dry_run_resources(tmp_path, config)
    expected = {**EXPECTED, ("register", "identity"): (15, 1500, 3, 0)}
    for job, (runtime, mem_mb, cpus, gpu) in expected.items():
        assert {key: jobs[job][key] for key in ("runtime", "mem_mb", "cpus_per_task", "gpu")} == {
            "runtime": str(runtime), "mem_mb": str(mem_mb), "cpus_per_task": str(cpus), "gpu": str(gpu)}, job


def test_without_a_resources_section_training_still_asks_for_a_gpu_and_cpus_follow_threads(tmp_path):
    config = re.sub(r"resources:.*", "", TINY, flags=re.S).replace("torch_threads: 1", "torch_threads: 2")
    jobs = dry_run_resources(tmp_path, config)
    assert jobs[("train", "voxelmorph")]["gpu"] == "1"
    assert jobs[("register", "voxelmorph")]["gpu"] == "0"
    assert jobs[("train", "voxelmorph")]["cpus_per_task"] == "2"   # = threads = torch_threads
    assert jobs[("report", None)]["cpus_per_task"] == "1"


@pytest.mark.parametrize("resources, message", [
    ("resources: {methods: {voxelmorf: {train: {gpu: 2}}}}", "unknown method 'voxelmorf' under 'resources: methods:'"),
    ("resources: {train: {memory: 4000}}", "'memory' was unexpected"),
])
def test_a_bad_resources_section_is_named(tmp_path, resources, message):
    config = re.sub(r"resources:.*", resources + "\n", TINY, flags=re.S)
    result = subprocess.run(snakemake(tmp_path, "-n", "--cores", "1", config=config),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


# --- a real cluster ---------------------------------------------------------------------------------------

def missing_for_a_cluster() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")
               if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found: install slurm-wlm and munge (tests/slurm/cluster.sh install)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running single-node cluster: the environment that points SLURM's commands at it."""
    reason = missing_for_a_cluster()
    if reason:
        if os.environ.get("REGBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"REGBENCH_REQUIRE_SLURM=1 but no SLURM cluster can be started here: {reason}")
        pytest.skip(f"no SLURM cluster here: {reason}")
    # not under pytest's folder: the munge user must reach the cluster's folder, and pytest's is private
    folder = Path(tempfile.mkdtemp(prefix="regbench-slurm-"))
    try:
        started = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True,
                                  timeout=120)
        assert started.returncode == 0, started.stderr
        yield {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        if (folder / "pids").exists():
            subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The tiny benchmark on the cluster and, meanwhile, locally (the SLURM run mostly waits)."""
    idle = subprocess.run(["sinfo", "--noheader", "--format=%t %c %G"], capture_output=True, text=True, env=cluster)
    local_dir, slurm_dir = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("slurm")
    local = subprocess.Popen(snakemake(local_dir, "--cores", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    # This cluster has no accounting database, so jobs are followed with squeue, not sacct. The first status
    # check after 2 s (the plugin's default: 40) and no retry of a failed job (the profile retries once) keep
    # the test short.
    slurm = subprocess.run(
        snakemake(slurm_dir, "--profile", str(ROOT / "workflow" / "profiles" / "slurm"),
                  "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
                  "--retries", "0"),
        capture_output=True, text=True, env=cluster, timeout=900)
    local_log = local.communicate(timeout=900)[0]
    assert local.returncode == 0, local_log[-4000:]
    assert slurm.returncode == 0, slurm.stderr[-6000:]
    jobs = subprocess.run(["scontrol", "--oneliner", "show", "job"], capture_output=True, text=True, env=cluster)
    return {"idle": idle.stdout.split(), "local": local_dir, "slurm": slurm_dir, "log": slurm.stderr,
            "jobs": jobs.stdout}


def test_the_node_is_idle_with_a_gpu_before_the_run(runs):
    state, cpus, gres = runs["idle"]
    assert state == "idle" and int(cpus) >= 1 and gres == "gpu:1"


def test_every_rule_ran_as_a_slurm_job_with_the_config_s_resources(runs):
    submitted = {}
    for line in runs["jobs"].splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        rule, _, wildcards = fields["Comment"].removeprefix("rule_").partition("_wildcards_")
        method = wildcards.removeprefix("embedded2d").removeprefix("_") or None
        if method is not None:  # <method>_<seed>: one job a training seed (TINY has seed 0 only)
            method, _, seed = method.rpartition("_")
            assert seed == "0", line
        assert fields["JobState"] == "COMPLETED", line
        minutes = int(fields["TimeLimit"].split(":")[0]) * 60 + int(fields["TimeLimit"].split(":")[1])
        gpus = int(fields["TresPerJob"].removeprefix("gres:gpu:")) if "TresPerJob" in fields else 0
        submitted[(rule, method)] = (minutes, int(fields["MinMemoryNode"].removesuffix("M")),
                                     int(fields["NumCPUs"]), gpus)
    assert submitted == EXPECTED
    assert "Finished jobid" in runs["log"] and "has been submitted with SLURM jobid" in runs["log"]


def test_the_cluster_gives_the_local_leaderboard_apart_from_timings(runs):
    local, slurm = (pd.read_csv(run / "results" / "embedded2d" / "leaderboard.csv")
                    for run in (runs["local"], runs["slurm"]))
    keep = [c for c in local.columns if not c.startswith(TIMING_COLUMNS)]
    pd.testing.assert_frame_equal(local[keep], slurm[keep])
    assert sorted(slurm["method"]) == ["identity", "voxelmorph"]
    assert (runs["slurm"] / "results" / "report" / "index.html").exists()
