"""--train.profile_start/--train.profile_steps: a trace of steady-state steps where TensorBoard's
profile plugin finds it, locally and on gs://."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from nanojaxgpt import prepare
from tests import train_runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import shakespeare

    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    prepare.prepare_char(shakespeare(), str(out))
    return str(out)


def _profile_runs(log_dir) -> list:
    """The runs TensorBoard's profile plugin lists for log_dir (a real `tensorboard` server)."""
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir),
                             "--port", "0", "--host", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if m := re.search(r"(http://127\.0\.0\.1:\d+/)", line):
                break
        else:
            raise AssertionError("tensorboard did not start")
        deadline = time.time() + 60
        while True:
            body = urllib.request.urlopen(m.group(1) + "data/plugin/profile/runs", timeout=30).read()
            runs = json.loads(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
            if runs or time.time() > deadline:
                return runs
            time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()


def test_profile_of_steps_5_to_7_is_listed_by_the_profile_plugin(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = train_runs.run(data_dir, str(out), "--max_iters=10", "--train.profile_start=5",
                          "--train.profile_steps=3", devices=1)
    assert "profiling steps 5-7" in proc.stderr and "profile of steps 5-7 written" in proc.stderr
    traces = list((out / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    runs = _profile_runs(out)
    assert len(runs) == 1, runs


def test_profile_to_gcs_and_a_start_at_the_first_step_is_refused(gcs, data_dir, tmp_path):
    from google.cloud import storage as gcs_client

    out = f"{gcs}/run"
    proc = train_runs.run(data_dir, out, "--max_iters=6", "--train.profile_start=3",
                          "--train.profile_steps=2", devices=1)
    assert "profile of steps 3-4 written" in proc.stderr
    bucket = gcs.removeprefix("gs://")
    names = [b.name for b in gcs_client.Client().list_blobs(bucket, prefix="run/plugins/profile/")]
    assert any(n.endswith(".xplane.pb") for n in names), names
    resumed = train_runs.run(data_dir, out, "--max_iters=8", "--train.profile_start=6", devices=1)
    assert "no profile: train.profile_start=6 is not after this run's first step 6" in resumed.stderr
