"""Step for step, tensor by tensor: our train step against nanoGPT's training loop in PyTorch.

Both start from the same random transformers GPT-2 and read the same batches, in float32. The
reference is written with nanoGPT's semantics (train.py and model.py's configure_optimizers):
torch.optim.AdamW over two parameter groups (dim >= 2 decays, the rest does not), get_lr's warmup
and cosine, the loss divided over the micro-steps, clip_grad_norm_. After every step, every
parameter, the loss and the gradient norm must agree to 1e-5 relative (a tensor's relative error:
||ours - ref|| / ||ref||), on one device and on an FSDP x TP mesh. A loss curve alone would not
do: decaying c_attn's bias moves the loss by less than 1e-4.

One slice is held to less: the key bias. Its gradient is zero (adding q.b_k to all of a query's
scores leaves their softmax unchanged), so both programs compute it as rounding noise, and Adam,
dividing by that noise's own size, turns it into steps of up to the learning rate, in each
program its own. The test checks that its gradient is that noise (below 1e-5 of the query bias's)
and compares the rest.
"""

import math

import equinox as eqx
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from nanojaxgpt import config, hf, optim, program, sharding
from nanojaxgpt import model as gpt

STEPS, ACCUM, BATCH, BLOCK, VOCAB = 8, 2, 8, 32, 100
CFG = {"model.n_layer": 2, "model.n_head": 4, "model.n_embd": 64, "model.block_size": BLOCK,
       "model.vocab_size": VOCAB, "model.dropout": 0.0, "train.batch_size": BATCH,
       "train.gradient_accumulation_steps": ACCUM, "optim.learning_rate": 3e-3,
       "optim.min_lr": 3e-4, "optim.warmup_iters": 2, "optim.lr_decay_iters": 6,
       "optim.weight_decay": 0.1, "optim.beta1": 0.9, "optim.beta2": 0.95, "optim.grad_clip": 1.0}
RTOL = 1e-5


def random_gpt2(activation: str, seed: int = 0) -> GPT2LMHeadModel:
    """A transformers GPT-2 with every parameter random (biases and norm gains too, so decaying
    one that should not decay shows)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(activation_function=activation,
        n_layer=CFG["model.n_layer"], n_head=CFG["model.n_head"], n_embd=CFG["model.n_embd"],
        n_positions=BLOCK, vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_implementation="eager"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.train()


def nanogpt_get_lr(it: int, o) -> float:
    """nanoGPT train.py's get_lr."""
    if it < o.warmup_iters:
        return o.learning_rate * (it + 1) / (o.warmup_iters + 1)
    if it > o.lr_decay_iters:
        return o.min_lr
    decay_ratio = (it - o.warmup_iters) / (o.lr_decay_iters - o.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return o.min_lr + coeff * (o.learning_rate - o.min_lr)


def split_qkv(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """c_attn's bias [3E] as its query, key and value parts."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("c_attn.bias"):
            out |= {f"{name}[{part}]": chunk for part, chunk in zip("qkv", np.split(t, 3), strict=True)}
        else:
            out[name] = t
    return out


def nanogpt_steps(model: GPT2LMHeadModel, batches: np.ndarray, cfg: config.Config):
    """nanoGPT's training loop; yields (loss, gradient norm before clipping, {name: tensor},
    {name: gradient}) after each optimizer step."""
    o = cfg.optim
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # lm_head is wte
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.learning_rate, betas=(o.beta1, o.beta2), fused=False)
    for it, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = nanogpt_get_lr(it, o)
        total = 0.0
        for micro in torch.from_numpy(batch).long():
            x, y = micro[:, :-1], micro[:, 1:]
            logits = model(x).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)) / len(batch)
            total += loss.item()
            loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in params.items()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield total, norm, {n: p.detach().numpy().copy() for n, p in params.items()}, grads


def our_steps(model: GPT2LMHeadModel, batches: np.ndarray, cfg: config.Config, mesh):
    """The same, through the train step a run compiles (program.build) on `mesh`."""
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    start = hf.from_tensors(cfg.model, tensors, "the random GPT-2")
    prog = program.build(cfg, mesh)
    state = prog.setup.from_params(start, cfg)  # from_tensors gives the arrays of a GPT
    for batch in batches:
        state, out = prog.steps.train(state, jax.device_put(batch, prog.batch_sharding))
        ours = hf.to_tensors(eqx.combine(state["model"], prog.setup.static))
        yield float(out["loss"]), float(out["grad_norm"]), ours, None


def relative_error(ours: np.ndarray | float, ref: np.ndarray | float) -> float:
    return float(np.linalg.norm(np.subtract(ours, ref)) / np.linalg.norm(ref))


def compare(cfg: config.Config, mesh) -> dict[str, float]:
    """The worst relative error of each parameter (and the loss, the gradient norm) over every step."""
    batches = np.random.default_rng(0).integers(0, VOCAB, (STEPS, ACCUM, BATCH, BLOCK + 1)).astype(np.int32)
    worst: dict[str, float] = {}
    norms = []
    activation = "gelu" if cfg.model.mlp == "gelu_exact" else "gelu_new"  # transformers' names
    for (loss, norm, ref, grads), (our_loss, our_norm, ours, _) in zip(
            nanogpt_steps(random_gpt2(activation), batches, cfg),
            our_steps(random_gpt2(activation), batches, cfg, mesh), strict=True):
        norms.append(norm)
        errors = {"loss": relative_error(our_loss, loss), "grad_norm": relative_error(our_norm, norm)}
        ref, ours, grads = split_qkv(ref), split_qkv(ours), split_qkv(grads)
        for name, tensor in ref.items():
            if name.endswith("[k]"):  # a zero gradient, computed as rounding noise (see above)
                assert np.linalg.norm(grads[name]) < 1e-5 * np.linalg.norm(grads[name[:-3] + "[q]"])
                continue
            errors[name.removeprefix("transformer.")] = relative_error(ours[name], tensor)
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in errors.items()}
    # The run exercised both sides of the clipping (the reference's norms before clipping).
    assert min(norms) < cfg.optim.grad_clip < max(norms), norms
    return worst


CONFIG = config.load(None, CFG)


@pytest.mark.parametrize("mesh,mlp", [
    ({"data": 1, "fsdp": 1, "tensor": 1}, "gelu"),
    ({"data": 1, "fsdp": 4, "tensor": 2}, "gelu"),
    ({"data": 1, "fsdp": 1, "tensor": 1}, "gelu_exact"),  # nanoGPT's model.py: nn.GELU()
], ids=["1device", "fsdp4xtp2", "1device-erf-gelu"])
def test_every_parameter_follows_nanogpt_step_for_step(mesh, mlp):
    cfg = config.replace(CONFIG, {f"mesh.{k}": v for k, v in mesh.items()} | {"model.mlp": mlp})
    n = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    worst = compare(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:n]))
    bad = {k: v for k, v in worst.items() if v > RTOL}
    assert not bad, f"relative errors above {RTOL}: {bad}"


def test_decaying_the_attention_bias_is_seen(monkeypatch):
    """The comparison above catches the old rule (decay every leaf with two axes besides layers,
    which includes c_attn's [3, heads, head_dim] bias)."""
    def by_rank(model):
        return jax.tree.map(lambda spec: sum(a != "layers" for a in spec) >= 2, gpt.logical_axes(model))

    monkeypatch.setattr(optim, "decay_mask", by_rank)
    cfg = config.replace(CONFIG, {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    worst = compare(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    assert worst["h.0.attn.c_attn.bias[q]"] > 10 * RTOL and worst["h.1.attn.c_attn.bias[v]"] > 10 * RTOL
    assert worst["loss"] < 1e-4  # what a loss curve shows
    assert max(v for k, v in worst.items() if k.endswith(("c_attn.weight", "mlp.c_fc.bias"))) <= RTOL
