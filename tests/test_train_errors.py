"""What a user can get wrong, or what goes wrong under a user, ends well: a diverged run stops
before it saves, a stop signal during start-up exits 0, damaged data is named; one line each."""

from __future__ import annotations

import math
import re
import signal
import subprocess

import pytest

from nanojaxgpt import prepare
from tests import train_runs
from tests.train_runs import curve


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import shakespeare

    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    prepare.prepare_char(shakespeare(), str(out))
    return str(out)


def _train(data_dir, out_dir, *overrides, devices=1) -> subprocess.CompletedProcess:
    return subprocess.run(train_runs.command(data_dir, str(out_dir), *overrides),
                          env=train_runs.env_for(devices), cwd=train_runs.REPO,
                          capture_output=True, text=True, timeout=240)


def _steps(out_dir) -> list[int]:
    return sorted(int(p.name) for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit())


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_divergence_stops_within_log_interval_and_saves_nothing_bad(data_dir, tmp_path):
    out = tmp_path / "run"
    first = _train(data_dir, out, "--max_iters=10", "--log_interval=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _steps(out) == [5, 10]
    # A sure divergence: every step after the resume at 10 multiplies the weights by ~1e30.
    diverged = _train(data_dir, out, "--max_iters=40", "--log_interval=4", "--learning_rate=1e30",
                      "--warmup_iters=0", "--min_lr=0")
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    line = _one_error_line(diverged)
    step = int(re.match(r"error: step (\d+): (loss|grad_norm) is nan", line).group(1))
    assert 10 <= step < 10 + 4 + 1  # seen at the first log step after it, within log_interval
    assert "last checkpoint is step 10" in line and "--learning_rate" in line
    assert _steps(out) == [5, 10]  # keep-N deleted nothing, wrote nothing after the last finite
    again = _train(data_dir, out, "--max_iters=40", "--eval_only=true")
    assert again.returncode == 0 and "resumed from step 10" in again.stderr, again.stderr[-3000:]
    assert math.isfinite(curve(out, "val/loss")[10])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_start_up_exits_0_with_a_message(data_dir, tmp_path, sig):
    out, log = tmp_path / "run", tmp_path / "run.log"
    # A model whose compile takes a while on CPU, so the signal lands before the first step.
    proc = train_runs.start(data_dir, str(out), "--max_iters=5", "--n_layer=8", "--scan_layers=false",
                            log=log, devices=1)
    train_runs.wait_for(log, "tokens per step", proc)  # the mesh is built, the steps compile
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert f"received {signal.Signals(sig).name} during start-up" in text and "nothing to save" in text
    assert "Traceback" not in text and "step 0/" not in text
    assert not (out / "checkpoints").exists() or _steps(out) == []


def test_a_damaged_shard_is_one_line_naming_it(data_dir, tmp_path):
    import shutil

    damaged = tmp_path / "shakespeare_char"
    shutil.copytree(data_dir, damaged)
    shard = damaged / "train-00000-of-00001.array_record"
    raw = bytearray(shard.read_bytes())
    for i in range(200, 60000, 2000):  # in the data of many chunks: every batch touches one
        raw[i] ^= 0x01
    shard.write_bytes(bytes(raw))
    proc = _train(str(damaged), tmp_path / "out", "--max_iters=5")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert f"shard {shard} cannot be read" in line and "damaged" in line


def test_a_mesh_that_cannot_split_the_heads_is_one_line_before_anything_compiles(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = _train(data_dir, out, "--mesh.tensor=8", devices=8)  # 2 heads over 8 devices
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert line.startswith("error: parameter h.attn.c_attn.weight (2, 32, 3, 2, 16): dimension 3 "
                           "('heads', size 2) does not split over mesh tensor=8 (8 devices); "
                           "choose a --mesh.tensor that divides 2 (1, 2)"), line
    assert not out.exists()  # before the run lock: nothing was written
