"""The ``disa`` command: verbs only. Each pipeline verb loads the config and calls ``disa.stages.<verb>.run``.

    disa demo [--quick]                       the exact testbed, every method, one table
    disa sample   -c CONFIG [--set k=v ...]   Stage 1: proposal samples, rewards, re-scoring (resumable shards)
    disa label    -c CONFIG                   Stage 1: log Z labels and diagnostics per prompt
    disa fit-z    -c CONFIG                   Stage 2: the frozen log Z regressor
    disa train    -c CONFIG                   Stage 3: RL with the chosen objective
    disa eval     -c CONFIG [--checkpoint P]  Mean@k, pass@k, distinct correct answers
    disa run      -c CONFIG                   all of the above in order
    disa study NAME [--quick] [-c CONFIG]     a paper study on the testbed (n_budget also on a run): table + plots
    disa report RUN_DIR                       one self-contained HTML page for a run, study or demo folder
    disa config  [-c CONFIG]                  every config field with its default and help, and every objective
"""

from __future__ import annotations

import argparse
import sys

VERBS = {
    "sample": "Stage 1: draw N proposal samples per prompt, verify, re-score under pi_ref and q",
    "label": "Stage 1: per-prompt log Z labels (eq. 8) and diagnostics",
    "fit-z": "Stage 2: fit and freeze the log Z regressor",
    "train": "Stage 3: RL with the configured objective",
    "eval": "evaluate a policy: Mean@k, pass@k, distinct correct answers",
    "run": "the whole pipeline: sample, label, fit-z, train, eval",
}


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, help="pipeline YAML config")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable; the value is YAML), e.g. --set train.objective=grpo",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disa", description="Distribution-matching RL with an offline, frozen log Z (DISA).")
    sub = parser.add_subparsers(dest="verb", required=True)

    demo = sub.add_parser("demo", help="run DISA and every baseline on the exact testbed and print one table")
    demo.add_argument("--quick", action="store_true", help="smaller budget")
    demo.add_argument("--seeds", type=int, default=1, help="number of seeds (mean and spread are reported)")
    demo.add_argument("--out", default="runs/demo", help="output folder: results.json, results.md, plots/")
    demo.add_argument("--methods", default=None, help="comma-separated subset (default: all): disa, flowrl, flowrl_no_logz, "
                      "grpo, gspo, aspo, sft; ablations disa_labels, disa_exact (log Z from the Stage 1 labels / the "
                      "exact value); transform study disa_affine, disa_group")
    demo.add_argument("--cache-dir", default=None, help="where the testbed models are cached")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="change one budget field of disa.demo.DemoSettings (repeatable), e.g. --set num_steps=300 "
                           "--set updates_per_batch=2 --set rollout_weight=clipped_is")

    for verb, help_text in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        _add_config_args(p)
        if verb == "eval":
            p.add_argument("--checkpoint", default=None, help="policy folder (default: the last training checkpoint)")
    study = sub.add_parser("study", help="run one of the paper's studies on the exact testbed (disa.studies)")
    study.add_argument("name", help="n_budget, beta_sweep, proposal or sft_vs_disa")
    study.add_argument("--quick", action="store_true", help="the small testbed")
    study.add_argument("--out", default=None, help="output folder (default: runs/study-NAME)")
    study.add_argument("--cache-dir", default=None, help="where the testbed models are cached")
    _add_config_args(study, required=False)  # n_budget -c CONFIG: on a pipeline run's samples instead
    report = sub.add_parser("report", help="one self-contained HTML page for a run or study folder (disa.report)")
    report.add_argument("run_dir", help="a run directory (output_dir) or a study/demo output folder")
    report.add_argument("--out", default=None, help="HTML file (default: RUN_DIR/report.html)")
    cfg = sub.add_parser("config", help="print every config field with its default and help text, then every "
                         "registered objective with its hyperparameters")
    _add_config_args(cfg, required=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from disa.config import ConfigError

    try:
        if args.verb == "demo":
            from disa.demo import FULL_SETTINGS, QUICK_SETTINGS, run_demo, settings_with

            methods = args.methods.split(",") if args.methods else None
            try:
                settings = settings_with(QUICK_SETTINGS if args.quick else FULL_SETTINGS, args.overrides)
            except ValueError as e:
                print(f"disa demo: {e}", file=sys.stderr)
                return 2
            run_demo(out_dir=args.out, quick=args.quick, seeds=args.seeds, methods=methods, cache_dir=args.cache_dir,
                     settings=settings)
            return 0

        if args.verb in ("study", "report"):
            from disa.report import cli_study_or_report

            return cli_study_or_report(args)
        from disa.config import describe, load_config

        cfg = load_config(args.config, args.overrides)  # loads the config's plugins too
        if args.verb == "config":
            for path, default, help_text in describe():
                print(f"{path:40s} {default:20s} {help_text}")
            return 0
        from disa import stages

        if args.verb == "run":
            stages.run_all(cfg)
        elif args.verb == "eval":
            stages.verb_function("eval")(cfg, checkpoint=args.checkpoint)
        else:
            stages.verb_function(args.verb)(cfg)
        return 0
    except ConfigError as e:
        print(f"disa: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
