# Classical baselines. `syn` and `affine` are ordinary methods (trainable = False: rule register runs them,
# no training). This file adds what learned methods need from them: SyN displacements between training
# subjects, to supervise methods that declare `needs_supervision = True` (BIRNet). The rule runs only when
# such a method is in the config: rule train asks for its output through `syn_supervision` (common.smk).
#
# Include after data.smk (it uses rules.prepare) and before train.smk.


rule syn_supervision:
    """SyN displacements for a fixed, seeded list of ordered training pairs (regbench/training/supervision.py)."""
    input:
        info=rules.prepare.output.info,
        arrays=rules.prepare.output.arrays,
    output:
        index=f"{RESULTS}/{{dataset}}/syn_supervision/index.csv",
        summary=f"{RESULTS}/{{dataset}}/syn_supervision/supervision.json",
    params:
        settings=supervision_settings,
        pairs=supervision_pair_count,
        prepared=prepared_folder,
        out=method_folder,
    threads: CONFIG["torch_threads"]
    priority: 2   # before the trainings: the supervised methods' trainings wait for it
    resources:
        **job_resources("syn_supervision"),
    log:
        f"{RESULTS}/logs/{{dataset}}/syn_supervision.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/syn_supervision.tsv",
    shell:
        "python -m regbench.training.supervision --prepared {params.prepared} --out {params.out}"
        " --settings {params.settings:q} --pairs {params.pairs} --workers {threads} > {log} 2>&1"
