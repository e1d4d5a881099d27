"""What a resumed run changes against the config saved with its checkpoint.

The architecture (every model field that changes a parameter's shape or meaning) must be the
checkpoint's: a difference is an error that names each key with both values. Everything else
(batch size, learning rate, max_iters, the mesh, run-time model settings like dropout or the
attention kernel) may change on resume; each change is reported once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nanojaxgpt.config import Config, ModelConfig

# Model fields that only change how the same parameters are computed with.
RUNTIME_MODEL_FIELDS = frozenset({"dropout", "attention", "remat", "compute_dtype"})
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                            if f.name not in RUNTIME_MODEL_FIELDS)


def architecture_diff(saved: dict[str, Any], current: Config) -> dict[str, tuple[Any, Any]]:
    """{model key: (saved value, current value)} for every architecture field that differs."""
    saved_model, model = saved.get("model", {}), current.to_dict()["model"]
    return {k: (saved_model[k], model[k]) for k in ARCHITECTURE_FIELDS
            if k in saved_model and saved_model[k] != model[k]}


def _show(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def architecture_message(out_dir: str, diff: dict[str, tuple[Any, Any]]) -> str:
    held = ", ".join(f"{k}={_show(a)}" for k, (a, _) in diff.items())
    asked = ", ".join(f"{k}={_show(b)}" for k, (_, b) in diff.items())
    flags = " ".join(f"--{k}={_show(a)}" for k, (a, _) in diff.items())
    return (f"out_dir {out_dir} holds a model with {held}; this run asks for {asked}: resume with "
            f"the checkpoint's values ({flags}) or start a new run in another --out_dir")


def changes(saved: dict[str, Any], current: Config) -> list[str]:
    """"section.key old -> new" for every saved setting this run changes (architecture excluded:
    it is checked first)."""
    out = []
    for section, values in current.to_dict().items():
        old_section = saved.get(section, {})
        for key, value in values.items():
            if key in old_section and old_section[key] != value:
                out.append(f"{section}.{key} {_show(old_section[key])} -> {_show(value)}")
    return out
