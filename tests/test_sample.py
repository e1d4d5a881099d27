"""Generation: KV cache == recompute, seeds, greedy, top-k, padding never drawn, the CLI and its errors."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanojaxgpt import kvcache, sample
from nanojaxgpt.config import ModelConfig
from nanojaxgpt.model import GPT
from tests.test_hf import save_tiny_gpt2

# vocab 70 pads to 128; block 32 so a few dozen new tokens run past the context
CFG = ModelConfig(block_size=32, vocab_size=70, n_layer=2, n_head=2, n_embd=32)
PROMPT = [5, 17, 42, 3, 60, 8, 1]


@pytest.fixture(scope="module")
def model():
    m = GPT(CFG, key=jax.random.key(3))
    return jax.tree.map(lambda w: w * 4, m)  # larger weights: peaked, varied predictions


def _greedy_reference(model, prompt, n):
    """Argmax of the full forward, one token at a time, cropping to the last block_size like nanoGPT.
    The window is zero-padded to block_size (one compilation): causality keeps the padding unseen."""
    forward = jax.jit(lambda m, idx, last: m(idx, inference=True)[last])
    tokens = list(prompt)
    for _ in range(n):
        window = tokens[-CFG.block_size:]
        padded = jnp.asarray(window + [0] * (CFG.block_size - len(window)))
        tokens.append(int(jnp.argmax(forward(model, padded, len(window) - 1))))
    return np.asarray(tokens)


def test_cache_matches_recompute_past_the_context(model):
    n = 40  # 7 + 40 > block_size 32: the last tokens come from a cropped window
    greedy = sample.generate(model, PROMPT, max_new_tokens=n, temperature=0.0)
    np.testing.assert_array_equal(greedy[0], _greedy_reference(model, PROMPT, n))
    assert len(set(greedy[0, 7:].tolist())) > 5
    opts = dict(max_new_tokens=n, num_samples=3, temperature=1.0, top_k=20, seed=7)
    drawn = sample.generate(model, PROMPT, **opts)
    np.testing.assert_array_equal(drawn, sample.generate(model, PROMPT, use_cache=False, **opts))
    assert drawn.shape == (3, 47) and np.all(drawn[:, :7] == PROMPT)
    assert not np.array_equal(drawn[0], drawn[1])  # the samples of one batch differ


def test_seeds_greedy_and_top_k(model):
    opts = dict(max_new_tokens=12, num_samples=3, temperature=0.7, top_k=20)  # shapes as above
    a = sample.generate(model, PROMPT, seed=1, **opts)
    np.testing.assert_array_equal(a, sample.generate(model, PROMPT, seed=1, **opts))
    assert not np.array_equal(a, sample.generate(model, PROMPT, seed=2, **opts))
    greedy = sample.generate(model, PROMPT, max_new_tokens=12, temperature=0.0)
    np.testing.assert_array_equal(greedy[0], _greedy_reference(model, PROMPT, 12))
    top1 = sample.generate(model, PROMPT, max_new_tokens=12, temperature=1.5, top_k=1, seed=5)
    np.testing.assert_array_equal(top1, greedy)


def test_padding_tokens_are_never_drawn(model):
    # At temperature 1e4 every real token is about equally likely; padding stays impossible.
    drawn = sample.generate(model, PROMPT, max_new_tokens=24, num_samples=3, temperature=1e4)
    assert drawn.max() < CFG.vocab_size and len(np.unique(drawn[:, 7:])) > 30
    logits = jax.random.normal(jax.random.key(0), (4, 128)).at[:, 70:].set(np.finfo(np.float32).min)
    for top_k in (None, 100, 128):
        assert sample.choose(logits, jax.random.key(1), 1e6, top_k).max() < 70


VARIANTS = {"gpt2": {}, "rope": dict(position="rope"), "swiglu": dict(mlp="swiglu"),
            "rmsnorm": dict(norm="rmsnorm"), "no_bias": dict(bias=False),
            "all": dict(position="rope", mlp="swiglu", norm="rmsnorm", bias=False)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_step_matches_full_forward(variant, dtype):
    """Prefill, then one cache step per position, gives the logits of the full forward there.

    Two sequences, so that each decode step must read its own sequence's cache rows."""
    cfg = dataclasses.replace(CFG, compute_dtype=dtype, **VARIANTS[variant])
    model = jax.tree.map(lambda w: w * 4, GPT(cfg, key=jax.random.key(3)))
    idx = jnp.asarray([PROMPT + [9, 9, 2, 30], [4, 4, 61, 0, 7, 13, 2, 50, 1, 1, 6]])
    full = jax.jit(jax.vmap(lambda m, i: m(i, inference=True), in_axes=(None, 0)))(model, idx)
    full = full[..., :cfg.vocab_size]  # the padding's logits are float32's minimum in both
    # Same math in another order: float32 agrees to rounding; bfloat16 to its 8-bit mantissa.
    atol = 1e-4 * float(jnp.abs(full).max()) if dtype == "float32" else 0.05 * float(full.std())
    dec = kvcache.decoder(model)
    step = jax.jit(kvcache.prefill)(dec, idx[:, :7], jnp.int32(6))
    np.testing.assert_allclose(step.logits[:, :cfg.vocab_size], full[:, 6], atol=atol)
    decode = jax.jit(kvcache.decode)
    for pos in range(7, 11):
        step = decode(dec, idx[:, pos], jnp.int32(pos), step.cache)
        np.testing.assert_allclose(step.logits[:, :cfg.vocab_size], full[:, pos], atol=atol,
                                   err_msg=f"position {pos}")


def test_prompt_errors(model):
    with pytest.raises(sample.PromptError, match="33 tokens.*block_size=32"):
        sample.generate(model, list(range(33)), max_new_tokens=1)
    with pytest.raises(sample.PromptError, match="empty"):
        sample.generate(model, [], max_new_tokens=1)
    with pytest.raises(sample.PromptError, match=r"\[0, 70\).*got 3\.\.70"):
        sample.generate(model, [3, 70], max_new_tokens=1)


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory):
    """A tiny GPT-2 with the real 50257-token vocabulary, so tiktoken's ids fit."""
    path = tmp_path_factory.mktemp("tiny_gpt2_50257")
    save_tiny_gpt2(path, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, n_positions=32)
    return path


def test_cli_prints_samples(gpt2_vocab_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text("Hello world")
    cmd = [sys.executable, "-m", "nanojaxgpt.sample", f"--init_from={gpt2_vocab_dir}",
           f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=2", "--max_new_tokens=5",
           "--temperature=0.8", "--top_k=50", "--seed=3"]
    run = subprocess.run(cmd, env=os.environ, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    samples = run.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[2] == ""
    assert all(s.startswith("Hello world") and len(s) > len("Hello world\n") for s in samples[:2])


def test_cli_errors_exit_2_with_a_message(gpt2_vocab_dir, tmp_path, capsys):
    cases = [(["--init_from=gpt3"], "unknown model 'gpt3'"),
             ([f"--init_from={tmp_path}/nowhere"], "does not exist"),
             ([f"--init_from={gpt2_vocab_dir}", "--start=" + "word " * 40], "longer than the model"),
             ([f"--init_from={gpt2_vocab_dir}", "--start=FILE:/no/such/file"], "cannot read the prompt file")]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((gpt2_vocab_dir / "config.json").read_text())
    cases.append(([f"--init_from={tmp_path / 'half'}"], "model.safetensors missing"))
    for argv, message in cases:
        assert sample.main(argv + ["--max_new_tokens=2", "--num_samples=1"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_cli_refuses_a_vocab_the_tokenizer_overflows(tmp_path, capsys):
    save_tiny_gpt2(tmp_path, vocab_size=300, n_layer=1, n_head=1, n_embd=8, n_positions=16)
    assert sample.main([f"--init_from={tmp_path}", "--max_new_tokens=1"]) == 2
    assert "50257 tokens but the model only 300" in capsys.readouterr().err


def test_kth_largest_is_exact():
    x = jax.random.normal(jax.random.key(0), (3, 500)) * 3
    x = x.at[:, 450:].set(np.finfo(np.float32).min).at[0, :40].set(1.5)  # padding and ties
    x = x.at[1, 7].set(-0.0).at[1, 8].set(0.0).at[2, 9].set(-np.inf)
    find = jax.jit(sample.kth_largest)
    for k in (1, 2, 39, 40, 41, 200, 449, 450, 451, 500):
        np.testing.assert_array_equal(find(x, k), jax.lax.top_k(x, k)[0][:, -1], err_msg=str(k))


def test_any_trained_kernel_samples_and_top_k_beyond_the_vocab_is_no_filter(model):
    # A run trained with cuDNN attention keeps attention="cudnn" in its config; sampling in float32
    # (or on a CPU) uses the portable kernel and gives the same tokens as an xla-kernel model.
    from nanojaxgpt.model import with_runtime

    cudnn = with_runtime(model, attention="cudnn")
    ref = sample.generate(model, PROMPT, max_new_tokens=8, num_samples=2, top_k=5, seed=3)
    np.testing.assert_array_equal(
        sample.generate(cudnn, PROMPT, max_new_tokens=8, num_samples=2, top_k=5, seed=3), ref)
    # top_k of the vocabulary or more filters nothing: the same draws as no top_k at all.
    unfiltered = sample.generate(model, PROMPT, max_new_tokens=8, num_samples=2, seed=3)
    for k in (CFG.vocab_size, 200):
        np.testing.assert_array_equal(
            sample.generate(model, PROMPT, max_new_tokens=8, num_samples=2, top_k=k, seed=3),
            unfiltered)
