rule train:
    """Train one method with its recipe and one seed on one dataset's training split (a GPU job on a cluster)."""
    input:
        info=rules.prepare.output.info,
        arrays=rules.prepare.output.arrays,
        supervision=syn_supervision,
    output:
        model=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/model.pt",
        log=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/train_log.csv",
        summary=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/train.json",
    params:
        settings=settings_json,
        prepared=prepared_folder,
        out=method_folder,
        supervision=supervision_folder,
    threads: CONFIG["torch_threads"]
    # every training before any registration that is ready: the short register jobs then fill the cores while the
    # last trainings run, instead of a long training starting last on a machine that has nothing else to do
    priority: 1
    resources:
        **job_resources("train"),
    log:
        f"{RESULTS}/logs/{{dataset}}/{{method}}/seed{{seed}}/train.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/{{method}}/seed{{seed}}/train.tsv",
    shell:
        "regbench train --prepared {params.prepared} --out {params.out} --settings {params.settings:q}"
        " --supervision {params.supervision} > {log} 2>&1"
