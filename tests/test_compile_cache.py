"""The persistent compilation cache through the training command: a cold start compiles and fills
out_dir/compile_cache, local or gs://; the same command again loads its steps from it."""

from __future__ import annotations

import re

import pytest

from tests import train_runs

LINE = re.compile(r"compilation cache (\S+): (\d+) compiles loaded from it, ([\d.]+) s of compiling saved")
STEPS = ("jit_train_fn", "jit_eval_fn")  # the train and eval steps: most of a start-up's compiling
# The run's own default cache, not the suite's; JAX logs each entry it writes. Every compile is
# kept, however short: JAX's default skips those under a second, and on a fast machine the eval
# step compiles in less (0.8 s seen here), which says nothing about the cache.
EXPLAIN = {"JAX_COMPILATION_CACHE_DIR": None, "JAX_EXPLAIN_CACHE_MISSES": "true",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def data_dir(char_data_dir):
    return char_data_dir


def _served(proc) -> tuple[str, int, float]:
    (m,) = LINE.findall(proc.stderr)
    return m[0], int(m[1]), float(m[2])


def _written(proc) -> set[str]:
    return set(re.findall(r"Writing (\S+) to persistent compilation cache", proc.stderr))


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_restart_loads_its_compiled_steps(where, data_dir, tmp_path, request):
    out = request.getfixturevalue("gcs") + "/run" if where == "gs" else str(tmp_path / "run")
    cold = train_runs.run(data_dir, out, "--max_iters=2", devices=2, env=EXPLAIN)
    assert _served(cold) == (f"{out}/compile_cache", 0, 0.0), cold.stderr[-3000:]
    assert set(STEPS) <= _written(cold), cold.stderr[-3000:]
    again = train_runs.run(data_dir, out, "--max_iters=4", devices=2, env=EXPLAIN)
    assert "resumed from step 2" in again.stderr
    path, hits, saved = _served(again)
    assert path == f"{out}/compile_cache" and hits >= 2 and saved > 0, again.stderr[-3000:]
    assert not set(STEPS) & _written(again), again.stderr[-3000:]  # loaded, not compiled again


def test_off_compiles_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = train_runs.run(data_dir, str(out), "--max_iters=1", "--compilation_cache_dir=off",
                          devices=2, env=EXPLAIN)
    assert not LINE.search(proc.stderr) and not (out / "compile_cache").exists()
