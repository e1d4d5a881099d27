"""The eval command on a run directory agrees with the run's own curves; HellaSwag in the training
loop; every error of the command and of train.hellaswag is one line with exit code 2."""

import os
import subprocess
import sys

import numpy as np
import pytest

from nanojaxgpt import eval as evaluate
from nanojaxgpt import hellaswag, prepare, sample, tokenizer, train
from tests.eval_runs import RECORDS, bpe_run, write_records  # noqa: F401  (a fixture)
from tests.test_hf import save_tiny_gpt2
from tests.train_runs import curve


def test_training_logs_hellaswag_and_the_command_reads_the_same(bpe_run):  # noqa: F811
    out = bpe_run["out"]
    acc, acc_norm = curve(out, "eval/hellaswag_acc"), curve(out, "eval/hellaswag_acc_norm")
    assert sorted(acc) == sorted(acc_norm) == [0, 10]
    assert all(v * len(RECORDS) == pytest.approx(round(v * len(RECORDS))) for v in acc.values())

    cmd = [sys.executable, "-m", "nanojaxgpt.eval", f"--init_from={out}",
           "--tasks=hellaswag,val_loss", f"--hellaswag_file={bpe_run['hellaswag']}"]
    proc = subprocess.run(cmd, env=os.environ, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    hs, val = proc.stdout.strip().split("\n")
    assert hs == hellaswag.Summary(acc[10], acc_norm[10], len(RECORDS)).line()
    tokens = 4 * 8 * 32  # the run's eval_iters x batch_size x block_size
    assert val == f"val loss {curve(out, 'val/loss')[10]:.4f} ({tokens} tokens)"

    # In full precision, from Python: the run's eval set, the same model, the same loss.
    loaded = sample.model_and_tokenizer(str(out))
    loss, n = evaluate.val_loss(loaded.model, str(bpe_run["data"]), batch_size=8, eval_iters=4,
                                seed=loaded.run_config.train.seed)
    assert n == tokens
    np.testing.assert_allclose(loss, curve(out, "val/loss")[10], rtol=1e-5)
    scored = hellaswag.score(loaded.model, hellaswag.read_examples(bpe_run["hellaswag"]),
                             tokenizer.get("gpt2"))
    summary = hellaswag.summarize(scored)
    np.testing.assert_allclose([summary.acc, summary.acc_norm], [acc[10], acc_norm[10]], rtol=1e-6)


def _exit_and_error(capsys, fn, argv) -> tuple[int, str]:
    capsys.readouterr()  # what came before (progress bars of the fixtures)
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([x for x in err.splitlines() if "error" in x]) == 1, err
    return e.value.code, err.splitlines()[-1]


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2_50257")
    save_tiny_gpt2(path, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, n_positions=32)
    return path


def test_command_errors_are_one_line(gpt2_vocab_dir, tmp_path, capsys):
    hs = tmp_path / "hellaswag_val.jsonl"
    write_records(hs)
    small = tmp_path / "small"
    save_tiny_gpt2(small, vocab_size=300, n_layer=1, n_head=1, n_embd=8, n_positions=16)
    cases = [([f"--init_from={gpt2_vocab_dir}", "--tasks=hellaswag,mmlu"], "unknown task mmlu"),
             ([f"--init_from={gpt2_vocab_dir}", "--tasks=val_loss"], "needs --data_dir=DIR"),
             ([f"--init_from={gpt2_vocab_dir}", "--tasks=val_loss", f"--data_dir={tmp_path}/none"],
              "no prepared data in"),
             ([f"--init_from={gpt2_vocab_dir}", f"--hellaswag_file={tmp_path}/none.jsonl"], "no such file"),
             ([f"--init_from={gpt2_vocab_dir}", f"--hellaswag_file={hs}", "--limit=-1"], "--limit=-1"),
             ([f"--init_from={small}", f"--hellaswag_file={hs}"], "needs a GPT-2 BPE model"),
             ([f"--init_from={tmp_path}/nowhere", f"--hellaswag_file={hs}"], "does not exist")]
    for argv, message in cases:
        code, err = _exit_and_error(capsys, evaluate.cli, argv)
        assert code == 2 and message in err, (argv, err)


def test_hellaswag_in_training_needs_gpt2_tokens_and_the_file(tmp_path, capsys):
    from tests.conftest import shakespeare

    prepare.prepare_char(shakespeare()[:20_000], str(tmp_path / "char"))
    prepare.prepare_documents(["one document", "another one"] * 4, 8, str(tmp_path / "bpe"),
                              val_fraction=0.5, seed=0)
    common = ["configs/shakespeare_char.toml", "--n_layer=1", "--n_embd=16", "--n_head=1",
              "--block_size=4", "--max_iters=1", "--train.hellaswag=true"]
    cases = [([f"--data_dir={tmp_path / 'char'}", f"--out_dir={tmp_path / 'o1'}"],
              "needs GPT-2 BPE data"),
             ([f"--data_dir={tmp_path / 'bpe'}", f"--out_dir={tmp_path / 'o2'}",
               f"--hellaswag_file={tmp_path / 'none.jsonl'}"], "train.hellaswag: --hellaswag_file=")]
    for argv, message in cases:
        code, err = _exit_and_error(capsys, train.cli, common + argv)
        assert code == 2 and message in err, (argv, err)
