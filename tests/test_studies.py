"""The studies' pure parts against hand-computed values; the testbed runs are slow-marked."""

import numpy as np
import pytest
import torch

from disa.estimators import label_prompts
from disa.studies import n_budget as nb


def test_kmeans_two_clusters_by_hand():
    x = np.array([[0, 0], [0, 1], [10, 0], [10, 1]], dtype=float)
    labels, centers, sse = nb.kmeans(x, 2, seed=0)
    assert sse == pytest.approx(1.0)  # four points each 0.5 from their centre
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert nb.kmeans(x, 1)[2] == pytest.approx(4 * (25 + 0.25))
    with pytest.raises(ValueError):
        nb.kmeans(x, 5)


def test_elbow_by_hand():
    # scaled points (0, 1), (.25, .111), (.5, .056), (.75, .022), (1, 0): farthest below the chord at k = 2
    assert nb.elbow_k([1, 2, 3, 4, 5], [100, 20, 15, 12, 10]) == 2
    assert nb.elbow_k([1, 2, 3, 4, 5], [100, 80, 60, 15, 10]) == 4
    assert nb.elbow_k([1, 2, 3], [5, 5, 5]) == 1
    with pytest.raises(ValueError):
        nb.elbow_k([1, 2], [3, 1])


def test_stratified_subset_proportional():
    labels = [0] * 4 + [1] * 6 + [2] * 2
    picked = nb.stratified_subset(labels, 6, seed=0)
    counts = np.bincount(np.asarray(labels)[picked], minlength=3)
    assert counts.tolist() == [2, 3, 1] and len(set(picked)) == 6
    # a tiny cluster still gets one when the size allows: quotas .9, 1.8, .3 -> 1, 1, 1
    counts = np.bincount(np.asarray([0] * 3 + [1] * 6 + [2])[nb.stratified_subset([0] * 3 + [1] * 6 + [2], 3)])
    assert counts.tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        nb.stratified_subset(labels, 13)


def test_subsample_of_the_whole_pool_is_the_pool_label_and_stats_by_hand():
    rng = np.random.default_rng(0)
    ref, q = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    r = (rng.random((3, 6)) < 0.5).astype(float)
    pool = label_prompts(*(torch.as_tensor(a) for a in (ref, q, r)), 2.0)["log_z"].numpy()
    labels = nb.subsample_labels(ref, q, r, 2.0, 6, 4)
    np.testing.assert_allclose(labels, np.tile(pool, (4, 1)))
    # labels (2 subsamples x 2 prompts) [[1, 3], [3, 5]] against reference [2, 2]: variances 2 and 2,
    # mean labels 2 and 4 -> bias (0 + 2) / 4, RMSE sqrt((1 + 1 + 1 + 9) / 4)
    stats = nb.label_stats(np.array([[1.0, 3.0], [3.0, 5.0]]), np.array([2.0, 2.0]))
    assert stats == pytest.approx({"variance": 2.0, "relative_bias": 0.5, "rmse": np.sqrt(3.0)})
    with pytest.raises(ValueError, match="undefined"):
        nb.label_stats(np.ones((2, 2)), np.zeros(2))


def test_budget_rows_variance_shrinks_with_n():
    rng = np.random.default_rng(1)
    pool = {"logp_ref": rng.normal(size=(4, 64)), "logp_q": rng.normal(size=(4, 64)),
            "reward": (rng.random((4, 64)) < 0.3).astype(float)}
    rows = nb.budget_rows(pool, 1.0, [2, 8, 32], num_subsamples=30)
    variances = [r["variance_vs_pool"] for r in rows]
    assert variances[0] > variances[1] > variances[2] > 0
    assert "rmse_vs_exact" not in rows[0]


def test_beta_sweep_target_row_by_hand():
    import math

    from disa.studies.beta_sweep import target_row

    # pi_ref puts 1/2 on two correct answers (1/4 each); exp(beta) = 3 -> P* = 1.5 / 2 = 0.75
    row = target_row([np.log([0.25, 0.25])], math.log(3.0), k=2)
    assert row["target_accuracy"] == pytest.approx(0.75)
    assert row["target_pass_at_2"] == pytest.approx(1 - 0.25**2)
    assert row["kl_target_ref"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def test_unknown_study_is_an_error(capsys):
    from disa import cli

    assert cli.main(["study", "nope"]) == 2
    assert "unknown study" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["n_budget", "beta_sweep", "proposal"])
def test_study_runs_on_the_quick_testbed(name, tmp_path):
    import json

    from disa import cli

    out = tmp_path / name
    assert cli.main(["study", name, "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["testbed"] == "quick" and results["rows"]
    assert (out / f"{name}.png").stat().st_size > 1000 and (out / "report.html").is_file()
    if name == "n_budget":
        variances = [r["variance_vs_pool"] for r in results["rows"]]
        assert variances == sorted(variances, reverse=True)
    if name == "proposal":  # a DISA policy trained from each proposal, scored exactly
        assert [r["proposal"] for r in results["rows"]] == ["weak (pi_ref)", "strong q"]
        assert all(0 < r["policy_accuracy"] < 1 and r["kl_target_policy"] > 0 for r in results["rows"])
    if name == "beta_sweep":  # sampled pass@k next to the exact one, k = 1..32
        for row in results["trained"]:
            sampled, exact = np.array(row["sampled_pass_curve"]), np.array(row["exact_pass_curve"])
            assert sampled.shape == exact.shape == (32,) and np.all(np.diff(exact) >= 0)
            assert exact[0] == pytest.approx(row["policy_accuracy"], abs=1e-6)
            assert np.abs(sampled - exact).max() < 0.15


def test_n_budget_on_a_tiny_model_pipeline_run(tiny_gpt2_path, tmp_path):
    """`disa sample` with a larger N, then `disa study n_budget -c CONFIG` on that run's pool."""
    import json

    import yaml

    from disa import cli
    from disa.verifiers import register_verifier

    @register_verifier("test_study_digit")
    def has_digit(prompts, completions, **columns):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i} plus {i} is"}) + "\n" for i in range(6)))
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "data": {"prompts": str(prompts), "verifier": "test_study_digit"},
        "models": {"reference": tiny_gpt2_path, "device": "cpu"}, "target": {"beta": 2.0},
        "sample": {"n": 8, "max_new_tokens": 6, "batch_size": 8, "seed": 0},
        "train": {"max_new_tokens": 6}, "eval": {"max_new_tokens": 6},  # within the tiny model's context
    }))
    assert cli.main(["sample", "-c", str(config)]) == 0
    out = tmp_path / "study"
    assert cli.main(["study", "n_budget", "-c", str(config), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pool_size"] == 8 and [r["n"] for r in results["rows"]] == [1, 2, 4]
    assert 1 <= results["elbow_k"] <= 6 and sum(results["cluster_sizes"]) == 6
    assert "relative_bias_vs_exact" not in results["rows"][0] and (out / "n_budget.png").is_file()
    # this config names no models.proposal: the proposal study, which compares it with pi_ref, refuses it
    assert cli.main(["study", "proposal", "-c", str(config), "--out", str(out / "p")]) == 2
