import pytest
import yaml

from disa.config import ConfigError, PipelineConfig, config_from_dict, load_config
from disa.config_help import describe


def test_defaults_match_paper():
    cfg = config_from_dict({})
    assert cfg.sample.n == 8 and cfg.train.group_size == 8
    assert cfg.target.beta == 15.0
    assert isinstance(cfg, PipelineConfig)


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sample": {"n": 4}, "train": {"objective": "grpo", "lr": 1e-5}}))
    cfg = load_config(path, overrides=["target.beta=2", "train.lora={r: 4}"])
    assert cfg.sample.n == 4
    assert cfg.train.objective == "grpo"
    assert cfg.target.beta == 2.0 and isinstance(cfg.target.beta, float)
    assert cfg.train.lora == {"r": 4}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"sample": {"temprature": 1.0}}, r"sample\.temprature: unknown field"),
        ({"sample": {"n": "eight"}}, r"sample\.n: expected int"),
        ({"sample": {"n": True}}, r"sample\.n: expected int"),
        ({"sample": {"n": 0}}, r"sample\.n: must be > 0"),
        ({"target": {"beta": -1}}, r"target\.beta: must be > 0"),
        ({"target": {"beta": float("inf")}}, r"target\.beta: must be > 0 and finite"),
        ({"target": {"reward_transform": "zscore"}}, r"target\.reward_transform: 'zscore' is not one of"),
        ({"train": {"objective_kwargs": {"beta": 3.0}}}, r"train\.objective_kwargs: beta is not an objective"),
        ({"train": {"objective": "grpo", "objective_kwargs": {"clip": 0.1}}}, r"'clip' is not a hyperparameter of objective 'grpo'"),
        ({"train": {"sft": {"lr": 0}}}, r"train\.sft\.lr: must be > 0"),
        ({"train": {"sft": {"lora": {"r": 0}}}}, r"train\.sft\.lora\.r: must be an int > 0"),
        ({"train": {"max_grad_norm": float("nan")}}, r"train\.max_grad_norm: must be >= 0"),
        ({"sample": {"temperature": float("inf")}}, r"sample\.temperature: must be > 0 and finite"),
        ({"eval": {"pass_at": []}}, r"eval\.pass_at"),
        ({"fit_z": {"patience": -5}}, r"fit_z\.patience: must be > 0"),
        ({"train": {"objective": "ppo"}}, r"train\.objective"),
        ({"train": {"top_p": 1.5}}, r"train\.top_p"),
        ({"eval": {"k": 4, "pass_at": [1, 8]}}, r"eval\.pass_at"),
        ({"fit_z": 3}, r"fit_z: expected a mapping"),
        ({"models": {"cpu_threads": 0}}, r"models\.cpu_threads: must be 'auto', an int >= 1 or null, got 0"),
        ({"models": {"cpu_threads": "all"}}, r"models\.cpu_threads: must be 'auto', an int >= 1 or null, got 'all'"),
        ({"models": {"cpu_threads": 1.5}}, r"models\.cpu_threads: expected str, got float"),
    ],
)
def test_bad_fields_are_named(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: {n: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: train\.lr: expected float"):
        load_config(wrong)


def test_every_field_has_help():
    rows = describe()
    assert len(rows) > 30
    assert all(help_text for _, _, help_text in rows), [r for r in rows if not r[2]]


# ---------------------------------------------------------------------------------------------- one tree
def test_train_section_is_the_trainer_config_and_sft_has_one_set_of_defaults():
    from disa.config import SFTConfig, TrainConfig

    cfg = config_from_dict({})
    assert type(cfg.train) is TrainConfig and type(cfg.train.sft) is SFTConfig
    assert cfg.train.sft == SFTConfig() == TrainConfig().sft  # whichever way a run starts
    assert cfg.train.sft.lora is not None and cfg.train.sft.lr == 1e-4 and cfg.train.lr == 1e-6
    assert TrainConfig.from_dict(cfg.train.to_dict()) == cfg.train  # what a checkpoint saves, read back


def test_direct_construction_is_validated_like_yaml():
    from disa.config import SFTConfig, TrainConfig

    with pytest.raises(ConfigError, match=r"TrainConfig\.group_size: must be > 0"):
        TrainConfig(group_size=0)
    with pytest.raises(ConfigError, match=r"SFTConfig\.aggregation: 'sum' is not one of"):
        SFTConfig(aggregation="sum")


def test_describe_lists_every_objective_and_its_hyperparameters():
    rows = {path: (default, help_text) for path, default, help_text in describe()}
    for name in ("disa", "flowrl", "flowrl_no_logz", "grpo", "gspo", "aspo", "sft"):
        assert f"train.objective={name}" in rows
    assert rows["train.objective=disa"][0] == "trajectory_balance, log Z: table"  # its default log Z source
    assert rows["train.objective=flowrl"][0] == "trajectory_balance, log Z: learned"
    assert "train.sft.num_epochs" in rows and "target.beta" in rows and "eval.temperature" in rows
    assert "  train.objective_kwargs.clip_eps" in rows  # grpo's
    assert "  train.objective_kwargs.beta" not in rows  # the target's, not a hyperparameter


def test_override_errors_name_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: runs/x\nsample: {n: 2}\n")
    with pytest.raises(ConfigError, match=r"output_dir is a value, not a section"):
        load_config(path, overrides=["output_dir.x=1"])
    with pytest.raises(ConfigError, match=r"^--set sample\.n=lots: sample\.n: expected int"):
        load_config(path, overrides=["sample.n=lots"])  # the override is at fault, not the file
    with pytest.raises(ConfigError, match=r"expected SECTION\.FIELD=VALUE"):
        load_config(path, overrides=["train.lr"])


def test_save_every_zero_means_only_at_the_end():
    assert config_from_dict({"train": {"save_every": 0}}).train.save_every == 0
    assert "0 = only at the end" in dict((r[0], r[2]) for r in describe())["train.save_every"]


@pytest.mark.parametrize(
    "train, match",
    [
        ({"save_every": -1}, r"train\.save_every: must be >= 0"),
        ({"weight_decay": -0.1}, r"train\.weight_decay: must be >= 0"),
        ({"warmup_steps": -1}, r"train\.warmup_steps: must be >= 0"),
        ({"keep_checkpoints": -2}, r"train\.keep_checkpoints: must be >= 0"),
        ({"generation_batch_size": 0}, r"train\.generation_batch_size: must be > 0"),
        ({"logz_head_layers": 0}, r"train\.logz_head_layers: must be > 0"),
        ({"logz_lr": 0.0}, r"train\.logz_lr: must be > 0"),
        ({"gradient_checkpointing": "yes"}, r"train\.gradient_checkpointing: expected bool"),
        ({"disable_dropout": 1}, r"train\.disable_dropout: expected bool"),
        ({"warmup_steps": 1.5}, r"train\.warmup_steps: expected int"),
    ],
)
def test_new_train_knobs_are_validated(train, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"train": train})


def test_a_bad_value_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sample: {n: lots}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: sample\.n: expected int"):
        load_config(path, overrides=["train.lr=1.0e-5"])


@pytest.mark.parametrize("written, value", [("1e-6", 1e-6), ("3E+2", 300.0), ("-0.5", -0.5), ("2.", 2.0)])
def test_yaml_numbers_are_read_as_users_write_them(tmp_path, written, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"train: {{weight_decay: 0.0}}\nfit_z: {{lr: {written}}}\n")
    if value > 0:
        assert load_config(path).fit_z.lr == value
        assert load_config(None, [f"train.lr={written}"]).train.lr == value
    else:
        with pytest.raises(ConfigError, match=r"fit_z\.lr: must be > 0"):
            load_config(path)


def test_words_are_not_numbers():
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got str \('fast'\)"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.lr: expected float"):
        load_config(None, ["train.lr=nan"])  # YAML spells it .nan; a word stays a word


@pytest.mark.parametrize("override, match", [
    ("sample.seed=-1", r"sample\.seed: must be >= 0"),
    ("train.max_grad_norm=-1", r"train\.max_grad_norm: must be >= 0"),
    ("data.long_prompts=truncate", r"data\.long_prompts: 'truncate' is not one of"),
])
def test_more_ranges_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_starting_yaml_is_a_commented_config_that_loads_as_the_defaults():
    from disa.config_help import starting_yaml

    text = starting_yaml()
    data = yaml.safe_load(text)
    assert list(data)[:3] == ["output_dir", "plugins", "stage1_dir"]
    assert {"data", "models", "target", "sample", "fit_z", "train", "eval"} <= set(data)
    assert config_from_dict(data) == config_from_dict({})
    assert "  # Proposal samples per prompt, N (paper: 8).\n  n: 8\n" in text  # help above each field
    assert "#   train.objective=disa" in text  # the objectives, as comments


def test_cpu_threads_auto_takes_the_free_cores_and_says_so(monkeypatch, caplog):
    caplog.set_level("INFO", logger="disa")
    import torch

    import disa.threads
    from disa.stages.common import apply_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(disa.threads, "machine_load", lambda: (4, 2.2))
        apply_cpu_threads("sample", "auto")
        assert torch.get_num_threads() == 2
        said = [(r.name, r.verb, r.getMessage()) for r in caplog.records]
        assert ("disa.stages.sample", "sample",
                "2 torch thread(s) on 4 core(s), load average 2.2 (models.cpu_threads: auto)") in said
        apply_cpu_threads("sample", 3)
        assert torch.get_num_threads() == 3
        apply_cpu_threads("sample", None)  # torch's default is left alone
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert load_config(None).models.cpu_threads == "auto"
    assert load_config(None, ["models.cpu_threads=2"]).models.cpu_threads == 2


def test_a_renamed_field_says_its_new_name():
    with pytest.raises(ConfigError, match=r"train\.log_with: renamed to train\.report_to"):
        config_from_dict({"train": {"log_with": "tensorboard"}})
