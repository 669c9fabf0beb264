# The report in two steps: rule report_dataset draws one dataset's figures and table, rule report joins every
# dataset into results/report/index.html and results/leaderboard.md (regbench/report/page.py). Outputs flagged
# report() also go into `snakemake --report report.html`, captioned by workflow/report/*.rst.


report: "../report/workflow.rst"


rule report_dataset:
    """One dataset's figures and leaderboard table; the median test pair is registered again by every method."""
    input:
        board=f"{RESULTS}/{{dataset}}/leaderboard.csv",
        info=rules.prepare.output.info,
        arrays=rules.prepare.output.arrays,
        labels=run_files("labels.csv"),
        models=[f"{RESULTS}/{{dataset}}/{m}/seed{s}/model.pt" for m in CONFIG["methods"] if is_trainable(m) for s in SEEDS[m]],
    output:
        dice=dataset_figure("dice_per_structure", "2 Dice per structure"),
        accuracy=dataset_figure("accuracy_regularity", "3 accuracy against regularity"),
        ranks=dataset_figure("ranks", "4 rank stability"),
        runtime=dataset_figure("runtime", "5 time"),
        curves=dataset_figure("training_curves", "6 training curves"),
        tuning=dataset_figure("tuning", "7 tuning on the val split"),
        example=dataset_figure("median_pair", "8 the median test pair"),
        table=report(f"{RESULTS}/report/{{dataset}}/leaderboard.html", caption="../report/leaderboard.rst",
                     category="{dataset}", labels={"figure": "1 leaderboard"}),
        facts=f"{RESULTS}/report/{{dataset}}/figures.json",
    params:
        settings=settings_json,
        results=lambda wildcards, input: os.path.dirname(os.path.dirname(input.board)),
        prepared=prepared_folder,
        methods=",".join(METHODS),
        lock=named_lock_file,
    threads: CONFIG["torch_threads"] + 1   # the median pair registers in a second process beside the drawing
    resources:
        **job_resources("report_dataset"),
    log:
        f"{RESULTS}/logs/{{dataset}}/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/report.tsv",
    shell:
        "python -m regbench.report.page dataset --results {params.results} --prepared {params.prepared}"
        " --dataset {wildcards.dataset} --methods {params.methods} --settings {params.settings:q}"
        " --lock={params.lock:q} > {log} 2>&1"


rule report:
    """results/leaderboard.md and results/report/index.html (every dataset, figures embedded)."""
    input:
        boards=expand(f"{RESULTS}/{{dataset}}/leaderboard.csv", dataset=DATASETS),
        figures=expand(f"{RESULTS}/report/{{dataset}}/figures.json", dataset=DATASETS),
        tables=expand(f"{RESULTS}/report/{{dataset}}/leaderboard.html", dataset=DATASETS),
        generalization=generalization_tables,
    output:
        markdown=f"{RESULTS}/leaderboard.md",
        html=report(f"{RESULTS}/report/index.html", caption="../report/index.rst", category="Report",
                    labels={"figure": "the whole report"}),
    params:
        results=lambda wildcards, output: os.path.dirname(output.markdown),
        data=DATA,
        methods=json.dumps({dataset: METHODS for dataset in DATASETS}),
        targets=json.dumps(TARGETS),
        config_hash=config_hash(CONFIG),
    resources:
        **job_resources("report"),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv",
    shell:
        "python -m regbench.report.page page --results {params.results} --data {params.data}"
        " --methods {params.methods:q} --targets {params.targets:q} --config-hash {params.config_hash} > {log} 2>&1"
