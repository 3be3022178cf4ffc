"""What a user reads: help texts that match the defaults, the docs' objectives table, the judge's settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from disa import cli
from disa.config import ConfigError, EvalConfig, LabelConfig

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_label_help_names_the_default_estimator(capsys):
    text = _help(capsys, "label")
    assert f"default {LabelConfig().estimator}" in text
    assert "eq. 8" not in text


def test_quick_help_says_it_is_a_smoke_run_and_quotes_no_timing(capsys):
    text = _help(capsys, "demo")
    quick = text[text.index("--quick a smoke"):text.index("--seeds SEEDS number")]
    assert "smoke run" in quick and "not representative" in quick
    assert not re.search(r"\d+ s\b", quick)


def test_the_objectives_table_lists_every_registered_objective():
    from disa.objectives import objective_names

    page = (ROOT / "docs" / "tutorials" / "baselines.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", page, flags=re.MULTILINE))
    assert set(objective_names()) <= listed, sorted(set(objective_names()) - listed)


def test_judge_settings_are_checked_against_the_client_fields():
    with pytest.raises(ConfigError, match=r"judge: unknown key\(s\) \['concurency'\]"):
        EvalConfig(judge={"base_url": "http://127.0.0.1:1/v1", "model": "m", "concurency": 4}).check()
    EvalConfig(judge={"base_url": "http://127.0.0.1:1/v1", "model": "m", "concurrency": 4, "http_retries": 1,
                      "api_key_env": "JUDGE_KEY"}).check()
    help_text = EvalConfig.__dataclass_fields__["judge"].metadata["help"]
    for key in ("concurrency", "http_retries", "backoff_s", "max_backoff_s", "api_key_env"):
        assert key in help_text


# ------------------------------------------------------------------------------------------------ logging
def _emit(verbose: int, quiet: int):
    import io
    import logging
    import warnings

    from disa.log import cli_logging, get_logger, stage_logger

    stream = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # everything reaches the user but what the command filters
        with cli_logging("run", verbose, quiet, stream=stream):
            _say_all(stage_logger, get_logger)
    assert all(getattr(h, "stream", None) is not stream for h in logging.getLogger("disa").handlers)  # removed
    return stream.getvalue().splitlines(), sorted(str(w.message) for w in caught)


def _say_all(stage_logger, get_logger):
    import warnings

    stage_logger("fit-z").info("fitted", extra={"verb": "fit-z"})
    get_logger("disa.demo").debug("a debug line")
    stage_logger("train").warning("no rewarded rollout", extra={"verb": "train"})
    get_logger("report").info("no verb of its own")
    # a library's deprecation, as transformers raises it (attributed to its module), and one of ours
    warnings.warn_explicit("old name", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
    warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="disa.something")


def test_the_command_logs_to_its_stream_with_the_verb_prefix_and_levels():
    lines, warned = _emit(0, 0)
    assert lines == ["disa fit-z: fitted", "disa train: WARNING: no rewarded rollout", "disa run: no verb of its own"]
    assert warned == ["ours"]  # the library's deprecation is hidden, ours is not
    lines, warned = _emit(1, 0)
    assert "disa run: a debug line" in lines and warned == ["old name", "ours"]
    lines, _ = _emit(0, 1)
    assert lines == ["disa train: WARNING: no rewarded rollout"]


def test_verbosity_flags_are_accepted_by_every_verb(capsys):
    parser = cli.build_parser()
    for verb in ("demo", "sample", "label", "fit-z", "train", "eval", "run", "report", "config", "study"):
        extra = {"report": ["d"], "study": ["n_budget"], "demo": [], "config": []}.get(verb, ["-c", "x.yaml"])
        args = parser.parse_args([verb, *extra, "-q"])
        assert (args.verbose, args.quiet) == (0, 1)
        args = parser.parse_args([verb, *extra, "-vv"])
        assert args.verbose == 2
