"""Fault cases of docs/reliability.md on the countdown example: two writers on one folder, resumes with other
inputs, damaged artefacts, numbers that would poison a loss, a moved run folder. Each asserts the exit code and
that the message names the file, field or prompt id; the fast ones run by default, real races are ``slow``."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from disa import cli
from disa.artifacts import LABELS, LOG_Z_TABLE, ArtifactError, Lineage, file_digest, reading, refuse_differences
from disa.run_dir import LOCK_DIR, RunDir, model_fingerprint, stage_lock, sweep_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "countdown.yaml")
SRC = str(ROOT / "src")
FAST = ["--set", "sample.n=4", "--set", "eval.k=2", "--set", "eval.pass_at=[1]"]


def main(verb: str, out: Path, *sets: str) -> int:
    argv = [verb, "-c", CONFIG, "--set", f"output_dir={out}", *FAST]
    for s in sets:
        argv += ["--set", s]
    return cli.main(argv)


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The whole pipeline once with 4 training steps (seconds); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("faults") / "run"
    os.chdir(ROOT)
    assert main("run", out, "train.num_steps=4") == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# ----------------------------------------------------------------------------------------------- locks
def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_leaves_no_lock(tmp_path):
    """A real process holds `disa train`'s lock: a real `disa train` on that folder exits 2 naming its pid; once the
    holder is killed (SIGKILL: no clean-up at all) the lock is free again."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from disa.run_dir import stage_lock\n"
         f"with stage_lock({str(out)!r}, 'train'):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "disa.cli", "train", "-c", CONFIG, "--set", f"output_dir={out}",
                                 "--set", "train.objective=grpo"], capture_output=True, text=True, cwd=ROOT,
                                env=subprocess_env(), timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"in use by another `disa train` (pid {holder.pid}," in second.stderr
        assert not (out / "checkpoints").exists()  # refused before anything was written
        with stage_lock(out, "sample"):  # another stage of the same folder is not blocked
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with stage_lock(out, "train") as path:  # the kernel dropped the dead holder's lock
        assert path == out / LOCK_DIR / "train" and f"pid {os.getpid()}" in path.read_text()


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    with stage_lock(tmp_path, "label"):
        with stage_lock(tmp_path, "label"):  # a study nests stage calls in one process
            pass
        probe = subprocess.run([sys.executable, "-c", "from disa.run_dir import stage_lock\n"
                                f"with stage_lock({str(tmp_path)!r}, 'label'): pass"],
                               capture_output=True, text=True, env=subprocess_env())
        assert probe.returncode == 1 and "RunLocked" in probe.stderr and f"pid {os.getpid()}" in probe.stderr
    probe = subprocess.run([sys.executable, "-c", "from disa.run_dir import stage_lock\n"
                            f"with stage_lock({str(tmp_path)!r}, 'label'): print('got it')"],
                           capture_output=True, text=True, env=subprocess_env())
    assert probe.stdout.strip() == "got it"  # released when the outer block ended


def test_stale_temporaries_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "samples").mkdir()
    stale = tmp_path / "samples" / f"shard-00000.parquet.tmp-{dead.pid}"
    live = tmp_path / f"meta.json.tmp-{os.getpid()}"
    keep = tmp_path / "notes.tmp-abc"
    for p in (stale, live, keep):
        p.write_text("x")
    assert sweep_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and keep.exists()


# ----------------------------------------------------------------------------------------------- resume guards
def test_sample_resume_with_another_proposal_dtype_or_prompt_texts_is_refused(run_copy, tmp_path, capsys):
    assert main("sample", run_copy, "models.proposal=examples/countdown/ref") == 2
    err = capsys.readouterr().err
    proposal, ref = model_fingerprint(ROOT / "examples/countdown/proposal"), model_fingerprint(ROOT / "examples/countdown/ref")
    assert "models.proposal: recorded" in err and proposal["digest"] in err and ref["digest"] in err
    assert main("sample", run_copy, "models.dtype=bfloat16") == 2
    assert "models.dtype: recorded 'float32', now 'bfloat16'" in capsys.readouterr().err
    edited = tmp_path / "prompts.jsonl"  # the same ids, another target for one of them
    rows = [json.loads(line) for line in (ROOT / "examples/countdown/prompts.jsonl").read_text().splitlines()]
    rows[3]["target"] += 1
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {p.name: file_digest(p) for p in (run_copy / "samples").iterdir()}
    assert main("sample", run_copy, f"data.prompts={edited}") == 2
    assert "data.prompts (prompt texts and verifier columns): recorded" in capsys.readouterr().err
    assert {p.name: file_digest(p) for p in (run_copy / "samples").iterdir()} == before


@pytest.mark.parametrize("change, field", [
    ("models.reference=examples/countdown/proposal", "models.reference: recorded"),
    ("models.dtype=bfloat16", "models.dtype: recorded 'float32', now 'bfloat16'"),
    ("eval.select_holdout=4", "eval.select_holdout: recorded 0, now 4"),
])
def test_train_resume_with_other_inputs_is_refused_naming_the_field(run_copy, capsys, change, field):
    assert main("train", run_copy, "train.num_steps=6", change) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4 was made from other inputs" in err and field in err
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]


def test_train_resume_after_the_log_z_table_was_made_again_is_refused(run_copy, capsys):
    table = pq.read_table(LOG_Z_TABLE.path(run_copy))
    shifted = table.set_column(1, "log_z", pa.array([v + 5.0 for v in table.column("log_z").to_pylist()]))
    pq.write_table(shifted.replace_schema_metadata(table.schema.metadata), LOG_Z_TABLE.path(run_copy))
    assert main("train", run_copy, "train.num_steps=6") == 2
    err = capsys.readouterr().err
    assert "log_z/table.parquet: recorded log_z/table.parquet (digest" in err


def test_a_log_z_table_older_than_its_labels_is_refused(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    labels = pq.read_table(LABELS.path(run_copy))
    pq.write_table(labels.slice(0, labels.num_rows).replace_schema_metadata(
        {**labels.schema.metadata, b"note": b"made again"}), LABELS.path(run_copy))
    assert main("train", run_copy, "train.num_steps=6") == 2
    err = capsys.readouterr().err
    assert "log_z/table.parquet was fitted on labels.parquet digest" in err and "run `disa fit-z` again" in err


def test_labels_older_than_their_samples_are_refused_by_fit_z(run_copy, capsys):
    shard = next((run_copy / "samples").glob("shard-*.parquet"))
    pq.write_table(pq.read_table(shard), shard, compression="gzip")  # the same rows, written again: other bytes
    assert main("fit-z", run_copy) == 2
    err = capsys.readouterr().err
    assert "labels.parquet was made from samples digest" in err and "run `disa label` again" in err


def test_every_output_records_the_digests_of_its_inputs(finished_run):
    from disa.artifacts import SAMPLES

    labels_meta = RunDir(finished_run).labels_metadata()
    assert labels_meta["inputs"]["samples"] == SAMPLES.digest(finished_run)
    table_meta = LOG_Z_TABLE.read_metadata(finished_run)
    assert table_meta["inputs"]["labels"] == LABELS.digest(finished_run)
    assert table_meta["labels_path"] == "labels.parquet"  # relative to the run folder
    ckpt = json.loads((finished_run / "checkpoints" / "checkpoint-4" / "lineage.json").read_text())["fields"]
    assert ckpt["log_z/table.parquet"] == {"path": "log_z/table.parquet", "digest": LOG_Z_TABLE.digest(finished_run)}
    assert ckpt["models.reference"]["digest"] == model_fingerprint(ROOT / "examples/countdown/ref")["digest"]
    evaluated = json.loads((finished_run / "eval" / "checkpoint-4" / "lineage.json").read_text())["fields"]
    policy = finished_run / "checkpoints" / "checkpoint-4" / "policy"
    assert evaluated["policy"]["path"] == "checkpoints/checkpoint-4/policy"
    assert evaluated["policy"]["digest"] == model_fingerprint(policy)["digest"]


def test_num_steps_below_the_checkpoint_is_a_clear_refusal(run_copy, capsys):
    assert main("train", run_copy, "train.num_steps=2") == 2
    assert "train.num_steps: 2, but" in capsys.readouterr().err


def test_a_moved_run_folder_resumes_and_its_metrics_are_rebuilt_from_the_checkpoint(run_copy, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    run_copy.rename(moved)
    metrics = moved / "checkpoints" / "metrics.csv"
    metrics.write_text(metrics.read_text()[:40])  # truncated mid-row, as a full disk leaves it
    assert main("sample", moved) == 0 and "0 written, 1 already there" in capsys.readouterr().err
    assert main("train", moved, "train.num_steps=6") == 0
    assert "resumed at step 4" in capsys.readouterr().err
    steps = [int(line.split(",")[0]) for line in metrics.read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
    lineage = json.loads((moved / "checkpoints" / "checkpoint-6" / "lineage.json").read_text())
    assert lineage["fields"]["log_z/table.parquet"]["path"] == "log_z/table.parquet"  # relative to the run folder


# ----------------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("target, verb, damage", [
    ("labels.parquet", "fit-z", b"PAR1 not a parquet file"),
    ("meta.json", "label", b'{"n": 4'),
    ("log_z/table.parquet", "train", b"\x00" * 64),
])
def test_a_damaged_artefact_is_one_line_naming_it_and_the_verb_that_rewrites_it(run_copy, capsys, target, verb, damage):
    if verb == "train":
        shutil.rmtree(run_copy / "checkpoints")
    (run_copy / target).write_bytes(damage)
    assert main(verb, run_copy) == 2
    err = capsys.readouterr().err.strip()
    writer = {"labels.parquet": "label", "meta.json": "sample", "log_z/table.parquet": "fit-z"}[target]
    assert len(err.splitlines()) == 1 and str(run_copy / target) in err and f"re-run `disa {writer}`" in err


def test_a_checkpoint_whose_state_was_edited_is_named(run_copy, capsys):
    state = run_copy / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    data = json.loads(state.read_text())
    data["step"] = 3
    state.write_text(json.dumps(data))
    assert main("train", run_copy, "train.num_steps=6") == 2
    assert f"{state}: records step 3, but the folder is checkpoint-4" in capsys.readouterr().err


def test_a_damaged_embedding_cache_is_a_cache_miss_and_is_rewritten_whole(run_copy, capsys):
    cache = RunDir(run_copy).embeddings_cache
    cache.write_bytes(cache.read_bytes()[:50])
    before = (run_copy / "log_z" / "table.parquet").read_bytes()
    assert main("fit-z", run_copy) == 0
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as fh:
        assert fh.get_tensor("embeddings").shape[0] == 24
    assert pq.read_table(run_copy / "log_z" / "table.parquet").equals(pq.read_table(pa.BufferReader(before)))


# ----------------------------------------------------------------------------------------------- numbers
def test_nan_or_huge_frozen_log_z_is_refused_before_step_one_naming_the_prompt(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    table = pq.read_table(LOG_Z_TABLE.path(run_copy))
    values = table.column("log_z").to_pylist()
    values[2], values[5] = float("nan"), 1e30
    ids = table.column("prompt_id").to_pylist()
    pq.write_table(table.set_column(1, "log_z", pa.array(values)).replace_schema_metadata(table.schema.metadata),
                   LOG_Z_TABLE.path(run_copy))
    assert main("train", run_copy) == 2
    err = capsys.readouterr().err
    assert f"{ids[2]!r} (nan)" in err and f"{ids[5]!r} (1e+30)" in err and "2 prompt(s)" in err
    assert not (run_copy / "checkpoints").exists() or not any((run_copy / "checkpoints").glob("checkpoint-*"))


def test_a_positive_log_prob_in_a_shard_is_refused_naming_the_row(run_copy, capsys):
    shard = next((run_copy / "samples").glob("shard-*.parquet"))
    table = pq.read_table(shard)
    logp = table.column("logp_ref").to_pylist()
    logp[6] = 1e6
    pq.write_table(table.set_column(table.schema.get_field_index("logp_ref"), "logp_ref", pa.array(logp)), shard)
    labels_before = file_digest(LABELS.path(run_copy))
    assert main("label", run_copy) == 2
    err = capsys.readouterr().err
    assert f"{shard}, row 7: column 'logp_ref' is 1000000.0" in err
    assert file_digest(LABELS.path(run_copy)) == labels_before


@pytest.mark.parametrize("damage, said", [
    ("drop a row", "rows, but meta.json says 96 (4 samples of 24 prompts)"),
    ("foreign id", "not the 24 prompts meta.json records"),
])
def test_a_readable_but_damaged_shard_is_refused_before_labelling(run_copy, capsys, damage, said):
    shard = next((run_copy / "samples").glob("shard-*.parquet"))
    table = pq.read_table(shard)
    if damage == "drop a row":
        table = table.slice(0, table.num_rows - 1)
    else:
        ids = table.column("prompt_id").to_pylist()
        ids = ["intruder" if pid == ids[0] else pid for pid in ids]
        table = table.set_column(0, "prompt_id", pa.array(ids))
    pq.write_table(table, shard)
    assert main("label", run_copy) == 2
    assert said in capsys.readouterr().err


def test_non_finite_labels_are_refused_naming_the_ids_and_nothing_is_written(tmp_path):
    from disa.stages.label import NonFiniteLabels, refuse_non_finite

    table = pa.table({"log_z": [0.1, float("inf"), float("nan")], "reward_scale": [1.0, 1.0, 1.0],
                      "reward_shift": [0.0, 0.0, float("-inf")]})
    with pytest.raises(NonFiniteLabels, match=r"2 of 3 prompts get a non-finite label: 'b' \(log_z = inf\), "
                                              r"'c' \(log_z = nan\)"):
        refuse_non_finite(["a", "b", "c"], table)
    refuse_non_finite(["a"], table.slice(0, 1))


def test_config_floats_must_be_finite(capsys):
    assert cli.main(["train", "-c", CONFIG, "--set", "train.weight_decay=.inf"]) == 2
    assert "train.weight_decay: must be a finite number, got inf" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the pieces
def test_reading_turns_any_library_error_into_one_error_naming_the_path_and_the_verb(tmp_path):
    bad = tmp_path / "labels.parquet"
    bad.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"labels\.parquet: cannot be read \(ArrowInvalid: .*re-run `disa label`"):
        with reading(bad, "label"):
            pq.read_table(str(bad))
    with pytest.raises(ArtifactError, match=r"cannot be read \(KeyError: 'num_prompts'\)"):
        with reading(bad, "sample"):
            {}["num_prompts"]


def test_model_fingerprint_sees_other_weights_of_the_same_shape_and_survives_a_copy(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    shutil.copytree(ROOT / "examples/countdown/ref", a)
    shutil.copytree(a, c)
    shutil.copytree(a, b)
    weights = b / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-8:] = bytes(8)  # same size, same config, other numbers
    weights.write_bytes(bytes(raw))
    assert model_fingerprint(a)["digest"] == model_fingerprint(c)["digest"]
    assert model_fingerprint(a)["digest"] != model_fingerprint(b)["digest"]


def test_lineage_differences_name_both_values():
    old = Lineage({"models.dtype": "float32", "labels.parquet": {"path": "labels.parquet", "digest": "aa"}, "x": 1})
    new = Lineage({"models.dtype": "float32", "labels.parquet": {"path": "labels.parquet", "digest": "bb"}})
    with pytest.raises(ArtifactError, match=r"labels\.parquet: recorded labels\.parquet \(digest aa\), now "
                                            r"labels\.parquet \(digest bb\)\); advice"):
        refuse_differences(old, new, "ckpt", "advice")
    refuse_differences(old, Lineage({"models.dtype": "float32"}), "ckpt", "advice")


def test_rewrite_metrics_is_the_history_in_first_seen_column_order(tmp_path):
    from disa.training.checkpoints import rewrite_metrics

    path = rewrite_metrics(tmp_path, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": float("nan"), "extra": 3}])
    assert path.read_text().splitlines() == ["step,loss,extra", "1,0.5,", "2,nan,3"]


# ----------------------------------------------------------------------------------------------- real races
@pytest.mark.slow
def test_two_real_trainings_on_one_folder_one_runs_one_is_refused(run_copy):
    """Two `disa train` processes started together on one output_dir: exactly one trains (exit 0, every step
    once in metrics.csv), the other exits 2 naming the lock, whatever the order they reach it."""
    shutil.rmtree(run_copy / "checkpoints")
    cmd = [sys.executable, "-m", "disa.cli", "train", "-c", CONFIG, "--set", f"output_dir={run_copy}",
           "--set", "train.num_steps=8"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=subprocess_env()) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    assert any("in use by another `disa train`" in err for code, err in results if code == 2)
    steps = [int(line.split(",")[0]) for line in (run_copy / "checkpoints" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_a_killed_training_resumes_to_the_same_weights_as_an_uninterrupted_one(run_copy, tmp_path):
    """SIGKILL after the first checkpoint, then a re-run: the final checkpoint equals an uninterrupted run's."""
    straight = tmp_path / "straight"
    shutil.copytree(run_copy, straight)
    for out in (run_copy, straight):
        shutil.rmtree(out / "checkpoints")
    base = [sys.executable, "-m", "disa.cli", "train", "-c", CONFIG, "--set", "train.num_steps=12",
            "--set", "train.save_every=2"]
    subprocess.run(base + ["--set", f"output_dir={straight}"], check=True, cwd=ROOT, env=subprocess_env(),
                   capture_output=True)
    victim = subprocess.Popen(base + ["--set", f"output_dir={run_copy}"], cwd=ROOT, env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_copy / "checkpoints" / "checkpoint-4").exists() and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    subprocess.run(base + ["--set", f"output_dir={run_copy}"], check=True, cwd=ROOT, env=subprocess_env(),
                   capture_output=True)
    from safetensors.torch import load_file

    a = load_file(str(straight / "checkpoints/checkpoint-12/policy/model.safetensors"))
    b = load_file(str(run_copy / "checkpoints/checkpoint-12/policy/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(line.split(",")[0]) for line in (run_copy / "checkpoints" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 13))
    assert not math.isnan(float((run_copy / "checkpoints" / "metrics.csv").read_text().splitlines()[-1].split(",")[1]))


# ----------------------------------------------------------------------------------------------- models, learning
def test_weights_that_do_not_fit_config_json_are_refused_before_loading(tmp_path, monkeypatch, capsys):
    """2-layer weights under `n_layer: 4` would load with two random layers; other widths fail deep in the
    loader. Both are one line naming the setting and the tensors, before any model loads."""
    from disa.stages.validate import weights_problem

    monkeypatch.chdir(ROOT)
    deeper, wider = tmp_path / "deeper", tmp_path / "wider"
    for folder, key, value in ((deeper, "n_layer", 4), (wider, "n_embd", 64)):
        shutil.copytree(ROOT / "examples/countdown/ref", folder)
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    assert weights_problem(ROOT / "examples/countdown/ref") is None  # tied lm_head: absent from the file, fine
    assert weights_problem(deeper).startswith("weights missing ['transformer.h.2.ln_1.weight'")
    assert "(24)" in weights_problem(deeper)
    assert "mis-shaped ['transformer.wte.weight [21, 32] (config: [21, 64])'" in weights_problem(wider)
    assert main("train", tmp_path / "run", f"models.policy={deeper}") == 2
    err = capsys.readouterr().err
    assert f"models.policy: {str(deeper)!r}: weights missing" in err and not (tmp_path / "run").exists()


def test_a_run_that_cannot_learn_says_so():
    from disa.config import config_from_dict
    from disa.stages.train import LEARNING_WINDOW, history_cannot_learn, settings_cannot_learn

    grpo_one = config_from_dict({"train": {"objective": "grpo", "group_size": 1}})
    assert "every advantage is 0" in settings_cannot_learn(grpo_one)[0]
    assert settings_cannot_learn(config_from_dict({"train": {"objective": "grpo", "group_size": 2}})) == []
    assert settings_cannot_learn(config_from_dict({"train": {"objective": "disa", "group_size": 1}})) == []
    dead = [{"step": i, "reward_mean": 0.0, "grad_norm": 0.0} for i in range(1, 31)]
    said = history_cannot_learn(dead, 30)
    assert len(said) == 2 and f"every step {30 - LEARNING_WINDOW + 1}-30 (no rewarded rollout)" in said[0]
    alive = dead[:-1] + [{"step": 30, "reward_mean": 0.125, "grad_norm": 0.3}]
    assert history_cannot_learn(alive, 30) == []
    assert history_cannot_learn(dead[:5], 30) == []  # too few steps to say
