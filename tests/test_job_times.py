"""Where a run's time went: Snakemake's benchmark records read back, summed per step."""
from pathlib import Path

import pandas as pd
import pytest

from regbench.io import InputError
from regbench.workflow.job_times import job_step, read_job_times, time_by_step, time_sentence

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def record(results, relative, seconds):
    path = results / "benchmarks" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds}\t0:00:{int(seconds):02d}\t3.00\t4.26\t0.28\t1.04\t0.00\t0.00\t0.00\t0.00\n")


@pytest.fixture
def results(tmp_path):
    for seed, (train, register) in enumerate(((30.0, 4.0), (34.0, 6.0))):
        record(tmp_path, f"embedded2d/voxelmorph/seed{seed}/train.tsv", train)
        record(tmp_path, f"embedded2d/voxelmorph/seed{seed}/register.tsv", register)
    record(tmp_path, "embedded2d/aggregate.tsv", 3.0)
    record(tmp_path, "embedded2d/aggregate_on_embedded2d_shift.tsv", 2.0)
    record(tmp_path, "embedded2d/prepare.tsv", 5.0)
    return tmp_path


def test_job_times_are_summed_per_step_the_most_time_first(results):
    jobs = read_job_times(results)
    assert len(jobs) == 7
    assert jobs.set_index("job").loc["embedded2d/voxelmorph/seed1/train", "wall_s"] == 34.0
    steps = time_by_step(jobs)
    assert list(steps.index) == ["train", "register", "prepare", "aggregate"]
    assert steps.loc["train", "jobs"] == 2 and steps.loc["train", "wall_s"] == 64.0
    assert steps.loc["aggregate", "jobs"] == 2 and steps.loc["aggregate", "wall_s"] == 5.0   # per target folded in
    assert steps["share"].sum() == pytest.approx(1.0)
    assert steps.loc["train", "share"] == pytest.approx(64 / 84)


def test_the_sentence_says_how_busy_the_cores_were(results):
    # 84 s of jobs in a 50 s run on 2 cores: 84 % of the cores' time
    sentence = time_sentence(read_job_times(results), run_wall_s=50.0, cores=2)
    assert "84 s of job time in all, 84% of 2 cores' wall time" in sentence
    assert "train 64 s (2 jobs, 76%), register 10 s (2 jobs, 12%), prepare 5 s (1 job, 6%)" in sentence
    assert time_sentence(pd.DataFrame(columns=["job", "step", "wall_s"]), 50.0, 2) == ""


def test_job_step_folds_the_per_target_forms():
    assert job_step(Path("x/aggregate_on_oasis.tsv")) == "aggregate"
    assert job_step(Path("x/seed0/register.tsv")) == "register"


def test_a_record_without_a_wall_time_is_an_error_naming_it(results):
    broken = results / "benchmarks" / "embedded2d" / "report.tsv"
    broken.write_text("max_rss\tcpu_time\n3.0\t0.1\n")
    with pytest.raises(InputError, match=r"report\.tsv: not a Snakemake benchmark record"):
        read_job_times(results)
