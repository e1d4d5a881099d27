"""Train nanoGPT's own model.py and this project side by side, and compare every tensor, every step.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python tools/prepare_shakespeare_char.py
    python tools/compare_nanogpt.py --nanogpt /tmp/nanoGPT [--steps 20] [-- --key=value ...]

Both start from the weights of nanoGPT's GPT (built from the run's config, seed 1337) and read the
same batches (this project's sampler), in float32 on the CPU. nanoGPT's side is its train.py loop:
`configure_optimizers` (its two groups, its AdamW), `get_lr`, the loss divided over the micro-steps,
`clip_grad_norm_`. Printed per step: both losses, and the largest relative error of any parameter
(||ours - nanoGPT's|| / ||nanoGPT's||), with its name; with bias=true the key third of c_attn's
bias is left out (its gradient is zero: see without_key_bias). The recipe is configs/shakespeare_char.toml
with dropout 0 (two programs cannot draw the same dropout masks) plus the given overrides; its
`mlp = "gelu_exact"` is nanoGPT's nn.GELU(). Exits 1 when a tensor is off by more than --rtol.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from nanojaxgpt import batches, config, data, hf, program, sharding  # noqa: E402

LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def nanogpt_module(directory: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", directory / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_hf(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """nanoGPT's state dict in Hugging Face's layout (Linear [out, in] -> Conv1D [in, out])."""
    out = {}
    for name, t in state.items():
        if name.endswith(".attn.bias") or name == "lm_head.weight":  # the causal mask; tied to wte
            continue
        a = t.detach().numpy()
        out[name] = np.ascontiguousarray(a.T) if name.endswith(LINEAR) else a.copy()
    return out


def without_key_bias(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """c_attn's bias as its query and value parts only: the key part's gradient is zero (q.b_k is
    added to all of a query's scores, which softmax ignores), so each program moves it by its own
    rounding noise, which Adam scales up to the learning rate."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("c_attn.bias"):
            q, _, v = np.split(t, 3)
            out |= {f"{name}[q]": q, f"{name}[v]": v}
        else:
            out[name] = t
    return out


def get_lr(it: int, o: config.OptimConfig) -> float:
    """nanoGPT train.py's get_lr."""
    if it < o.warmup_iters:
        return o.learning_rate * (it + 1) / (o.warmup_iters + 1)
    if it > o.lr_decay_iters:
        return o.min_lr
    ratio = (it - o.warmup_iters) / (o.lr_decay_iters - o.warmup_iters)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.learning_rate - o.min_lr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (its model.py)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("overrides", nargs="*", help="--key=value for the config, after --")
    args = p.parse_args()
    cfg = config.load(REPO / "configs/shakespeare_char.toml", ["--dropout=0.0", *args.overrides])
    m, t, o = cfg.model, cfg.train, cfg.optim
    meta = data.read_meta(cfg.data.data_dir)
    cfg = config.replace(cfg, {"model.vocab_size": meta.vocab_size})
    ng = nanogpt_module(args.nanogpt)
    torch.manual_seed(t.seed)
    ref = ng.GPT(ng.GPTConfig(block_size=m.block_size, vocab_size=meta.vocab_size, n_layer=m.n_layer,
                              n_head=m.n_head, n_embd=m.n_embd, dropout=0.0, bias=m.bias))
    optimizer = ref.configure_optimizers(o.weight_decay, o.learning_rate, (o.beta1, o.beta2), "cpu")

    mesh = sharding.make_mesh(cfg.mesh)
    prog = program.build(cfg, mesh)
    state = prog.setup.from_params(eqx.filter(hf.from_tensors(cfg.model, as_hf(ref.state_dict()),
                                                              "nanoGPT"), eqx.is_array), cfg)
    rows = t.batch_size * t.gradient_accumulation_steps
    train = batches.Batches(cfg.data.data_dir, "train", block_size=m.block_size, rows=rows,
                            seed=t.seed, sampling=cfg.data.sampling, meta=meta)
    worst = 0.0
    for it in range(args.steps):
        tokens = train.read(it, np.arange(rows)).reshape(t.gradient_accumulation_steps,
                                                         t.batch_size, m.block_size + 1)
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it, o)
        ref_loss = 0.0
        for micro in torch.from_numpy(tokens).long():
            _, loss = ref(micro[:, :-1].contiguous(), micro[:, 1:].contiguous())
            loss = loss / t.gradient_accumulation_steps
            ref_loss += loss.item()
            loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state, out = prog.steps.train(state, jax.device_put(tokens, prog.batch_sharding))
        ours = without_key_bias(hf.to_tensors(eqx.combine(state["model"], prog.setup.static)))
        theirs = without_key_bias(as_hf(ref.state_dict()))
        errors = {k: float(np.linalg.norm(ours[k] - v) / np.linalg.norm(v)) for k, v in theirs.items()}
        name = max(errors, key=errors.get)
        worst = max(worst, errors[name])
        print(f"step {it:3d}  loss nanoGPT {ref_loss:.6f} ours {float(out['loss']):.6f}  "
              f"worst tensor {name} {errors[name]:.2e}", flush=True)
    print(f"largest relative error of any parameter over {args.steps} steps: {worst:.2e} "
          f"({'within' if worst <= args.rtol else 'above'} {args.rtol:g})")
    return 0 if worst <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
