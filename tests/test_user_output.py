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
