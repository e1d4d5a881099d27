"""Test setup: 8 fake CPU devices, the offline GPT-2 tokenizer, a GCS-protocol server on loopback."""

import itertools
import os
import tempfile
from pathlib import Path

# Before anything touches a JAX backend: the multi-device tests run on 8 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the runs the suite starts (tests/multiprocess.py gives it
# to them as JAX_COMPILATION_CACHE_DIR): the many runs of the same tiny models compile once. Not
# for this process: its tests time saves and compiles in-process. A test of the cache itself, or
# of a user's shell, removes the variable.
os.environ.setdefault("NANOJAXGPT_TEST_COMPILATION_CACHE",
                      tempfile.mkdtemp(prefix="nanojaxgpt-tests-jax-cache-"))

# tiktoken's "gpt2" files, offline, when the shared folder is beside the checkout.
_SHARED = Path(__file__).resolve().parents[2] / "shared"
if (_SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED / "tiktoken_cache"))

import pytest  # noqa: E402

from tools.gcs_server import GCSServer  # noqa: E402

_SHAKESPEARE = _SHARED / "data" / "tinyshakespeare.txt"


def shakespeare() -> str:
    """tiny-shakespeare: from ../shared when it is there (CI, offline), else downloaded once."""
    if _SHAKESPEARE.is_file():
        return _SHAKESPEARE.read_text()
    cached = Path.home() / ".cache" / "nanojaxgpt" / "tinyshakespeare.txt"
    if not cached.is_file():
        from nanojaxgpt import prepare

        try:
            text = prepare.download_text()
        except prepare.PrepareError as e:
            pytest.fail(f"the tests need tiny-shakespeare: put it at {cached} or {_SHAKESPEARE} ({e})",
                        pytrace=False)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(text)
    return cached.read_text()
@pytest.fixture(scope="module")
def char_data_dir(tmp_path_factory) -> str:
    """tiny-shakespeare prepared as characters, once per test module (a local data_dir)."""
    from nanojaxgpt import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    prepare.prepare_char(shakespeare(), str(out))
    return str(out)


_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def gcs_server():
    server = GCSServer()
    yield server
    server.stop()


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """A fresh bucket on the loopback GCS server, with every library pointed at it: `gs://name`."""
    for k, v in gcs_server.env().items():
        monkeypatch.setenv(k, v)
    return gcs_server.create_bucket(f"bucket-{os.getpid()}-{next(_bucket_ids)}")


@pytest.fixture
def shakespeare_text() -> str:
    return shakespeare()
