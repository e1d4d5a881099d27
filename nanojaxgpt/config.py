"""Typed, frozen run configuration: a TOML file plus `--key=value` overrides.

A config has sections (model, mesh, data, optim, train, checkpoint). On the command line a key is
given as `--section.key=value`, or bare (`--n_layer=4`) when the key name is unique across sections,
so nanoGPT's own commands work unchanged. Unknown keys and values of the wrong type are errors that
name the key and the closest valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from nanojaxgpt import config_rules


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50257  # GPT-2 BPE; padded up to a multiple of `vocab_multiple` in the weights
    vocab_multiple: int = 64  # 50257 -> 50304; padding logits are never sampled nor counted in the loss
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # "gelu": GPT-2's tanh-approximate GELU (OpenAI's weights, llm.c); "gelu_exact": the erf GELU of
    # nanoGPT's model.py (nn.GELU()); "swiglu": a gated MLP of the same parameter count
    mlp: Literal["gelu", "gelu_exact", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    position: Literal["learned", "rope"] = "learned"
    attention: Literal["xla", "cudnn", "splash"] = "xla"  # kernel: see nanojaxgpt/attention.py
    remat: Literal["none", "full", "dots"] = "none"  # activation checkpointing of each block
    scan_layers: bool = True  # lax.scan over stacked blocks: compile time flat in depth
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # parameters are always float32

    # The fields a model's weights do not fix: how it runs, and how far its vocabulary is padded.
    # A pretrained or restored model takes these from the run's config, the rest from its own.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("dropout", "attention", "remat", "scan_layers",
                                                 "compute_dtype", "vocab_multiple")

    def runtime(self) -> dict[str, Any]:
        """This config's RUNTIME_FIELDS and their values."""
        return {k: getattr(self, k) for k in self.RUNTIME_FIELDS}

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class MeshConfig:
    # Device counts per mesh axis; their product is the global device count. -1 = the rest.
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Slices (TPU multislice) or, where devices have no slice, hosts that the data axis spans over
    # the data-centre network: only the once-per-step gradient reduction crosses it.
    slices: int = 1


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = "data/shakespeare_char"  # local path or gs://; written by tools/prepare_*.py
    # The order of the training windows (nanojaxgpt/data.py): "random" = nanoGPT's (a window at a
    # random offset, drawn with replacement); "epoch" = llm.c's (the split cut into consecutive
    # windows, each read once per epoch in an order shuffled anew every epoch).
    sampling: Literal["random", "epoch"] = "random"
    # A read of gs:// token records (the evaluation sets, a step's batch) still waiting after this
    # long is an error that stops the run (and every host), not a silent hang on stalled storage.
    read_timeout_s: float = 120.0


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    decay_lr: bool = True
    # The warmup: "nanogpt" = lr * (it + 1) / (warmup_iters + 1) (nanoGPT's get_lr), "llmc" =
    # lr * (it + 1) / warmup_iters (llm.c and build-nanogpt); both then decay by the same cosine.
    schedule: Literal["nanogpt", "llmc"] = "nanogpt"
    weight_decay: float = 1e-1  # on the Linear and Embedding weights only (nanojaxgpt/optim.py)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global norm; 0 disables


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "out"  # local path or gs://: checkpoints, TensorBoard logs, resolved config
    init_from: str = "scratch"  # "scratch", or a GPT-2 name / Hugging Face directory to fine-tune
    seed: int = 1337
    batch_size: int = 12  # global sequences per micro-step
    gradient_accumulation_steps: int = 1
    max_iters: int = 600000
    eval_interval: int = 2000
    eval_iters: int = 200
    log_interval: int = 10
    eval_only: bool = False  # evaluate the latest checkpoint (or the initial model) and exit
    profile_start: int = -1  # first step of a JAX profiler trace into out_dir (-1: none)
    profile_steps: int = 3  # steps in that trace
    profile_all_hosts: bool = False  # every host writes a trace, not only process 0
    hellaswag: bool = False  # HellaSwag accuracy at every eval (GPT-2 BPE data; nanojaxgpt/hellaswag.py)
    hellaswag_file: str = ""  # hellaswag_val.jsonl; "" = the cached copy, downloaded once
    hellaswag_limit: int = 0  # score the first N examples only (0 = all 10,042)
    # JAX's persistent compilation cache (nanojaxgpt/compile_cache.py): "" = out_dir/compile_cache,
    # "off", or a local or gs:// directory
    compilation_cache_dir: str = ""


@dataclass(frozen=True)
class CheckpointConfig:
    checkpoint_interval: int = 1000  # steps between async saves; one is always written at the end
    keep_checkpoints: int = 3
    save_timeout_s: float = 600.0  # a save still running after this long is an error
    # A gs:// run lock (out_dir/run.lock) not refreshed for this long is a dead run's: the next run
    # takes it over. A second run waits up to this long to tell a live holder from a dead one.
    lock_stale_s: float = 60.0


@dataclass(frozen=True)
class DistributedConfig:
    initialization_timeout_s: int = 300  # hosts must find the coordinator within this
    heartbeat_timeout_s: int = 100  # a dead host makes the others exit within about this


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def _all_qualified() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _keys(s)]


def _suggest(name: str, choices: list[str]) -> str:
    """The few closest keys (never the whole list): difflib's best three, however far."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(close)}?"
    nearest = difflib.get_close_matches(name, choices, n=3, cutoff=0.0)
    return f"the nearest keys are {', '.join(nearest)} (all keys: nanojaxgpt/config.py)"


def _resolve_key(key: str) -> tuple[str, str]:
    """`section.key` or a bare key that is unique across sections -> (section, key)."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; "
                              f"sections: {', '.join(SECTIONS)}")
        if name not in _keys(section):
            raise ConfigError(f"unknown config key {key!r}; "
                              + _suggest(name, [f"{section}.{k}" for k in _keys(section)] + _keys(section)))
        return section, name
    owners = [s for s in SECTIONS if key in _keys(s)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous; write one of "
                          + ", ".join(f"{s}.{key}" for s in owners))
    bare = [k for s in SECTIONS for k in _keys(s)]
    raise ConfigError(f"unknown config key {key!r}; " + _suggest(key, bare + _all_qualified()))


def _coerce(qualified: str, value: Any, annotation: Any) -> Any:
    """Check (and, for strings from the command line, parse) a value against a field's type."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{qualified}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{qualified}={value!r} must be a boolean (true or false)")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{qualified}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{qualified}={value!r} must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{qualified}={value!r} must be a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{qualified}={value!r} must be a string")
    raise TypeError(f"unsupported config field type {annotation!r} for {qualified}")  # a bug, not user input


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from nested {section: {key: value}} (or flat section.key) values."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for k, v in values.items():
        if isinstance(v, dict):
            if k not in SECTIONS:
                raise ConfigError(f"{source}: unknown section [{k}]; sections: {', '.join(SECTIONS)}")
            for kk, vv in v.items():
                _set(sections, f"{k}.{kk}", vv, source)
        else:
            _set(sections, k, v, source)
    try:
        cfg = Config(**{s: SECTIONS[s](**kv) for s, kv in sections.items()})
    except TypeError as e:  # pragma: no cover - _set checks keys first
        raise ConfigError(f"{source}: {e}") from None
    if (problem := next(config_rules.problems(cfg), None)) is not None:
        raise ConfigError(problem)
    return cfg


def _set(sections: dict[str, dict[str, Any]], key: str, value: Any, source: str) -> None:
    try:
        section, name = _resolve_key(key)
        sections[section][name] = _coerce(f"{section}.{name}", value, _field_types(section)[name])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`--key=value` arguments -> {key: value} (values stay strings; typed later)."""
    out: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot parse argument {arg!r}; overrides look like --n_layer=4 "
                              "or --model.n_layer=4")
        k, v = arg[2:].split("=", 1)
        out[k] = v
    return out


def load(path: str | Path | None, overrides: list[str] | dict[str, Any] = ()) -> Config:
    """Read a TOML config file (or start from defaults when path is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; the ones shipped are in configs/")
        try:
            values = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    cfg = from_dict(values, source=str(path) if path else "defaults")
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(list(overrides))
    if overrides:
        cfg = replace(cfg, overrides, source="command line")
    return resolve_paths(cfg)


def resolve_paths(cfg: Config) -> Config:
    """data_dir, out_dir and a local init_from as absolute paths (gs:// and model names as they
    are), so the run and everything it saves mean the same place whatever the working directory."""
    from nanojaxgpt.storage import absolute

    init_from = cfg.train.init_from  # "scratch", a GPT-2 name, or a directory
    if os.path.exists(init_from) or os.sep in init_from or init_from.startswith((".", "~")):
        init_from = absolute(init_from)
    cache_dir = cfg.train.compilation_cache_dir
    cache_dir = absolute(cache_dir) if cache_dir not in ("", "off") else cache_dir
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, data_dir=absolute(cfg.data.data_dir)),
        train=dataclasses.replace(cfg.train, out_dir=absolute(cfg.train.out_dir),
                                  init_from=init_from,
                                  hellaswag_file=cfg.train.hellaswag_file and absolute(cfg.train.hellaswag_file),
                                  compilation_cache_dir=cache_dir))


def replace(cfg: Config, overrides: dict[str, Any], source: str = "overrides") -> Config:
    """A copy of cfg with `{key: value}` overrides applied (keys as on the command line)."""
    values = cfg.to_dict()
    for k, v in overrides.items():
        try:
            section, name = _resolve_key(k)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        values[section][name] = v
    return from_dict(values, source=source)


def from_json(text: str) -> Config:
    """The resolved config as saved in a run directory or checkpoint."""
    return from_dict(json.loads(text), source="saved config")


def to_toml_like(cfg: Config) -> str:
    """A readable, sectioned dump of the resolved config, for the console."""
    lines = []
    for s, kv in cfg.to_dict().items():
        lines.append(f"[{s}]")
        lines += [f"  {k} = {v!r}" for k, v in kv.items()]
    return "\n".join(lines)

