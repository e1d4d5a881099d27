"""The corpora tools/prepare_hf_dataset.py prepares by name, and their documents cut into parts.

A part is the unit of resumable, parallel tokenization (nanojaxgpt/prepare_parts.py): a few row
groups of a .parquet file, one .txt / .jsonl file, or a row range of a Hugging Face dataset. Parts
are small picklable descriptions; `documents()` reads their texts, in order, in any process.
Hub files come through huggingface_hub (resumable downloads into its cache), parquet through
pyarrow: `pip install -e ".[data]"`. OpenWebText's hub copy needs the `datasets` library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from nanojaxgpt.prepare import PrepareError, TextFiles

PART_DOCUMENTS = 50_000  # documents per part: ~35M GPT-2 tokens of FineWeb, 70 MB of part file


@dataclasses.dataclass(frozen=True)
class Corpus:
    repo: str  # Hugging Face dataset
    files: str | None  # glob of its parquet files; None: read with datasets.load_dataset
    text_key: str
    val_fraction: float  # share of the documents held out as the val split
    about: str


CORPORA = {
    "fineweb-edu-10bt": Corpus("HuggingFaceFW/fineweb-edu", "sample/10BT/*.parquet", "text", 0.01,
                               "FineWeb-Edu sample-10BT, ~10B GPT-2 tokens (llm.c's GPT-2 runs)"),
    "fineweb-10bt": Corpus("HuggingFaceFW/fineweb", "sample/10BT/*.parquet", "text", 0.01,
                           "FineWeb sample-10BT, ~10B GPT-2 tokens (llm.c's first GPT-2 124M run)"),
    "openwebtext": Corpus("Skylion007/openwebtext", None, "text", 0.0005,
                          "OpenWebText, ~8M documents, ~9B GPT-2 tokens (nanoGPT's GPT-2 runs)"),
}


@runtime_checkable
class Part(Protocol):
    key: str  # names the part in progress files: changes when its documents do
    count: int

    def documents(self) -> Iterator[str]: ...


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError("reading .parquet needs pyarrow: pip install -e \".[data]\"") from None
    return pq


@dataclasses.dataclass(frozen=True)
class ParquetPart:
    path: str
    row_groups: tuple[int, ...]
    count: int
    text_key: str

    @property
    def key(self) -> str:
        return f"{self.path}:row_groups {self.row_groups[0]}-{self.row_groups[-1]}:{self.count}"

    def documents(self) -> Iterator[str]:
        file = _pyarrow_parquet().ParquetFile(self.path)
        for batch in file.iter_batches(batch_size=1024, row_groups=list(self.row_groups),
                                       columns=[self.text_key]):
            yield from (text or "" for text in batch.column(0).to_pylist())


@dataclasses.dataclass(frozen=True)
class TextPart:
    path: str
    count: int
    text_key: str

    @property
    def key(self) -> str:
        return f"{self.path}:{self.count}"

    def documents(self) -> Iterator[str]:
        return iter(TextFiles([self.path], text_key=self.text_key))


@dataclasses.dataclass(frozen=True)
class DatasetPart:
    dataset: Any  # a datasets.Dataset (pickles as its memory-mapped cache files)
    start: int
    stop: int
    text_key: str

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def key(self) -> str:
        return f"{self.dataset.info.dataset_name or 'dataset'}:rows {self.start}-{self.stop}"

    def documents(self) -> Iterator[str]:
        for i in range(self.start, self.stop, 1024):
            yield from self.dataset[i:min(i + 1024, self.stop)][self.text_key]


def parquet_parts(path: str, text_key: str, part_documents: int = PART_DOCUMENTS) -> list[ParquetPart]:
    """Consecutive row groups of one parquet file, about part_documents rows each (at least one group)."""
    try:
        file = _pyarrow_parquet().ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise PrepareError(f"{path} is not a readable parquet file ({e})") from None
    if text_key not in file.schema_arrow.names:
        raise PrepareError(f"{path} has no column {text_key!r} (columns: {file.schema_arrow.names}); "
                           "choose one with --text_key")
    parts, groups, rows = [], [], 0
    for g in range(file.metadata.num_row_groups):
        groups.append(g)
        rows += file.metadata.row_group(g).num_rows
        if rows >= part_documents or g == file.metadata.num_row_groups - 1:
            parts.append(ParquetPart(str(path), tuple(groups), rows, text_key))
            groups, rows = [], 0
    return [p for p in parts if p.count]


def local_parts(paths: Sequence[str | Path], text_key: str,
                part_documents: int = PART_DOCUMENTS) -> list[Part]:
    """Parts of local .parquet / .jsonl / .txt files (a folder: every such file under it, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".parquet", ".jsonl", ".txt"))
        elif not p.is_file():
            raise PrepareError(f"input {p} does not exist")
        else:
            files.append(p)
    if not files:
        raise PrepareError(f"no .parquet, .jsonl or .txt files in {[str(p) for p in paths]}")
    parts: list[Part] = []
    for f in files:
        if f.suffix == ".parquet":
            parts += parquet_parts(str(f), text_key, part_documents)
        else:  # TextFiles checks the suffix and counts the documents
            parts.append(TextPart(str(f), len(TextFiles([f], text_key=text_key)), text_key))
    return [p for p in parts if p.count]


def hub_files(corpus: Corpus, revision: str | None = None, cache_dir: str | None = None) -> list[str]:
    """The corpus's parquet files, downloaded from the Hugging Face hub once (a rerun resumes)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PrepareError("downloading from the Hugging Face hub needs huggingface_hub: "
                           "pip install -e \".[data]\"  (or pass local files with --input)") from None
    try:
        root = snapshot_download(corpus.repo, repo_type="dataset", revision=revision,
                                 allow_patterns=[corpus.files], cache_dir=cache_dir)
    except Exception as e:  # offline, unknown revision, no disk: the hub's errors have no common base
        raise PrepareError(f"could not download {corpus.repo}/{corpus.files} from the Hugging Face hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline? "
                           "Download the files elsewhere and pass them with --input") from None
    files = sorted(str(f) for f in Path(root).glob(corpus.files))
    if not files:
        raise PrepareError(f"{corpus.repo} has no files {corpus.files} at revision {revision or 'main'}")
    return files


def dataset_parts(corpus: Corpus, text_key: str, revision: str | None = None, num_proc: int = 1,
                  part_documents: int = PART_DOCUMENTS) -> list[DatasetPart]:
    """Row ranges of a hub dataset read with the `datasets` library (downloaded once into its cache)."""
    try:
        import datasets
    except ImportError:
        raise PrepareError(f"{corpus.repo} is read with the Hugging Face `datasets` library: "
                           "pip install datasets  (or pass local files with --input)") from None
    try:
        ds = datasets.load_dataset(corpus.repo, revision=revision, split="train", num_proc=num_proc)
    except Exception as e:  # the library's errors have no common base either
        raise PrepareError(f"could not load {corpus.repo}: {type(e).__name__}: {e}; if its loading "
                           "script no longer runs, try --revision refs/convert/parquet, or download "
                           "the files and pass --input") from None
    if text_key not in ds.column_names:
        raise PrepareError(f"{corpus.repo} has no column {text_key!r} (columns: {ds.column_names}); "
                           "choose one with --text_key")
    ds = ds.select_columns([text_key])
    return [DatasetPart(ds, s, min(s + part_documents, len(ds)), text_key)
            for s in range(0, len(ds), part_documents)]
