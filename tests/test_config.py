import pytest
import yaml

from disa.config import ConfigError, PipelineConfig, config_from_dict, describe, load_config


def test_defaults_match_paper():
    cfg = config_from_dict({})
    assert cfg.sample.n == 8 and cfg.train.group_size == 8
    assert cfg.label.beta == 15.0
    assert isinstance(cfg, PipelineConfig)


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sample": {"n": 4}, "train": {"objective": "grpo", "lr": 1e-5}}))
    cfg = load_config(path, overrides=["label.beta=2", "train.lora={r: 4}"])
    assert cfg.sample.n == 4
    assert cfg.train.objective == "grpo"
    assert cfg.label.beta == 2.0 and isinstance(cfg.label.beta, float)
    assert cfg.train.lora == {"r": 4}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"sample": {"temprature": 1.0}}, r"sample\.temprature: unknown field"),
        ({"sample": {"n": "eight"}}, r"sample\.n: expected int"),
        ({"sample": {"n": True}}, r"sample\.n: expected int"),
        ({"sample": {"n": 0}}, r"sample\.n: must be > 0"),
        ({"label": {"beta": -1}}, r"label\.beta: must be > 0"),
        ({"label": {"reward_transform": "zscore"}}, r"label\.reward_transform: 'zscore' is not one of"),
        ({"train": {"objective": "ppo"}}, r"train\.objective"),
        ({"train": {"top_p": 1.5}}, r"train\.top_p"),
        ({"eval": {"k": 4, "pass_at": [1, 8]}}, r"eval\.pass_at"),
        ({"fit_z": 3}, r"fit_z: expected a mapping"),
        ({"models": {"cpu_threads": 0}}, r"models\.cpu_threads: must be >= 1"),
        ({"models": {"cpu_threads": "all"}}, r"models\.cpu_threads: expected int"),
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


# ---------------------------------------------------------------------------------------------- train.* -> trainer
def _nondefault(value, name):
    """A valid value different from ``value`` for a train.* knob (used to see that each one is passed on)."""
    if isinstance(value, bool):
        return not value
    if name == "seed":
        return value + 7
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 2 + 0.5 if name != "top_p" else 0.9
    return None


def test_every_trainer_knob_is_a_train_field_or_filled_by_the_pipeline():
    import dataclasses

    from disa.config import TrainSection
    from disa.pipeline import TRAIN_CONFIG_FROM_ELSEWHERE
    from disa.trainer import TrainConfig

    section = {f.name: f for f in dataclasses.fields(TrainSection)}
    trainer = {f.name: f for f in dataclasses.fields(TrainConfig)}
    missing = sorted(set(trainer) - set(section) - set(TRAIN_CONFIG_FROM_ELSEWHERE))
    assert not missing, f"TrainConfig fields with no train.* field and no pipeline source: {missing}"
    for name in ("weight_decay", "warmup_steps", "gradient_checkpointing", "generation_batch_size",
                 "keep_checkpoints", "logz_head_layers", "disable_dropout"):
        assert name in section and section[name].metadata["help"]
    # a shared knob means the same thing with the same default, whether set through disa train or the trainer API
    for name in set(section) & set(trainer) - {"objective"}:
        assert section[name].default == trainer[name].default, name


def test_every_shared_train_field_reaches_train_config(tmp_path):
    import dataclasses

    from disa.config import TrainSection
    from disa.pipeline import _train_config
    from disa.trainer import TrainConfig

    shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(TrainSection)}
    train = {}
    for name in sorted(shared):
        value = _nondefault(getattr(TrainSection(), name), name)
        if value is not None:
            train[name] = value
    assert {"weight_decay", "warmup_steps", "gradient_checkpointing", "generation_batch_size", "keep_checkpoints",
            "logz_head_layers", "disable_dropout", "save_every", "lr", "logz_lr"} <= set(train)
    train.update(objective="flowrl", lora={"r": 4}, mixed_precision="bf16", log_with="tensorboard")
    cfg = config_from_dict({"train": train, "sample": {"stop": ["###"]}, "label": {"beta": 3.0}})
    built = _train_config(cfg, tmp_path / "ckpts")
    for name in shared - {"objective_kwargs"}:
        assert getattr(built, name) == getattr(cfg.train, name), name
    assert built.objective_kwargs == {"beta": 3.0} and built.stop == ["###"]
    assert built.output_dir == str(tmp_path / "ckpts") and built.reward_transform == "affine"
    assert built.lora is not cfg.train.lora  # a copy: the trainer may not mutate the config


def test_sft_config_gets_the_shared_train_fields(tmp_path):
    from disa.pipeline import _from_train_section
    from disa.sft import SFTConfig

    cfg = config_from_dict({"train": {"objective": "sft", "weight_decay": 0.1, "warmup_steps": 5, "sft_epochs": 2,
                                      "gradient_checkpointing": True, "keep_checkpoints": 2, "save_every": 0}})
    built = _from_train_section(cfg.train, SFTConfig, num_epochs=cfg.train.sft_epochs, output_dir=str(tmp_path))
    assert (built.weight_decay, built.warmup_steps, built.num_epochs) == (0.1, 5, 2)
    assert built.gradient_checkpointing and built.keep_checkpoints == 2 and built.save_every == 0
    assert built.lr == cfg.train.lr and built.output_dir == str(tmp_path)


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
