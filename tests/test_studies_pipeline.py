"""The studies on a pipeline config (``disa study NAME -c CONFIG``): the committed Countdown example's tiny models
on 6 of its prompts with a 2-step budget, so each study runs in seconds; and the helpers' pure parts by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from disa import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "countdown"


@pytest.fixture
def tiny_countdown(tmp_path):
    """A config on the example's ref/proposal models: 6 prompts, N = 4, 2 training steps, eval k = 4."""
    lines = (EXAMPLES / "prompts.jsonl").read_text().splitlines()[:6]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "data": {"prompts": str(prompts), "verifier": "countdown"},
        "models": {"reference": str(EXAMPLES / "ref"), "proposal": str(EXAMPLES / "proposal"), "device": "cpu",
                   "cpu_threads": 1},
        "target": {"beta": 3.0, "reward_transform": "raw"},
        "sample": {"n": 4, "max_new_tokens": 16, "batch_size": 6},
        "fit_z": {"hidden": 8, "max_epochs": 5, "val_fraction": 0.34},
        "train": {"group_size": 4, "prompts_per_step": 3, "num_steps": 2, "micro_batch_size": 64,
                  "generation_batch_size": 3, "lr": 1e-3, "max_new_tokens": 16, "save_every": 0,
                  "sft": {"num_epochs": 1}},
        "eval": {"k": 4, "pass_at": [1, 4], "max_new_tokens": 16, "batch_size": 6, "bootstrap": 0},
    }))
    return config


def _results(out: Path, name: str) -> dict:
    assert (out / "results.md").is_file() and (out / "report.html").is_file()
    assert (out / f"{name}.png").stat().st_size > 5000
    return json.loads((out / "results.json").read_text())


def _check_eval_row(row: dict, k: int = 4) -> None:
    curve = row["pass_curve"]
    assert len(curve) == k and curve == sorted(curve) and 0 <= curve[0] <= curve[-1] <= 1
    assert row["pass@1"] == pytest.approx(row["mean_at_k"]) and row[f"pass@{k}"] == curve[-1]


def test_beta_sweep_on_a_pipeline_config(tiny_countdown, tmp_path):
    """Through the library entry with two trained betas (the CLI path is the other studies')."""
    from disa.config import load_config
    from disa.report import build_report

    out = tmp_path / "beta"
    cfg = load_config(str(tiny_countdown))
    from disa.studies.beta_sweep import run_from_config

    res = run_from_config(cfg, str(out), betas=(1.0, 3.0, 15.0), train_betas=(1.0, 8.0), num_subsamples=20)
    build_report(out)
    res = _results(out, "beta_sweep")
    assert res["pool_size"] == 16 and res["n"] == 4 and res["prompts"] == 6 and res["seeds"] == 1
    assert [r["beta"] for r in res["rows"]] == [1.0, 3.0, 15.0]
    assert all(r["label_variance"] >= 0 and 1 <= r["mean_ess"] <= 4 for r in res["rows"])
    assert res["rows"][0]["label_variance"] <= res["rows"][2]["label_variance"]  # same samples, sharper weights
    assert len({r["reward_rate"] for r in res["rows"]}) == 1  # one pool for every beta
    assert [r["beta"] for r in res["trained"]] == [1.0, 8.0]
    for row in [*res["trained"], res["reference"]]:
        _check_eval_row(row)
    # every trained beta labelled the very same Stage 1 samples, each with its own target
    from disa.run_dir import RunDir

    assert RunDir(out / "seed0" / "beta8").recorded_target().beta == 8.0
    for beta in (1, 8):
        meta = json.loads((out / "seed0" / f"beta{beta}" / "meta.json").read_text())
        assert meta == json.loads((out / "seed0" / "stage1" / "meta.json").read_text())
    assert "## DISA trained at each beta" in (out / "results.md").read_text()


def test_proposal_on_a_pipeline_config(tiny_countdown, tmp_path):
    out = tmp_path / "proposal"
    assert cli.main(["study", "proposal", "-c", str(tiny_countdown), "--out", str(out)]) == 0
    res = _results(out, "proposal")
    strong, weak = res["rows"]
    assert strong["proposal"].startswith("strong") and weak["proposal"].startswith("weak")
    for row in (strong, weak):
        assert row["stage2_val_mse"] >= 0 and row["stage2_mean_predictor_mse"] >= 0 and row["label_spread"] >= 0
        _check_eval_row(row)
    # the weak run's proposal is pi_ref itself: log q = log pi_ref on every sample; the strong one's is not
    from disa.stages.label import collect_groups

    for tag, same in (("weak", True), ("strong", False)):
        order, groups = collect_groups(str(out / "seed0" / tag / "samples"))
        diff = np.concatenate([np.subtract(groups[p]["logp_ref"], groups[p]["logp_q"]) for p in order])
        assert (np.abs(diff).max() < 1e-4) == same and len(order) == 6
    assert 1 <= strong["mean_ess"] <= 4 and 1 <= weak["mean_ess"] <= 4


def test_sft_vs_disa_on_a_pipeline_config_with_two_seeds(tiny_countdown, tmp_path):
    out = tmp_path / "sft"
    assert cli.main(["study", "sft_vs_disa", "-c", str(tiny_countdown), "--out", str(out), "--seeds", "2"]) == 0
    res = _results(out, "sft_vs_disa")
    disa, sft = res["rows"]
    assert disa["method"] == "DISA" and sft["method"].startswith("SFT") and res["seeds"] == 2
    assert "mean_at_k_std" in disa and disa["mean_at_k_std"] >= 0
    # the proposal's reward-1 samples of the DISA run's Stage 1 files (a seed with none leaves SFT at pi_ref)
    from disa.config import load_config
    from disa.studies.sft_vs_disa import correct_samples

    counts = [correct_samples(load_config(str(tiny_countdown), [f"output_dir={out / f'seed{s}' / 'disa'}"]))
              for s in (0, 1)]
    assert sft["sft_examples"] == pytest.approx(np.mean(counts))
    for row in (disa, sft, res["reference"]):
        _check_eval_row(row)
    # SFT read its samples from the DISA run (stage1_dir) and has none of its own
    assert not (out / "seed0" / "sft" / "samples").exists() and (out / "seed1" / "disa" / "samples").is_dir()
    assert counts[0] == 0 or (out / "seed0" / "sft" / "checkpoints").is_dir()
    assert "±" in (out / "results.md").read_text() and "mean ± std over 2 seeds" in (out / "results.md").read_text()


def test_a_config_without_what_the_study_needs_is_a_clear_error(tiny_countdown, tmp_path, capsys):
    args = ["study", "proposal", "-c", str(tiny_countdown), "--out", str(tmp_path / "x")]
    assert cli.main(args + ["--set", "models.proposal=null"]) == 2
    assert "models.proposal" in capsys.readouterr().err
    assert cli.main(args + ["--set", f"models.proposal={EXAMPLES / 'ref'}"]) == 2
    assert "other than models.reference" in capsys.readouterr().err
    assert cli.main(["study", "beta_sweep", "-c", str(tiny_countdown), "--out", str(tmp_path / "y"),
                     "--set", "models.reference=/nonexistent/model"]) == 2
    assert "models.reference" in capsys.readouterr().err
    assert cli.main(["study", "sft_vs_disa", "-c", str(tiny_countdown), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert cli.main(["study", "n_budget", "-c", str(tiny_countdown), "--seeds", "2", "--out", str(tmp_path / "z")]) == 1
    assert "does not apply" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mean_over_seeds_and_display_by_hand():
    from disa.studies.pipeline import display_rows, mean_over_seeds

    rows = mean_over_seeds([[{"m": "a", "x": 1.0, "c": [0.0, 1.0]}], [{"m": "a", "x": 3.0, "c": [1.0, 1.0]}]])
    assert rows == [{"m": "a", "x": 2.0, "x_std": pytest.approx(math.sqrt(2.0)), "c": [0.5, 1.0]}]
    assert display_rows(rows, ["m", "x"], 2) == [{"m": "a", "x": "2 ± 1.4"}]
    assert mean_over_seeds([[{"x": 1.0}]]) == [{"x": 1.0, "x_std": 0.0}]
    assert mean_over_seeds([[{"beta": 3.0, "x": 1}], [{"beta": 3.0, "x": 2}]]) == [{"beta": 3.0, "x": 1.5, "x_std": pytest.approx(0.7071, abs=1e-4)}]


def test_derived_config_changes_fields_and_names_a_bad_one(tiny_countdown, tmp_path):
    from disa.config import ConfigError, load_config
    from disa.studies.pipeline import derived_config

    cfg = load_config(str(tiny_countdown))
    sub = derived_config(cfg, tmp_path / "sub", {"target.beta": 8.0, "sample.seed": 3})
    assert (sub.target.beta, sub.sample.seed, sub.output_dir, cfg.target.beta) == (8.0, 3, str(tmp_path / "sub"), 3.0)
    with pytest.raises(ConfigError, match="target.nope"):
        derived_config(cfg, tmp_path, {"target.nope": 1})
    with pytest.raises(ConfigError, match="beta"):
        derived_config(cfg, tmp_path, {"target.beta": -1.0})


def test_label_row_at_by_hand():
    from disa.studies.beta_sweep import label_row_at

    # q = pi_ref (weights 1) and no reward: every label is log mean exp(0) = 0, ESS = n, variance 0
    zeros = np.zeros((3, 8))
    row = label_row_at([zeros, zeros, zeros], 2.0, 4, num_subsamples=5)
    assert row == {"beta": 2.0, "label_variance": 0.0, "mean_label": 0.0, "mean_ess": 4.0, "reward_rate": 0.0}
    # one rewarded sample of 2 (weights 1): label log((e^beta + 1) / 2) for every subset of both
    reward = np.array([[1.0, 0.0]])
    row = label_row_at([np.zeros((1, 2))] * 2 + [reward], 1.0, 2, num_subsamples=3)
    assert row["mean_label"] == pytest.approx(math.log((math.e + 1) / 2)) and row["reward_rate"] == 0.5


def test_exact_pass_curve_by_hand():
    from disa.studies.beta_sweep import exact_pass_curve

    # p = 0.5 and 0: pass@1 = 0.25, pass@2 = (0.75 + 0) / 2
    np.testing.assert_allclose(exact_pass_curve([0.5, 0.0], 2), [0.25, 0.375])
    with pytest.raises(ValueError):
        exact_pass_curve([1.5], 2)
