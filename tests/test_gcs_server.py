"""The loopback GCS server works for every client the project uses."""

from google.cloud import storage


def test_upload_list_download(gcs):
    bucket = storage.Client().bucket(gcs.removeprefix("gs://"))
    bucket.blob("a/b.txt").upload_from_string(b"hello")
    assert [b.name for b in bucket.list_blobs(prefix="a/")] == ["a/b.txt"]
    assert bucket.blob("a/b.txt").download_as_bytes() == b"hello"
