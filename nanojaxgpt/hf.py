"""GPT-2 weights from a Hugging Face directory (config.json + model.safetensors) into GPT, and back.

    load("gpt2")              the hub's GPT-2 small (needs internet and `pip install nanojaxgpt[hub]`)
    load("path/to/dir")       a directory as transformers' save_pretrained writes it
    save(model, "out/hf")     config.json + model.safetensors that GPT2LMHeadModel.from_pretrained opens

Hugging Face's GPT-2 uses Conv1D, whose weights are already [in, out] like ours; only the attention
weights are reshaped so heads are a real dim: c_attn [E, 3E] <-> [E, 3, n_head, head_dim] and
attn.c_proj [E, E] <-> [n_head, head_dim, E]. The per-layer tensors h.{i}.* are stacked into our
"layers" dim; wte gets zero rows up to the padded vocabulary (removed again on export).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanojaxgpt.config import ModelConfig
from nanojaxgpt.model import GPT, abstract_model

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
_HUB_REPO = "openai-community/{}"
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some GPT-2 files carry
# transformers' activation_function -> ModelConfig.mlp: GPT-2's two tanh GELUs, and the erf GELU
# of nanoGPT's model.py.
_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


class LoadError(ValueError):
    """A model source that cannot be loaded or saved; the message names what is wrong."""


def _local_dir(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    if source in GPT2_NAMES:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise LoadError(f"downloading {source!r} from the Hugging Face hub needs huggingface_hub: "
                            "pip install nanojaxgpt[hub]") from None
        repo = _HUB_REPO.format(source)
        try:
            return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"]))
        except Exception as e:  # offline, proxy, rate limit: the hub client raises many kinds
            raise LoadError(f"could not download {repo} from the Hugging Face hub "
                            f"({type(e).__name__}: {e}); check the network, or pass a local "
                            "directory saved with save_pretrained") from e
    if path.exists():
        raise LoadError(f"{source} is a file; give the directory holding config.json and model.safetensors")
    if os.sep in source or source.startswith("."):
        raise LoadError(f"directory {source} does not exist")
    raise LoadError(f"unknown model {source!r}: not a directory and not one of {', '.join(GPT2_NAMES)}")


def is_hf_dir(path: str | Path) -> bool:
    """A directory that claims to be a Hugging Face checkpoint (loading checks the rest): it has
    model.safetensors, or a config.json with a model_type (a run directory's config has none)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return True
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def model_config(hf: dict, source: str, **overrides) -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT-2 config.json (architecture checked, not assumed)."""
    if hf.get("model_type") != "gpt2":
        raise LoadError(f"{source}: config.json has model_type={hf.get('model_type')!r}; only GPT-2 "
                        "(model_type 'gpt2') loads")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise LoadError(f"{source}: config.json lacks {', '.join(missing)}")
    activation = hf.get("activation_function", "gelu_new")
    checks = {"activation_function": (activation, tuple(_ACTIVATIONS)),
              "n_inner": (hf.get("n_inner"), (None, 4 * hf["n_embd"])),
              "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
              "add_cross_attention": (hf.get("add_cross_attention", False), (False,))}
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise LoadError(f"{source}: config.json {key}={value!r} is not GPT-2's ({allowed[0]!r})")
    if not math.isclose(hf.get("layer_norm_epsilon", 1e-5), 1e-5):
        raise LoadError(f"{source}: config.json layer_norm_epsilon={hf['layer_norm_epsilon']} is not 1e-5")
    bad = sorted(set(overrides) - set(ModelConfig.RUNTIME_FIELDS))
    if bad:
        raise LoadError(f"cannot override {', '.join(bad)} of a pretrained model; "
                        f"allowed: {', '.join(ModelConfig.RUNTIME_FIELDS)}")
    return ModelConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], mlp=_ACTIVATIONS[activation],
                       **overrides)


def _hf_shape(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """The Hugging Face shape of one layer's parameter whose shape here is `shape`."""
    if name == "wte.weight":
        return (cfg.vocab_size, cfg.n_embd)
    if name == "attn.c_attn.weight":  # [E, 3, H, D] <- [E, 3E]
        return (shape[0], math.prod(shape[1:]))
    if name == "attn.c_attn.bias":  # [3, H, D] <- [3E]
        return (math.prod(shape),)
    if name == "attn.c_proj.weight":  # [H, D, E] <- [E, E]
        return (shape[0] * shape[1], shape[2])
    return shape


def _names(path: tuple) -> str:
    return ".".join(entry.name for entry in path)


def from_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> GPT:
    """A GPT from Hugging Face GPT-2 tensors (keys with or without the "transformer." prefix)."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    used = set()

    def take(key: str, expected: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise LoadError(f"{source}: not a GPT-2 checkpoint for config.json's sizes: tensor {key} "
                            "is missing from model.safetensors")
        a = tensors[key]
        if tuple(a.shape) != expected:
            raise LoadError(f"{source}: parameter {key} has shape {tuple(a.shape)}, expected {expected} "
                            f"(n_layer={cfg.n_layer}, n_head={cfg.n_head}, n_embd={cfg.n_embd}, "
                            f"block_size={cfg.block_size}, vocab_size={cfg.vocab_size})")
        used.add(key)
        return np.asarray(a, dtype=np.float32)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = _names(path)
        if path[0].name == "h":  # stacked: [n_layer, *per-layer shape]
            sub = name.removeprefix("h.")
            per_layer = tuple(leaf.shape[1:])
            layers = [take(f"h.{i}.{sub}", _hf_shape(sub, per_layer, cfg)).reshape(per_layer)
                      for i in range(cfg.n_layer)]
            return jnp.asarray(np.stack(layers))
        a = take(name, _hf_shape(name, tuple(leaf.shape), cfg))
        if name == "wte.weight":
            a = np.pad(a, ((0, cfg.padded_vocab_size - cfg.vocab_size), (0, 0)))
        return jnp.asarray(a.reshape(leaf.shape))

    model = jax.tree_util.tree_map_with_path(fill, abstract_model(cfg))
    if "lm_head.weight" in tensors:
        used.add("lm_head.weight")
        if not np.array_equal(tensors["lm_head.weight"], tensors["wte.weight"]):
            raise LoadError(f"{source}: lm_head.weight differs from wte.weight; only GPT-2's tied "
                            "head is supported")
    extra = sorted(k for k in tensors if k not in used and not k.endswith(_BUFFERS))
    if extra:
        raise LoadError(f"{source}: unexpected tensors for GPT-2: {', '.join(extra[:5])}"
                        + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    return model


def load(source: str, **overrides) -> GPT:
    """GPT-2 from a GPT-2 name (hub download) or a local Hugging Face directory.

    `overrides` set run-time fields (ModelConfig.RUNTIME_FIELDS, e.g. compute_dtype="bfloat16",
    dropout=0.1); the architecture always comes from config.json. Dropout defaults to 0.
    """
    from safetensors.numpy import load_file

    path = _local_dir(source)
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise LoadError(f"{path} is not a Hugging Face GPT-2 directory: {' and '.join(missing)} "
                        f"missing (save one with transformers' save_pretrained, or nanojaxgpt.hf.save)")
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    cfg = model_config(hf, str(path), **overrides)
    return from_tensors(cfg, load_file(path / "model.safetensors"), str(path))


def _check_exportable(cfg: ModelConfig) -> None:
    gpt2 = {"mlp": "gelu", "norm": "layernorm", "position": "learned"}  # bias=False: zero biases
    differ = {k: getattr(cfg, k) for k, v in gpt2.items() if getattr(cfg, k) != v
              and not (k == "mlp" and cfg.mlp == "gelu_exact")}
    if differ:
        raise LoadError("only the GPT-2 architecture exports to Hugging Face format "
                        f"({', '.join(f'{k}={v!r}' for k, v in gpt2.items())}); this model has "
                        + ", ".join(f"{k}={v!r}" for k, v in differ.items()))


def to_tensors(model: GPT) -> dict[str, np.ndarray]:
    """Hugging Face GPT-2 tensors (transformers' names, vocab un-padded, lm_head tied so absent).
    A model without biases gets zero ones, which compute the same function."""
    cfg = model.config
    _check_exportable(cfg)
    out: dict[str, np.ndarray] = {}

    def put(path: tuple, leaf: jax.Array) -> None:
        name = _names(path)
        a = np.asarray(leaf, dtype=np.float32)
        if path[0].name == "h":
            sub = name.removeprefix("h.")
            for i in range(cfg.n_layer):
                out[f"transformer.h.{i}.{sub}"] = np.ascontiguousarray(
                    a[i].reshape(_hf_shape(sub, a.shape[1:], cfg)))
        elif name == "wte.weight":
            out["transformer.wte.weight"] = np.ascontiguousarray(a[:cfg.vocab_size])
        else:
            out[f"transformer.{name}"] = a

    jax.tree_util.tree_map_with_path(put, model)
    if not cfg.bias:  # Conv1D weights are [in, out] and norm gains [E]: the bias is [out] / [E]
        out |= {name.removesuffix("weight") + "bias": np.zeros(w.shape[-1:], np.float32)
                for name, w in list(out.items()) if name.endswith(".weight") and ".wte." not in name
                and ".wpe." not in name}
    return out


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' GPT2LMHeadModel."""
    special = min(50256, cfg.vocab_size - 1)  # GPT-2's <|endoftext|>, kept inside small vocabularies
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size,
            "n_inner": None, "activation_function": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
            "bos_token_id": special, "eos_token_id": special, "dtype": "float32"}


def save(model: GPT, out_dir: str) -> None:
    """Write config.json + model.safetensors that GPT2LMHeadModel.from_pretrained(out_dir) opens."""
    from safetensors.numpy import save_file

    tensors = to_tensors(model)
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")

