rule register:
    """Register every test pair with one method and score it (one row a pair, one row a pair x label)."""
    input:
        info=rules.prepare.output.info,
        model=trained_model,
    output:
        pairs=f"{RESULTS}/{{dataset}}/{{method}}/pairs.csv",
        labels=f"{RESULTS}/{{dataset}}/{{method}}/labels.csv",
        summary=f"{RESULTS}/{{dataset}}/{{method}}/eval.json",
    params:
        settings=settings_json,
        prepared=prepared_folder,
        out=method_folder,
    threads: CONFIG["torch_threads"]
    resources:
        **job_resources("register"),
    log:
        f"{RESULTS}/logs/{{dataset}}/{{method}}/register.log",
    shell:
        "regbench register --prepared {params.prepared} --out {params.out} --settings {params.settings:q} > {log} 2>&1"


rule aggregate:
    """One leaderboard per dataset: mean, std and median of every metric over the same test pairs."""
    input:
        expand(f"{RESULTS}/{{{{dataset}}}}/{{method}}/pairs.csv", method=METHODS),
    output:
        board=f"{RESULTS}/{{dataset}}/leaderboard.csv",
        stats=f"{RESULTS}/{{dataset}}/stats.csv",
        provenance=f"{RESULTS}/{{dataset}}/leaderboard.json",
    params:
        results=lambda wildcards, output: os.path.dirname(os.path.dirname(output.board)),
        methods=",".join(METHODS),
    resources:
        **job_resources("aggregate"),
    log:
        f"{RESULTS}/logs/{{dataset}}/aggregate.log",
    shell:
        "regbench aggregate --results {params.results} --dataset {wildcards.dataset} --methods {params.methods}"
        " > {log} 2>&1"
