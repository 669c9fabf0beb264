"""``regbench`` command line: the workflow's steps (each rule is one call) and small utilities.

The workflow passes each job its settings as JSON (:func:`regbench.config.job_settings`), so a job
can be rerun by hand with the exact command from its log.
"""
from __future__ import annotations

import argparse
import json
import logging
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


def cmd_train(args) -> None:
    from regbench import plugins
    from regbench.data import PreparedDataset
    from regbench.runtime import provenance
    from regbench.training import train

    settings = _settings(args.settings)
    device = _prepare_runtime(settings)
    method = plugins.load_method(settings["method"])
    dataset = PreparedDataset(args.prepared)
    summary = train(method, settings["recipe"], dataset, args.out, seed=settings["seed"], device=device,
                    provenance=provenance(settings, device), progress=True)
    log.info("trained %s in %.1f s (%d iterations, final loss %.4f)", method.name, summary["train_time_s"],
             summary["iterations"], summary["final_loss"])


def cmd_register(args) -> None:
    from regbench import plugins
    from regbench.data import PreparedDataset
    from regbench.evaluation import evaluate_method
    from regbench.runtime import provenance
    from regbench.training import load_trained

    settings = _settings(args.settings)
    device = _prepare_runtime(settings)
    method = plugins.load_method(settings["method"])
    dataset = PreparedDataset(args.prepared)
    recipe = settings["recipe"]
    net = None
    if method.trainable:
        net, recipe = load_trained(method, Path(args.out) / "model.pt", device)
    table = evaluate_method(method, recipe, dataset, args.out, net=net, device=device,
                            runtime_repeats=settings["evaluation"]["runtime_repeats"],
                            label_warp=settings["evaluation"]["label_warp"],
                            provenance=provenance(settings, device), progress=True)
    log.info("%s: mean Dice %.4f over %d pairs", method.name, table["dice"].mean(), len(table))


def cmd_aggregate(args) -> None:
    from regbench.aggregate import write_leaderboard
    from regbench.io import write_json
    from regbench.runtime import provenance

    board = write_leaderboard(args.results, args.dataset, args.methods.split(","))
    write_json(Path(args.results) / args.dataset / "leaderboard.json",
               {"methods": args.methods.split(","), "provenance": provenance({"dataset": args.dataset})})
    print(board.to_string(index=False, max_cols=12))


def cmd_report(args) -> None:
    from regbench.report import write_report

    methods = json.loads(args.methods)
    write_report(args.results, list(methods), methods)


def cmd_list(args) -> None:
    from regbench import plugins

    if args.what == "methods":
        for method_id in plugins.method_ids():
            method = plugins.load_method(method_id)
            print(f"{method_id:20s} {'trained' if method.trainable else 'no training':12s} {method.citation.splitlines()[0] if method.citation else ''}")
    else:
        for dataset_id in plugins.dataset_ids():
            print(f"{dataset_id:20s} {plugins.load_dataset(dataset_id).description}")


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
    p.add_argument("--out", required=True, help="results/<dataset>/<method>")
    p.add_argument("--settings", required=True)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("register", help="register and score every test pair with one method")
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True, help="results/<dataset>/<method>")
    p.add_argument("--settings", required=True)
    p.set_defaults(func=cmd_register)

    p = commands.add_parser("aggregate", help="write results/<dataset>/leaderboard.csv")
    p.add_argument("--results", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--methods", required=True, help="comma-separated method ids")
    p.set_defaults(func=cmd_aggregate)

    p = commands.add_parser("report", help="write results/leaderboard.md, the figures and the HTML report")
    p.add_argument("--results", required=True)
    p.add_argument("--methods", required=True, help='JSON: {"dataset": ["method", ...]}')
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("list", help="list the method or dataset plugins")
    p.add_argument("what", choices=["methods", "datasets"])
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as err:
        print(f"regbench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
