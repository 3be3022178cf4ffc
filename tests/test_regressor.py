"""Stage 2: LogZRegressor / fit_regressor / save+load / run_fit_z / FrozenLogZ."""

import importlib.util
import json
import math
import random
import string
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from disa.embeddings import PromptEmbedder
from disa.regressor import LogZRegressor, fit_regressor, load_regressor, save_regressor, split_indices
from disa.stages.fit_z import FrozenLogZ, format_fit_table, prompt_texts_by_id, read_labels, run_fit_z


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matmuls on a shared 2-core box: extra intra-op threads only spin (measured 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_problem(num_prompts=300, dim=16, noise=0.05, seed=0):
    """Embeddings on a wild scale and offset, labels a linear-plus-bump function of them (shifted, like log Z)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_prompts, dim, generator=gen)
    embeddings = z * torch.linspace(0.1, 50.0, dim) + 7.0  # standardisation must cope with this
    w = torch.randn(dim, generator=gen)
    labels = -12.0 + 2.0 * (z @ w) / math.sqrt(dim) + 0.3 * torch.sin(z[:, 0])
    labels = labels + noise * torch.randn(num_prompts, generator=gen)
    return embeddings, labels


class LetterCountEmbedder(PromptEmbedder):
    """A real (if crude) embedder: frequencies of a-z and 0-9 in the text. Cheap and deterministic."""

    alphabet = string.ascii_lowercase + string.digits
    fingerprint = "letter-count"
    batch_size = 8

    @property
    def dim(self):
        return len(self.alphabet)

    def _embed_batch(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            for ch in text.lower():
                col = self.alphabet.find(ch)
                if col >= 0:
                    out[row, col] += 1.0
            out[row] /= max(len(text), 1)
        return out


def test_init_predicts_train_label_mean():
    torch.manual_seed(0)
    embeddings, labels = synthetic_problem(50)
    model = LogZRegressor(embeddings.shape[1], hidden=8)
    model.set_normalization(embeddings, labels)
    pred = model(embeddings)
    assert pred.shape == (50,)
    assert torch.allclose(pred, labels.mean().expand(50), atol=1e-5)


def test_fit_synthetic_target_low_val_mse_and_high_r2():
    torch.manual_seed(0)
    embeddings, labels = synthetic_problem()
    rng_before = torch.get_rng_state()
    model, report = fit_regressor(
        embeddings, labels, hidden=64, lr=3e-3, max_epochs=300, patience=20, seed=0, progress=False
    )
    assert torch.equal(rng_before, torch.get_rng_state()), "fit must not consume the global RNG"
    assert report.n_train == 240 and report.n_val == 60 and len(report.val_indices) == 60
    assert report.val_r2 > 0.9, report
    assert report.val_mse < 0.1 * report.baseline_val_mse
    assert report.train_mse < 0.1 * float(labels.var())
    # The reported numbers are the returned model's numbers.
    val_idx = torch.tensor(report.val_indices)
    with torch.no_grad():
        pred = model(embeddings[val_idx])
    assert math.isclose(float(((pred - labels[val_idx]) ** 2).mean()), report.val_mse, rel_tol=1e-5)
    assert not model.training and all(not p.requires_grad for p in model.parameters())


def test_fit_is_deterministic_given_seed_and_split_depends_on_it():
    embeddings, labels = synthetic_problem(80)
    kw = dict(hidden=16, max_epochs=5, patience=5, progress=False)
    m1, r1 = fit_regressor(embeddings, labels, seed=3, **kw)
    m2, r2 = fit_regressor(embeddings, labels, seed=3, **kw)
    assert torch.equal(m1(embeddings), m2(embeddings)) and r1.val_indices == r2.val_indices
    _, r3 = fit_regressor(embeddings, labels, seed=4, **kw)
    assert r3.val_indices != r1.val_indices


def test_early_stopping_restores_best_epoch():
    # Few noisy prompts, a wide net and a large step: the val MSE improves, then the net memorises noise.
    embeddings, labels = synthetic_problem(40, dim=12, noise=1.0, seed=1)
    patience = 5
    model, report = fit_regressor(
        embeddings, labels, hidden=256, lr=3e-2, max_epochs=400, patience=patience, batch_size=8, seed=0, progress=False
    )
    val_curve = [h["val_mse"] for h in report.history]
    assert len(val_curve) == report.epochs
    assert report.epochs < 400, "should have stopped early"
    assert 1 <= report.best_epoch < report.epochs
    assert report.epochs == report.best_epoch + patience
    assert val_curve[-1] > min(val_curve), "the last epoch must be worse than the best for this test to mean anything"
    assert report.best_epoch == 1 + val_curve.index(min(val_curve))
    assert math.isclose(report.val_mse, min(val_curve), rel_tol=1e-5)
    val_idx = torch.tensor(report.val_indices)
    with torch.no_grad():
        restored_mse = float(((model(embeddings[val_idx]) - labels[val_idx]) ** 2).mean())
    assert math.isclose(restored_mse, min(val_curve), rel_tol=1e-5)


def test_save_load_round_trip_identical_and_frozen(tmp_path):
    embeddings, labels = synthetic_problem(60)
    model, _ = fit_regressor(embeddings, labels, hidden=32, max_epochs=10, progress=False)
    save_regressor(model, tmp_path / "logz", {"embedder": "letter-count", "note": "x"})
    assert sorted(p.name for p in (tmp_path / "logz").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_regressor(tmp_path / "logz")
    assert torch.equal(loaded(embeddings), model(embeddings))
    assert loaded.meta == {"embedder": "letter-count", "note": "x"}
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.label_mean, model.label_mean) and torch.equal(loaded.input_std, model.input_std)


def test_regressor_module_loads_standalone(tmp_path):
    """The saved artefact is readable by regressor.py alone, imported from its file outside the package."""
    import disa.regressor as packaged

    embeddings, labels = synthetic_problem(30)
    model, _ = fit_regressor(embeddings, labels, hidden=8, max_epochs=3, progress=False)
    save_regressor(model, tmp_path)
    spec = importlib.util.spec_from_file_location("standalone_logz_regressor", packaged.__file__)
    standalone = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = standalone  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(standalone)
        loaded = standalone.load_regressor(tmp_path)
    finally:
        del sys.modules[spec.name]
    assert type(loaded) is not LogZRegressor  # really the standalone copy
    assert torch.equal(loaded(embeddings), model(embeddings))


def test_fit_errors_are_clear():
    embeddings, labels = synthetic_problem(20)
    bad = labels.clone()
    bad[7] = float("nan")
    with pytest.raises(ValueError, match=r"labels: non-finite.*index \[7\]"):
        fit_regressor(embeddings, bad)
    with pytest.raises(ValueError, match="19 labels for 20 embeddings"):
        fit_regressor(embeddings, labels[:19])
    with pytest.raises(ValueError, match=r"labels: expected a 1-D"):
        fit_regressor(embeddings, labels[:, None])
    bad_emb = embeddings.clone()
    bad_emb[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"embeddings: non-finite.*row \[3\]"):
        fit_regressor(bad_emb, labels)
    with pytest.raises(ValueError, match="too few"):
        fit_regressor(embeddings[:2], labels[:2])
    with pytest.raises(ValueError, match="val_fraction"):
        fit_regressor(embeddings, labels, val_fraction=1.0)
    with pytest.raises(ValueError, match="patience"):
        fit_regressor(embeddings, labels, patience=0)
    with pytest.raises(ValueError, match=r"expected shape \(P, 16\)"):
        LogZRegressor(16)(torch.zeros(3, 5))


def test_split_indices_partition():
    train, val = split_indices(11, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 9
    assert sorted(train.tolist() + val.tolist()) == list(range(11))
    train3, val3 = split_indices(3, 0.2, seed=0)
    assert (len(train3), len(val3)) == (2, 1)


def test_load_regressor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_regressor(tmp_path)
    model = LogZRegressor(4, hidden=3)
    save_regressor(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors: weights do not match"):
        load_regressor(tmp_path)
    del config["input_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing field 'input_dim'"):
        load_regressor(tmp_path)


# --------------------------------------------------------------------------------------------------
# stages/fit_z.py
# --------------------------------------------------------------------------------------------------


def random_prompts(n, seed=0):
    rng = random.Random(seed)
    letters = string.ascii_lowercase[:8] + "  "
    return {f"p{i}": "".join(rng.choice(letters) for _ in range(rng.randint(10, 40))) for i in range(n)}


def write_labels(path, ids, values, extra_columns=True):
    columns = {"prompt_id": ids, "log_z": values}
    if extra_columns:
        columns["ess"] = [1.0] * len(ids)
    pq.write_table(pa.table(columns), path)


def labels_from_letters(texts_by_id, embedder):
    """A log Z target the letter-count features explain: a fixed linear map plus an offset."""
    ids = sorted(texts_by_id)
    feats = embedder.embed([texts_by_id[i] for i in ids])
    w = torch.linspace(-3.0, 3.0, feats.shape[1])
    return ids, (feats @ w * 10.0 - 5.0).tolist()


def test_run_fit_z_end_to_end(tmp_path, capsys):
    embedder = LetterCountEmbedder()
    prompts = random_prompts(200)
    ids, values = labels_from_letters(prompts, embedder)
    write_labels(tmp_path / "labels.parquet", ids, values)
    records = [{"id": k, "text": v} for k, v in prompts.items()] + [{"id": "unlabelled", "text": "zzz"}]
    report = run_fit_z(
        tmp_path / "labels.parquet", records, embedder, tmp_path / "log_z",
        cache_path=tmp_path / "emb.safetensors", hidden=64, lr=3e-3, max_epochs=300, progress=False,
    )
    assert report.val_r2 > 0.9 and report.n_train + report.n_val == 200
    out = capsys.readouterr().out
    assert "val R^2" in out and "train-mean baseline" in out
    saved = json.loads((tmp_path / "log_z" / "report.json").read_text())
    assert math.isclose(saved["val_mse"], report.val_mse) and len(saved["val_prompt_ids"]) == report.n_val
    assert set(saved["val_prompt_ids"]) <= set(ids)
    config = json.loads((tmp_path / "log_z" / "config.json").read_text())
    assert config["meta"]["embedder"] == "letter-count" and config["meta"]["fit"]["hidden"] == 64
    assert (tmp_path / "emb.safetensors").is_file()

    frozen = FrozenLogZ(tmp_path / "log_z", embedder)
    val_ids = saved["val_prompt_ids"]
    pred = frozen([prompts[i] for i in val_ids], ids=val_ids)
    target = torch.tensor([values[ids.index(i)] for i in val_ids])
    assert pred.shape == (len(val_ids),) and not pred.requires_grad
    assert math.isclose(float(((pred - target) ** 2).mean()), report.val_mse, rel_tol=1e-4)
    # memoised by id; a changed text is recomputed, not served stale
    again = frozen([prompts[val_ids[0]], "abc"], ids=[val_ids[0], val_ids[1]])
    assert again[0] == pred[0] and again[1] == frozen(["abc"])[0]


def test_frozen_logz_never_carries_grad(tmp_path):
    embedder = LetterCountEmbedder()
    embeddings = torch.rand(30, embedder.dim)
    model, _ = fit_regressor(embeddings, embeddings.sum(1), hidden=8, max_epochs=3, progress=False)
    model.requires_grad_(True)  # even if someone un-freezes the module it is handed...
    frozen = FrozenLogZ(model, embedder)
    assert all(not p.requires_grad for p in frozen.regressor.parameters())
    inputs = embeddings.clone().requires_grad_(True)
    with torch.enable_grad():
        out = frozen.predict(inputs)
        texts_out = frozen(["abc", "hello world"])
    assert not out.requires_grad and out.grad_fn is None and out.shape == (30,)
    assert not texts_out.requires_grad and texts_out.shape == (2,)


def test_frozen_logz_checks_embedder(tmp_path):
    save_regressor(LogZRegressor(7), tmp_path / "a", {"embedder": "letter-count"})
    with pytest.raises(ValueError, match="36-d embeddings but the regressor expects 7-d"):
        FrozenLogZ(tmp_path / "a", LetterCountEmbedder())
    save_regressor(LogZRegressor(36), tmp_path / "b", {"embedder": "something-else"})
    with pytest.warns(UserWarning, match="fitted on embedder 'something-else'"):
        FrozenLogZ(tmp_path / "b", LetterCountEmbedder())


def test_run_fit_z_input_errors(tmp_path):
    embedder = LetterCountEmbedder()
    prompts = random_prompts(10)
    write_labels(tmp_path / "l.parquet", ["p0", "p1", "ghost", "p3", "spook"], [0.0, 1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"2 prompt_id\(s\).*\['ghost', 'spook'\]"):
        run_fit_z(tmp_path / "l.parquet", prompts, embedder, tmp_path / "o")
    pq.write_table(pa.table({"prompt_id": ["p0"], "logz": [1.0]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: missing column\(s\) \['log_z'\]"):
        read_labels(tmp_path / "bad.parquet")
    write_labels(tmp_path / "nan.parquet", ["p0", "p1", "p2"], [0.0, float("nan"), None])
    with pytest.raises(ValueError, match=r"non-finite for prompt_id \['p1', 'p2'\]"):
        read_labels(tmp_path / "nan.parquet")
    write_labels(tmp_path / "dup.parquet", ["p0", "p1", "p0"], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"duplicate prompt_id \['p0'\]"):
        read_labels(tmp_path / "dup.parquet")
    with pytest.raises(FileNotFoundError, match="labels_path"):
        read_labels(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match=r"prompts\[1\] \(id 'b'\): no rendered 'text'"):
        prompt_texts_by_id([{"id": "a", "text": "x"}, {"id": "b", "prompt": "raw"}])
    assert prompt_texts_by_id([{"id": 3, "prompt": "raw"}], render=lambda r: "<" + r["prompt"] + ">") == {"3": "<raw>"}
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        prompt_texts_by_id([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])


def test_format_fit_table_shows_na_for_undefined_r2():
    embeddings, labels = synthetic_problem(10)
    _, report = fit_regressor(embeddings, labels, hidden=4, max_epochs=2, progress=False)
    report.val_r2 = float("nan")
    assert "n/a" in format_fit_table(report)
    assert report.to_dict()["val_r2"] is None


@pytest.mark.parametrize("num_prompts, value", [(15, 7.3), (35, 7.3), (30, 0.3), (20, -1234.567)])
def test_r2_is_nan_for_constant_validation_labels(num_prompts, value):
    """Identical float32 labels: their mean can be off by an ulp, so SS_tot is ~1e-13, not 0; R^2 must still be NaN
    (a plain ``SS_tot > 0`` check gave 0.0 for 15 and 35 prompts of 7.3)."""
    embeddings = torch.randn(num_prompts, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.full((num_prompts,), value)
    _, report = fit_regressor(embeddings, labels, hidden=4, max_epochs=3, progress=False)
    assert math.isnan(report.val_r2), report.val_r2
    assert report.val_mse < 1e-8 and report.to_dict()["val_r2"] is None


def test_r2_is_defined_for_a_small_but_real_label_spread():
    embeddings = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    labels = 7.3 + 1e-3 * torch.arange(40, dtype=torch.float32) % 3  # spread ~1e-3: well above the 1e-6 tolerance
    model, report = fit_regressor(embeddings, labels, hidden=4, max_epochs=3, progress=False)
    assert math.isfinite(report.val_r2)
    val_idx = torch.tensor(report.val_indices)
    y = labels[val_idx].double()
    ss_tot = float(((y - y.mean()) ** 2).sum())
    assert report.val_r2 == pytest.approx(1.0 - report.val_mse * len(val_idx) / ss_tot, rel=1e-9, abs=1e-9)
