"""Resuming through the training command as a user runs it: a checkpoint with changed bytes is
named and skipped for the one before, a changed architecture is one line with exit code 2, and a
changed setting is applied and logged once. One trained run directory, copied for each case."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest

from nanojaxgpt import completion, config, optim
from tests import train_runs
from tests.test_checkpoint_integrity import flip_largest_local
from tests.test_train_errors import _one_error_line, _steps

MAX = "--max_iters=10"


@pytest.fixture(scope="module")
def data_dir(char_data_dir):
    return char_data_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One device, and one compilation cache for the runs below: a rerun does not compile again."""
    return train_runs.cached_env(1, str(tmp_path_factory.mktemp("jax-cache")))


def _run(data_dir, env, out, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run(train_runs.command(data_dir, str(out), *overrides), env=env,
                          cwd=train_runs.REPO, capture_output=True, text=True, timeout=240)


@pytest.fixture
def train(data_dir, env):
    return lambda out, *overrides: _run(data_dir, env, out, *overrides)


@pytest.fixture(scope="module")
def trained(data_dir, env, tmp_path_factory):
    """A finished 10-step run with checkpoints of steps 5 and 10."""
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = _run(data_dir, env, out, MAX)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(out) == [5, 10]
    return out


def copy_of(trained, tmp_path):
    """The run as a preemption after its last checkpoint leaves it: without the completion marker
    (a complete run is not restored again, see tests/test_completion.py)."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / completion.MARKER).unlink()
    return out


def test_changed_bytes_in_the_newest_checkpoint_resume_from_the_one_before(train, trained,
                                                                            tmp_path):
    out = copy_of(trained, tmp_path)
    changed = flip_largest_local(out / "checkpoints" / "10")
    assert "/state/" in str(changed)
    proc = train(out, MAX)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    damaged = [line for line in proc.stderr.splitlines() if "damaged" in line]
    assert len(damaged) == 1, proc.stderr[-3000:]
    assert f"checkpoint {out / 'checkpoints' / '10'} is damaged" in damaged[0]
    assert "failed its integrity check" in damaged[0]
    assert "resumed from step 5" in proc.stderr
    assert _steps(out) == [5, 10]  # step 10 trained again and written over the damaged one
    assert "replacing the unusable checkpoint" in proc.stderr


def test_a_changed_architecture_is_one_line_exit_2(train, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    proc = train(out, MAX, "--n_layer=3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc)  # also: no traceback
    assert "n_layer=2" in line and "n_layer=3" in line and "--n_layer=2" in line, line
    assert [ln for ln in proc.stderr.splitlines() if "n_layer=" in ln] == [line]
    assert "strict" not in proc.stderr and "resumed from" not in proc.stderr
    assert _steps(out) == [5, 10]


def test_a_changed_setting_resumes_and_is_logged_once(train, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    proc = train(out, "--max_iters=12", "--learning_rate=5e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "resumed from step 10" in proc.stderr
    changes = re.findall(r"changed since the checkpoint: (.*)", proc.stderr)
    assert sorted(changes) == ["optim.learning_rate 0.001 -> 0.0005", "train.max_iters 10 -> 12",
                               f"train.out_dir {trained} -> {out}"]  # a copied run says so
    # The new rate is the one trained with: TensorBoard's train/lr at step 11 follows it.
    cfg = config.load(str(train_runs.REPO / "configs/shakespeare_char.toml"),
                      [*train_runs.TINY, "--max_iters=12", "--learning_rate=5e-4"])
    assert math.isclose(train_runs.curve(out, "train/lr")[11],
                        float(optim.learning_rate(cfg.optim, 11)), rel_tol=1e-5)


def _samples_saved(out, step) -> int:
    """The data position in a checkpoint's meta item (JSON)."""
    return json.loads((out / "checkpoints" / str(step) / "meta" / "metadata").read_text())["samples"]


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_a_resume_with_another_batch_size_reads_on_from_the_next_window(train, trained, tmp_path,
                                                                        sampling):
    """10 steps of 8 windows, then 2 steps of 16 x 2 accumulated: the resumed run starts at
    window 80, the first unread one, and its checkpoint says it read 80 + 2 x 32."""
    if sampling == "random":
        out = copy_of(trained, tmp_path)
    else:
        out = tmp_path / "run"
        assert train(out, MAX, "--sampling=epoch").returncode == 0
    assert _samples_saved(out, 10) == 80
    proc = train(out, "--max_iters=12", "--batch_size=16", "--gradient_accumulation_steps=2",
                 f"--sampling={sampling}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step 10 ({out}; 80 training windows read)" in proc.stderr
    assert _samples_saved(out, 12) == 80 + 2 * 16 * 2


def test_a_checkpoint_saved_without_its_data_position_read_its_batch_size_every_step():
    from nanojaxgpt import checkpoint, train

    old = checkpoint.Restored(step=10, state=None, meta={},
                              config={"train": {"batch_size": 8, "gradient_accumulation_steps": 2}})
    assert train._samples_read(old) == 160
    assert train._samples_read(checkpoint.Restored(step=10, state=None, meta={"samples": 99},
                                                   config=old.config)) == 99
