"""The ``disa`` command: verbs only. Each verb reads the pipeline config and calls one stage function.

    disa demo [--quick]                      the exact testbed, every method, one table
    disa sample   -c CONFIG [--set k=v ...]  Stage 1: proposal samples, rewards, re-scoring (resumable shards)
    disa label    -c CONFIG                  Stage 1: log Z labels and diagnostics per prompt
    disa fit-z    -c CONFIG                  Stage 2: the frozen log Z regressor
    disa train    -c CONFIG                  Stage 3: RL with the chosen objective
    disa eval     -c CONFIG [--checkpoint P] Mean@k, pass@k, distinct correct answers
    disa run CONFIG                          all of the above in order
    disa config                              print the config schema with defaults and help
"""

from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="pipeline YAML config")
    else:
        p.add_argument("-c", "--config", required=True, help="pipeline YAML config")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable), e.g. --set train.objective=grpo",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disa", description="Distribution-matching RL with an offline, frozen log Z (DISA).")
    sub = parser.add_subparsers(dest="verb", required=True)

    demo = sub.add_parser("demo", help="run DISA and every baseline on the exact testbed and print one table")
    demo.add_argument("--quick", action="store_true", help="smaller budget (under 3 minutes on 2 CPU cores)")
    demo.add_argument("--seeds", type=int, default=1, help="number of seeds (mean and spread are reported)")
    demo.add_argument("--out", default="runs/demo", help="output folder: results.json, results.md, plots/")
    demo.add_argument("--methods", default=None, help="comma-separated subset (default: all): disa, flowrl, flowrl_no_logz, "
                      "grpo, gspo, aspo, sft; ablations disa_labels, disa_exact (log Z from the Stage 1 labels / the "
                      "exact value); transform study disa_affine, disa_group")
    demo.add_argument("--cache-dir", default=None, help="where the testbed models are cached")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="change one budget field of disa.demo.DemoSettings (repeatable), e.g. --set num_steps=300 "
                           "--set updates_per_batch=2 --set rollout_weight=clipped_is")

    for verb, help_text in [
        ("sample", "Stage 1: draw N proposal samples per prompt, verify, re-score under pi_ref and q"),
        ("label", "Stage 1: per-prompt log Z labels (eq. 8) and diagnostics"),
        ("fit-z", "Stage 2: fit and freeze the log Z regressor"),
        ("train", "Stage 3: RL with the configured objective"),
    ]:
        _add_config_args(sub.add_parser(verb, help=help_text))
    ev = sub.add_parser("eval", help="evaluate a policy: Mean@k, pass@k, distinct correct answers")
    _add_config_args(ev)
    ev.add_argument("--checkpoint", default=None, help="policy folder (default: the last training checkpoint)")
    _add_config_args(sub.add_parser("run", help="the whole pipeline: sample, label, fit-z, train, eval"), positional=True)
    sub.add_parser("config", help="print every config field with its default and help text")
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
        if args.verb == "config":
            from disa.config import describe

            for path, default, help_text in describe():
                print(f"{path:34s} {default:18s} {help_text}")
            return 0

        from disa import pipeline
        from disa.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.verb == "run":
            pipeline.run_all(cfg)
        elif args.verb == "eval":
            pipeline.stage_eval(cfg, checkpoint=args.checkpoint)
        else:
            getattr(pipeline, "stage_" + args.verb.replace("-", "_"))(cfg)
        return 0
    except ConfigError as e:
        print(f"disa: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
