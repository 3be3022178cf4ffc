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
