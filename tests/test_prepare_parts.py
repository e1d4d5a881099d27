"""Preparing a named corpus: parts of real parquet/jsonl files, resumable parallel tokenization, gs://."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanojaxgpt import corpora, data, prepare, prepare_parts
from tests.test_prepare import stream

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while rain falls on hills".split()


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Doc {seed}-{i}: " + " ".join(rng.choice(WORDS, rng.integers(5, 60))) for i in range(n)]


def write_inputs(root: Path) -> tuple[list[Path], list[str]]:
    """Two parquet files (row groups of 300 and 400) and a jsonl file: 2,600 documents in all."""
    a, b, c = documents(1500, 1), documents(800, 2), documents(300, 3)
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": a, "id": list(range(len(a)))}), root / "a.parquet", row_group_size=300)
    pq.write_table(pa.table({"text": b}), root / "b.parquet", row_group_size=400)
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in c))
    return [root / "a.parquet", root / "b.parquet", root / "c.jsonl"], a + b + c


def same_output(x: Path, y: Path) -> None:
    meta = data.read_meta(x)
    assert meta == data.read_meta(y)
    for split in meta.splits.values():
        for shard in split.shards:
            assert (x / shard.name).read_bytes() == (y / shard.name).read_bytes(), shard.name


def test_parts_are_row_groups_and_files(tmp_path):
    files, docs = write_inputs(tmp_path / "in")
    parts = corpora.local_parts([tmp_path / "in"], "text", part_documents=500)
    # a.parquet: 5 groups of 300 -> parts of 600, 600, 300; b.parquet: 2 of 400 -> 800; c.jsonl: one part.
    assert [(Path(p.path).name, p.count) for p in parts] == [
        ("a.parquet", 600), ("a.parquet", 600), ("a.parquet", 300), ("b.parquet", 800), ("c.jsonl", 300)]
    assert [t for p in parts for t in p.documents()] == docs
    assert len({p.key for p in parts}) == len(parts)
    with pytest.raises(prepare.PrepareError, match=r"no column 'body' \(columns: \['text', 'id'\]\).*--text_key"):
        corpora.local_parts([files[0]], "body")
    with pytest.raises(prepare.PrepareError, match="nope.parquet does not exist"):
        corpora.local_parts([tmp_path / "nope.parquet"], "text")


def test_parts_write_byte_for_byte_what_prepare_documents_writes(tmp_path):
    _, docs = write_inputs(tmp_path / "in")
    parts = corpora.local_parts([tmp_path / "in"], "text", part_documents=500)
    options = dict(val_fraction=0.01, seed=5, record_size=256, shard_tokens=256 * 40)
    result = prepare_parts.prepare_parts(parts, str(tmp_path / "parts"), **options)
    prepare.prepare_documents(docs, len(docs), str(tmp_path / "whole"), **options)
    same_output(tmp_path / "parts", tmp_path / "whole")
    meta = result.meta
    assert meta.splits["val"].documents == 26 and meta.splits["train"].documents == 2574
    assert len(meta.splits["train"].shards) > 2  # several shards, records cut across parts
    assert not (tmp_path / "parts" / prepare_parts.PARTS).exists()  # the part files are removed


def test_an_interrupted_preparation_resumes_from_its_finished_parts(tmp_path, capsys, monkeypatch):
    files, docs = write_inputs(tmp_path / "in")
    jsonl = files[2]
    good = jsonl.read_text()
    jsonl.write_text("\n".join(good.splitlines()[:-1] + ["{broken"]))  # the last part fails, as a crash
    parts = corpora.local_parts([tmp_path / "in"], "text", part_documents=500)
    out, work = tmp_path / "out", tmp_path / "work"
    options = dict(val_fraction=0.01, seed=5, record_size=256, work_dir=str(work))
    with pytest.raises(ValueError, match=r"c.jsonl:300: not valid JSON"):
        prepare_parts.prepare_parts(parts, str(out), **options)
    done = sorted((work / prepare_parts.PARTS).glob("*.json"))
    assert [p.name for p in done] == ["00000.json", "00001.json", "00002.json", "00003.json",
                                      "manifest.json"]
    assert not (out / data.META).exists()
    tokenized = []  # the parts the rerun tokenizes (each by the real function)
    real = prepare_parts.tokenize_part
    monkeypatch.setattr(prepare_parts, "tokenize_part", lambda i, *a, **k: tokenized.append(i) or real(i, *a, **k))

    jsonl.write_text(good)  # the same 300 documents, now readable: the same parts
    capsys.readouterr()
    prepare_parts.prepare_parts(corpora.local_parts([tmp_path / "in"], "text", part_documents=500),
                                str(out), **options)
    assert f"resuming: 4 of 5 parts already tokenized in {work / prepare_parts.PARTS}" in capsys.readouterr().out
    assert tokenized == [4]
    prepare.prepare_documents(docs, len(docs), str(tmp_path / "whole"), val_fraction=0.01, seed=5,
                              record_size=256)
    same_output(out, tmp_path / "whole")

    # Parts of other settings are never mixed in: another seed tokenizes everything again.
    partial = work / prepare_parts.PARTS
    partial.mkdir()
    (partial / "manifest.json").write_text(json.dumps({"format": prepare_parts.FORMAT, "seed": 5}))
    (partial / "00000.json").write_text("stale")
    result = prepare_parts.prepare_parts(parts, str(tmp_path / "other"), **{**options, "seed": 6})
    assert "tokenizing again" in capsys.readouterr().out
    assert result.meta.splits["val"].documents == 26


def run_tool(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "tools/prepare_hf_dataset.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_the_tool_tokenizes_in_worker_processes_and_uploads_to_gcs(gcs, tmp_path):
    files, docs = write_inputs(tmp_path / "in")
    out = f"{gcs}/fineweb"
    cache = tmp_path / "cache"
    run = run_tool("--dataset", "fineweb-edu-10bt", "--input", str(tmp_path / "in"), "--out", out,
                   "--workers", "2", "--part_documents", "500", env={"XDG_CACHE_HOME": str(cache)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train: " in run.stdout and "uploaded 3 file(s)" in run.stdout, run.stdout
    assert "tokenize: 100%" in run.stderr and "2600/2600" in run.stderr, run.stderr[-2000:]
    assert not (cache / "nanojaxgpt" / "prepare" / out.removeprefix("gs://")).exists()  # staging removed
    meta = data.read_meta(out)
    assert meta.splits["val"].documents == 26  # FineWeb's 1%
    prepare.prepare_documents(docs, len(docs), str(tmp_path / "whole"), val_fraction=0.01, seed=2357)
    assert meta == data.read_meta(tmp_path / "whole")
    remote = data.Tokens(out, "val")
    assert np.array_equal(remote.windows(np.array([0]), remote.n_tokens)[0], stream(tmp_path / "whole", "val"))


def test_the_tool_explains_what_it_cannot_do_in_one_line(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = run_tool("--dataset", "fineweb-10bt", "--out", str(tmp_path / "o"), env=offline, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download HuggingFaceFW/fineweb/sample/10BT/*.parquet "
                           "from the Hugging Face hub") and "--input" in last, run.stderr
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    run = run_tool("--dataset", "fineweb-10bt", "--input", str(tmp_path / "x.parquet"), timeout=300)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last.startswith("error: ") and "x.parquet is not a readable parquet" \
        in last, run.stderr[-2000:]
