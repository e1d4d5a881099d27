"""Preparing data: real ArrayRecord shards + meta.json, nanoGPT's splits, GPT-2 documents, gs:// upload."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from google.cloud import storage as gcs_client

from nanojaxgpt import batches, data, prepare

ROOT = Path(__file__).resolve().parents[1]


def stream(directory, split) -> np.ndarray:
    """A split's whole token stream, read back record by record from its shards."""
    meta = data.read_meta(directory)
    paths = [str(Path(directory) / s.name) for s in meta.splits[split].shards]
    records = grain.sources.ArrayRecordDataSource(paths)
    return np.concatenate([np.frombuffer(records[i], dtype=meta.dtype) for i in range(len(records))])


def test_shakespeare_char_like_nanogpt(shakespeare_text, tmp_path):
    result = prepare.prepare_char(shakespeare_text, str(tmp_path), record_size=1000, shard_tokens=300_000)
    meta = data.read_meta(tmp_path)
    assert meta == result.meta
    n = len(shakespeare_text)
    assert (meta.vocab_size, meta.tokenizer, meta.eot, meta.dtype) == (65, "char", None, "uint16")
    assert meta.tokens == {"train": int(n * 0.9), "val": n - int(n * 0.9)} == {"train": 1003854, "val": 111540}
    shards = meta.splits["train"].shards
    assert [s.name for s in shards] == [f"train-0000{i}-of-00004.array_record" for i in range(4)]
    assert [s.records for s in shards] == [300, 300, 300, 104] and shards[-1].tokens == 103_854
    assert all((tmp_path / s.name).stat().st_size == s.bytes for s in shards)
    tok = data.tokenizer(tmp_path)
    assert tok.decode(stream(tmp_path, "train")) == shakespeare_text[:int(n * 0.9)]
    assert tok.decode(stream(tmp_path, "val")) == shakespeare_text[int(n * 0.9):]


def test_split_writer_records_shards_and_dtype(tmp_path):
    (tmp_path / "train-00007-of-00009.array_record").write_bytes(b"stale")  # an older run's shard
    w = prepare.SplitWriter(tmp_path, "train", vocab_size=100_000, record_size=10, shard_tokens=30)
    tokens = np.arange(0, 99_999, 1377)  # 73 tokens, some above 65535
    for piece in np.array_split(tokens, 7):
        w.add(piece)
    split = w.close(documents=3)
    assert not (tmp_path / "train-00007-of-00009.array_record").exists()
    assert split.tokens == 73 and [s.records for s in split.shards] == [3, 3, 2]
    assert [s.tokens for s in split.shards] == [30, 30, 13]
    meta = data.Meta(vocab_size=100_000, tokenizer="gpt2", eot=None, dtype="uint32", record_size=10,
                     splits={"train": split})
    (tmp_path / data.META).write_text(meta.to_json())
    back = stream(tmp_path, "train")
    assert back.dtype == np.uint32 and np.array_equal(back, tokens)
    assert np.array_equal(data.Tokens(tmp_path, "train").windows(np.array([0, 25, 62]), 11),
                          [tokens[0:11], tokens[25:36], tokens[62:73]])
    with pytest.raises(ValueError, match="token id 100000 outside the vocabulary"):
        w.add([100_000])


def write_inputs(tmp_path) -> list[Path]:
    (tmp_path / "a.txt").write_text("Hello world")
    docs = [{"text": "Hello"}, {"text": " world"}, {"id": 3, "text": "Hello world!"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n\n")
    return [tmp_path / "a.txt", tmp_path / "b.jsonl"]


def test_prepare_text_documents_with_eot(tmp_path):
    files = prepare.TextFiles(write_inputs(tmp_path))
    assert list(files) == ["Hello world", "Hello", " world", "Hello world!"] and len(files) == 4
    out = tmp_path / "out"
    result = prepare.prepare_documents(files, len(files), str(out), val_fraction=0.25, seed=1)
    meta = result.meta
    assert (meta.vocab_size, meta.tokenizer, meta.eot, meta.dtype) == (50257, "gpt2", 50256, "uint16")
    ids = {"Hello world": [15496, 995], "Hello": [15496], " world": [995], "Hello world!": [15496, 995, 0]}
    is_val = prepare.val_documents(4, 0.25, 1)
    assert is_val.sum() == 1
    for split, want_val in (("train", False), ("val", True)):
        docs = [d for d, v in zip(files, is_val) if v == want_val]
        expected = [t for d in docs for t in ids[d] + [50256]]  # every document ends with EOT
        assert stream(out, split).tolist() == expected
        assert meta.splits[split].documents == len(docs) and meta.tokens[split] == len(expected)


def test_text_inputs_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(prepare.TextFiles([tmp_path / "bad.jsonl"]))
    (tmp_path / "key.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(ValueError, match=r"key.jsonl:1: no string field 'text' \(has \['body'\]\).*--text_key"):
        list(prepare.TextFiles([tmp_path / "key.jsonl"]))
    assert list(prepare.TextFiles([tmp_path / "key.jsonl"], text_key="body")) == ["ok"]
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x.csv: only .txt and .jsonl"):
        prepare.TextFiles([tmp_path / "x.csv"])
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        prepare.TextFiles([tmp_path / "nope.txt"])
    (tmp_path / "one.txt").write_text("para one\n\npara two\nline three")
    assert len(prepare.TextFiles([tmp_path / "one.txt"], txt_documents="paragraph")) == 2
    assert len(prepare.TextFiles([tmp_path / "one.txt"], txt_documents="line")) == 3
    with pytest.raises(ValueError, match="1 document.*--txt_documents"):
        prepare.prepare_documents(["only one"], 1, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        prepare.val_documents(10, 1.5, 0)


def test_tools_run_from_repo_root(shakespeare_text, tmp_path):
    (tmp_path / "input.txt").write_text(shakespeare_text[:20_000])
    out = tmp_path / "sc"
    run = subprocess.run([sys.executable, "tools/prepare_shakespeare_char.py", "--input",
                          str(tmp_path / "input.txt"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "train: 18,000 tokens" in run.stdout and data.read_meta(out).tokens == {"train": 18000, "val": 2000}
    inputs = write_inputs(tmp_path)
    run = subprocess.run([sys.executable, "tools/prepare_text.py", "--input", *map(str, inputs),
                          "--out", str(tmp_path / "txt"), "--val_fraction", "0.5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert data.read_meta(tmp_path / "txt").splits["val"].documents == 2


def blobs(bucket_url):
    client = gcs_client.Client()
    return {b.name: (b.generation, b.size) for b in client.list_blobs(bucket_url.removeprefix("gs://"))}


def test_upload_to_gcs_skips_what_is_there(gcs, shakespeare_text, tmp_path):
    out = f"{gcs}/data/sc"
    text = shakespeare_text[:100_000]
    first = prepare.prepare_char(text, out, record_size=512, shard_tokens=512 * 40)
    names = [s.name for split in first.meta.splits.values() for s in split.shards] + ["meta.json"]
    assert len(names) == 7 and first.upload.uploaded == tuple(names) and first.upload.skipped == ()
    assert first.local_dir is None  # the temporary staging folder is gone
    before = blobs(gcs)
    assert set(before) == {f"data/sc/{n}" for n in names}

    second = prepare.prepare_char(text, out, record_size=512, shard_tokens=512 * 40, work_dir=str(tmp_path))
    assert second.upload.uploaded == () and second.upload.skipped == tuple(names)
    assert blobs(gcs) == before  # same generations: nothing was rewritten

    # A damaged remote shard (an interrupted copy) with a different size, and one with the same size.
    bucket = gcs_client.Client().bucket(gcs.removeprefix("gs://"))
    bucket.blob(f"data/sc/{names[1]}").upload_from_string(b"short")
    size = first.meta.splits["train"].shards[2].bytes
    bucket.blob(f"data/sc/{names[2]}").upload_from_string(b"\0" * size)
    third = prepare.prepare_char(text, out, record_size=512, shard_tokens=512 * 40, work_dir=str(tmp_path))
    assert third.upload.uploaded == (names[1], names[2])
    assert data.read_meta(out) == first.meta
    local = batches.Batches(tmp_path, "train", block_size=256, rows=8, seed=3)
    remote = batches.Batches(out, "train", block_size=256, rows=8, seed=3)
    assert np.array_equal(remote.read(4, range(8)), local.read(4, range(8)))


def load_tool(name):
    """A tools/*.py script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_openwebtext_tool_is_the_text_pipeline(tmp_path, monkeypatch, capsys):
    owt = load_tool("prepare_openwebtext")
    docs = [{"text": f"document {i}"} for i in range(40)]
    (tmp_path / "owt.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    owt.main(["--input", str(tmp_path / "owt.jsonl"), "--out", str(tmp_path / "owt"), "--threads", "2"])
    meta = data.read_meta(tmp_path / "owt")
    assert meta.tokenizer == "gpt2" and meta.splits["val"].documents == 1  # 0.05% of 40, at least one
    assert meta.splits["train"].documents == 39 and "train:" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without the library
    with pytest.raises(prepare.PrepareError, match="pip install datasets"):
        owt.main(["--out", str(tmp_path / "hub")])
