"""The pipeline verbs end to end on tiny real models (``tiny_gpt2_path`` / ``tiny_llama_path`` from conftest).

Random-init models never write a correct ``\\boxed{}`` answer, so most tests use a registered toy verifier with a
deterministic mix of rewards: 1 when the completion contains a digit. The math verifier is used where "no sample
is correct" is the point.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from disa import cli
from disa.stages.sample import list_shards
from disa.verifiers import register_verifier

NUM_PROMPTS, N, K, STEPS = 5, 4, 4, 2


@register_verifier("test_has_digit")
def has_digit(prompts, completions, answer=None, **columns):
    assert answer is not None and len(answer) == len(completions)  # the prompt set's column reaches the verifier
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def write_prompts(path: Path) -> Path:
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + {i}? Put the answer in \\boxed{{}}.", "answer": str(2 * i)}
            for i in range(1, NUM_PROMPTS)]
    rows.append({"id": "q-chat", "messages": [{"role": "user", "content": "Compute 7 * 6."}], "answer": "42"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(tmp_path: Path, reference: str = "", name: str = "cfg.yaml", **sections) -> str:
    data = {
        "output_dir": str(tmp_path / "run"),
        "data": {"prompts": str(write_prompts(tmp_path / "prompts.jsonl")), "verifier": "test_has_digit"},
        "models": {"reference": reference, "device": "cpu"},
        "sample": {"n": N, "max_new_tokens": 12, "batch_size": 8, "shard_size": 3, "seed": 0},
        "target": {"beta": 2.0, "reward_transform": "affine"},
        "fit_z": {"hidden": 16, "max_epochs": 15, "patience": 5},
        "train": {"objective": "disa", "group_size": 4, "prompts_per_step": 2, "num_steps": STEPS,
                  "micro_batch_size": 8, "max_new_tokens": 10, "lr": 1e-3, "save_every": 1},
        "eval": {"k": K, "pass_at": [1, K], "max_new_tokens": 10, "batch_size": 8},
    }
    for section, values in sections.items():
        data[section].update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def read_samples(out: Path) -> dict:
    shards = list_shards(str(out / "samples"))
    return pa.concat_tables([pq.read_table(f) for f in shards]).to_pydict()


def metrics_rows(out: Path) -> list[dict]:
    with (out / "checkpoints" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def hidden_size(model_path: str) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return config.get("hidden_size") or config["n_embd"]


def check_eval_against_samples(out: Path, k: int, pass_at: list[int], name: str | None = None) -> dict:
    """eval.json's numbers, recomputed by hand from eval_samples.parquet: in ``out/eval/<name>/`` when ``name`` is
    given (checking that ``out``'s top-level files are the same, latest, evaluation), else in ``out``."""
    if name is not None:
        folder = out / "eval" / name
        for file in ("eval.json", "eval.md", "eval_samples.parquet"):
            assert (folder / file).read_bytes() == (out / file).read_bytes(), file
        out = folder
    report = json.loads((out / "eval.json").read_text())
    summary = report["summary"]
    samples = pq.read_table(out / "eval_samples.parquet").to_pydict()
    assert len(samples["prompt_id"]) == NUM_PROMPTS * k == summary["samples"]
    assert samples["correct"] == [r >= 1.0 for r in samples["reward"]]
    by_prompt = defaultdict(list)
    for pid, ok, text in zip(samples["prompt_id"], samples["correct"], samples["response"]):
        by_prompt[pid].append((ok, text))
    assert sorted(by_prompt) == sorted(row["prompt_id"] for row in report["prompts"])
    assert all(len(v) == k for v in by_prompt.values())
    mean_at_k = sum(sum(ok for ok, _ in v) / k for v in by_prompt.values()) / len(by_prompt)
    assert 0.0 <= summary["mean_at_k"] <= 1.0
    assert summary["mean_at_k"] == pytest.approx(mean_at_k, abs=1e-12)
    for kk in pass_at:
        expected = sum(1 - math.comb(k - sum(ok for ok, _ in v), kk) / math.comb(k, kk) for v in by_prompt.values())
        assert summary["pass_at"][str(kk)] == pytest.approx(expected / len(by_prompt), abs=1e-12)
    distinct = sum(len({t for ok, t in v if ok}) for v in by_prompt.values()) / len(by_prompt)
    assert summary["distinct_correct"] == pytest.approx(distinct, abs=1e-12)
    md = (out / "eval.md").read_text()
    assert f"| Mean@{k} | {summary['mean_at_k']:.4f} |" in md and md.count("| q") == NUM_PROMPTS
    return summary


# ---------------------------------------------------------------------------------------------- 1. disa run
def test_run_end_to_end_disa_on_gpt2(tiny_gpt2_path, tmp_path, capsys):
    config = write_config(tmp_path, tiny_gpt2_path)
    assert cli.main(["run", "-c", config]) == 0
    out = tmp_path / "run"
    printed = capsys.readouterr().err  # each stage's messages, named by the stage (disa.log)
    for verb in ("sample", "label", "fit-z", "train", "eval"):
        assert f"disa {verb}:" in printed

    samples = read_samples(out)
    assert len(samples["prompt_id"]) == NUM_PROMPTS * N
    assert len(list_shards(str(out / "samples"))) == math.ceil(NUM_PROMPTS / 3)
    rewards = samples["reward"]
    assert set(rewards) <= {0.0, 1.0} and 0 < sum(rewards) < len(rewards)  # the toy verifier gives a mix

    labels = pq.read_table(out / "labels.parquet").to_pydict()
    assert len(labels["prompt_id"]) == NUM_PROMPTS and set(labels["n"]) == {N}
    assert sorted(labels["prompt_id"]) == sorted(set(samples["prompt_id"]))
    for pid, rate in zip(labels["prompt_id"], labels["reward_rate"]):
        mine = [r for p, r in zip(samples["prompt_id"], rewards) if p == pid]
        assert rate == pytest.approx(sum(mine) / N)

    log_z_config = json.loads((out / "log_z" / "config.json").read_text())
    assert log_z_config["input_dim"] == log_z_config["meta"]["embedding_dim"] == hidden_size(tiny_gpt2_path)
    assert (out / "log_z" / "model.safetensors").is_file()
    report = json.loads((out / "log_z" / "report.json").read_text())
    assert report["n_train"] + report["n_val"] == NUM_PROMPTS and report["val_mse"] >= 0

    rows = metrics_rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["log_z_mean"])) for r in rows)
    assert (out / "checkpoints" / f"checkpoint-{STEPS}" / "policy" / "model.safetensors").is_file()
    train_config = json.loads((out / "checkpoints" / f"checkpoint-{STEPS}" / "train_config.json").read_text())
    assert train_config["objective"] == "disa" and train_config["objective_kwargs"] == {}
    target = json.loads((out / "checkpoints" / f"checkpoint-{STEPS}" / "target.json").read_text())
    assert target == {"beta": 2.0, "reward_transform": "affine"}
    # the labels and the log Z table describe themselves: the target they estimate, N, the models
    meta = json.loads(pq.read_schema(out / "labels.parquet").metadata[b"disa"])
    assert meta["target"] == target and meta["n"] == N
    assert meta["samples"]["reference_fingerprint"]["path"] == str(Path(tiny_gpt2_path).resolve())
    table = pq.read_table(out / "log_z" / "table.parquet")
    assert sorted(table.column("prompt_id").to_pylist()) == sorted(labels["prompt_id"])
    assert json.loads(table.schema.metadata[b"disa"])["target"] == target
    assert sum(table.column("held_out").to_pylist()) == report["n_val"]

    summary = check_eval_against_samples(out, K, [1, K], name=f"checkpoint-{STEPS}")
    assert summary["policy"].endswith(f"checkpoint-{STEPS}/policy")

    # train resumes from the newest checkpoint: one more step, not three
    assert cli.main(["train", "-c", config, "--set", f"train.num_steps={STEPS + 1}"]) == 0
    assert [int(r["step"]) for r in metrics_rows(out)] == list(range(1, STEPS + 2))
    assert "resumed at step 2" in capsys.readouterr().err
    # ...but not into a checkpoint made with other settings
    assert cli.main(["train", "-c", config, "--set", "train.lr=0.5"]) == 2
    assert "lr: 0.001 -> 0.5" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 2. verbs alone
def test_each_verb_alone_grpo_lora_on_llama(tiny_llama_path, tmp_path, capsys):
    config = write_config(tmp_path)  # models.reference left empty: it comes from --set
    out = tmp_path / "llama-run"
    sets = ["--set", f"models.reference={tiny_llama_path}", "--set", f"output_dir={out}",
            "--set", "train.objective=grpo", "--set", "train.lora={r: 2, alpha: 4, dropout: 0.0}"]

    assert cli.main(["sample", "-c", config, *sets]) == 0
    samples = read_samples(out)
    assert len(samples["prompt_id"]) == NUM_PROMPTS * N
    assert all(p.startswith("<s><|user|>") and p.endswith("<|assistant|>") for p in samples["prompt"])  # chat template
    assert not (out / "labels.parquet").exists()

    assert cli.main(["label", "-c", config, *sets]) == 0
    assert pq.read_metadata(out / "labels.parquet").num_rows == NUM_PROMPTS
    assert not (out / "log_z").exists()

    assert cli.main(["fit-z", "-c", config, *sets]) == 0
    assert json.loads((out / "log_z" / "config.json").read_text())["input_dim"] == hidden_size(tiny_llama_path)

    assert cli.main(["train", "-c", config, *sets]) == 0
    assert len(metrics_rows(out)) == STEPS
    policy = out / "checkpoints" / f"checkpoint-{STEPS}" / "policy"
    assert (policy / "adapter_config.json").is_file() and not (policy / "model.safetensors").exists()  # LoRA
    train_config = json.loads((policy.parent / "train_config.json").read_text())
    assert train_config["objective"] == "grpo" and train_config["lora"]["r"] == 2

    assert cli.main(["eval", "-c", config, *sets]) == 0  # the adapter checkpoint, applied to pi_ref
    adapter_summary = check_eval_against_samples(out, K, [1, K], name=f"checkpoint-{STEPS}")
    assert adapter_summary["policy"] == str(policy)

    assert cli.main(["eval", "-c", config, *sets, "--set", "eval.k=2", "--set", "eval.pass_at=[2]",
                     "--checkpoint", tiny_llama_path]) == 0  # any model folder, e.g. the reference itself
    summary = check_eval_against_samples(out, 2, [2], name=Path(tiny_llama_path).name)
    assert summary["policy"] == tiny_llama_path and summary["k"] == 2
    assert "Mean@2" in capsys.readouterr().err
    # the first evaluation is still there, untouched: two checkpoints' numbers side by side
    assert check_eval_against_samples(out / "eval" / f"checkpoint-{STEPS}", K, [1, K]) == adapter_summary
    assert sorted(p.name for p in (out / "eval").iterdir()) == sorted([f"checkpoint-{STEPS}", Path(tiny_llama_path).name])


# ---------------------------------------------------------------------------------------------- 3. sft
def test_sft_trains_on_the_reward_one_samples_only(tiny_gpt2_path, tmp_path, monkeypatch):
    import disa.training

    config = write_config(tmp_path, tiny_gpt2_path, train={"objective": "sft", "sft": {"num_epochs": 1, "micro_batch_size": 2}})
    assert cli.main(["sample", "-c", config]) == 0
    samples = read_samples(tmp_path / "run")
    winners = sorted((p, r) for p, r, w in zip(samples["prompt_id"], samples["response"], samples["reward"]) if w == 1)
    assert 0 < len(winners) < len(samples["reward"])

    seen = {}
    real = disa.training.train_sft

    def spy(policy, tokenizer, examples, config, **kw):
        seen["examples"] = list(examples)
        return real(policy, tokenizer, examples, config, **kw)

    monkeypatch.setattr(disa.training, "train_sft", spy)
    assert cli.main(["train", "-c", config]) == 0  # sft needs no labels and no log Z
    prompt_text = {f"q{i}": f"What is {i} + {i}? Put the answer in \\boxed{{}}." for i in range(1, NUM_PROMPTS)}
    prompt_text["q-chat"] = "Compute 7 * 6."
    by_text = {v: k for k, v in prompt_text.items()}
    assert sorted((by_text[p], r) for p, r in seen["examples"]) == winners
    rows = metrics_rows(tmp_path / "run")
    assert len(rows) == math.ceil(len(winners) / 2)  # one epoch of micro-batches of 2
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{len(rows)}" / "policy").is_dir()


def test_sft_without_reward_one_samples_is_a_clear_error(tiny_gpt2_path, tmp_path, capsys):
    config = write_config(tmp_path, tiny_gpt2_path, data={"verifier": "math"}, sample={"n": 2},
                          train={"objective": "sft"})
    assert cli.main(["sample", "-c", config]) == 0
    assert sum(read_samples(tmp_path / "run")["reward"]) == 0  # a random model never boxes the right number
    assert cli.main(["train", "-c", config]) == 2
    err = capsys.readouterr().err
    assert "no reward-1 samples among 10 Stage 1 samples" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- 4. errors
def test_missing_artefacts_name_the_file_and_the_verb(tmp_path, capsys):
    config = write_config(tmp_path, str(tmp_path))  # any existing folder: nothing gets loaded
    out = tmp_path / "run"
    for verb, missing, maker in [
        ("label", str(out / "samples" / "shard-*.parquet"), "disa sample"),
        ("fit-z", str(out / "labels.parquet"), "disa label"),
        ("train", str(out / "labels.parquet"), "disa label"),
        ("eval", str(out / "checkpoints"), "disa train"),
    ]:
        assert cli.main([verb, "-c", config]) == 2, verb
        err = capsys.readouterr().err
        assert missing in err and f"`{maker}" in err, (verb, err)


def test_config_errors_name_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: {temprature: 0.7}\n")
    assert cli.main(["sample", "-c", str(bad)]) == 2
    assert "sample.temprature: unknown field" in capsys.readouterr().err

    config = write_config(tmp_path)  # no models.reference
    assert cli.main(["sample", "-c", config]) == 2
    assert "models.reference: not set" in capsys.readouterr().err
    assert cli.main(["sample", "-c", config, "--set", f"models.reference={tmp_path / 'nope'}"]) == 2
    assert "is not a local folder" in capsys.readouterr().err
    assert cli.main(["sample", "-c", config, "--set", f"models.reference={tmp_path}",
                     "--set", "data.verifier=nonesuch"]) == 2
    assert "data.verifier: unknown verifier 'nonesuch'" in capsys.readouterr().err
    assert cli.main(["train", "-c", config, "--set", "train.objective_kwargs={beta: 3.0}"]) == 2
    assert "train.objective_kwargs: beta is not an objective hyperparameter" in capsys.readouterr().err


def test_eval_folder_names_keep_checkpoints_apart(tmp_path):
    from disa.config import config_from_dict
    from disa.run_dir import RunDir
    from disa.stages.evaluate import eval_name

    cfg = config_from_dict({"output_dir": str(tmp_path / "run")})
    ckpts = RunDir(cfg.output_dir).checkpoints
    assert RunDir(cfg.output_dir).eval == tmp_path / "run" / "eval"
    assert eval_name(cfg, ckpts / "checkpoint-100" / "policy") == "checkpoint-100"
    assert eval_name(cfg, ckpts / "checkpoint-200" / "policy") == "checkpoint-200"
    # another run's checkpoint-100 must not land on this run's eval/checkpoint-100/
    assert eval_name(cfg, tmp_path / "other" / "checkpoints" / "checkpoint-100" / "policy") == "other-checkpoint-100"
    assert eval_name(cfg, tmp_path / "trainer-run" / "checkpoint-7" / "policy") == "trainer-run-checkpoint-7"
    assert eval_name(cfg, tmp_path / "Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct"
    assert eval_name(cfg, tmp_path / "my model (v2)") == "my_model__v2_"


def test_train_knobs_reach_the_trainer_end_to_end(tiny_gpt2_path, tmp_path):
    """flowrl needs neither labels nor log_z/ (group r~): `disa train` alone, with every new train.* knob set."""
    knobs = {"objective": "flowrl", "weight_decay": 0.1, "warmup_steps": 1, "gradient_checkpointing": True,
             "generation_batch_size": 1, "keep_checkpoints": 1, "logz_head_layers": 1, "disable_dropout": False,
             "save_every": 1}
    config = write_config(tmp_path, tiny_gpt2_path, target={"reward_transform": "group"}, train=knobs)
    assert cli.main(["train", "-c", config]) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]  # keep_checkpoints=1
    saved = json.loads((ckpts / f"checkpoint-{STEPS}" / "train_config.json").read_text())
    for name, value in knobs.items():
        assert saved[name] == value, name
    assert len(metrics_rows(tmp_path / "run")) == STEPS


# ---------------------------------------------------------------------------------------------- 5. one flow
def test_stage3_refuses_a_target_other_than_the_labels(tiny_gpt2_path, tmp_path, capsys):
    """Labels made at beta = 2 with the affine r~ must not train a policy towards beta = 3 or another r~."""
    config = write_config(tmp_path, tiny_gpt2_path)
    for verb in ("sample", "label", "fit-z"):
        assert cli.main([verb, "-c", config]) == 0
    capsys.readouterr()
    assert cli.main(["train", "-c", config, "--set", "target.beta=3.0"]) == 2
    err = capsys.readouterr().err
    assert "target.beta: the config says 3.0" in err and "labels.parquet was made with beta = 2.0" in err
    assert cli.main(["train", "-c", config, "--set", "target.reward_transform=group"]) == 2
    err = capsys.readouterr().err
    assert "target.reward_transform: the config says 'group'" in err and "reward_transform = 'affine'" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was trained
    # GRPO reads no Stage 1 artefact, so another target is no concern of its
    assert cli.main(["train", "-c", config, "--set", "target.beta=3.0", "--set", "train.objective=grpo",
                     "--set", "train.num_steps=1"]) == 0


def test_a_users_objective_is_usable_from_config_and_train(tiny_gpt2_path, tmp_path, capsys):
    """A new objective is one file that registers itself: named in `plugins`, `disa config` lists it and its
    hyperparameters, and `disa train` trains with it, with beta from the target."""
    plugin = tmp_path / "my_objective.py"
    plugin.write_text(
        "from disa.objectives import register_objective, trajectory_balance_loss\n"
        "SEEN = []\n"
        "@register_objective('scaled_tb', family='trajectory_balance', log_z='zero')\n"
        "def scaled_tb(*, logp, ref_logp, mask, rewards, beta, log_z=None, scale: float = 1.0):\n"
        "    \"\"\"Trajectory balance with log Z = 0, times a constant.\"\"\"\n"
        "    import torch\n"
        "    SEEN.append((beta, scale))\n"
        "    zeros = torch.zeros(mask.shape[0])\n"
        "    loss, metrics = trajectory_balance_loss(logp=logp, ref_logp=ref_logp, mask=mask, rewards=rewards,\n"
        "                                            log_z=zeros, beta=beta)\n"
        "    return scale * loss, metrics\n"
    )
    config = write_config(tmp_path, tiny_gpt2_path, target={"reward_transform": "group"},
                          train={"objective": "scaled_tb", "objective_kwargs": {"scale": 0.5}})
    data = yaml.safe_load(Path(config).read_text())
    data["plugins"] = [str(plugin)]
    Path(config).write_text(yaml.safe_dump(data))
    assert cli.main(["config", "-c", config]) == 0
    printed = capsys.readouterr().out
    assert "train.objective=scaled_tb" in printed and "train.objective_kwargs.scale" in printed
    assert cli.main(["train", "-c", config]) == 0
    import sys

    seen = sys.modules["disa_plugin_my_objective"].SEEN
    assert seen and all(entry == (2.0, 0.5) for entry in seen)  # beta from target.beta, scale from the config
    assert len(metrics_rows(tmp_path / "run")) == STEPS
    assert cli.main(["train", "-c", config, "--set", "train.objective_kwargs={beta: 1.0}"]) == 2


def test_training_leaves_out_the_checkpoint_selection_slice():
    """`disa eval` selects checkpoints on a seeded slice of the training prompts; `disa train` must not train on it."""
    from disa import metrics
    from disa.config import config_from_dict
    from disa.data import PromptRecord
    from disa.stages.train import training_records

    records = [PromptRecord(id=f"p{i}", prompt=f"prompt {i}") for i in range(10)]
    assert training_records(config_from_dict({}), records) == records  # nothing held out by default
    cfg = config_from_dict({"eval": {"select_holdout": 3, "seed": 5}})
    kept = training_records(cfg, records)
    held = set(metrics.held_out_slice([r.id for r in records], 3, seed=5))
    assert len(kept) == 7 and not held & {r.id for r in kept}
    with pytest.raises(Exception, match="eval.select_holdout"):
        training_records(config_from_dict({"eval": {"select_holdout": 10}}), records)
