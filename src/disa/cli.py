"""The ``disa`` command: verbs only. Each pipeline verb loads the config and calls ``disa.stages.<verb>.run``.

    disa demo [--quick]                       the exact testbed, every method, one table
    disa sample   -c CONFIG [--set k=v ...]   Stage 1: proposal samples, rewards, re-scoring (resumable shards)
    disa label    -c CONFIG                   Stage 1: log Z labels and diagnostics per prompt
    disa fit-z    -c CONFIG                   Stage 2: the frozen log Z regressor
    disa train    -c CONFIG                   Stage 3: RL with the chosen objective
    disa eval     -c CONFIG [--checkpoint P]  Mean@k, pass@k, distinct correct answers
    disa run      -c CONFIG                   all of the above in order
    disa study NAME [--quick] [-c CONFIG]     a paper study on the testbed, or with -c on the pipeline: table + plots
    disa report RUN_DIR                       one self-contained HTML page for a run, study or demo folder
    disa config  [-c CONFIG]                  every config field as a commented YAML config, and every objective
    disa --version
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
COMMON_EPILOG = ("Every input is checked before any model loads (prompt rows, prompt lengths, model folders and "
                 "tokenizers, output_dir); problems are listed together and the exit code is 2. --debug shows "
                 "tracebacks. `disa config` prints every field as a commented YAML config.")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, help="pipeline YAML config")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable; the value is YAML), e.g. --set train.objective=grpo",
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _threads_arg(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'auto', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from disa import __version__

    parser = argparse.ArgumentParser(prog="disa", description="Distribution-matching RL with an offline, frozen log Z (DISA).")
    parser.add_argument("--version", action="version", version=f"disa {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)

    demo = sub.add_parser("demo", help="run DISA and every baseline on the exact testbed and print one table",
                          description="Run DISA and every baseline on the exact Countdown testbed (builds and caches "
                          "the tiny testbed models on first use) and print one table.",
                          epilog="Reads: the testbed cache (--cache-dir, else $DISA_CACHE_DIR or ~/.cache/disa). "
                                 "Writes: OUT/results.json, results.md, plots/*.png (an interrupted run resumes).")
    demo.add_argument("--quick", action="store_true", help="smaller budget (68 s from an empty cache on a shared 2-core machine, load 8; see the README)")
    demo.add_argument("--seeds", type=int, default=1, help="number of seeds (mean and spread are reported)")
    demo.add_argument("--out", default="runs/demo", help="output folder: results.json, results.md, plots/")
    demo.add_argument("--methods", default=None, help="comma-separated subset (default: all): disa, flowrl, flowrl_no_logz, "
                      "grpo, gspo, aspo, sft; ablations disa_labels, disa_exact (log Z from the Stage 1 labels / the "
                      "exact value); transform study disa_affine, disa_group")
    demo.add_argument("--cache-dir", default=None, help="where the testbed models are cached")
    demo.add_argument("--build-threads", type=_threads_arg, default=None, metavar="N|auto",
                      help="torch threads for building the testbed (default 1, whatever the load, as docs/results.md "
                           "was built; auto: every free core, a faster build on an idle machine). Results depend "
                           "on it, so another count builds another testbed, cached apart")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                      help="change one budget field of disa.demo.DemoSettings (repeatable), e.g. --set num_steps=300 "
                           "--set updates_per_batch=2 --set rollout_weight=clipped_is")
    demo.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    from disa.artifacts import STAGE_IO, run_io

    for verb, help_text in VERBS.items():
        io = STAGE_IO[verb] if verb in STAGE_IO else run_io()  # what each verb reads and writes, declared once
        reads, writes = io.reads_text(), io.writes_text()
        p = sub.add_parser(verb, help=help_text, description=f"{help_text}. Reads: {reads}. Writes: {writes}.",
                           epilog=COMMON_EPILOG)
        _add_config_args(p)
        if verb == "eval":
            p.add_argument("--checkpoint", default=None, help="policy folder (default: the last training checkpoint)")
    study = sub.add_parser("study", help="run one of the paper's studies on the exact testbed, or with -c on the "
                           "pipeline's stages (disa.studies)")
    study.add_argument("name", help="n_budget, beta_sweep, proposal, sft_vs_disa or regimes")
    study.add_argument("--quick", action="store_true", help="the small testbed")
    study.add_argument("--out", default=None, help="output folder (default: runs/study-NAME)")
    study.add_argument("--cache-dir", default=None, help="where the testbed models are cached")
    study.add_argument("--build-threads", type=_threads_arg, default=None, metavar="N|auto",
                       help="torch threads for building the testbed, as in disa demo (default 1, the documented build)")
    study.add_argument("--seeds", type=int, default=1, help="seeds of the studies that train (mean ± std); "
                       "n_budget trains nothing")
    _add_config_args(study, required=False)  # -c CONFIG: sub-runs of the pipeline's stages instead of the testbed
    report = sub.add_parser("report", help="one self-contained HTML page for a run or study folder (disa.report)")
    report.add_argument("run_dir", help="a run directory (output_dir) or a study/demo output folder")
    report.add_argument("--out", default=None, help="HTML file (default: RUN_DIR/report.html)")
    cfg = sub.add_parser("config", help="print every config field as a commented YAML config, grouped by section",
                         description="Print every config field with its default and help as a commented YAML "
                         "config grouped by section (save it as a starting config), then every registered objective "
                         "with its hyperparameters. With -c, that config is checked first and the objectives of "
                         "the plugins it names are listed too.")
    _add_config_args(cfg, required=False)
    return parser


def quiet_library_bars() -> None:
    """Without a terminal (a log, CI, a pipe), transformers' per-load and per-save bars print two raw lines for
    every model it reads or writes, which buries the stages' own output; ours stay (tqdm drops them itself)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    verb = "disa"
    try:  # Ctrl-C from the first instant (library imports take seconds) ends with one line, never a traceback
        args = build_parser().parse_args(argv)
        verb = args.verb
        quiet_library_bars()
        return _run(args)
    except KeyboardInterrupt:
        print(f"disa {verb}: interrupted (a re-run resumes)" if verb != "disa" else "disa: interrupted",
              file=sys.stderr)
        return 130


def _run(args) -> int:
    try:
        return _dispatch(args)
    except Exception as e:  # one line for the user; the traceback only with --debug
        if getattr(args, "debug", False):
            raise
        from disa.config import ConfigError

        if isinstance(e, ConfigError):  # an input: a setting, a prompt file, an artefact (exit 2)
            print(f"disa {args.verb}: {e}", file=sys.stderr)
            return 2
        print(f"disa {args.verb}: error: {type(e).__name__}: {e} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.verb == "demo":
        from disa.demo import FULL_SETTINGS, QUICK_SETTINGS, run_demo, settings_with

        methods = args.methods.split(",") if args.methods else None
        try:
            settings = settings_with(QUICK_SETTINGS if args.quick else FULL_SETTINGS, args.overrides)
        except ValueError as e:
            print(f"disa demo: {e}", file=sys.stderr)
            return 2
        run_demo(out_dir=args.out, quick=args.quick, seeds=args.seeds, methods=methods, cache_dir=args.cache_dir,
                 settings=settings, build_threads=args.build_threads)
        return 0
    if args.verb in ("study", "report"):
        from disa.report import cli_study_or_report

        return cli_study_or_report(args)

    from disa.config import load_config
    from disa.config_help import starting_yaml

    cfg = load_config(args.config, args.overrides)  # loads the config's plugins too
    if args.verb == "config":
        print(starting_yaml(), end="")
        return 0
    from disa import stages
    from disa.stages.validate import check_inputs

    if args.verb == "run":  # every stage's problems at once, before any model loads (each verb checks its own)
        check_inputs(cfg, "run")
        stages.run_all(cfg)
    elif args.verb == "eval":
        stages.verb_function("eval")(cfg, checkpoint=args.checkpoint)
    else:
        stages.verb_function(args.verb)(cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
