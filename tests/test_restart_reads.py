"""What a restart asks of its bucket, read from a real GCS server's access log: no listing of the
whole bucket, and the restored checkpoint's config and metadata read once each."""

from __future__ import annotations

import pytest

from nanojaxgpt import prepare, storage
from tests import train_runs
from tests.conftest import shakespeare
from tools.gcs_server import GCSServer


@pytest.mark.timeout(300)
def test_a_restart_reads_what_it_needs_once(monkeypatch):
    server = GCSServer(log_requests=True)  # its own server, so that its log is this test's
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        storage.client.cache_clear()  # this process's client is the suite server's
        bucket = server.create_bucket("restart-reads")
        data, run = f"{bucket}/data", f"{bucket}/run"
        prepare.prepare_char(shakespeare(), data)
        train_runs.run(data, run, "--max_iters=10", devices=2, env=server.env())
        before = len(server.requests())
        again = train_runs.run(data, run, "--max_iters=11", devices=2, env=server.env())
        assert "resumed from step 10" in again.stderr
        asked = server.requests()[before:]
    finally:
        server.stop()
        storage.client.cache_clear()
    lists = [q for method, path, q in asked if method == "GET" and path.endswith("/o")]
    assert lists and all(q.get("prefix", "").startswith(("run/", "data/")) for q in lists), lists
    downloads = [path.split("/o/", 1)[1] for method, path, _ in asked if "/download/" in path]
    for name in ("data/meta.json", "run/DONE", "run/checkpoints/10/config/metadata",
                 "run/checkpoints/10/meta/metadata"):
        assert downloads.count(name) == 1, (name, downloads)
