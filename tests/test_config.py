import pytest

import yaml
from bdm_cli.config import Config, ConfigError, from_dict, list_presets, load_config, preset_path, to_dict


def test_defaults_and_presets_load():
    assert load_config().diffusion.sigma_blur_max == 20.0
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.preset == name
        assert from_dict(to_dict(cfg)) == cfg


def test_extends_and_differences_only():
    base, ddpm = load_config("cifar10"), load_config("ddpm_cifar10")
    assert ddpm.diffusion.sigma_blur_max == 0.0
    assert ddpm.model == base.model and ddpm.train == base.train


def test_overrides_and_types():
    cfg = load_config("cifar10", ["train.lr=1e-3", "model.channel_mult=1,2", "data.hflip=false", "train.steps=5"])
    assert cfg.train.lr == 1e-3 and cfg.model.channel_mult == (1, 2) and cfg.data.hflip is False and cfg.train.steps == 5
    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        load_config("cifar10", ["train.lr=abc"])
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        load_config("cifar10", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config("cifar10", ["trian.lr=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("cifar10", ["lr=1"])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  channels: 32\n   dropout: [0.1\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  chanels: 32\n")
    with pytest.raises(ConfigError, match="did you mean model.channels"):
        load_config(str(unknown))


def test_frozen():
    with pytest.raises(Exception):
        Config().train.lr = 1.0  # type: ignore[misc]


def test_presets_hold_only_differences():
    """A preset sets only values that differ from what it extends (or the defaults): a repeated default would
    silently stop following it."""
    for name in list_presets():
        data = yaml.safe_load(preset_path(name).read_text())  # only its keys: the values are bdm's to read
        parent = data.pop("extends", None)
        base, mine = to_dict(load_config(parent) if parent else Config()), to_dict(load_config(name))
        repeated = [f"{section}.{key}" for section, values in data.items() for key in values
                    if base[section][key] == mine[section][key]]
        assert not repeated, f"{name} repeats {repeated}"
