rule register:
    """Register every test pair with one run of a method and score it (one row a pair, one row a pair x label)."""
    input:
        info=rules.prepare.output.info,
        arrays=rules.prepare.output.arrays,
        model=trained_model,
    output:
        pairs=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/pairs.csv",
        labels=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/labels.csv",
        summary=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/eval.json",
    params:
        settings=settings_json,
        prepared=prepared_folder,
        out=method_folder,
        run=trained_run,
    threads: CONFIG["torch_threads"]
    priority: register_priority
    resources:
        **job_resources("register"),
    log:
        f"{RESULTS}/logs/{{dataset}}/{{method}}/seed{{seed}}/register.log",
    shell:
        "regbench register --prepared {params.prepared} --out {params.out} --run {params.run}"
        " --settings {params.settings:q} > {log} 2>&1"


rule aggregate:
    """One leaderboard per dataset: every metric over the same test pairs, averaged over seeds, with bootstrap
    intervals of the means and of the ranks."""
    input:
        run_files("pairs.csv"),
    output:
        board=f"{RESULTS}/{{dataset}}/leaderboard.csv",
        stats=f"{RESULTS}/{{dataset}}/stats.csv",
        scores=f"{RESULTS}/{{dataset}}/scores.csv",
        ranks=f"{RESULTS}/{{dataset}}/ranks.csv",
        provenance=f"{RESULTS}/{{dataset}}/leaderboard.json",
    params:
        results=lambda wildcards, output: os.path.dirname(os.path.dirname(output.board)),
        methods=",".join(METHODS),
        seeds=seeds_json,
        bootstrap=json.dumps(CONFIG["bootstrap"], sort_keys=True),
    resources:
        **job_resources("aggregate"),
    log:
        f"{RESULTS}/logs/{{dataset}}/aggregate.log",
    shell:
        "regbench aggregate --results {params.results} --dataset {wildcards.dataset} --methods {params.methods}"
        " --seeds {params.seeds:q} --bootstrap {params.bootstrap:q} > {log} 2>&1"


rule register_on:
    """Register another dataset's test pairs (config evaluate_on) with one run trained on this dataset; the images are
    resampled onto the grid the network was trained on, and the displacement is scored on the target's grid."""
    input:
        info=f"{DATA}/{{target}}/prepared/dataset.json",
        arrays=f"{DATA}/{{target}}/prepared/arrays/index.csv",
        trained_on=rules.prepare.output.info,
        model=trained_model,
    output:
        pairs=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/on_{{target}}/pairs.csv",
        labels=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/on_{{target}}/labels.csv",
        summary=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/on_{{target}}/eval.json",
    params:
        settings=target_settings_json,
        prepared=prepared_folder,
        trained_on=lambda wildcards, input: os.path.dirname(input.trained_on),
        run=trained_run,
        out=method_folder,
    threads: CONFIG["torch_threads"]
    priority: register_priority
    resources:
        **job_resources("register"),
    log:
        f"{RESULTS}/logs/{{dataset}}/{{method}}/seed{{seed}}/register_on_{{target}}.log",
    shell:
        "regbench register --prepared {params.prepared} --out {params.out} --run {params.run}"
        " --trained-on {params.trained_on} --settings {params.settings:q} > {log} 2>&1"


rule aggregate_on:
    """The leaderboard of the runs trained on a dataset, on another dataset's test pairs (results/<ds>/on_<target>/)."""
    input:
        target_run_files,
    output:
        board=f"{RESULTS}/{{dataset}}/on_{{target}}/leaderboard.csv",
        stats=f"{RESULTS}/{{dataset}}/on_{{target}}/stats.csv",
        scores=f"{RESULTS}/{{dataset}}/on_{{target}}/scores.csv",
        ranks=f"{RESULTS}/{{dataset}}/on_{{target}}/ranks.csv",
        provenance=f"{RESULTS}/{{dataset}}/on_{{target}}/leaderboard.json",
    params:
        results=lambda wildcards, output: os.path.dirname(os.path.dirname(os.path.dirname(output.board))),
        methods=",".join(METHODS),
        seeds=seeds_json,
        bootstrap=json.dumps(CONFIG["bootstrap"], sort_keys=True),
    resources:
        **job_resources("aggregate"),
    log:
        f"{RESULTS}/logs/{{dataset}}/aggregate_on_{{target}}.log",
    shell:
        "regbench aggregate --results {params.results} --dataset {wildcards.dataset} --methods {params.methods}"
        " --seeds {params.seeds:q} --bootstrap {params.bootstrap:q} --on {wildcards.target} > {log} 2>&1"


rule generalization:
    """Every method's Dice on its training dataset and on each evaluate_on target, the drop, and each dataset's
    MI(intensity; labels): results/<dataset>/generalization.csv."""
    input:
        board=rules.aggregate.output.board,
        scores=rules.aggregate.output.scores,
        targets=target_tables,
    output:
        f"{RESULTS}/{{dataset}}/generalization.csv",
    params:
        results=lambda wildcards, input: os.path.dirname(os.path.dirname(input.board)),
        targets=lambda wildcards: ",".join(TARGETS[wildcards.dataset]),
        data=DATA,
        bootstrap=json.dumps(CONFIG["bootstrap"], sort_keys=True),
    resources:
        **job_resources("aggregate"),
    log:
        f"{RESULTS}/logs/{{dataset}}/generalization.log",
    shell:
        "regbench generalization --results {params.results} --dataset {wildcards.dataset} --targets {params.targets}"
        " --data {params.data} --bootstrap {params.bootstrap:q} > {log} 2>&1"
