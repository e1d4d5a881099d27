"""Export of trained runs: transformers opens the directory, its logits equal the run's own, its
tokenizer equals tiktoken's GPT-2, its HellaSwag equals the run's; variants are one-line errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from nanojaxgpt import export, prepare, sample, tokenizer
from tests.eval_runs import RECORDS, bpe_run  # noqa: F401  (a fixture)
from tests.test_hellaswag import reference
from tests.train_runs import curve, run

TEXT = "Hello world, ünïcode café 👋 — tabs\t and  spaces\n\nnew<|endoftext|>lines 12345 ’quoted’"


@pytest.fixture(scope="module")
def exported(bpe_run, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "hf"
    cmd = [sys.executable, "-m", "nanojaxgpt.export", f"--init_from={bpe_run['out']}", f"--out={out}"]
    proc = subprocess.run(cmd, env=os.environ, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"wrote {out}: config.json, model.safetensors, vocab.json, "
                                   "merges.txt, special_tokens_map.json, tokenizer_config.json")
    model = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    return out, model.eval()


def test_exported_run_has_the_runs_logits(bpe_run, exported):  # noqa: F811
    _, theirs = exported
    ours = sample.model_and_tokenizer(str(bpe_run["out"])).model
    idx = np.random.RandomState(0).randint(0, 50257, ours.config.block_size)
    logits = np.asarray(jax.jit(lambda m, i: m(i, inference=True))(ours, jnp.asarray(idx)))
    with torch.no_grad():
        expected = theirs(torch.tensor(idx)[None]).logits[0].numpy()
    assert expected.shape == (ours.config.block_size, 50257)
    np.testing.assert_allclose(logits[:, :50257], expected, atol=1e-4, rtol=0)


def test_exported_tokenizer_is_gpt2s(exported):
    out, _ = exported
    tok = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.get("gpt2").encode(TEXT)
    assert tok.encode(TEXT) == ids and tok.decode(ids) == TEXT
    assert tok.eos_token_id == 50256 and len(tok) == 50257


def test_transformers_scores_hellaswag_as_the_run_logged(bpe_run, exported):  # noqa: F811
    _, theirs = exported
    enc = tokenizer.get("gpt2")
    expected = [reference(theirs, r, enc, n_positions=theirs.config.n_positions) for r in RECORDS]
    acc = np.mean([np.argmin(s) == r["label"] for (s, _), r in zip(expected, RECORDS)])
    acc_norm = np.mean([np.argmin(m) == r["label"] for (_, m), r in zip(expected, RECORDS)])
    out = bpe_run["out"]
    assert (curve(out, "eval/hellaswag_acc")[10], curve(out, "eval/hellaswag_acc_norm")[10]) == \
        pytest.approx((acc, acc_norm))


def test_a_bias_free_run_exports_with_zero_biases_and_a_variant_is_one_line(tmp_path):
    from tests.conftest import shakespeare

    prepare.prepare_char(shakespeare()[:20_000], str(tmp_path / "data"))
    run(str(tmp_path / "data"), str(tmp_path / "run"), "--max_iters=1", "--block_size=8")  # bias=false
    export_cmd = lambda run_dir, hf_dir: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "nanojaxgpt.export", f"--init_from={run_dir}", f"--out={hf_dir}"],
        env=os.environ, capture_output=True, text=True, timeout=240)
    proc = export_cmd(tmp_path / "run", tmp_path / "hf")
    assert proc.returncode == 0 and "no tokenizer files: the model reads 'char' tokens" in proc.stdout, proc.stderr
    ours = sample.model_and_tokenizer(str(tmp_path / "run")).model
    assert not ours.config.bias
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager", dtype=torch.float32)
    vocab = ours.config.vocab_size  # the characters of the text
    idx = np.random.RandomState(0).randint(0, vocab, 8)
    with torch.no_grad():
        expected = theirs.eval()(torch.tensor(idx)[None]).logits[0].numpy()
    logits = np.asarray(jax.jit(lambda m, i: m(i, inference=True))(ours, jnp.asarray(idx)))
    np.testing.assert_allclose(logits[:, :vocab], expected, atol=1e-4, rtol=0)
    assert not theirs.transformer.h[0].mlp.c_fc.bias.any()

    run(str(tmp_path / "data"), str(tmp_path / "rms"), "--max_iters=1", "--block_size=8", "--norm=rmsnorm")
    proc = export_cmd(tmp_path / "rms", tmp_path / "hf-rms")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: only the GPT-2 architecture exports to Hugging Face format (mlp='gelu', "
        "norm='layernorm', position='learned'); this model has norm='rmsnorm'")
    assert not (tmp_path / "hf-rms").exists()
    with pytest.raises(ValueError, match="writes a local directory"):
        export.export(str(tmp_path / "run"), "gs://bucket/hf")
