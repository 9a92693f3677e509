"""Run configs: strict YAML loading with errors that name the key and the file."""

import pytest

from trainer.config import RunConfig, dump_config, load_run_config
from trainer.config_loading import ConfigError, from_dict

import yaml


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_reference_recipe(tmp_path):
    config = load_run_config(write(tmp_path, "{}"))
    assert config.optimizer.lr == 1e-4 and config.optimizer.betas == (0.9, 0.999)
    assert config.optimizer.weight_decay == 5e-4 and config.data.batch_size == 64
    assert config.loss.lam_flip == 0.5 and config.loss.lam_perc == 1.0
    assert config.model.resolved_border_depth == pytest.approx(1.04)


def test_nested_values_and_int_to_float(tmp_path):
    config = load_run_config(write(tmp_path, "model:\n  image_size: 128\noptimizer:\n  lr: 1\n  betas: [0.5, 0.9]\n"))
    assert config.model.image_size == 128
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.optimizer.betas == (0.5, 0.9)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "model:\n  imgae_size: 128\n")
    with pytest.raises(ConfigError) as error:
        load_run_config(path)
    assert "model.imgae_size" in str(error.value) and str(path) in str(error.value)


def test_wrong_type_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: lots\n")
    with pytest.raises(ConfigError) as error:
        load_run_config(path)
    assert "train.max_steps" in str(error.value) and str(path) in str(error.value)


def test_bool_is_not_an_int_and_int_is_not_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_run_config(write(tmp_path, "data:\n  batch_size: true\n"))
    with pytest.raises(ConfigError, match="model.use_confidence"):
        load_run_config(write(tmp_path, "model:\n  use_confidence: 1\n"))


def test_invalid_value_and_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="min_depth"):
        load_run_config(write(tmp_path, "model:\n  min_depth: 2.0\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_run_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "model: [unclosed\n"))


def test_dump_round_trips():
    config = RunConfig()
    config.model.image_size = 128
    assert from_dict(RunConfig, yaml.safe_load(dump_config(config))) == config


def test_shipped_configs_load():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    run_configs = [path for path in sorted(configs.rglob("*.yaml"))
                   if "templates" not in path.parts and not path.name.startswith(("fleet", "ray-", "kuberay"))]
    assert configs / "default.yaml" in run_configs and configs / "experiments" / "cpu-reference-recipe.yaml" in run_configs
    for path in run_configs:
        config = load_run_config(path)
        assert config.train.max_steps is None or config.train.max_steps > 0, path
