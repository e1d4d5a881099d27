"""Config files, overrides and their errors."""

import json
from pathlib import Path

import pytest

from nanojaxgpt import config
from nanojaxgpt.config import ConfigError

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = config.load(path)
    assert cfg.model.n_embd % cfg.model.n_head == 0


def test_nanogpt_style_bare_overrides():
    cfg = config.load("configs/shakespeare_char.toml",
                      ["--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                       "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"])
    assert (cfg.model.block_size, cfg.train.batch_size, cfg.model.n_layer) == (64, 12, 4)
    assert (cfg.model.n_embd, cfg.train.max_iters, cfg.optim.lr_decay_iters) == (128, 2000, 2000)
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.model.n_head == 4 and cfg.model.bias is False  # from the file


def test_qualified_overrides_and_types():
    cfg = config.load(None, ["--mesh.fsdp=2", "--model.bias=false", "--learning_rate=3e-4",
                             "--max_iters=1_000"])
    assert cfg.mesh.fsdp == 2 and cfg.model.bias is False
    assert cfg.optim.learning_rate == 3e-4 and cfg.train.max_iters == 1000


def test_unknown_key_names_the_closest_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'n_layr'.*n_layer"):
        config.load(None, ["--n_layr=4"])
    with pytest.raises(ConfigError, match=r"model.n_layr.*model.n_layer"):
        config.load(None, ["--model.n_layr=4"])
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        config.load(None, ["--modle.n_layer=4"])


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"model.n_layer='four' must be an integer"):
        config.load(None, ["--n_layer=four"])
    with pytest.raises(ConfigError, match=r"model.mlp='relu' is not one of 'gelu', 'swiglu'"):
        config.load(None, ["--mlp=relu"])
    with pytest.raises(ConfigError, match=r"model.bias='maybe' must be a boolean"):
        config.load(None, ["--bias=maybe"])


def test_bad_files_and_values(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layers = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*n_layers.*n_layer"):
        config.load(bad)
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="divisible"):
        config.load(None, ["--n_embd=100", "--n_head=3"])
    with pytest.raises(ConfigError, match="at most one"):
        config.load(None, ["--mesh.data=-1", "--mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match="cannot parse argument"):
        config.load(None, ["n_layer=4"])


def test_json_round_trip():
    cfg = config.load("configs/gpt2_124m.toml", ["--n_layer=2"])
    again = config.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["model"]["n_layer"] == 2
