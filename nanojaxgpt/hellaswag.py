"""HellaSwag: score each ending by the loss of its tokens given the context (llm.c's conventions).

    examples = hellaswag.read_examples(hellaswag.dataset_file(None), limit=100)
    results = hellaswag.score(model, examples, tokenizer.get("gpt2"))   # one Scored per example
    hellaswag.summarize(results)  # Summary(acc=..., acc_norm=..., examples=100)

As llm.c's dev/data/hellaswag.py: an ending's tokens are encode(" " + ending) after encode(ctx);
`acc` picks the ending of lowest summed loss, `acc_norm` the lowest mean loss per token (ties: the
first). A row longer than block_size + 1 tokens loses tokens of the context from the left.
The rows (one per ending) are scored by nanojaxgpt/scoring.py: batched, jitted, sharded over the
mesh, each host feeding its own devices' rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import numpy as np
from jax.sharding import Mesh

from nanojaxgpt import scoring
from nanojaxgpt.model import GPT

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE_NAME = "hellaswag_val.jsonl"
VAL_EXAMPLES = 10042


class HellaSwagError(ValueError):
    """The HellaSwag file is missing, unreadable or malformed, or the model cannot take it."""


@dataclasses.dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class Scored:
    """One example's result: per ending, the summed and mean loss of its tokens and their count."""
    label: int
    loss_sum: tuple[float, ...]
    loss_mean: tuple[float, ...]
    tokens: tuple[int, ...]
    pred: int  # argmin of loss_sum
    pred_norm: int  # argmin of loss_mean


@dataclasses.dataclass(frozen=True)
class Summary:
    acc: float
    acc_norm: float
    examples: int

    def line(self) -> str:
        return f"hellaswag acc {self.acc:.4f} acc_norm {self.acc_norm:.4f} ({self.examples} examples)"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanojaxgpt" / "hellaswag"


def dataset_file(path: str | None, url: str = URL) -> Path:
    """`path` when given, else the cached copy of the validation set (downloaded once)."""
    if path:
        if not Path(path).is_file():
            raise HellaSwagError(f"--hellaswag_file={path}: no such file (hellaswag_val.jsonl "
                                 f"from {URL})")
        return Path(path)
    cached = cache_dir() / FILE_NAME
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            f.write(response.read())
    except OSError as e:  # offline, DNS, proxy, timeout: urllib's errors are all OSErrors
        partial.unlink(missing_ok=True)
        raise HellaSwagError(f"cannot download {url} ({getattr(e, 'reason', e)}); this machine may "
                             f"be offline: download {FILE_NAME} elsewhere and pass "
                             "--hellaswag_file=PATH") from None
    os.replace(partial, cached)  # a download cut short never looks like the cached file
    return cached


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The first `limit` (all when None or 0) records {ctx, endings, label} of a HellaSwag jsonl."""
    out: list[Example] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HellaSwagError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        if limit and len(out) == limit:
            break
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            example = Example(str(r["ctx"]), tuple(str(e) for e in r["endings"]), int(r["label"]))
        except (ValueError, KeyError, TypeError) as e:
            raise HellaSwagError(f"{path} line {number} is not a HellaSwag record {{ctx, endings, "
                                 f"label}} ({type(e).__name__}: {e})") from None
        if len(example.endings) < 2 or not 0 <= example.label < len(example.endings):
            raise HellaSwagError(f"{path} line {number}: label {example.label} for "
                                 f"{len(example.endings)} endings")
        out.append(example)
    if not out:
        raise HellaSwagError(f"{path} holds no HellaSwag records")
    return out


def render(example: Example, tokenizer, block_size: int) -> list[scoring.Row]:
    """Per ending: (context + ending tokens, index of the first ending token), cut from the left to
    block_size + 1 tokens (inputs are all but the last token, targets all but the first)."""
    ctx = tokenizer.encode(example.ctx)
    rows = []
    for ending in example.endings:
        full = ctx + tokenizer.encode(" " + ending)  # GPT-2 BPE: the space starts the ending's word
        cut = max(0, len(full) - (block_size + 1))
        rows.append((full[cut:], max(1, len(ctx) - cut)))
    return rows


def score(model: GPT, examples: Sequence[Example], tokenizer, *, mesh: Mesh | None = None,
          tokens_per_device: int = 4096) -> list[Scored]:
    """Every example scored by `model` on `mesh` (default: all devices, the batch over them).

    Every host calls this with the same examples. `tokens_per_device` bounds the rows of one
    forward pass: its logits are tokens_per_device x padded vocab float32 per device.
    """
    cfg = model.config
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab > cfg.vocab_size:
        raise HellaSwagError(f"HellaSwag is tokenized with a {vocab}-token tokenizer but the model "
                             f"has {cfg.vocab_size} tokens: it needs a GPT-2 BPE model")
    endings = [len(e.endings) for e in examples]
    rendered = [row for e in examples for row in render(e, tokenizer, cfg.block_size)]
    loss, count = scoring.row_losses(model, rendered, mesh=mesh, tokens_per_device=tokens_per_device)
    results, start = [], 0
    for example, n in zip(examples, endings):
        s, c = loss[start:start + n], count[start:start + n]
        mean = s / np.maximum(c, 1)
        results.append(Scored(label=example.label, loss_sum=tuple(s.tolist()),
                              loss_mean=tuple(mean.tolist()), tokens=tuple(c.tolist()),
                              pred=int(np.argmin(s)), pred_norm=int(np.argmin(mean))))
        start += n
    return results


def summarize(results: Sequence[Scored]) -> Summary:
    n = len(results)
    return Summary(acc=sum(r.pred == r.label for r in results) / n,
                   acc_norm=sum(r.pred_norm == r.label for r in results) / n, examples=n)


def for_training(cfg: Any, static: Any, mesh: Mesh, tokenizer_name: str
                 ) -> Callable[[int, Any], dict[str, float]]:
    """The training loop's hook: `scores(step, params) -> {"eval/hellaswag_acc": ..., ...}`, or
    {} from a hook that does nothing when train.hellaswag is off. Reads the file now, so a
    missing one stops the run before its first step."""
    from nanojaxgpt import config, tokenizer

    t = cfg.train
    if not t.hellaswag:
        return lambda step, params: {}
    if tokenizer_name != "gpt2":
        raise config.ConfigError(f"train.hellaswag=true needs GPT-2 BPE data, but {cfg.data.data_dir} "
                                 f"is tokenized with {tokenizer_name!r}; set --train.hellaswag=false")
    try:
        examples = read_examples(dataset_file(t.hellaswag_file or None), t.hellaswag_limit)
    except HellaSwagError as e:
        raise config.ConfigError(f"train.hellaswag: {e}") from None
    tok = tokenizer.get("gpt2")
    log = logging.getLogger("nanojaxgpt.hellaswag")

    def scores(step: int, params) -> dict[str, float]:
        summary = summarize(score(eqx.combine(params, static), examples, tok, mesh=mesh))
        log.info("step %d: %s", step, summary.line())
        return {"eval/hellaswag_acc": summary.acc, "eval/hellaswag_acc_norm": summary.acc_norm}

    return scores
