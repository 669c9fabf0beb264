rule register:
    """Register every test pair with one run of a method and score it (one row a pair, one row a pair x label)."""
    wildcard_constraints:
        dataset=OWN_PAIRS_ONLY,   # a dataset evaluated elsewhere too registers in register_<dataset> (below)
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
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/{{method}}/seed{{seed}}/register.tsv",
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
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/aggregate.tsv",
    shell:
        "regbench aggregate --results {params.results} --dataset {wildcards.dataset} --methods {params.methods}"
        " --seeds {params.seeds:q} --bootstrap {params.bootstrap:q} > {log} 2>&1"


# A dataset whose runs also register other datasets' test pairs (config evaluate_on) has a register rule of its own:
# one job a run registers its test pairs, then each target's, into results/<dataset>/<method>/seed<k>/on_<target>/,
# the model loaded once (a job a target cost a Python start-up, and elastix ITK's, for a few seconds of work). On a
# target the images are resampled onto the grid the network was trained on and the displacement is scored on the
# target's grid; a method that does not train registers the target directly with this dataset's recipe.
for _dataset, _targets in TARGETS.items():
    if not _targets:
        continue

    rule:
        name:
            f"register_{_dataset}"
        wildcard_constraints:
            dataset=re.escape(_dataset),
        input:
            info=rules.prepare.output.info,
            arrays=rules.prepare.output.arrays,
            targets=[f"{DATA}/{t}/prepared/{name}" for t in _targets for name in ("dataset.json", "arrays/index.csv")],
            model=trained_model,
        output:
            pairs=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/pairs.csv",
            labels=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/labels.csv",
            summary=f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/eval.json",
            **{f"{kind}_on_{t}": f"{RESULTS}/{{dataset}}/{{method}}/seed{{seed}}/on_{t}/{kind}.{ext}"
               for t in _targets for kind, ext in (("pairs", "csv"), ("labels", "csv"), ("eval", "json"))},
        params:
            settings=settings_json,
            prepared=prepared_folder,
            out=method_folder,
            run=trained_run,
            on=lambda wildcards, output, targets=tuple(_targets): targets_json(wildcards, output, targets),
        threads: CONFIG["torch_threads"]
        priority: register_priority
        resources:
            **job_resources("register"),
        log:
            f"{RESULTS}/logs/{{dataset}}/{{method}}/seed{{seed}}/register.log",
        benchmark:
            f"{RESULTS}/benchmarks/{{dataset}}/{{method}}/seed{{seed}}/register.tsv",
        shell:
            "regbench register --prepared {params.prepared} --out {params.out} --run {params.run}"
            " --settings {params.settings:q} --on {params.on:q} > {log} 2>&1"


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
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/aggregate_on_{{target}}.tsv",
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
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/generalization.tsv",
    shell:
        "regbench generalization --results {params.results} --dataset {wildcards.dataset} --targets {params.targets}"
        " --data {params.data} --bootstrap {params.bootstrap:q} > {log} 2>&1"
