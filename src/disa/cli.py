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

Results go to stdout; messages to stderr as ``disa <verb>: ...`` through one logging handler (:mod:`disa.log`),
``-v`` / ``-q`` on every verb for more or fewer. The module imports neither torch nor transformers: ``--help``
and an input error answer at once, a verb that needs a model imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

VERBS = {
    "sample": "Stage 1: draw N proposal samples per prompt, verify, re-score under pi_ref and q",
    "label": "Stage 1: per-prompt log Z labels and diagnostics (estimator: label.estimator, default {estimator})",
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


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more messages on stderr (debug lines, and the libraries' own warnings)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="only warnings and errors on stderr")


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
    demo.add_argument("--quick", action="store_true", help="a smoke run (the small testbed, a short budget): checks "
                      "that every method runs end to end; its numbers are not representative (the full demo's are "
                      "in docs/results/demo.md)")
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
    from disa.config import LabelConfig

    for verb, help_text in VERBS.items():
        help_text = help_text.format(estimator=LabelConfig().estimator)
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
    study.add_argument("--quick", action="store_true", help="a smoke run on the small testbed (numbers not "
                       "representative)")
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
    for p in sub.choices.values():  # results go to stdout, messages to stderr: -v / -q choose how many
        _add_verbosity(p)
    return parser


def quiet_library_bars() -> None:
    """Without a terminal (a log, CI, a pipe), transformers' per-load and per-save bars print two raw lines for
    every model it reads or writes, which buries the stages' own output; ours stay (tqdm drops them itself)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


_INTERRUPTED = {"by_user": False, "again": False}


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C: a KeyboardInterrupt, remembered: an import it lands in may swallow it and fail later (an ImportError of
    a partially initialised module), and that failure is still the user's Ctrl-C. A second Ctrl-C exits at once."""
    if _INTERRUPTED["by_user"] and not _INTERRUPTED["again"]:
        _interrupted_again(signum, frame)
    _INTERRUPTED.update(by_user=True, again=False)
    raise KeyboardInterrupt


def _unraisable(hook_args) -> None:
    """A KeyboardInterrupt raised where Python can only ignore it (a weakref or GC callback, e.g. importlib's module
    locks) would be printed as 'Exception ignored ... Traceback' and the run would go on: deliver it again instead."""
    if _INTERRUPTED["by_user"] and issubclass(hook_args.exc_type, KeyboardInterrupt):
        import _thread

        _INTERRUPTED["again"] = True
        _thread.interrupt_main(signal.SIGINT)
        return
    sys.__unraisablehook__(hook_args)


def _interrupted_again(signum, frame) -> None:  # a second Ctrl-C while the first unwinds: out now, one line
    os.write(2, b"disa: interrupted\n")
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    first = (sys.argv[1:] if argv is None else list(argv))[:1]
    verb = first[0] if first and first[0] in (*VERBS, "demo", "study", "report", "config") else "disa"  # for Ctrl-C
    _INTERRUPTED.update(by_user=False, again=False)
    hooked = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if hooked:  # first, before any heavy import
        try:
            signal.signal(signal.SIGINT, _on_interrupt)
            sys.unraisablehook = _unraisable
        except ValueError:  # not the main thread: Python's own handler stays
            hooked = False
    try:  # Ctrl-C from the first instant (library imports take seconds) ends with one line, never a traceback
        args = build_parser().parse_args(argv)
        verb = args.verb
        from disa.log import cli_logging

        with cli_logging(verb, args.verbose, args.quiet):
            return _run(args)
    except KeyboardInterrupt:
        if hooked:
            signal.signal(signal.SIGINT, _interrupted_again)
        print(f"disa {verb}: interrupted (a re-run resumes)" if verb != "disa" else "disa: interrupted",
              file=sys.stderr)
        return 130
    finally:
        if hooked and not _INTERRUPTED["by_user"]:  # an in-process caller gets Python's handlers back
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.unraisablehook = sys.__unraisablehook__


def _run(args) -> int:
    try:
        return _dispatch(args)
    except Exception as e:  # one line for the user; the traceback only with --debug
        if _INTERRUPTED["by_user"]:
            raise KeyboardInterrupt from None
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
    if args.verb in ("demo", "study"):
        quiet_library_bars()  # here, not before: importing transformers takes a second that --help need not wait
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
    quiet_library_bars()
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
