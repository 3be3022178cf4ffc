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
    half = moved / "checkpoints" / ".tmp-checkpoint-5"  # a killed run's half-written checkpoint
    (half / "policy").mkdir(parents=True)
    assert main("sample", moved) == 0 and "0 written, 1 already there" in capsys.readouterr().err
    assert main("train", moved, "train.num_steps=6") == 0
    assert "resumed at step 4" in capsys.readouterr().err
    steps = [int(line.split(",")[0]) for line in metrics.read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not half.exists()  # swept when training started
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


def set_in_first_shard(run: Path, column: str, row: int, value) -> Path:
    """Overwrite one cell of the run's first Stage 1 shard (a damaged-but-readable file); returns the shard."""
    shard = next((run / "samples").glob("shard-*.parquet"))
    table = pq.read_table(shard)
    values = table.column(column).to_pylist()
    values[row] = value
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values)), shard)
    return shard


def test_a_positive_log_prob_in_a_shard_is_refused_naming_the_row(run_copy, capsys):
    shard = set_in_first_shard(run_copy, "logp_ref", 6, 1e6)
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
    from disa.stages.train import settings_cannot_learn
    from disa.training.rl import LEARNING_WINDOW, history_cannot_learn

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


# ----------------------------------------------------------------------------------------------- rewards in range
def test_a_reward_outside_the_verifiers_declared_range_fails_that_item_naming_the_verifier():
    """The one scoring path (Stage 1 sampling, Stage 3 rollouts, eval) checks each reward against the range the
    verifier registered: 7 from a [0, 1] verifier gets its failure reward and a warning naming verifier and row."""
    from disa.training.rollouts import score_rewards
    from disa.verifiers import VerifierItemWarning, register_verifier, score, verifier_spec

    @register_verifier("test_faults_seven", reward_range=(0.0, 1.0))
    def seven(prompts, completions, **_):
        return [7.0 if c == "bad" else 0.5 for c in completions]

    with pytest.warns(VerifierItemWarning, match=r"verifier 'test_faults_seven', row 1 \(prompt id 'p1'\): returned "
                                                 r"7\.0, outside its declared reward range \[0, 1\]"):
        assert score("test_faults_seven", ["a", "b"], ["ok", "bad"], ids=["p0", "p1"]) == [0.5, 0.0]
    with pytest.warns(VerifierItemWarning, match="outside its declared reward range"):  # Stage 3's rollouts
        rewards = score_rewards(seven, [{"id": "p", "text": "a"}, {"id": "q", "text": "b"}], ["bad", "ok"])
    assert rewards.tolist() == [0.0, 0.5]
    with pytest.raises(RuntimeError, match="verifier 'test_faults_seven' failed on every one of the 2 items"):
        score("test_faults_seven", ["a", "b"], ["bad", "bad"])
    assert verifier_spec("countdown").reward_range == verifier_spec("math").reward_range == (0.0, 1.0)
    with pytest.raises(ValueError, match="failure_reward -1.0 is outside its reward_range"):
        register_verifier("test_faults_bad_range", reward_range=(0.0, 1.0), failure_reward=-1.0)
    with pytest.raises(ValueError, match="reward_range must be two finite numbers"):
        register_verifier("test_faults_bad_range", reward_range=(1.0, 0.0))


def test_a_shard_with_a_reward_outside_the_verifiers_range_is_refused_naming_file_and_row(run_copy, capsys):
    shard = set_in_first_shard(run_copy, "reward", 4, 7.0)
    labels_before = file_digest(LABELS.path(run_copy))
    assert main("label", run_copy) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{shard}, row 5: column 'reward' is 7.0, outside the reward range [0, 1] verifier 'countdown' declares" in err
    assert file_digest(LABELS.path(run_copy)) == labels_before


# ----------------------------------------------------------------------------------------------- prompt files
def _prompt_rows() -> list[str]:
    return (ROOT / "examples/countdown/prompts.jsonl").read_text().splitlines(keepends=True)


@pytest.mark.parametrize("damage, said", [
    (lambda lines: lines[:2] + [b'{"id": "x", "prompt": "caf\xe9 -> 1 ="}\n'] + lines[3:],
     "line 3: not UTF-8 (byte 0xe9 at byte 27 of the line); save the file as UTF-8"),
    (lambda lines: lines[:1] + [b'{"id": "x", "prompt": "  ", "numbers": [1], "target": 1}\n'] + lines[2:],
     "line 2: field 'prompt' is empty"),
    (lambda lines: lines[:3] + [b'{"id": "x", "prompt": "1 2 -> 3 =", "numbers": [1, 2]}\n'] + lines[4:],
     "line 4 (id 'x'): field 'target' is missing (give both 'numbers' and 'target'"),
    (lambda lines: lines[:4] + [b'{"id": "x", "prompt": "what is 2 + 2?"}\n'] + lines[5:],
     "line 5 (id 'x'): no fields 'numbers' / 'target', and field 'prompt' is not of the form"),
    (lambda lines: lines[:5] + [b'{"id": "x", "prompt": "' + b"7 " * 600 + b'"}\n'] + lines[6:],
     "line 6: longer than 1000 bytes (one prompt row)"),
])
def test_a_bad_prompt_file_is_one_line_naming_file_line_and_field_before_any_model_loads(
        tmp_path, monkeypatch, capsys, damage, said):
    import disa.data
    from disa.stages import common

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(disa.data, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"".join(damage([line.encode() for line in _prompt_rows()])))
    assert main("sample", tmp_path / "run", f"data.prompts={prompts}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{prompts}, {said}" in err, err
    assert main("train", tmp_path / "run", f"data.prompts={prompts}") == 2  # listed with train's missing artefacts
    assert f"{prompts}, {said}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_10_mb_prompt_line_is_refused_quickly_and_without_gigabytes(tmp_path):
    """A real `disa sample` on a prompt file whose line 3 is a 10 MB prompt: exit 2 naming the line and the id, in
    a few seconds and far below the 4.3 GB the whole-text tokenization took (the child's peak RSS is measured)."""
    import resource

    rows = _prompt_rows()
    huge = json.dumps({"id": "huge", "prompt": "7 " * 5_000_000, "numbers": [7], "target": 7}) + "\n"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(rows[:2]) + huge + "".join(rows[3:]))
    probe = ("import resource, subprocess, sys\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.stderr.write(r.stderr)")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "disa.cli", "sample", "-c", CONFIG,
                           "--set", f"output_dir={tmp_path / 'run'}", "--set", f"data.prompts={prompts}"],
                          capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=300)
    seconds = time.time() - start
    code, peak_kb = (int(v) for v in done.stdout.split())
    assert code == 2, done.stderr
    assert f"{prompts}, line 3 (id 'huge'): at least" in done.stderr and "exceed the context of models." in done.stderr
    assert peak_kb < 1_500_000, f"peak RSS {peak_kb / 1e6:.2f} GB"
    assert seconds < 120
    del resource


# ----------------------------------------------------------------------------------------------- stale temporaries
def test_a_stage_sweeps_the_temporaries_of_dead_writers_when_it_starts_on_a_folder(run_copy, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [run_copy / f"labels.parquet.tmp-{dead.pid}", run_copy / "samples" / f"shard-00000.parquet.tmp-{dead.pid}"]
    live = run_copy / f"meta.json.tmp-{os.getppid()}"  # pytest's parent shell: alive, not ours
    for p in (*stale, live):
        p.write_bytes(b"half a file")
    assert main("label", run_copy) == 0
    assert not any(p.exists() for p in stale) and live.exists()


# ----------------------------------------------------------------------------------------------- runs that cannot learn
def test_group_size_1_with_a_group_statistic_is_refused_before_any_model_loads(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    assert main("train", run_copy, "train.objective=grpo", "train.group_size=1") == 2
    err = capsys.readouterr().err
    assert "train.group_size: 1, but grpo with r~ raw uses a group statistic" in err
    assert not (run_copy / "checkpoints").exists()


def test_a_training_with_no_rewarded_rollout_in_a_window_says_so_as_it_happens(run_copy, monkeypatch, caplog):
    """A verifier that never rewards: the trainer warns at the end of each window (here 3 steps), while training."""
    import logging

    import disa.training.rl as rl
    from disa.verifiers import register_verifier

    register_verifier("test_faults_never", reward_range=(0.0, 1.0))(lambda prompts, completions, **_: [0.0] * len(completions))
    monkeypatch.setattr(rl, "LEARNING_WINDOW", 3)
    shutil.rmtree(run_copy / "checkpoints")
    with caplog.at_level(logging.WARNING, logger="disa.training.rl"):
        assert main("train", run_copy, "data.verifier=test_faults_never", "train.num_steps=6") == 0
    said = [r.getMessage() for r in caplog.records if "no rewarded rollout" in r.getMessage()]
    assert [s.split("every step ")[1].split(" ")[0] for s in said] == ["1-3", "4-6"]


# ----------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_at_any_instant_of_the_first_seconds_is_one_line_and_exit_130(run_copy):
    """Real processes interrupted 0.05-3 s after `disa train` starts (imports, config, checks, model loading,
    training): exit 130 and one line, never a traceback; a second Ctrl-C while the first unwinds exits at once."""
    shutil.rmtree(run_copy / "checkpoints")
    start = "import sys; from disa.cli import main; print('up', flush=True); sys.exit(main())"
    said = ("disa: interrupted", "disa train: interrupted (a re-run resumes)")
    for delays in ([0.05], [1.5], [3.0], [0.4, 0.41]):
        p = subprocess.Popen([sys.executable, "-c", start, "train", "-c", CONFIG, "--set", f"output_dir={run_copy}",
                              "--set", "train.num_steps=500"], cwd=ROOT, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "up"
        t0 = time.time()
        for d in delays:
            time.sleep(max(0.0, t0 + d - time.time()))
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err and p.returncode == 130, (delays, p.returncode, err)
        assert err.strip().splitlines()[-1] in said, (delays, err)


# ----------------------------------------------------------------------------------------------- weights and metrics
def test_weights_the_header_check_cannot_read_are_checked_when_they_load(tmp_path):
    """*.bin weights are left to the loader: 2-layer weights under `n_layer: 4` are refused there, naming the
    missing tensors, instead of loading two random layers; the committed model loads."""
    from disa.config import ConfigError
    from disa.generation.hf import load_model_and_tokenizer
    from disa.stages.validate import weights_problem
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    shutil.copytree(ROOT / "examples/countdown/ref", folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
    weights.unlink()
    load_model_and_tokenizer(str(folder), device="cpu")  # fits: tied lm_head is not reported missing
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    assert weights_problem(folder) is None  # no safetensors header to read
    with pytest.raises(ConfigError, match=r"bin: weights missing \['transformer\.h\.2\..*\(24\); the weights do not "
                                          r"belong to its config\.json"):
        load_model_and_tokenizer(str(folder), device="cpu")


def test_the_metrics_logger_rebuilds_metrics_csv_from_the_checkpoint_history(tmp_path):
    from disa.training.logger import MetricsLogger

    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\n2,\x00garbled\n3,0.2\n4,0.1\n")
    history = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.3, "extra": 1.0}]
    logger = MetricsLogger(tmp_path, "none", resume_step=2, history=history)
    logger.log({"step": 3, "loss": 0.25})
    logger.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["step,loss", "1,0.5", "2,0.4", "3,0.25"]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_every_float_setting_must_be_finite():
    """The config check refuses NaN and infinity in every float field of every section, nested ones included (a
    YAML `.inf`), naming the field."""
    import dataclasses

    from disa.config import ConfigError, PipelineConfig, config_from_dict

    def float_fields(obj, path=()):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from float_fields(value, (*path, f.name))
            elif isinstance(value, float) or "float" in str(f.type):
                yield (*path, f.name)

    checked = []
    for path in float_fields(PipelineConfig()):
        for bad in (math.inf, math.nan):
            data: dict = {}
            node = data
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = bad
            with pytest.raises(ConfigError, match=rf"\b{path[-1]}: "):
                config_from_dict(data)
        checked.append(".".join(path))
    assert len(checked) >= 20 and "train.weight_decay" in checked and "train.sft.weight_decay" in checked, checked
