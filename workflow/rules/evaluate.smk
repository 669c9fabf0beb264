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
    threads: CONFIG["torch_threads"]
    resources:
        **job_resources("register"),
    log:
        f"{RESULTS}/logs/{{dataset}}/{{method}}/seed{{seed}}/register.log",
    shell:
        "regbench register --prepared {params.prepared} --out {params.out} --settings {params.settings:q} > {log} 2>&1"


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
