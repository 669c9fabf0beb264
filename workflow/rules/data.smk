rule prepare:
    """Download (when the dataset has something to download) and prepare one dataset."""
    output:
        subjects=f"{DATA}/{{dataset}}/prepared/subjects.csv",
        labels=f"{DATA}/{{dataset}}/prepared/labels.csv",
        pairs=f"{DATA}/{{dataset}}/prepared/pairs.csv",
        info=f"{DATA}/{{dataset}}/prepared/dataset.json",
        # the memory-mapped volumes (layout 2): a folder prepared before them lacks this file and is rebuilt
        arrays=f"{DATA}/{{dataset}}/prepared/arrays/index.csv",
    params:
        settings=settings_json,
        raw=f"{DATA}/{{dataset}}/raw",
        prepared=lambda wildcards, output: os.path.dirname(output.info),
    threads: CONFIG["torch_threads"]
    resources:
        **job_resources("prepare"),
    log:
        f"{RESULTS}/logs/{{dataset}}/prepare.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/prepare.tsv",
    shell:
        "regbench prepare --raw {params.raw} --prepared {params.prepared} --settings {params.settings:q} > {log} 2>&1"
