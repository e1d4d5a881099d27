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
    with pytest.raises(ConfigError, match=r"model.mlp='relu' is not one of 'gelu', 'gelu_exact', 'swiglu'"):
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


@pytest.mark.parametrize("override,message", [
    ("--learning_rate=0", "optim.learning_rate=0.0 must be positive"),
    ("--learning_rate=-1e-3", "must be positive"),
    ("--learning_rate=nan", "optim.learning_rate=nan must be a finite number"),
    ("--min_lr=-1e-5", r"optim.min_lr=-1e-05 must be in \[0, optim.learning_rate"),
    ("--min_lr=1e-2", r"optim.min_lr=0.01 must be in \[0, optim.learning_rate=0.0006\]"),
    ("--beta1=1.0", r"optim.beta1=1.0 must be in \[0, 1\)"),
    ("--beta2=-0.1", r"optim.beta2=-0.1 must be in \[0, 1\)"),
    ("--grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0"),
    ("--weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("--warmup_iters=700000", "optim.warmup_iters=700000 must be <= optim.lr_decay_iters=600000"),
    ("--warmup_iters=-1", "optim.warmup_iters=-1 must be >= 0"),
    ("--eval_iters=0", "train.eval_iters=0 must be positive"),
    ("--log_interval=0", "train.log_interval=0 must be positive"),
    ("--max_iters=-5", "train.max_iters=-5 must be >= 0"),
    ("--save_timeout_s=0", "checkpoint.save_timeout_s=0.0 must be positive"),
    ("--heartbeat_timeout_s=0", "distributed.heartbeat_timeout_s=0 must be positive"),
    ("--dropout=1.0", r"model.dropout=1.0 must be in \[0, 1\)"),
    ("--out_dir= ", "train.out_dir must not be empty"),
    ("--attention=splash", "attention='splash' tiles the sequence in blocks of 128, but model.block_size=100"),
    ("--attention=cudnn", "attention='cudnn' .* runs in bfloat16"),
])
def test_values_are_checked_not_only_types(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, ["--block_size=100", override])


def test_schedule_checks_follow_decay_lr():
    # Without decay the warmup may outlast lr_decay_iters: the schedule is the constant rate.
    cfg = config.load(None, ["--decay_lr=false", "--warmup_iters=10", "--lr_decay_iters=5"])
    assert cfg.optim.warmup_iters == 10


def test_a_misspelt_key_lists_a_few_keys_never_all():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["--zzqqxx=1"])
    listed = str(e.value).split("the nearest keys are ")[1].split(" (")[0].split(", ")
    assert len(listed) == 3 and all(k in config._all_qualified() or "." not in k for k in listed)
    assert len(str(e.value)) < 200


def test_local_paths_are_resolved_once_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ft").mkdir(parents=True)
    cfg = config.load(None, ["--out_dir=out-x", "--data_dir=data/x", "--init_from=runs/ft"])
    assert cfg.train.out_dir == str(tmp_path / "out-x")
    assert cfg.data.data_dir == str(tmp_path / "data" / "x")
    assert cfg.train.init_from == str(tmp_path / "runs" / "ft")
    # Saved resolved: the saved config means the same place from any working directory.
    assert config.from_json(cfg.to_json()).train.out_dir == str(tmp_path / "out-x")
    cloud = config.load(None, ["--out_dir=gs://b/run", "--data_dir=gs://b/data", "--init_from=gpt2"])
    assert (cloud.train.out_dir, cloud.data.data_dir, cloud.train.init_from) == (
        "gs://b/run", "gs://b/data", "gpt2")
    assert config.load(None, ["--out_dir=~/r"]).train.out_dir == str(Path.home() / "r")


def test_the_10b_token_recipe_is_llm_c_s_run():
    """llm.c's scripts/run_gpt2_124M.sh: -b 64 -t 1024 -d 524288 -l 0.0006 -q 0.0 -u 700 -c 0.1,
    18,865 steps, its schedule (llmc/schedulers.h), one epoch in shuffled order."""
    from nanojaxgpt import optim

    cfg = config.load("configs/gpt2_124m_fineweb10b.toml")
    t, o, m = cfg.train, cfg.optim, cfg.model
    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * m.block_size
    assert tokens_per_step == 524_288 and t.max_iters == o.lr_decay_iters == 18_865
    assert (m.n_layer, m.n_head, m.n_embd, m.vocab_size) == (12, 12, 768, 50257)
    assert (o.learning_rate, o.min_lr, o.warmup_iters, o.weight_decay, o.beta1, o.beta2,
            o.grad_clip) == (6e-4, 0.0, 700, 0.1, 0.9, 0.95, 1.0)
    assert o.schedule == "llmc" and cfg.data.sampling == "epoch"
    lr = [float(optim.learning_rate(o, s)) for s in (0, 699, 700, 9782, 18_864)]
    assert abs(lr[0] - 6e-4 / 700) < 1e-12 and abs(lr[1] - 6e-4) < 1e-10  # full rate at step 699
    assert abs(lr[2] - 6e-4) < 1e-10 and abs(lr[3] - 3e-4) < 1e-7 and 0 < lr[4] < 1e-10
    assert t.hellaswag and t.eval_interval == 250
    assert t.eval_iters * t.batch_size * m.block_size == 10_485_760  # llm.c's 20 x 524,288 val tokens
