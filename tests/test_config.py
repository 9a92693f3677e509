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


# -- fidelity options (issue 12 item 6) and the model-config hash ------------------------------------

# model_config_hash of these model sections as written before pixel_centre and shading_normal_eps
# existed (commit 4209795): checkpoints saved then must still resume.
HASH_BEFORE_FIDELITY_OPTIONS = {"reference defaults": "17ef9b10ee2a0124",
                                "configs/experiments/blobs-default-recipe.yaml": "c4d36e4726a7cf9c"}


def test_fidelity_options_defaults_validation_and_yaml():
    from trainer.model.config import ModelConfig

    model = ModelConfig()
    assert (model.supersample, model.pixel_centre, model.shading_normal_eps) == (1, "integer", None)
    with pytest.raises(ValueError, match="pixel_centre"):
        ModelConfig(pixel_centre="centre")
    with pytest.raises(ValueError, match="shading_normal_eps"):
        ModelConfig(shading_normal_eps=0.0)
    config = RunConfig()
    config.model.shading_normal_eps, config.model.pixel_centre = 1e-7, "reference"
    assert from_dict(RunConfig, yaml.safe_load(dump_config(config))) == config
    # YAML reads 1e-7 (no dot) as a string: an error naming the key, not a silent default.
    with pytest.raises(ConfigError, match="model.shading_normal_eps"):
        from_dict(RunConfig, yaml.safe_load("model:\n  shading_normal_eps: 1e-7\n"))


def test_synface_config_sets_the_authors_choices():
    from pathlib import Path

    model = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "synface.yaml").model
    assert (model.supersample, model.pixel_centre, model.shading_normal_eps) == (2, "reference", 1e-7)


def test_model_config_hash_counts_the_options_but_old_checkpoints_still_match():
    from pathlib import Path

    from trainer.model.config import ModelConfig, model_config_hash

    default_yaml = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "experiments"
                                   / "blobs-default-recipe.yaml").model
    assert model_config_hash(ModelConfig()) == HASH_BEFORE_FIDELITY_OPTIONS["reference defaults"]
    assert model_config_hash(default_yaml) == HASH_BEFORE_FIDELITY_OPTIONS["configs/experiments/blobs-default-recipe.yaml"]
    # An old checkpoint's model section (no new keys) loads with the defaults and the same hash.
    old_section = yaml.safe_load(dump_config(RunConfig()))["model"]
    del old_section["pixel_centre"], old_section["shading_normal_eps"]
    old = from_dict(ModelConfig, old_section, "model")
    assert old == ModelConfig() and model_config_hash(old) == HASH_BEFORE_FIDELITY_OPTIONS["reference defaults"]
    # Each option changes the rendering, so each changes the hash (and resuming across it is refused).
    hashes = {model_config_hash(ModelConfig(**change))
              for change in ({}, {"supersample": 2}, {"pixel_centre": "reference"}, {"shading_normal_eps": 1e-7},
                             {"shading_normal_eps": 1e-6})}
    assert len(hashes) == 5
