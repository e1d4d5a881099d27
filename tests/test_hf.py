"""hf.py against real transformers GPT-2 models: same logits, same greedy text, exact round trips."""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from nanojaxgpt import hf, sample
from nanojaxgpt.config import ModelConfig
from nanojaxgpt.model import abstract_model


def save_tiny_gpt2(path, *, vocab_size=1000, n_layer=2, n_head=2, n_embd=64, n_positions=64,
                   seed=0, activation="gelu_new") -> GPT2LMHeadModel:
    """A random transformers GPT-2 (biases and norm gains random too) written by save_pretrained."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
                        activation_function=activation,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return model


def _torch_logits(model, idx):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(idx))[None]).logits[0].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    return path, save_tiny_gpt2(path)


def test_logits_match_transformers(tiny):
    path, ref = tiny
    model = hf.load(str(path))
    assert model.config.vocab_size == 1000 and model.config.padded_vocab_size == 1024
    idx = np.random.RandomState(0).randint(0, 1000, 64)
    ours = np.asarray(jax.jit(lambda m, i: m(i, inference=True))(model, jnp.asarray(idx)))
    np.testing.assert_allclose(ours[:, :1000], _torch_logits(ref, idx), atol=1e-4, rtol=0)


def test_the_erf_gelu_of_nanogpt_loads_and_exports_as_transformers_gelu(tmp_path):
    ref = save_tiny_gpt2(tmp_path / "erf", activation="gelu", n_layer=1)
    model = hf.load(str(tmp_path / "erf"))
    assert model.config.mlp == "gelu_exact"
    idx = np.random.RandomState(1).randint(0, 1000, 32)
    ours = np.asarray(jax.jit(lambda m, i: m(i, inference=True))(model, jnp.asarray(idx)))
    np.testing.assert_allclose(ours[:, :1000], _torch_logits(ref, idx), atol=1e-4, rtol=0)
    tanh = np.asarray(jax.jit(lambda m, i: m(i, inference=True))(
        hf.from_tensors(dataclasses.replace(model.config, mlp="gelu"), hf.to_tensors(model), "x"),
        jnp.asarray(idx)))
    assert np.abs(tanh - ours)[:, :1000].max() > 1e-4  # the two GELUs are told apart
    hf.save(model, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["activation_function"] == "gelu"


def test_greedy_generation_matches_transformers(tiny):
    path, ref = tiny
    prompt = [11, 222, 333, 4, 555]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                pad_token_id=999)[0].numpy()
    ours = sample.generate(hf.load(str(path)), prompt, max_new_tokens=40, temperature=0.0)
    assert len(set(expected[5:].tolist())) > 5  # a real test: the text is not one repeated token
    np.testing.assert_array_equal(ours[0], expected)


def test_export_round_trip_is_exact_and_opens_in_transformers(tiny, tmp_path):
    path, ref = tiny
    model = hf.load(str(path))
    hf.save(model, str(tmp_path / "out"))
    again = hf.load(str(tmp_path / "out"))
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "out", attn_implementation="eager",
                                             dtype=torch.float32).eval()
    idx = np.arange(0, 1000, 17)[:50]
    np.testing.assert_array_equal(_torch_logits(theirs, idx), _torch_logits(ref, idx))
    original = load_file(path / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert exported.keys() == original.keys()  # same names, lm_head tied (absent)
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k])


def test_hub_file_layout_loads(tiny, tmp_path):
    """The hub's GPT-2 files: no "transformer." prefix, causal-mask buffers, maybe an lm_head copy."""
    path, ref = tiny
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors["lm_head.weight"] = tensors["wte.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a, b = hf.load(str(path)), hf.load(str(tmp_path))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_runtime_overrides(tiny):
    model = hf.load(str(tiny[0]), compute_dtype="bfloat16", scan_layers=False, dropout=0.1)
    assert model.config.compute_dtype == "bfloat16" and model.config.dropout == 0.1
    with pytest.raises(hf.LoadError, match="cannot override n_layer"):
        hf.load(str(tiny[0]), n_layer=3)


def test_unknown_name_and_missing_files(tmp_path):
    with pytest.raises(hf.LoadError, match="unknown model 'gpt3'.*gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        hf.load("gpt3")
    with pytest.raises(hf.LoadError, match="does not exist"):
        hf.load(str(tmp_path / "nowhere"))
    with pytest.raises(hf.LoadError, match="config.json and model.safetensors missing"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hf.LoadError, match="model.safetensors missing"):
        hf.load(str(tmp_path))


def test_not_gpt2_and_wrong_shapes(tiny, tmp_path):
    path, _ = tiny
    tensors = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(hf.LoadError, match="model_type='llama'"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(hf.LoadError, match="activation_function='relu'"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    bad = dict(tensors, **{"transformer.h.1.mlp.c_fc.weight": np.zeros((64, 128), np.float32)})
    save_file(bad, tmp_path / "model.safetensors")
    shapes = r"h\.1\.mlp\.c_fc\.weight has shape \(64, 128\), expected \(64, 256\)"
    with pytest.raises(hf.LoadError, match=shapes):
        hf.load(str(tmp_path))
    del bad["transformer.h.1.mlp.c_fc.weight"]
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(hf.LoadError, match=r"tensor h\.1\.mlp\.c_fc\.weight is missing"):
        hf.load(str(tmp_path))


def test_only_gpt2_architecture_exports(tmp_path):
    cfg = ModelConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8, mlp="swiglu")
    with pytest.raises(hf.LoadError, match="only the GPT-2 architecture exports.*mlp='swiglu'"):
        hf.save(abstract_model(cfg), str(tmp_path))  # refused before any array is read


def test_hub_download_needs_the_hub_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(hf.LoadError, match=r"pip install nanojaxgpt\[hub\]"):
        hf.load("gpt2-medium")
