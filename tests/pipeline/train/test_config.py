"""Config: defaults, YAML and --set only override, unknown keys and wrong types rejected."""

import pytest

from pipeline.train.config import (
    ConfigError,
    TrainConfig,
    flat_params,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)


def test_defaults_without_file():
    assert load_config() == TrainConfig()


def test_yaml_then_set_override_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 4\n  view_size: [64, 96]\noptim:\n  lr: 0.01\n")
    config = load_config(path, ["optim.lr=3e-4", "scaling.num_workers=1", "optim.epochs=2"])
    assert config.data.batch_size == 4
    assert config.data.view_size == (64, 96)
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.scaling.num_workers == 1
    assert config.optim.epochs == 2
    assert config.data.micro_batches == TrainConfig().data.micro_batches  # untouched default


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"'data.batch_size'.*expected int.*float"):
        load_config(None, ["data.batch_size=2.5"])


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.batch_sise'.*bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'"):
        load_config(None, ["optimizer.lr=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'scaling.use_gpu'.*expected bool"):
        load_config(None, ["scaling.use_gpu=yes please"])
    with pytest.raises(ConfigError, match=r"'data.view_size\[1\]'"):
        load_config(None, ["data.view_size=[64, x]"])
    with pytest.raises(ConfigError, match=r"section 'data'.*mapping"):
        load_config(None, ["data=3"])


def test_range_checks():
    with pytest.raises(ConfigError, match="micro_batches"):
        load_config(None, ["data.micro_batches=0"])
    with pytest.raises(ConfigError, match="scheduler"):
        load_config(None, ["optim.scheduler=linear"])
    with pytest.raises(ConfigError, match="hedge_after_s"):
        load_config(None, ["reader.hedge_after_s=-0.1"])
    with pytest.raises(ConfigError, match="hedge_after_s"):  # would never hedge
        load_config(None, ["reader.hedge_after_s=2", "reader.request_timeout_s=2"])
    assert load_config(None, ["reader.hedge_after_s=0"]).reader.hedge_after_s == 0.0  # off


def test_model_overrides_merge_key_by_key():
    config = load_config(
        None, ["model.overrides={n_patches: 4, patch_size: 32}", "model.overrides.patch_size=64"]
    )
    assert config.model.overrides == {"n_patches": 4, "patch_size": 64}


def test_parse_override_rejects_missing_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("data.batch_size")


def test_save_load_round_trip_and_flat_params(tmp_path):
    config = load_config(None, ["model.overrides.n_patches=3", "data.view_size=[32, 32]"])
    path = save_config(config, tmp_path / "run" / "config.yaml")
    assert load_config(path) == config
    assert from_dict(to_dict(config)) == config
    params = flat_params(config)
    assert params["model.overrides.n_patches"] == "3"
    assert params["data.batch_size"] == str(config.data.batch_size)
    assert params["data.view_size"] == "[32, 32]"


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        TrainConfig().data.batch_size = 3  # type: ignore[misc]


def test_placement_strategy_is_one_of_rays():
    assert load_config(None, []).scaling.placement_strategy == "PACK"
    assert load_config(None, ["scaling.placement_strategy=SPREAD"]).scaling.placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match=r"'scaling.placement_strategy'.*'spread'"):
        load_config(None, ["scaling.placement_strategy=spread"])
