"""Local-or-gs:// file helpers for the data pipeline: read a small file, list sizes, upload with skip.

gs:// goes through google-cloud-storage with Application Default Credentials (`storage.Client()`);
against an emulator it follows STORAGE_EMULATOR_HOST. Shard files themselves are read by
array_record, which has its own GCS client (CLOUD_STORAGE_EMULATOR_ENDPOINT for an emulator).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

GCS_PREFIX = "gs://"


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS_PREFIX)


def absolute(path: str) -> str:
    """A local path made absolute (and ~ expanded) against the current directory; gs:// as is.

    Orbax and tensorstore refuse relative paths, and a resolved path stays right when the
    working directory changes, so paths a user types are resolved once, where they come in.
    """
    path = str(path)
    if is_gcs(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def join(directory: str, name: str) -> str:
    """`directory/name` for a local path or a gs:// URL (never drops the scheme's slashes)."""
    return f"{str(directory).rstrip('/')}/{name}"


@dataclasses.dataclass(frozen=True)
class GCSPath:
    bucket: str
    name: str  # object name or prefix inside the bucket, without a leading or trailing "/"

    @classmethod
    def parse(cls, url: str) -> GCSPath:
        if not is_gcs(url):
            raise ValueError(f"{url!r} is not a gs:// URL")
        bucket, _, name = url[len(GCS_PREFIX):].partition("/")
        if not bucket:
            raise ValueError(f"{url!r} has no bucket name; write gs://BUCKET/path")
        return cls(bucket, name.strip("/"))

    def child(self, name: str) -> str:
        return f"{self.name}/{name}" if self.name else name


@functools.cache
def client():
    from google.cloud import storage  # imported on first gs:// use only

    return storage.Client()


def _bucket(url: str):
    path = GCSPath.parse(url)
    return path, client().bucket(path.bucket)


def read_text(path: str) -> str:
    """The text of a small file; FileNotFoundError naming the path when it is not there."""
    if not is_gcs(path):
        return Path(path).read_text()
    from google.api_core import exceptions

    gpath, bucket = _bucket(path)
    try:
        return bucket.blob(gpath.name).download_as_text()
    except exceptions.NotFound:
        raise FileNotFoundError(f"{path} does not exist") from None


def write_text(path: str, text: str) -> None:
    """Write a small file (its parent directory created when local)."""
    if not is_gcs(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    gpath, bucket = _bucket(path)
    bucket.blob(gpath.name).upload_from_string(text)


def file_sizes(directory: str) -> dict[str, int]:
    """{file name: size in bytes} for the files directly in `directory` ({} when it is absent)."""
    if not is_gcs(directory):
        d = Path(directory)
        return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()} if d.is_dir() else {}
    from google.api_core import exceptions

    gpath, _ = _bucket(directory)
    prefix = gpath.child("")
    try:
        blobs = client().list_blobs(gpath.bucket, prefix=prefix, delimiter="/")
        return {b.name[len(prefix):]: b.size for b in blobs}
    except exceptions.NotFound:
        return {}


def bucket_exists(url: str) -> bool:
    """False when the bucket of a gs:// URL does not exist; always True for a local path.

    Lists at most one object (storage.objects.list, which any run that writes there needs anyway).
    """
    if not is_gcs(url):
        return True
    from google.api_core import exceptions

    gpath, _ = _bucket(url)
    try:
        next(iter(client().list_blobs(gpath.bucket, prefix=gpath.child(""), max_results=1)), None)
    except exceptions.NotFound:
        return False
    return True


def crc32c(path: Path) -> str:
    """Base64 of the big-endian CRC32C of a file: the form GCS reports in a blob's `crc32c`."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


@dataclasses.dataclass(frozen=True)
class UploadReport:
    uploaded: tuple[str, ...]  # names written to the bucket by this call
    skipped: tuple[str, ...]  # names already there with the same size and CRC32C


def upload(local_dir: Path, url: str, names: Sequence[str],
           done: Callable[[str], None] | None = None) -> UploadReport:
    """Copy `local_dir/NAME` to `url/NAME` for each name, in order, skipping identical blobs.

    A blob is identical when its size and CRC32C match the local file, so a rerun after an
    interruption uploads only what is missing or damaged. Large files use resumable uploads and
    the server verifies the CRC32C we send. `done(name)` is called after each file (progress bars).
    """
    gpath, bucket = _bucket(url)
    uploaded, skipped = [], []
    for name in names:
        local = Path(local_dir) / name
        blob = bucket.get_blob(gpath.child(name))
        size, checksum = local.stat().st_size, crc32c(local)
        if blob is not None and blob.size == size and blob.crc32c == checksum:
            skipped.append(name)
        else:
            new = bucket.blob(gpath.child(name))
            new.upload_from_filename(str(local), checksum="crc32c", crc32c_checksum_value=checksum)
            uploaded.append(name)
        if done:
            done(name)
    return UploadReport(tuple(uploaded), tuple(skipped))
