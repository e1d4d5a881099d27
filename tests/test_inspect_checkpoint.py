"""tools/inspect_checkpoint.py on real runs: complete, half-written and damaged checkpoints, local
and gs://."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import jax.numpy as jnp
import pytest

from nanojaxgpt import checkpoint
from nanojaxgpt.config import CheckpointConfig, Config, MeshConfig
from tests.test_checkpoint import CFG, REPO, kill_mid_save, save
from tests.test_checkpoint_integrity import flip_largest_local, state_of
from tools import inspect_checkpoint

N = 1 << 22  # floats in the killed saver's state: 16 MiB a checkpoint


@dataclass(frozen=True)
class KilledRun:
    path: str
    killed: int  # the step cut off mid-save; the steps before it are complete (default Config)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> KilledRun:
    run = str(tmp_path_factory.mktemp("killed"))
    return KilledRun(run, kill_mid_save(run, N))


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()[2:]]


def test_table_marks_incomplete_and_shows_sizes_and_config(killed_run, capsys):
    k = killed_run.killed
    assert inspect_checkpoint.main([killed_run.path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"checkpoints in {killed_run.path}/checkpoints"
    assert out.splitlines()[1].split()[:4] == ["step", "status", "bytes", "size"]
    (step1, status1, bytes1, *rest1), (step2, status2, *_) = rows(out)[-2:]
    assert (step1, status1, step2, status2) == (str(k - 1), "complete", str(k), "INCOMPLETE")
    size = int(bytes1.replace(",", ""))
    assert 0.8 * N * 4 < size < 1.1 * N * 4  # float32 data (zstd saves ~8% of random floats)
    assert rest1 == [f"{size / 2**20:.1f}", "MiB", "12", "12", "768", "1024", "1,-1,1"]
    entries = inspect_checkpoint.list_checkpoints(killed_run.path)
    assert [(e.step, e.complete) for e in entries][-2:] == [(k - 1, True), (k, False)]
    assert entries[-2].size_bytes == size


def test_config_option_prints_the_saved_config(killed_run, capsys):
    assert inspect_checkpoint.main([killed_run.path, "--config", str(killed_run.killed - 1)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(Config().to_json())
    assert inspect_checkpoint.main([killed_run.path, "--config", "70"]) == 1
    assert "no checkpoint of step 70" in capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    assert inspect_checkpoint.main([str(tmp_path / "nope")]) == 1
    assert f"run directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert inspect_checkpoint.main([str(tmp_path)]) == 1
    assert "holds no checkpoints" in capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    assert inspect_checkpoint.main([str(tmp_path)]) == 1
    assert "holds no checkpoints" in capsys.readouterr().err


def test_gcs_run(gcs, capsys):
    run = gcs + "/gpt"
    cfg = Config(model=CFG.model, mesh=MeshConfig(data=2, fsdp=4, tensor=1))
    with checkpoint.Checkpointer(run, CheckpointConfig()) as ck:
        for step in (100, 200):
            ck.save(step, {"w": jnp.zeros((1000,))}, cfg)
    assert inspect_checkpoint.main([run]) == 0
    table = rows(capsys.readouterr().out)
    assert [r[:2] for r in table] == [["100", "complete"], ["200", "complete"]]
    assert table[0][-5:] == ["2", "2", "16", "8", "2,4,1"]
    assert inspect_checkpoint.main([run, "--config", "200"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(cfg.to_json())
    assert inspect_checkpoint.main([run, "--verify"]) == 0  # the arrays read back from gs://
    assert [r[:2] for r in rows(capsys.readouterr().out)] == [["100", "complete"], ["200", "complete"]]


def test_damaged_checkpoints_show_as_damaged_with_the_reason(tmp_path, capsys):
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig(keep_checkpoints=10)) as ck:
        for step in range(1, 7):
            state = state_of(step)
            if step == 6:
                state["big"] = state["big"].at[5].set(float("nan"))
            save(ck, step, state)
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / "2" / "state")  # the state is gone, the commit markers are not
    meta = root / "3" / "meta" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "note": "added"}))
    (root / "4" / "config" / "metadata").write_bytes(b"\x89\xff not json")
    flip_largest_local(root / "5")  # array bytes: seen only when the arrays are read

    assert inspect_checkpoint.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    table = rows(out)
    assert [r[:2] for r in table[:6]] == [["1", "complete"], ["2", "DAMAGED"], ["3", "DAMAGED"],
                                         ["4", "DAMAGED"], ["5", "complete"], ["6", "complete"]]
    reasons = out.split("\n\n", 1)[1].splitlines()
    assert reasons == [
        f"step 2 is DAMAGED ({root / '2'}): its state is missing",
        f"step 3 is DAMAGED ({root / '3'}): its metadata or config changed after it was written "
        "(CRC-32C mismatch)",
        f"step 4 is DAMAGED ({root / '4'}): its config is not readable JSON (UnicodeDecodeError)"]

    assert inspect_checkpoint.main([str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("(every array read and checked)")
    assert [r[1] for r in rows(out)[:6]] == ["complete"] + ["DAMAGED"] * 5
    reasons = out.split("\n\n", 1)[1].splitlines()
    assert reasons[3:] == [
        f"step 5 is DAMAGED ({root / '5'}): the data of big changed after it was written "
        "(digest mismatch)",
        f"step 6 is DAMAGED ({root / '6'}): big holds non-finite values (NaN or inf)"]


def test_runs_as_a_script(killed_run):
    out = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", killed_run.path],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [r[:2] for r in rows(out.stdout)][-1] == [str(killed_run.killed), "INCOMPLETE"]
