"""The DONE marker: written once a run reaches max_iters, read by a rerun and by launch/supervise.py."""

from __future__ import annotations

import json

import pytest

from nanojaxgpt import completion, prepare
from tests.train_runs import run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import shakespeare

    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    prepare.prepare_char(shakespeare(), str(out))
    return str(out)


def test_finished_run_marks_itself_and_a_rerun_does_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    first = run(data_dir, str(out), "--max_iters=10", devices=2)
    assert json.loads((out / "DONE").read_text()) == {"step": 10}
    assert "run complete" in first.stderr
    again = run(data_dir, str(out), "--max_iters=10", devices=2)
    assert "is complete (step 10 >= max_iters 10); nothing to do" in again.stderr
    assert "resumed from" not in again.stderr and "train loss" not in again.stderr
    # A higher max_iters continues the finished run and moves the marker.
    more = run(data_dir, str(out), "--max_iters=15", devices=2)
    assert "resumed from step 10" in more.stderr
    assert completion.done_step(str(out)) == 15


def test_a_run_stopped_before_max_iters_is_not_complete(tmp_path):
    assert completion.done_step(str(tmp_path)) is None
    assert not completion.is_complete(str(tmp_path), 10)
    completion.mark(str(tmp_path), 5)
    assert not completion.is_complete(str(tmp_path), 10) and completion.is_complete(str(tmp_path), 5)


def test_marker_on_gcs(gcs):
    out = gcs + "/runs/a"
    assert completion.done_step(out) is None
    completion.mark(out, 20)
    assert completion.done_step(out) == 20 and completion.is_complete(out, 20)
