"""End to end on one host: a short run, kill and resume, and the same run on three meshes."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from tests import train_runs
from tests.train_runs import curve, run

MAX = "--max_iters=20"


@pytest.fixture(scope="module")
def data_dir(char_data_dir):
    return char_data_dir


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run on 8 devices as data=2, fsdp=2, tensor=2."""
    out = tmp_path_factory.mktemp("reference")
    proc = run(data_dir, str(out), MAX, "--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2")
    return {"out": out, "log": proc.stderr}


def test_short_run_writes_logs_checkpoints_and_config(reference):
    out = reference["out"]
    loss = curve(out, "train/loss")
    assert sorted(loss) == list(range(20))
    assert loss[19] < loss[0] - 0.3  # it learns: ln(65) = 4.17 at the start, ~3.7 after 20 steps
    val = curve(out, "val/loss")
    assert sorted(val) == [0, 10, 20]
    for tag in ("train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/step_time_ms"):
        assert len(curve(out, tag)) == 20, tag
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["n_layer"] == 2 and saved["model"]["vocab_size"] == 65
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10, 15, 20]
    assert "step 19/20" in reference["log"] and "eta" in reference["log"]


def test_sigkill_then_same_command_resumes_bitwise(data_dir, reference, tmp_path):
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = train_runs.start(data_dir, str(out), MAX, "--mesh.data=2", "--mesh.fsdp=2",
                            "--mesh.tensor=2", log=log)
    train_runs.wait_for(log, "step 12/20", proc)  # past the step-10 checkpoint, before 15
    train_runs.kill(proc)
    resumed = run(data_dir, str(out), MAX, "--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2")
    # The latest COMPLETE checkpoint: 10, or 5 when the async save of 10 was still in flight.
    assert re.search(r"resumed from step (5|10) ", resumed.stderr), resumed.stderr[-2000:]
    for tag in ("train/loss", "val/loss", "train/grad_norm"):
        # Same mesh, same batches, same dropout masks: the curve is bitwise the uninterrupted one,
        # each step once (what the killed run logged after step 10 is dropped by TensorBoard).
        assert curve(out, tag) == curve(reference["out"], tag), tag


@pytest.mark.parametrize("mesh,devices", [(["--mesh.fsdp=8"], 8), ([], 1)], ids=["fsdp8", "1dev"])
def test_other_meshes_give_the_same_curve(data_dir, reference, tmp_path, mesh, devices):
    out = tmp_path / "run"
    run(data_dir, str(out), MAX, *mesh, devices=devices)
    ours, ref = curve(out, "train/loss"), curve(reference["out"], "train/loss")
    assert sorted(ours) == sorted(ref)
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [ref[s] for s in sorted(ref)],
                               rtol=2e-5, atol=2e-5)


def test_checkpoint_from_one_mesh_resumes_on_another(data_dir, reference, tmp_path):
    out = tmp_path / "moved"
    shutil.copytree(reference["out"] / "checkpoints", out / "checkpoints")
    for step in (15, 20):  # keep the run's state at step 10 only
        shutil.rmtree(out / "checkpoints" / str(step))
    proc = run(data_dir, str(out), MAX, devices=1)
    assert "resumed from step 10" in proc.stderr
    ours, ref = curve(out, "train/loss"), curve(reference["out"], "train/loss")
    assert sorted(ours) == list(range(10, 20))
    np.testing.assert_allclose([ours[s] for s in range(10, 20)], [ref[s] for s in range(10, 20)],
                               rtol=2e-5, atol=2e-5)


def _cli_error(capsys, *argv: str) -> str:
    from nanojaxgpt import train

    with pytest.raises(SystemExit) as exit_:
        train.cli([str(train_runs.REPO / "configs/shakespeare_char.toml"), *argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    err = _cli_error(capsys, f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'out'}")
    assert "no prepared data in" in err and "nowhere" in err and "tools/prepare_" in err


def test_unknown_flag_is_a_clear_error(tmp_path, capsys):
    err = _cli_error(capsys, "--n_layr=3")
    assert "unknown config key 'n_layr'" in err and "n_layer" in err


def test_sample_from_the_run_directory(reference, capsys):
    """`python -m nanojaxgpt.sample --init_from=OUT_DIR`: the run's model and its char tokenizer."""
    from nanojaxgpt import sample

    argv = [f"--init_from={reference['out']}", "--start=ROMEO:", "--num_samples=2",
            "--max_new_tokens=30", "--seed=7"]
    assert sample.main(argv) == 0
    first = capsys.readouterr().out
    samples = [s.strip("\n") for s in first.split("---------------") if s.strip()]
    assert len(samples) == 2
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 30 for s in samples)
    assert sample.main(argv) == 0 and capsys.readouterr().out == first  # the seed fixes the text


def test_eval_only_evaluates_the_latest_checkpoint_and_trains_nothing(data_dir, reference, tmp_path):
    out = tmp_path / "evaluated"
    shutil.copytree(reference["out"] / "checkpoints", out / "checkpoints")
    proc = run(data_dir, str(out), MAX, "--eval_only=true", devices=1)
    assert "resumed from step 20" in proc.stderr
    val = curve(out, "val/loss")
    assert list(val) == [20]
    np.testing.assert_allclose(val[20], curve(reference["out"], "val/loss")[20], rtol=2e-5)
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10, 15, 20]  # nothing trained, nothing saved


def test_fine_tune_takes_the_pretrained_architecture_and_resumes(data_dir, tmp_path):
    """--init_from=HF_DIR as nanoGPT's init_from='gpt2': the architecture is the checkpoint's."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=48, n_layer=1, n_head=3)
    hf_dir = tmp_path / "pretrained"
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(hf_dir)
    out = tmp_path / "finetune"
    first = run(data_dir, str(out), "--max_iters=4", f"--init_from={hf_dir}", devices=1)
    assert f"initialised from {hf_dir}" in first.stderr
    saved = json.loads((out / "config.json").read_text())["model"]
    # TINY asks for 2 layers x 32 wide; the pretrained model has 1 x 48 and its own vocabulary.
    assert (saved["n_layer"], saved["n_embd"], saved["n_head"], saved["vocab_size"]) == (1, 48, 3, 80)
    assert saved["dropout"] == 0.1  # run-time settings still come from the command line
    again = run(data_dir, str(out), "--max_iters=8", f"--init_from={hf_dir}", devices=1)
    assert "resumed from step 4" in again.stderr
    assert sorted(curve(out, "train/loss")) == list(range(8))
