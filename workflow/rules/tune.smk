# The tuning protocol (spec/protocol.md, section 2), run on demand: `snakemake --cores all tune` tunes every method
# of the config that declares a search space, on each dataset's val split with the same budget (config `tuning:`),
# and writes each dataset's lock file (config/tuned/<dataset>.yaml, or the one the config names under `tuned:`).
# Nothing in `rule all` needs it: a run trains with the lock file the config names, read when the workflow starts.


rule tune_method:
    """Tune one method on one dataset's val split (Optuna, a journal beside the outputs: a killed tuning resumes)."""
    input:
        info=rules.prepare.output.info,
        arrays=rules.prepare.output.arrays,
        supervision=syn_supervision,
    output:
        choice=f"{RESULTS}/tuning/{{dataset}}/{{method}}/choice.json",
        trials=f"{RESULTS}/tuning/{{dataset}}/{{method}}/trials.csv",
    params:
        settings=tune_settings,
        prepared=prepared_folder,
        out=method_folder,
        supervision=supervision_folder,
    threads: CONFIG["torch_threads"]
    resources:
        **job_resources("tune"),
    log:
        f"{RESULTS}/logs/{{dataset}}/{{method}}/tune.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/{{method}}/tune.tsv",
    shell:
        "regbench tune --prepared {params.prepared} --out {params.out} --settings {params.settings:q}"
        " --supervision {params.supervision} > {log} 2>&1"


for tuned_dataset in DATASETS:

    rule:
        name:
            f"lock_{tuned_dataset}"
        input:
            expand(f"{RESULTS}/tuning/{tuned_dataset}/{{method}}/choice.json", method=TUNED_METHODS),
        output:
            lock_file(tuned_dataset),
        params:
            dataset=tuned_dataset,
        log:
            f"{RESULTS}/logs/{tuned_dataset}/lock.log",
        benchmark:
            f"{RESULTS}/benchmarks/{tuned_dataset}/lock.tsv",
        shell:
            "regbench lock --dataset {params.dataset} --out {output} {input} > {log} 2>&1"


rule tune:
    """Target: every dataset's lock file, tuned afresh where results/tuning/ holds no choice yet."""
    input:
        [lock_file(d) for d in DATASETS],
