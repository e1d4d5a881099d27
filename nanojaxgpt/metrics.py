"""TensorBoard scalars from process 0 (the console line and MFU are nanojaxgpt.progress's).

Event files are written in TensorBoard's format with tensorboardX's protos and record writer.
- Resume: a run that restarts from the checkpoint of step N writes, first in its first event file,
  a SessionLog START event at step min(N + 1, first step it logs). TensorBoard's reader
  (EventAccumulator) then drops every point at or after that step read from earlier files, for
  every tag, so the curve continues with no gap and no duplicate even where the killed run had
  logged past N (and also where the new run logs step N itself again). (TensorBoard's Rust data server,
  `--load_fast`, ignores START but drops a tag's later points when that tag's step goes back,
  which gives the same curves for every tag the new run logs again.)
- gs:// log dirs: events go to a local file that is closed, uploaded once as its own object and
  deleted at every flush (and every `upload_interval_s`, and on close), so each byte is uploaded
  once; tensorboardX's own gs:// writer re-uploads the whole growing file at every flush.
  TensorBoard reads a directory's event files in name order: names carry the run's start time
  (made later than any existing file's) and a chunk counter. Uploads run in a background thread;
  an upload error is raised by the next scalars(), flush() or close().
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import SupportsFloat

# tensorboardX's package __init__ imports torch where it is installed (a second of every start)
# only to accept torch tensors; we log Python floats. Hide torch for that one import.
_torch_hidden = "torch" not in sys.modules
if _torch_hidden:
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
try:
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.record_writer import RecordWriter
    from tensorboardX.summary import scalar
finally:
    if _torch_hidden:
        del sys.modules["torch"]

from nanojaxgpt import storage  # noqa: E402

_EVENT_NAME = re.compile(r"events\.out\.tfevents\.(\d{10})\.")


class MetricsError(RuntimeError):
    """Writing or uploading TensorBoard events failed; the message names the path."""


class _Uploader:
    """Background thread: copy closed local event files to gs://bucket/prefix/, each once."""

    def __init__(self, gs_dir: str, local_dir: str, timeout_s: float) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        path = storage.GCSPath.parse(gs_dir)
        # Each upload, retries included, gives up after timeout_s: a stalled bucket is an error
        # (raised in the training thread), not a flush that never returns.
        self._timeout_s = timeout_s
        self._retry = DEFAULT_RETRY.with_timeout(timeout_s)
        self.gs_dir = gs_dir.rstrip("/")
        self.local_dir = local_dir
        self._prefix = path.child("")  # "prefix/" or "" at the bucket's root
        self._bucket = storage.client().bucket(path.bucket)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._error: BaseException | None = None
        self.uploaded_bytes = 0
        self.uploaded_files = 0
        self._thread = threading.Thread(target=self._run, name="tensorboard-upload", daemon=True)

    def existing_names(self) -> list[str]:
        try:
            blobs = self._bucket.client.list_blobs(self._bucket, prefix=self._prefix, delimiter="/")
            return [b.name[len(self._prefix):] for b in blobs]
        except Exception as e:
            raise MetricsError(f"cannot list TensorBoard log dir {self.gs_dir}: {e}; check that "
                               "the bucket exists and that this machine may write to it") from e

    def submit(self, path: str) -> None:
        if not self._thread.is_alive():
            self._thread.start()
        self._queue.put(path)

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            if self._error is None:  # after a failure keep the files on disk, upload nothing more
                try:
                    size = os.path.getsize(path)
                    # if_generation_match=0: create only, which also makes the upload safe to retry.
                    self._bucket.blob(self._prefix + os.path.basename(path)).upload_from_filename(
                        path, if_generation_match=0, timeout=self._timeout_s, retry=self._retry)
                    os.remove(path)
                    self.uploaded_bytes += size
                    self.uploaded_files += 1
                except BaseException as e:  # noqa: BLE001 - handed to the training thread
                    self._error = e
            self._queue.task_done()

    def check(self) -> None:
        if self._error is not None:  # sticky: the files after a failed one stay on local disk
            raise MetricsError(f"uploading TensorBoard events to {self.gs_dir} failed: "
                               f"{self._error}; the files not uploaded are in {self.local_dir}"
                               ) from self._error

    def drain(self) -> None:
        """Block until every submitted file is uploaded (or has failed)."""
        if self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.check()


class Metrics:
    """TensorBoard writer for one run directory (local or gs://); a no-op where not enabled."""

    def __init__(self, log_dir: str, *, enabled: bool, resume_step: int | None = None,
                 upload_interval_s: float = 60.0, upload_timeout_s: float = 120.0) -> None:
        self.enabled = enabled
        self.log_dir = log_dir
        if not enabled:
            return
        self._uploader = None
        if storage.is_gcs(log_dir):
            self._dir = tempfile.mkdtemp(prefix="nanojaxgpt-tensorboard-")
            self._uploader = _Uploader(log_dir, self._dir, upload_timeout_s)
            existing = self._uploader.existing_names()
        else:
            self._dir = log_dir
            os.makedirs(log_dir, exist_ok=True)
            existing = os.listdir(log_dir)
        # Later than every event file already there, so TensorBoard reads this run's files last.
        stamps = [int(m.group(1)) for n in existing if (m := _EVENT_NAME.match(n))]
        self._stamp = max([int(time.time()), *(s + 1 for s in stamps)])
        self._host = socket.gethostname()
        self._resume_step = resume_step
        self._upload_interval_s = upload_interval_s
        self._chunk = 0
        self._file: RecordWriter | None = None
        self._opened_at = 0.0
        atexit.register(self.close)  # a crashing run still writes (and uploads) its last points

    def _write(self, event: Event) -> None:
        if self._file is None:
            name = f"events.out.tfevents.{self._stamp:010d}.{self._host}.{self._chunk:06d}"
            self._file = RecordWriter(os.path.join(self._dir, name))
            self._opened_at = time.monotonic()
            self._file.write(Event(wall_time=time.time(), file_version="brain.Event:2")
                             .SerializeToString())
            if self._chunk == 0 and self._resume_step is not None:
                # Hide earlier points after the checkpoint, and from the first step this run logs
                # (a loop may log the checkpoint's own step again).
                purge = min(self._resume_step + 1, event.step)
                self._file.write(Event(wall_time=time.time(), step=purge,
                                       session_log=SessionLog(status=SessionLog.START))
                                 .SerializeToString())
        self._file.write(event.SerializeToString())

    def scalars(self, step: int, values: Mapping[str, SupportsFloat | None]) -> None:
        """Log `{tag: value}` at `step` (None values, e.g. MFU on CPU, are skipped)."""
        if not self.enabled:
            return
        if self._uploader:
            self._uploader.check()
        now = time.time()
        for tag, value in values.items():
            if value is not None:
                self._write(Event(wall_time=now, step=step, summary=scalar(tag, float(value))))
        if self._uploader and time.monotonic() - self._opened_at >= self._upload_interval_s:
            self._roll()

    def _roll(self) -> None:
        """Close the current file; for gs://, hand it to the uploader (the next event opens a new one)."""
        if self._file is None:
            return
        self._file.flush()
        self._file.close()
        if self._uploader:
            self._uploader.submit(self._file.path)
            self._file = None
            self._chunk += 1

    def flush(self, wait: bool = False) -> None:
        """Local: events on disk now. gs://: the current file starts uploading; with `wait`, the
        call returns once every file so far is in the bucket (one small upload)."""
        if not self.enabled:
            return
        if self._uploader:
            self._uploader.check()
            self._roll()
            if wait:
                self._uploader.drain()
                self._uploader.check()
        elif self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Write and upload everything; raise if any upload failed."""
        if not self.enabled:
            return
        atexit.unregister(self.close)
        self.enabled = False
        self._roll()
        self._file = None
        if self._uploader:
            self._uploader.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def uploaded_bytes(self) -> int:
        """Bytes uploaded to gs:// so far (0 for a local log dir)."""
        uploader = getattr(self, "_uploader", None)
        return uploader.uploaded_bytes if uploader else 0
