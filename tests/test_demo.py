"""``disa demo`` on the quick testbed: its numbers are recomputed here from the files it wrote."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from disa.demo import (
    DEFAULT_METHODS, QUICK_SETTINGS, label_errors, results_markdown, run_demo, settings_with, summarize,
)
from disa.estimators import label_prompts
from disa.testbed import build_testbed, correct_logprobs, log_z_from_logprobs

torch.set_num_threads(1)


def test_label_errors_by_hand():
    out = label_errors(np.array([1.0, 2.0, 4.0]), np.array([1.5, 2.0, 3.0]))
    assert out["bias"] == pytest.approx((-0.5 + 0 + 1) / 3)
    assert out["rmse"] == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3))


def test_summarize_mean_and_sample_std():
    def run(acc, rmse):
        return {"stage1": [{"proposal": "q", "label": "lse", "rmse": rmse, "bias": 0.0, "mean_ess": 1.0,
                            "reward_rate": 0.5, "mean_max_weight": 1.0}],
                "stage2": {"val_mse": 0.1}, "methods": {"disa": {"p_correct": acc}}}

    s = summarize([run(0.2, 1.0), run(0.4, 3.0)], ["disa"])
    assert s["methods"]["disa"]["p_correct"] == {"mean": pytest.approx(0.3), "std": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert s["stage1"]["q / lse"]["rmse"]["mean"] == pytest.approx(2.0)
    assert s["stage2"]["val_mse"]["std"] == 0.0


def test_run_demo_quick_numbers_match_its_own_artefacts(tmp_path):
    settings = dataclasses.replace(QUICK_SETTINGS, num_steps=2, fit_epochs=20, sft_epochs=1)
    out = tmp_path / "demo"
    methods = ["disa", "grpo", "sft", "disa_affine"]
    results = run_demo(str(out), quick=True, seeds=1, methods=methods, cache_dir=str(tmp_path / "cache"),
                       settings=settings)

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"] == methods
    markdown = (out / "results.md").read_text()
    for row in ("| **disa** |", "| **grpo** |", "| **sft** |", "| pi* (target) |", "strong q / lse", "weak (pi_ref) / geometric",
                "| **disa_affine** |", "| pi* (frozen affine r~) |"):
        assert row in markdown
    for plot in ("methods.png", "reward_curves.png", "stage1_labels.png"):
        assert (out / "plots" / plot).stat().st_size > 1000

    # Stage 1: the label RMSE is recomputed from the shards the demo wrote and the exact log Z
    tb = build_testbed(str(tmp_path / "cache"), quick=True)
    ref = tb.load_ref()
    exact = np.array([log_z_from_logprobs(correct_logprobs(ref, tb.tokenizer, p), settings.beta) for p in tb.train_prompts])
    samples = pq.read_table(out / "seed0" / "stage1_strong" / "samples").to_pandas()
    assert len(samples) == len(tb.train_prompts) * settings.n_samples
    samples["order"] = samples["prompt_id"].str.removeprefix("train-").astype(int)
    samples = samples.sort_values(["order", "sample_idx"])
    shape = (len(tb.train_prompts), settings.n_samples)
    as_tensor = lambda col: torch.tensor(samples[col].to_numpy(), dtype=torch.float64).view(shape)  # noqa: E731
    labels = label_prompts(as_tensor("logp_ref"), as_tensor("logp_q"), as_tensor("reward"), settings.beta)
    err = labels["log_z"].numpy() - exact
    lse_row = results["runs"][0]["stage1"][0]
    assert (lse_row["proposal"], lse_row["label"]) == ("strong q", "lse")
    assert lse_row["rmse"] == pytest.approx(float(np.sqrt(np.mean(err**2))), rel=1e-6)
    assert lse_row["bias"] == pytest.approx(float(err.mean()), rel=1e-6, abs=1e-9)

    # the beta sweep at the demo's own beta and N is the same label, computed by another path
    sweep = [r for r in results["runs"][0]["sweeps"] if r["study"] == "beta_sweep" and r["proposal"] == "strong q"
             and r["beta"] == settings.beta]
    assert len(sweep) == 1 and sweep[0]["rmse"] == pytest.approx(lse_row["rmse"], rel=1e-6)
    n_rows = [r for r in results["runs"][0]["sweeps"] if r["study"] == "n_sweep" and r["proposal"] == "strong q"]
    assert [r["n"] for r in n_rows] == [1, 2, 4, 8, 16] and [r["batches"] for r in n_rows] == [16, 8, 4, 2, 1]
    assert "## Stage 1 label error vs the budget N" in markdown and (out / "plots" / "stage1_sweeps.png").exists()

    # the affine row is scored against the exact Z of the (a, b) frozen in labels_affine.parquet
    affine = pq.read_table(out / "seed0" / "stage1_strong" / "labels_affine.parquet").to_pandas()
    affine = affine.set_index("prompt_id").loc[[f"train-{i}" for i in range(len(tb.train_prompts))]]
    exact_affine = np.array([
        log_z_from_logprobs(correct_logprobs(ref, tb.tokenizer, p), settings.beta, (b, a + b))
        for p, a, b in zip(tb.train_prompts, affine["reward_scale"], affine["reward_shift"])
    ])
    affine_row = results["runs"][0]["stage1"][2]
    assert (affine_row["proposal"], affine_row["label"]) == ("strong q", "lse, affine r~")
    assert affine_row["bias"] == pytest.approx(float(np.mean(affine["log_z"].to_numpy() - exact_affine)), rel=1e-6)
    assert results["runs"][0]["methods"]["disa_affine"]["log_z"] == pytest.approx(float(exact_affine.mean()), rel=1e-6)

    # Stage 3: the untrained reference row is exact; every method has every metric, in range
    ref_row = results["reference"]["pi_ref"]
    assert ref_row["log_z"] == pytest.approx(float(exact.mean()), rel=1e-6)
    assert ref_row["p_correct_target"] > ref_row["p_correct"]  # beta > 0 tilts towards correct answers
    for method in methods:
        m = results["runs"][0]["methods"][method]
        assert 0 <= m["p_correct"] <= 1 and 0 <= m["tv"] <= 1 and m["kl_target_policy"] >= 0
        assert 0 <= m["heldout_p_correct"] <= 1 and m["wall_s"] > 0
    assert len(results["runs"][0]["curves"]["grpo"]) == settings.num_steps
    assert results_markdown(on_disk) == markdown


def test_run_demo_resumes_finished_methods_and_redoes_them_when_settings_change(tmp_path, caplog):
    caplog.set_level("INFO", logger="disa")
    settings = dataclasses.replace(QUICK_SETTINGS, num_steps=2, fit_epochs=5, sweep_n_max=2)
    kw = dict(out_dir=str(tmp_path / "d"), quick=True, methods=["grpo"], cache_dir=str(tmp_path / "c"))
    first = run_demo(settings=settings, **kw)
    done = tmp_path / "d" / "seed0" / "grpo" / "demo_result.json"
    stamp = done.stat().st_mtime_ns
    caplog.clear()
    again = run_demo(settings=settings, **kw)
    assert "grpo            reused" in caplog.text and done.stat().st_mtime_ns == stamp
    assert again["runs"][0]["methods"]["grpo"] == pytest.approx(first["runs"][0]["methods"]["grpo"])
    changed = run_demo(settings=dataclasses.replace(settings, num_steps=3), **kw)
    assert len(changed["runs"][0]["curves"]["grpo"]) == 3 and done.stat().st_mtime_ns != stamp


def test_settings_overrides_parse_types_and_name_bad_fields():
    s = settings_with(QUICK_SETTINGS, ["num_steps=300", "lr=1", "rollout_weight=clipped_is", "sweep_betas=[1, 2]"])
    assert (s.num_steps, s.lr, s.rollout_weight, s.sweep_betas) == (300, 1.0, "clipped_is", (1, 2))
    assert s.beta == QUICK_SETTINGS.beta
    with pytest.raises(ValueError, match="FIELD one of"):
        settings_with(QUICK_SETTINGS, ["num_stepz=3"])
    with pytest.raises(ValueError, match="num_steps: expected int"):
        settings_with(QUICK_SETTINGS, ["num_steps=many"])
    with pytest.raises(ValueError, match="sweep_betas: expected tuple"):
        settings_with(QUICK_SETTINGS, ["sweep_betas=3"])


def test_cli_demo_rejects_a_bad_override(capsys):
    from disa.cli import main

    assert main(["demo", "--quick", "--set", "length_normalize=maybe"]) == 2
    assert "length_normalize: expected bool" in capsys.readouterr().err


def test_run_demo_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="methods: unknown"):
        run_demo(str(tmp_path), quick=True, methods=["disa", "ppo"])


@pytest.mark.slow
def test_cli_demo_quick(tmp_path):
    from disa.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "c")]) == 0
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert set(results["summary"]["methods"]) == set(DEFAULT_METHODS)


# ---------------------------------------------------------------------------------------------- what the user sees
def test_progress_lines_give_the_eta_from_the_rate_so_far():
    import io

    from disa.testbed.progress import ProgressLines

    now = [0.0]
    out = io.StringIO()
    progress = ProgressLines("testbed pi_ref", 200, clock=lambda: now[0], out=out)
    for step in range(1, 201):
        now[0] = step * 0.5  # 0.5 s a step
        progress.update(step, loss=1.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "testbed pi_ref: 20/200 steps (10%), 10s elapsed, ETA 1m30s, loss 1.000"
    assert lines[-1].startswith("testbed pi_ref: 200/200 steps (100%), 1m40s elapsed, ETA 0s")


@pytest.mark.parametrize("wanted, cores, load, expected", [
    (2, 2, 0.1, 2), (2, 2, 0.5, 2), (2, 2, 0.9, 1), (2, 2, 6.0, 1), (2, 16, 3.0, 2), (8, 16, 10.2, 6),
    (2, 2, None, 2), (1, 2, 6.0, 1)])
def test_threads_are_chosen_from_the_free_cores(wanted, cores, load, expected):
    from disa.threads import choose_threads

    assert choose_threads(wanted, cores, load) == expected


@pytest.mark.parametrize("threads, cores, load, says_variant, busy_hint", [
    (1, 2, 0.1, False, None), (1, 2, 6.0, False, None), (2, 2, 0.1, True, None), (2, 2, 4.5, True, 1),
    (2, 16, 3.0, True, None)])
def test_the_build_says_its_threads_and_why(threads, cores, load, says_variant, busy_hint):
    from disa.testbed.progress import thread_note

    note = thread_note(threads, 1, cores, load)
    assert note.startswith(f"{threads} torch thread(s) on {cores} core(s), load average {load:.1f}")
    assert ("equally valid variant" in note) == says_variant
    assert ("--build-threads 1 builds faster" in note) == (busy_hint == 1)


def test_the_build_does_not_depend_on_the_load_unless_asked(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="disa")
    from disa.testbed import TestbedConfig
    from disa.testbed import models

    tiny = TestbedConfig(n_train_prompts=4, n_eval_prompts=2, n_embd=8, n_layer=1, n_head=1, ref_steps=2,
                         proposal_steps=1, batch_size=4, familiarity_levels=(0.5,))
    monkeypatch.setattr(models, "machine_load", lambda: (2, 0.0))  # idle
    documented = build_testbed(tmp_path, config=tiny)  # default: 1 thread, the documented build
    assert documented.root.name == tiny.fingerprint()
    assert json.loads((documented.root / "build.json").read_text())["build_threads"] == 1
    auto = build_testbed(tmp_path, config=tiny, num_threads="auto")  # every free core: 2, cached apart
    assert auto.root.name == tiny.fingerprint() + "-threads2"
    assert "equally valid variant" in caplog.text
    caplog.clear()
    monkeypatch.setattr(models, "machine_load", lambda: (2, 5.0))  # busy: the default is the same testbed
    assert build_testbed(tmp_path, config=tiny).root == documented.root
    assert build_testbed(tmp_path, config=tiny, num_threads="auto").root.name == tiny.fingerprint()  # 1 free core
    assert "building" not in caplog.text  # both were cached
    build_testbed(tmp_path, config=tiny, num_threads=2)  # cached: nothing to say
    with pytest.raises(ValueError, match="num_threads"):
        build_testbed(tmp_path, config=tiny, num_threads=0)


def test_smoothing_starts_at_the_first_value_and_skips_nans():
    from disa.demo_report import smooth

    np.testing.assert_allclose(smooth([1.0, float("nan"), 0.0, 0.0], weight=0.5), [1.0, 1.0, 0.5, 0.25])
    assert math.isnan(smooth([float("nan"), 2.0])[0])


def test_regressor_verdict_says_whether_it_beats_the_mean():
    from disa.stages.fit_z import regressor_verdict

    assert "BETTER than predicting the training mean (MSE 2)" in regressor_verdict(1.0, 2.0)
    assert "WORSE than" in regressor_verdict(3.0, 2.0)
    assert "no better than" in regressor_verdict(27.94, 27.94)
