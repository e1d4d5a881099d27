"""HellaSwag scoring against a straightforward transformers reference (llm.c's evaluate loop)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from nanojaxgpt import hellaswag, hf, sharding, tokenizer
from nanojaxgpt.config import MeshConfig
from tests.eval_runs import RECORDS
from tests.test_hf import save_tiny_gpt2

N_POSITIONS = 64


def reference(model: GPT2LMHeadModel, record: dict, enc, n_positions: int = N_POSITIONS
              ) -> tuple[np.ndarray, np.ndarray]:
    """llm.c dev/data/hellaswag.py: rows ctx + " " + ending zero-padded, mask on the ending,
    summed and mean cross-entropy of the masked targets; rows longer than the context are cut
    from the left (the model takes at most n_positions inputs)."""
    ctx = enc.encode(record["ctx"])
    rows, masks = [], []
    for ending in record["endings"]:
        end = enc.encode(" " + ending)
        row, mask = ctx + end, [0] * len(ctx) + [1] * len(end)
        rows.append(row[-(n_positions + 1):])
        masks.append(mask[-(n_positions + 1):])
    width = max(map(len, rows))
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)], mask[i, :len(m)] = torch.tensor(r), torch.tensor(m)
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                             reduction="none").view(len(rows), -1)
    shift_mask = mask[:, 1:]
    total = (losses * shift_mask).sum(dim=1)
    return total.numpy(), (total / shift_mask.sum(dim=1)).numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hellaswag")
    ref = save_tiny_gpt2(root / "model", vocab_size=50257, n_layer=2, n_head=2, n_embd=32,
                         n_positions=N_POSITIONS, seed=1)
    data = root / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    enc = tokenizer.get("gpt2")
    expected = [reference(ref, r, enc) for r in RECORDS]
    return {"dir": root / "model", "file": data, "expected": expected, "enc": enc}


def _expected_line(expected) -> str:
    acc = np.mean([np.argmin(s) == r["label"] for (s, _), r in zip(expected, RECORDS)])
    acc_norm = np.mean([np.argmin(m) == r["label"] for (_, m), r in zip(expected, RECORDS)])
    return f"hellaswag acc {acc:.4f} acc_norm {acc_norm:.4f} ({len(RECORDS)} examples)"


@pytest.mark.parametrize("devices", [8, 1])
def test_per_ending_losses_and_choices_equal_transformers(setup, devices):
    import jax

    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:devices])
    examples = hellaswag.read_examples(setup["file"])
    results = hellaswag.score(hf.load(str(setup["dir"])), examples, setup["enc"], mesh=mesh,
                              tokens_per_device=64)  # several batches and windows
    assert len(results) == len(RECORDS)
    for got, (total, mean), record in zip(results, setup["expected"], RECORDS):
        np.testing.assert_allclose(got.loss_sum, total, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got.loss_mean, mean, rtol=1e-5, atol=1e-5)
        assert (got.pred, got.pred_norm, got.label) == (np.argmin(total), np.argmin(mean), record["label"])
    # the choices differ between the two rules somewhere, so both are really checked
    assert any(np.argmin(t) != np.argmin(m) for t, m in setup["expected"])
    assert hellaswag.summarize(results).line() == _expected_line(setup["expected"])


def test_eval_command_prints_the_reference_accuracy(setup):
    cmd = [sys.executable, "-m", "nanojaxgpt.eval", f"--init_from={setup['dir']}",
           "--tasks=hellaswag", f"--hellaswag_file={setup['file']}"]
    run = subprocess.run(cmd, env=os.environ, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == _expected_line(setup["expected"])
    limited = subprocess.run(cmd + ["--limit=2"], env=os.environ, capture_output=True, text=True,
                             timeout=240)
    assert limited.returncode == 0, limited.stderr
    assert limited.stdout.strip().endswith("(2 examples)")


def test_file_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # nothing listens on port 9 of loopback: a download that fails as it does offline
    with pytest.raises(hellaswag.HellaSwagError, match="pass --hellaswag_file=PATH"):
        hellaswag.dataset_file(None, url="http://127.0.0.1:9/hellaswag_val.jsonl")
    assert not any((tmp_path / "cache").rglob("*.part*"))
    cached = tmp_path / "cache" / "nanojaxgpt" / "hellaswag" / "hellaswag_val.jsonl"
    cached.write_text(json.dumps(RECORDS[0]) + "\n")
    assert hellaswag.dataset_file(None, url="http://127.0.0.1:9/") == cached  # no download
    with pytest.raises(hellaswag.HellaSwagError, match="no such file"):
        hellaswag.dataset_file(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + '{"ctx": "x", "endings": ["a"]}\n')
    with pytest.raises(hellaswag.HellaSwagError, match="line 2 is not a HellaSwag record"):
        hellaswag.read_examples(bad)
    assert len(hellaswag.read_examples(bad, limit=1)) == 1


def test_two_hosts_score_their_shares_and_print_the_reference(setup):
    """The eval command as a 2-process jax.distributed job (2 devices each): the rows are spread
    over 4 devices on 2 hosts, the results gathered; process 0 alone prints."""
    from tests import multiprocess

    code = f"""
import jax
from nanojaxgpt import eval
try:
    eval.cli(["--init_from={setup['dir']}", "--tasks=hellaswag", "--hellaswag_file={setup['file']}"])
finally:
    print("processes", jax.process_count(), "devices", jax.device_count())
"""
    env = {"TIKTOKEN_CACHE_DIR": os.environ.get("TIKTOKEN_CACHE_DIR")}
    with multiprocess.launch(code, n_processes=2, local_device_count=2, env=env) as job:
        results = job.wait(timeout=240)
    assert [r.returncode for r in results] == [0, 0], results[0].output[-3000:] + results[1].output[-3000:]
    expected = _expected_line(setup["expected"])
    assert expected in results[0].output.splitlines()
    assert expected not in results[1].output
    assert all("processes 2 devices 4" in r.output for r in results)
