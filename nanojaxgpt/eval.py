"""Evaluate a GPT: HellaSwag accuracy and validation loss.

    python -m nanojaxgpt.eval --init_from=gpt2 --tasks=hellaswag,val_loss --data_dir=data/openwebtext
    hellaswag acc 0.2859 acc_norm 0.2955 (10042 examples)
    val loss 3.1234 (2457600 tokens)

--init_from: as in nanojaxgpt.sample (a GPT-2 name, a Hugging Face directory, a run directory,
local or gs://, or "resume"). HellaSwag reads --hellaswag_file, or the validation set downloaded
once into ~/.cache/nanojaxgpt/hellaswag. val_loss scores the windows a run evaluates as val/loss:
eval_iters x batch_size windows of block_size + 1 tokens drawn with seed + 1 from the val split of
--data_dir; a run directory gives its own data_dir, batch_size, eval_iters and seed, so the figure
equals the run's val/loss at the checkpoint's step. Pass a run's values to put GPT-2 beside it.
Every host of a multi-host job runs the same command; process 0 prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

import jax
import numpy as np

from nanojaxgpt import batches, data, distributed, hellaswag, scoring, sharding, storage
from nanojaxgpt.cli import run_command
from nanojaxgpt.config import DistributedConfig, MeshConfig, TrainConfig
from nanojaxgpt.model import GPT, with_runtime
from nanojaxgpt.sample import model_and_tokenizer

TASKS = ("hellaswag", "val_loss")


def val_loss(model: GPT, data_dir: str, *, batch_size: int, eval_iters: int, seed: int,
             sampling: str = "random", mesh: jax.sharding.Mesh | None = None) -> tuple[float, int]:
    """(mean loss, tokens scored) on the val windows a run with this batch_size, eval_iters, seed
    and data.sampling evaluates (its fixed eval set, batches.eval_set)."""
    meta = data.read_meta(data_dir)
    if meta.vocab_size > model.config.vocab_size:
        raise data.DataError(f"{data_dir} has {meta.vocab_size} token ids but the model only "
                             f"{model.config.vocab_size}: give data prepared with the model's tokenizer")
    rows = eval_iters * batch_size
    windows = batches.eval_set(data_dir, "val", block_size=model.config.block_size,
                               batch_size=batch_size, eval_iters=eval_iters, seed=seed,
                               sampling=sampling, meta=meta).read(0, np.arange(rows))
    loss, count = scoring.row_losses(model, [(w, 1) for w in windows], mesh=mesh)
    return float(np.mean(loss / count)), int(count.sum())


def _parse(argv: list[str]) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m nanojaxgpt.eval", description=__doc__.split("\n")[0])
    p.add_argument("--init_from", default="gpt2", help="GPT-2 name, Hugging Face dir, run dir, or resume")
    p.add_argument("--out_dir", default="out", help="the run directory for --init_from=resume")
    p.add_argument("--tasks", default="hellaswag", help="comma-separated: " + ", ".join(TASKS))
    p.add_argument("--limit", type=int, default=0, help="HellaSwag: the first N examples (0 = all)")
    p.add_argument("--hellaswag_file", default=None, help="hellaswag_val.jsonl (default: cached download)")
    p.add_argument("--data_dir", default=None, help="val_loss: prepared data (default: a run's own)")
    p.add_argument("--batch_size", type=int, default=None, help=f"val_loss (default: a run's, or {d.batch_size})")
    p.add_argument("--eval_iters", type=int, default=None, help=f"val_loss (default: a run's, or {d.eval_iters})")
    p.add_argument("--seed", type=int, default=None, help=f"val_loss (default: a run's, or {d.seed})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (weights stay float32)")
    return p.parse_args(argv)


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks={text}: unknown task {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(TASKS)}")
    return tasks


def main(argv: list[str]) -> int:
    args = _parse(argv)
    tasks = _tasks(args.tasks)
    for name in ("limit", "batch_size", "eval_iters"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "limit" else 1):
            raise ValueError(f"--{name}={value} must be {'>= 0' if name == 'limit' else 'positive'}")
    topo = distributed.initialize(DistributedConfig())
    examples = None
    if "hellaswag" in tasks:  # the file first: a missing one fails before the model loads
        examples = hellaswag.read_examples(hellaswag.dataset_file(args.hellaswag_file), args.limit)
    loaded = model_and_tokenizer(args.init_from, args.out_dir)
    model = with_runtime(loaded.model, compute_dtype=args.dtype)
    mesh = sharding.make_mesh(MeshConfig())
    lines = []
    if examples is not None:
        if getattr(loaded.tokenizer, "name", None) != "gpt2":
            raise hellaswag.HellaSwagError(f"{args.init_from} reads {loaded.tokenizer.name!r} tokens; "
                                           "HellaSwag needs a GPT-2 BPE model")
        results = hellaswag.score(model, examples, loaded.tokenizer, mesh=mesh)
        lines.append(hellaswag.summarize(results).line())
    if "val_loss" in tasks:
        run = loaded.run_config.train if loaded.run_config else TrainConfig()
        data_dir = args.data_dir or (loaded.run_config.data.data_dir if loaded.run_config else None)
        if data_dir is None:
            raise ValueError(f"--tasks=val_loss of {args.init_from} needs --data_dir=DIR (prepared "
                             "data, local or gs://)")
        loss, tokens = val_loss(model, storage.absolute(data_dir),
                                batch_size=args.batch_size or run.batch_size,
                                eval_iters=args.eval_iters or run.eval_iters,
                                seed=run.seed if args.seed is None else args.seed,
                                sampling=(loaded.run_config.data.sampling if loaded.run_config
                                          else "random"), mesh=mesh)
        lines.append(f"val loss {loss:.4f} ({tokens} tokens)")
    if topo.process_index == 0:
        print("\n".join(lines))
    return 0


def cli(argv: list[str] | None = None, exit: Callable[[int], NoReturn] = sys.exit) -> NoReturn:  # noqa: A002
    # As nanojaxgpt.sample: ValueError covers hf.LoadError, data.DataError and HellaSwagError;
    # RuntimeError the checkpoint's, distributed's and the GPT-2 tokenizer's missing files.
    run_command(main, argv, errors=(ValueError, OSError, RuntimeError), exit=exit)


if __name__ == "__main__":
    cli()
