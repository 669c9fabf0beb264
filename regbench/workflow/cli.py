"""``regbench`` command line: the workflow's steps (each rule is one call) and small utilities.

The workflow passes each job its settings as JSON (:func:`regbench.workflow.config.job_settings`), so a job
can be rerun by hand with the exact command from its log.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from regbench.io import InputError

log = logging.getLogger("regbench")


def _settings(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"regbench: --settings is not valid JSON ({err})")


def _prepare_runtime(settings: dict):
    from regbench.runtime import configure_threads, select_device

    configure_threads(settings["torch_threads"])
    return select_device(settings["device"])


def cmd_prepare(args) -> None:
    from regbench import plugins
    from regbench.runtime import configure_threads, seed_everything

    settings = _settings(args.settings)
    configure_threads(settings["torch_threads"])
    seed_everything(settings["seed"])
    source = plugins.load_dataset(settings["dataset"])
    options = source.resolve_options(settings["dataset_options"])
    source.download(Path(args.raw), options)
    source.prepare(Path(args.raw), Path(args.prepared), options)
    from regbench.evaluation.information import record_dataset_mi

    record_dataset_mi(args.prepared)   # how hard the dataset is for intensity-driven registration, in dataset.json


def cmd_train(args) -> None:
    from regbench import plugins
    from regbench.data.prepared import PreparedDataset
    from regbench.evaluation.selection import val_scorer
    from regbench.runtime import provenance
    from regbench.training.loop import train

    settings = _settings(args.settings)
    device = _prepare_runtime(settings)
    method = plugins.load_method(settings["method"])
    dataset = PreparedDataset(args.prepared).without_test()  # no choice is made on the test split
    try:
        summary = train(method, settings["recipe"], dataset, args.out, seed=settings["seed"], device=device,
                        provenance=provenance(settings, device), progress=True,
                        mixed_precision=settings.get("mixed_precision", False), supervision_folder=args.supervision,
                        data_workers=settings.get("data_workers", "auto"),
                        checkpoint_score=val_scorer(method, dataset, settings["recipe"], device,
                                                    settings["evaluation"]["label_warp"]))
    except Exception as err:
        if settings.get("on_failure", "stop") != "skip":
            raise
        record_failure(Path(args.out), settings["method"], "train", err)
        return
    (Path(args.out) / "failure.json").unlink(missing_ok=True)  # a failure recorded by an earlier attempt
    log.info("trained %s in %.1f s (%d iterations, final loss %.4f)", method.name, summary["train_time_s"],
             summary["iterations"], summary["final_loss"])


def cmd_register(args) -> None:
    """Register and score one run's test pairs; with --on, also other datasets' (config evaluate_on), the model
    loaded once and each dataset scored into its own folder."""
    from regbench import plugins
    from regbench.data.prepared import PreparedDataset
    from regbench.io import read_json
    from regbench.training.loop import load_trained

    settings = _settings(args.settings)
    targets = _targets(args.on) if args.on else []
    device = _prepare_runtime(settings)
    method = plugins.load_method(settings["method"])
    run = Path(args.run or args.out)   # the training run whose model registers
    trained_on = None
    if args.trained_on:   # a run of another dataset registers this one's test pairs
        trained_on = _grid_of(read_json(Path(args.trained_on) / "dataset.json"))
    jobs = [(args.prepared, Path(args.out), settings, trained_on)]
    if targets:   # the same run on other datasets' test pairs, resampled onto the grid it was trained on
        own = _grid_of(read_json(Path(args.prepared) / "dataset.json"))
        jobs += [(target["prepared"], Path(target["out"]), target["settings"], own) for target in targets]
    failed = read_failure(run)
    net, trained_recipe = None, None
    for prepared, out, job_settings, grid in jobs:
        row = job_settings.get("row", job_settings["method"])
        if failed is not None and (run == out or failed["step"] == "train"):
            # training failed and on_failure is skip: the failure passes on to the leaderboard
            record_failure(out, row, failed["step"], failed["error"], evaluation=True)
            continue
        try:
            if method.trainable and net is None:
                net, trained_recipe = load_trained(method, run / "model.pt", device)
            recipe = trained_recipe if method.trainable else job_settings["recipe"]
            dataset = PreparedDataset(prepared)
            table = _register(out, job_settings, method, recipe, dataset, net, device, grid)
        except Exception as err:
            if job_settings.get("on_failure", "stop") != "skip":
                raise
            record_failure(out, row, "register", err, evaluation=True)
            continue
        log.info("%s on %s: mean Dice %.4f over %d pairs", method.name, dataset.name, table["dice"].mean(), len(table))


def _grid_of(info: dict) -> dict:
    return {"id": info["id"], "shape": info["shape"], "spacing": info["spacing"]}


def _targets(text: str) -> list[dict]:
    """--on: a JSON list of {prepared, out, settings}, one per other dataset."""
    try:
        targets = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"regbench register: --on is not valid JSON ({err})")
    if not isinstance(targets, list) or not all(isinstance(t, dict) and {"prepared", "out", "settings"} <= set(t)
                                                 for t in targets):
        raise SystemExit("regbench register: --on must be a JSON list of {prepared, out, settings} objects")
    return targets


def _register(out: Path, settings, method, recipe, dataset, net, device, trained_on=None):
    from regbench.evaluation.scoring import evaluate_method
    from regbench.runtime import provenance

    registration, record = None, None
    options = settings.get("instance_optimisation")
    if options:   # a +io row: the trained network fine-tuned on each pair first
        from regbench.training.instance import instance_optimised_registration

        def fine_tuned(method, net, fixed, moving, recipe, adapter):
            return instance_optimised_registration(method, net, fixed, moving, recipe, adapter, options["steps"],
                                                   options["lr"])

        registration, record = fine_tuned, {"instance_optimisation": {**options, "method": method.name}}
    return evaluate_method(method, recipe, dataset, out, net=net, device=device,
                            runtime_repeats=settings["evaluation"]["runtime_repeats"],
                            label_warp=settings["evaluation"]["label_warp"],
                            provenance=provenance(settings, device), progress=True,
                            export_dir=out / "displacements" if settings["evaluation"].get("export_displacements") else None,
                            mixed_precision=settings.get("mixed_precision", False),
                            recipe_name=settings.get("recipe_name"), trained_on=trained_on,
                            registration=registration, row_id=settings.get("row"), record=record)


def record_failure(out: Path, method_id: str, step: str, error, evaluation: bool = False) -> None:
    """With ``on_failure: skip``: write the step's outputs as a recorded failure, so the rest goes on.

    ``failure.json`` holds the step and the error; train.json / eval.json say ``failed``; the leaderboard
    lists the method as failed with that error. Delete the method's folder to try it again.
    """
    import pandas as pd
    import torch

    from regbench.io import atomic_path, write_csv, write_json

    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    log.error("%s failed in %s: %s (on_failure: skip, the benchmark goes on without it)", method_id, step, message)
    record = {"method": method_id, "failed": True, "step": step, "error": message}
    write_json(out / "failure.json", record)
    if evaluation:
        write_csv(out / "pairs.csv", pd.DataFrame(columns=["fixed", "moving"]))
        write_csv(out / "labels.csv", pd.DataFrame(columns=["fixed", "moving", "label", "name", "dice"]))
        write_json(out / "eval.json", record)
    else:
        write_csv(out / "train_log.csv", pd.DataFrame(columns=["iteration", "loss"]))
        write_json(out / "train.json", record)
        with atomic_path(out / "model.pt") as tmp:
            torch.save(record, tmp)


def read_failure(out: Path) -> dict | None:
    from regbench.io import read_json

    return read_json(out / "failure.json") if (out / "failure.json").exists() else None


def parse_labels(text: str) -> list[int]:
    """'1-35' or '2,4,10-12' -> label values (ranges inclusive)."""
    labels = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                low, high = part.split("-", 1) if not part.startswith("-") else (part, part)
                labels.extend(range(int(low), int(high) + 1))
            elif part:
                labels.append(int(part))
        except ValueError:
            raise SystemExit(f"regbench evaluate: --labels: cannot read {part!r} (use lists and ranges: 1-35,40)")
    if not labels or any(label <= 0 for label in labels):
        raise SystemExit("regbench evaluate: --labels must name labels > 0 (0 is background)")
    return sorted(set(labels))


def _json_ready(value):
    """NaN becomes null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def cmd_tune(args) -> None:
    from regbench import plugins
    from regbench.data.prepared import PreparedDataset
    from regbench.runtime import provenance
    from regbench.tuning.study import tune

    settings = _settings(args.settings)
    device = _prepare_runtime(settings)
    method = plugins.load_method(settings["method"])
    dataset = PreparedDataset(args.prepared).without_test()  # tuning chooses on val, never on test
    options = settings["tuning"]
    choice = tune(method, settings["recipe"], dataset, args.out, trials=int(options["trials"]),
                  fraction=float(options["fraction"]), max_fold_pct=float(options["max_fold_pct"]),
                  seed=int(options["seed"]), device=device, label_warp=settings["evaluation"]["label_warp"],
                  supervision_folder=args.supervision, provenance=provenance(settings, device))
    log.info("%s: chose %s (val Dice %.4f, %s) after %d trials", method.name, choice["chosen"], choice["val_dice"],
             choice["status"], len(choice["trials"]))


def cmd_lock(args) -> None:
    from datetime import datetime, timezone

    from regbench.io import read_json
    from regbench.runtime import git_commit
    from regbench.tuning.lock import choices_in_lock, read_lock, write_lock

    choices = [read_json(path) for path in args.choices]
    if args.update:  # the lock's other methods stay as they were tuned, each with the commit that tuned it
        retuned = {choice["method"] for choice in choices}
        choices = [c for c in choices_in_lock(read_lock(args.out, args.dataset)) if c["method"] not in retuned] + choices
    # the lock file's own change (snakemake removes it before the job rewrites it) does not make the code dirty
    made = {"commit": git_commit(ignoring=(args.out,)), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": os.environ.get("REGBENCH_COMMAND") or "snakemake --cores all tune"}
    write_lock(args.out, args.dataset, choices, made)


def cmd_evaluate(args) -> None:
    """Every per-pair metric for one displacement file, as JSON."""
    import numpy as np

    from regbench.evaluation import metrics
    from regbench.io import load_nifti, write_text
    from regbench.learn2reg import read_displacement

    fixed, fixed_spacing = load_nifti(args.fixed_seg, kind="labels")
    moving, _ = load_nifti(args.moving_seg, kind="labels")
    if moving.shape != fixed.shape:
        raise InputError(f"{args.moving_seg}: shape {moving.shape} differs from the fixed label map's {fixed.shape} ({args.fixed_seg})")
    u = read_displacement(args.disp, fixed.shape)
    labels = parse_labels(args.labels) if args.labels else sorted(int(v) for v in np.unique(fixed) if v != 0)
    if args.spacing:
        try:
            spacing = tuple(float(s) for s in args.spacing.split(","))
        except ValueError:
            raise SystemExit(f"regbench evaluate: --spacing: cannot read {args.spacing!r} (e.g. 1,1,1)")
        if len(spacing) != fixed.ndim:
            raise SystemExit(f"regbench evaluate: --spacing has {len(spacing)} values, the images have {fixed.ndim} axes")
    else:
        spacing = fixed_spacing
    scores, per_label = metrics.pair_metrics(fixed, moving, u, labels, spacing, label_warp=args.label_warp)
    result = {**scores, "spacing": list(spacing), "n_labels": len(labels),
              "labels": per_label.to_dict(orient="records")}
    text = json.dumps(_json_ready(result), indent=2, allow_nan=False)
    if args.json:
        write_text(args.json, text + "\n")
    else:
        print(text)


def cmd_aggregate(args) -> None:
    from regbench.evaluation.aggregate import scored_dir, write_leaderboard
    from regbench.io import write_json
    from regbench.layout import target_dir
    from regbench.runtime import provenance

    methods = args.methods.split(",")
    seeds = json.loads(args.seeds) if args.seeds else {m: [0] for m in methods}
    bootstrap = json.loads(args.bootstrap) if args.bootstrap else {"resamples": 1000, "seed": 0}
    failed = {}
    for method in methods:  # a method that failed in one run is not ranked: its runs would not be comparable
        for seed in seeds[method]:
            record = read_failure(scored_dir(args.results, args.dataset, method, seed, args.on))
            if record and method not in failed:
                failed[method] = f"seed {seed}, {record['step']}: {record['error']}"
    ranked = {m: seeds[m] for m in methods if m not in failed}
    board = write_leaderboard(args.results, args.dataset, ranked, resamples=int(bootstrap["resamples"]),
                              bootstrap_seed=int(bootstrap["seed"]), evaluated_on=args.on)
    folder = Path(args.results) / args.dataset if args.on is None else target_dir(args.results, args.dataset, args.on)
    write_json(folder / "leaderboard.json",
               {"methods": methods, "seeds": seeds, "failed": failed, "bootstrap": bootstrap,
                **({"evaluated_on": args.on} if args.on else {}),
                "provenance": provenance({"dataset": args.dataset, "evaluated_on": args.on})})
    print(board.to_string(index=False, max_cols=12))


def cmd_generalization(args) -> None:
    from regbench.evaluation.generalization import write_generalization

    bootstrap = json.loads(args.bootstrap) if args.bootstrap else {"resamples": 1000, "seed": 0}
    table = write_generalization(args.results, args.dataset, [t for t in args.targets.split(",") if t], args.data,
                                 resamples=int(bootstrap["resamples"]), bootstrap_seed=int(bootstrap["seed"]))
    print(table[["method", "evaluated_on", "dice_mean", "dice_drop", "rank"]].to_string(index=False))


def cmd_report(args) -> None:
    from regbench.report.page import write_report

    methods = json.loads(args.methods)
    write_report(args.results, list(methods), methods)


def cmd_list(args) -> None:
    from regbench import plugins

    if args.what == "methods":
        for method_id in plugins.method_ids():
            method = plugins.load_method(method_id)
            paper = sum(d.applies_to("paper") and d.changes_results for d in method.deviations)
            deviations = f"{len(method.deviations)} deviations ({paper} in the paper recipe)"
            citation = method.citation.splitlines()[0] if method.citation else ""
            print(f"{method_id:20s} {'trained' if method.trainable else 'no training':12s} {deviations:34s} {citation}")
    else:
        for dataset_id in plugins.dataset_ids():
            print(f"{dataset_id:20s} {plugins.load_dataset(dataset_id).description}")


def cmd_plan(args) -> None:
    import yaml

    from regbench import plugins
    from regbench.io import write_csv
    from regbench.runtime import configure_threads, select_device
    from regbench.workflow.config import check_config
    from regbench.workflow.plan import plan, summary

    root = plugins.project_root()
    configfile = Path(args.configfile or root / "config" / "config.yaml")
    try:
        raw = yaml.safe_load(configfile.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{configfile}: cannot read the config ({err})") from None
    config = check_config(raw, source=str(configfile), schema=root / "config" / "schema.yaml",
                          config_dir=configfile.resolve().parent)
    configure_threads(config["torch_threads"])
    table = plan(config, select_device(config["device"]), steps=args.steps)
    print(summary(table))
    if args.csv:
        write_csv(args.csv, table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regbench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="download (if needed) and prepare one dataset")
    p.add_argument("--raw", required=True, help="folder of the raw download")
    p.add_argument("--prepared", required=True, help="folder of the prepared layout")
    p.add_argument("--settings", required=True, help="job settings as JSON")
    p.set_defaults(func=cmd_prepare)

    p = commands.add_parser("train", help="train one method on one prepared dataset")
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True, help="results/<dataset>/<method>/seed<seed>")
    p.add_argument("--settings", required=True)
    p.add_argument("--supervision", help="the dataset's SyN supervision folder, for a method that learns from it "
                                         "(default: syn_supervision beside --out)")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("register", help="register and score every test pair with one method")
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True, help="results/<dataset>/<method>/seed<seed>, or its on_<target> folder")
    p.add_argument("--settings", required=True)
    p.add_argument("--run", help="the training run whose model registers (default: --out); with --trained-on, "
                                 "results/<trained on>/<method>/seed<seed>")
    p.add_argument("--trained-on", help="the prepared folder of the dataset the run was trained on, when --prepared is "
                                        "another one (cross-dataset evaluation: resampled onto the training grid)")
    p.add_argument("--on", help='JSON: [{"prepared": ..., "out": ..., "settings": {...}}], other datasets whose test '
                                "pairs the same run registers after --prepared's (config evaluate_on), each into its "
                                "own folder")
    p.set_defaults(func=cmd_register)

    p = commands.add_parser("tune", help="tune one method on one prepared dataset's val split (Optuna, resumable)")
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True, help="results/tuning/<dataset>/<method>")
    p.add_argument("--settings", required=True, help="job settings as JSON, with the config's tuning section")
    p.add_argument("--supervision", help="the dataset's SyN supervision folder, for a method that learns from it")
    p.set_defaults(func=cmd_tune)

    p = commands.add_parser("lock", help="write a tuning lock file from every method's choice.json")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True, help="the lock file (config/tuned/<dataset>.yaml)")
    p.add_argument("--update", action="store_true",
                   help="keep the existing lock's methods that no choice.json is given for (a method added to a "
                        "tuned config: tune it alone, then update the lock); the budgets must agree")
    p.add_argument("choices", nargs="*", help="results/tuning/<dataset>/<method>/choice.json, one a method")
    p.set_defaults(func=cmd_lock)

    p = commands.add_parser("evaluate", help="score one displacement file (Learn2Reg format) and print every metric as JSON")
    p.add_argument("--fixed-seg", required=True, help="fixed label map (NIfTI)")
    p.add_argument("--moving-seg", required=True, help="moving label map (NIfTI)")
    p.add_argument("--disp", required=True, help="displacement, X x Y x Z x 3 (2D: X x Y x 2), voxels, on the fixed grid (.nii.gz or .npz)")
    p.add_argument("--labels", help="labels to score, lists and ranges (1-35,40); default: every label of the fixed map but 0")
    p.add_argument("--spacing", help="voxel spacing in mm (1,1,1); default: the fixed label map's header")
    p.add_argument("--label-warp", choices=["nearest", "linear"], default="nearest")
    p.add_argument("--json", help="write the JSON here instead of printing it")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("aggregate", help="write results/<dataset>/leaderboard.csv")
    p.add_argument("--results", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--methods", required=True, help="comma-separated method ids")
    p.add_argument("--seeds", help='JSON: {"method": [seeds]}, the runs of each method (default: seed 0 each)')
    p.add_argument("--bootstrap", help='JSON: {"resamples": 1000, "seed": 0}')
    p.add_argument("--on", help="another dataset whose test pairs the runs registered (evaluate_on): write "
                                "results/<dataset>/on_<target>/leaderboard.csv from their on_<target> scores")
    p.set_defaults(func=cmd_aggregate)

    p = commands.add_parser("generalization", help="write results/<dataset>/generalization.csv: the runs trained on "
                                                   "a dataset, on it and on every evaluate_on target")
    p.add_argument("--results", required=True)
    p.add_argument("--dataset", required=True, help="the dataset the runs were trained on")
    p.add_argument("--targets", required=True, help="comma-separated ids of the other datasets they registered")
    p.add_argument("--data", default="data", help="the data folder (each dataset's prepared pairs.csv: MI per pair)")
    p.add_argument("--bootstrap", help='JSON: {"resamples": 1000, "seed": 0}')
    p.set_defaults(func=cmd_generalization)

    p = commands.add_parser("report", help="write results/leaderboard.md, the figures and the HTML report")
    p.add_argument("--results", required=True)
    p.add_argument("--methods", required=True, help='JSON: {"dataset": ["method", ...]}')
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("plan", help="estimate a config's hours of training, tuning and registration on this "
                                         "machine's device (a short calibration per method)")
    p.add_argument("--configfile", help="the config (default: config/config.yaml)")
    p.add_argument("--steps", type=int, default=3, help="calibration steps per method, after one warm-up")
    p.add_argument("--csv", help="also write the table here")
    p.set_defaults(func=cmd_plan)

    p = commands.add_parser("list", help="list the method or dataset plugins")
    p.add_argument("what", choices=["methods", "datasets"])
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (InputError, ValueError) as err:
        print(f"regbench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
