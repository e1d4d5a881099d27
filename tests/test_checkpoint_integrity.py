"""Checkpoint integrity: bytes changed after a save (local and gs://), a non-finite state and
edited metadata are each reported with the checkpoint's path and skipped for the one before."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from nanojaxgpt import checkpoint
from nanojaxgpt.config import CheckpointConfig
from tests.test_checkpoint import abstract_of, assert_bitwise_equal, save, train_state


def state_of(seed: int) -> dict:
    """A train state whose largest file on storage is array data (256 KiB of random floats)."""
    return {**train_state(seed), "big": jax.random.normal(jax.random.key(seed), (1 << 16,))}


def save_two(run: str, second: dict | None = None) -> dict[int, dict]:
    states = {1: state_of(1), 2: second if second is not None else state_of(2)}
    with checkpoint.Checkpointer(run, CheckpointConfig()) as ck:
        for s, state in states.items():
            save(ck, s, state)
    return states


def flip_middle(data: bytes, n: int = 4) -> bytes:
    """The same bytes with n of them in the middle inverted: same size, other content."""
    raw = bytearray(data)
    for i in range(len(raw) // 2, len(raw) // 2 + n):
        raw[i] ^= 0xFF
    return bytes(raw)


def flip_largest_local(step_dir: Path) -> Path:
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = largest.stat().st_size
    largest.write_bytes(flip_middle(largest.read_bytes()))
    assert largest.stat().st_size == size
    return largest


def flip_largest_gcs(step_dir: str) -> str:
    """Rewrite the largest object under a gs:// step directory with bytes changed in its middle."""
    from google.cloud import storage

    bucket_name, _, prefix = step_dir.removeprefix("gs://").partition("/")
    client = storage.Client()
    largest = max(client.list_blobs(bucket_name, prefix=prefix + "/"), key=lambda b: b.size)
    data = largest.download_as_bytes()
    client.bucket(bucket_name).blob(largest.name).upload_from_string(flip_middle(data))
    assert client.bucket(bucket_name).get_blob(largest.name).size == len(data)
    return largest.name


def restore_warned(run: str, abstract, caplog) -> tuple[checkpoint.Restored, list[str]]:
    with checkpoint.Checkpointer(run, CheckpointConfig()) as ck:
        assert ck.latest_step() == 2
        with caplog.at_level(logging.WARNING, logger="nanojaxgpt.checkpoint"):
            r = ck.restore(abstract)
    return r, [m for m in caplog.messages if "damaged" in m]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_bytes_changed_in_the_middle_are_caught(where, tmp_path, request, caplog):
    run = request.getfixturevalue("gcs") + "/run" if where == "gcs" else str(tmp_path)
    states = save_two(run)
    step_dir = str(epath.Path(run) / "checkpoints" / "2")
    if where == "gcs":
        changed = flip_largest_gcs(step_dir)
    else:
        changed = str(flip_largest_local(Path(step_dir)))
    assert "/state/" in changed  # the array data, not a JSON file
    r, warned = restore_warned(run, abstract_of(states[1]), caplog)
    assert r.step == 1
    assert_bitwise_equal(r.state, states[1])
    assert len(warned) == 1 and step_dir in warned[0], caplog.messages
    assert "failed its integrity check: the data of big changed" in warned[0]
    with checkpoint.Checkpointer(run, CheckpointConfig()) as ck:
        with pytest.raises(checkpoint.CheckpointError, match=f"{step_dir}: failed its integrity"):
            ck.restore(abstract_of(states[1]), step=2)


def test_a_non_finite_state_is_skipped(tmp_path, caplog):
    bad = state_of(2)
    bad["big"] = bad["big"].at[123].set(np.nan)
    with caplog.at_level(logging.WARNING, logger="nanojaxgpt.checkpoint"):
        states = save_two(str(tmp_path), second=bad)
    assert any("state of step 2 holds non-finite values (big)" in m for m in caplog.messages)
    caplog.clear()
    r, warned = restore_warned(str(tmp_path), abstract_of(states[1]), caplog)
    assert r.step == 1
    assert_bitwise_equal(r.state, states[1])
    assert len(warned) == 1 and str(tmp_path / "checkpoints" / "2") in warned[0]
    assert "big holds non-finite values" in warned[0]


@pytest.mark.parametrize("item", ["meta", "config"])
def test_edited_metadata_is_caught(item, tmp_path, caplog):
    states = save_two(str(tmp_path))
    path = tmp_path / "checkpoints" / "2" / item / "metadata"
    saved = json.loads(path.read_text())
    if item == "meta":
        saved["note"] = "added"  # still valid JSON
    else:
        saved["optim"]["learning_rate"] *= 10
    path.write_text(json.dumps(saved))
    r, warned = restore_warned(str(tmp_path), abstract_of(states[1]), caplog)
    assert r.step == 1 and r.meta == {}
    assert_bitwise_equal(r.state, states[1])
    assert len(warned) == 1 and str(tmp_path / "checkpoints" / "2") in warned[0]
    assert "metadata or config changed after it was written" in warned[0]
