"""metrics.py: TensorBoard events read back by TensorBoard's own reader, local and on GCS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nanojaxgpt import metrics


def _read(log_dir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def _points(acc: EventAccumulator, tag: str) -> dict[int, float]:
    steps = [e.step for e in acc.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {sorted(steps)}"
    return {e.step: e.value for e in acc.Scalars(tag)}


def _download(gs_dir: str, dest: Path) -> list[int]:
    """Copy every object under gs_dir into dest; their sizes."""
    from google.cloud import storage

    bucket, _, prefix = gs_dir[len("gs://"):].partition("/")
    sizes = []
    for blob in storage.Client().list_blobs(bucket, prefix=prefix.rstrip("/") + "/"):
        blob.download_to_filename(dest / Path(blob.name).name)
        sizes.append(blob.size)
    return sizes


def _crash_and_resume(log_dir: str) -> None:
    """Run A logs 1..50 and dies without closing; run B resumes from the step-30 checkpoint."""
    a = metrics.Metrics(log_dir, enabled=True)
    for step in range(1, 51):
        a.scalars(step, {"train/loss": 100.0 + step, "val/loss": 10.0 + step if step % 10 == 0 else None})
    a.flush()
    if log_dir.startswith("gs://"):
        a._uploader.close()  # the upload thread finished before the kill
    b = metrics.Metrics(log_dir, enabled=True, resume_step=30)
    for step in range(31, 61):
        b.scalars(step, {"train/loss": 200.0 + step})
        if step == 45:
            b.flush()
    b.scalars(60, {"val/loss": 99.0})  # run B evaluates less often: A's val points 40, 50 must go
    b.close()


def _check_resumed(acc: EventAccumulator) -> None:
    loss = _points(acc, "train/loss")
    assert sorted(loss) == list(range(1, 61))
    assert all(loss[s] == 100.0 + s for s in range(1, 31))
    assert all(loss[s] == 200.0 + s for s in range(31, 61))  # run B's values, not A's
    assert _points(acc, "val/loss") == {10: 20.0, 20: 30.0, 30: 40.0, 60: 99.0}


def test_resume_continues_curve_without_gap_or_duplicate(tmp_path):
    _crash_and_resume(str(tmp_path))
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    _check_resumed(_read(tmp_path))


def test_resume_where_the_loop_logs_the_checkpoint_step_again(tmp_path):
    """A loop that logs iteration `start` first after restoring the checkpoint of step `start`."""
    a = metrics.Metrics(str(tmp_path), enabled=True)
    for step in range(0, 50):
        a.scalars(step, {"train/loss": 100.0 + step})
    a.flush()
    b = metrics.Metrics(str(tmp_path), enabled=True, resume_step=30)
    for step in range(30, 60):
        b.scalars(step, {"train/loss": 200.0 + step})
    b.close()
    loss = _points(_read(tmp_path), "train/loss")
    assert loss == {s: (100.0 if s < 30 else 200.0) + s for s in range(60)}


def test_without_resume_step_old_points_would_duplicate(tmp_path):
    """The START event is what removes the killed run's later points (the test can fail)."""
    a = metrics.Metrics(str(tmp_path), enabled=True)
    for step in range(1, 11):
        a.scalars(step, {"train/loss": float(step)})
    a.close()
    b = metrics.Metrics(str(tmp_path), enabled=True)
    for step in range(6, 11):
        b.scalars(step, {"train/loss": float(step)})
    b.close()
    assert len(_read(tmp_path).Scalars("train/loss")) == 15


def test_gcs_uploads_each_byte_once_and_resumes(gcs, tmp_path):
    log_dir = f"{gcs}/run1/tensorboard"
    # Reference: the same events in one local file.
    ref = tmp_path / "ref"
    m = metrics.Metrics(str(ref), enabled=True)
    for step in range(1, 201):
        m.scalars(step, {"train/loss": 1.0 / step, "train/lr": 1e-3, "perf/mfu": 0.5})
    m.close()
    one_file = sum(f.stat().st_size for f in ref.iterdir())

    m = metrics.Metrics(log_dir, enabled=True)
    for step in range(1, 201):
        m.scalars(step, {"train/loss": 1.0 / step, "train/lr": 1e-3, "perf/mfu": 0.5})
        if step % 20 == 0:
            m.flush()  # 10 flushes: tensorboardX's gs writer would upload ~5.5x the final size
    m.close()
    got = tmp_path / "got"
    got.mkdir()
    sizes = _download(log_dir, got)
    assert len(sizes) == 10  # one object per flush, the last flush left nothing for close()
    assert m.uploaded_bytes == sum(sizes)
    header = 2 * 40  # a file_version record per extra file
    assert one_file <= sum(sizes) <= one_file + len(sizes) * header, (one_file, sizes)
    acc = _read(got)
    assert sorted(_points(acc, "train/loss")) == list(range(1, 201))
    assert _points(acc, "perf/mfu") == {s: 0.5 for s in range(1, 201)}

    _crash_and_resume(f"{gcs}/run2")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    _download(f"{gcs}/run2", resumed)
    _check_resumed(_read(resumed))


def test_flush_wait_returns_with_the_events_in_the_bucket(gcs, tmp_path):
    """What train.py relies on at each checkpoint: the logs so far are on gs:// when it returns."""
    log_dir = f"{gcs}/run/tensorboard"
    m = metrics.Metrics(log_dir, enabled=True)
    for step in range(10):
        m.scalars(step, {"train/loss": float(step)})
    m.flush(wait=True)
    got = tmp_path / "got"
    got.mkdir()
    _download(log_dir, got)  # before close(): a process killed now would lose nothing
    assert sorted(_points(_read(got), "train/loss")) == list(range(10))
    m.close()


def test_upload_interval_rolls_files_without_flush(gcs, tmp_path):
    m = metrics.Metrics(f"{gcs}/tb", enabled=True, upload_interval_s=0.0)
    for step in range(5):
        m.scalars(step, {"train/loss": float(step)})
    m.close()
    sizes = _download(f"{gcs}/tb", tmp_path)
    assert len(sizes) == 5
    assert sorted(_points(_read(tmp_path), "train/loss")) == list(range(5))


def test_missing_bucket_is_a_clear_error(gcs):
    with pytest.raises(metrics.MetricsError, match="gs://no-such-bucket/tb"):
        metrics.Metrics("gs://no-such-bucket/tb", enabled=True)


def test_upload_error_surfaces_on_next_call(gcs):
    from google.cloud import storage

    m = metrics.Metrics(f"{gcs}/tb", enabled=True)
    storage.Client().bucket(gcs[len("gs://"):]).delete()  # uploads now fail with 404
    m.scalars(1, {"train/loss": 1.0})
    m.flush()
    m._uploader._queue.join()  # the background upload has failed by now
    with pytest.raises(metrics.MetricsError, match=f"{gcs}/tb"):
        m.scalars(2, {"train/loss": 2.0})
    with pytest.raises(metrics.MetricsError):
        m.close()


_STALLED_UPLOAD = """
import sys, time
from nanojaxgpt import metrics
m = metrics.Metrics(sys.argv[1], enabled=True, upload_timeout_s=1.0)
m.scalars(1, {"train/loss": 1.0})
t0 = time.monotonic()
try:
    m.flush(wait=True)
except metrics.MetricsError as e:
    print(f"{time.monotonic() - t0:.1f}", e)
"""


@pytest.mark.timeout(120)
def test_a_stalled_upload_is_an_error_within_its_timeout(gcs, gcs_server):
    """Storage that takes 3 s to answer each request: the listing at start waits (the library's
    own 60 s bound), the upload gives up after upload_timeout_s=1, retries included."""
    import os

    from tools.latency_proxy import LatencyProxy

    slow = LatencyProxy(target_port=gcs_server.port, delay_s=3.0)
    try:
        env = {**os.environ, **{k: v.replace(gcs_server.url, slow.url)
                                for k, v in gcs_server.env().items()}}
        out = subprocess.run([sys.executable, "-c", _STALLED_UPLOAD, f"{gcs}/tb"], env=env,
                             capture_output=True, text=True, timeout=100)
    finally:
        slow.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    seconds, message = out.stdout.split(" ", 1)
    assert f"uploading TensorBoard events to {gcs}/tb failed" in message, out.stdout
    assert float(seconds) < 10, out.stdout


def test_disabled_writes_nothing(tmp_path):
    m = metrics.Metrics(str(tmp_path / "tb"), enabled=False, resume_step=3)
    m.scalars(1, {"train/loss": 1.0})
    m.flush()
    m.close()
    assert not (tmp_path / "tb").exists()


def test_import_leaves_torch_alone():
    """tensorboardX would import torch (a second of start-up); torch stays importable after."""
    code = ("import sys, nanojaxgpt.metrics; assert 'torch' not in sys.modules, 'torch imported'; "
            "import torch; torch.zeros(1)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
