"""Prepare OpenWebText for GPT-2 124M, as nanoGPT's data/openwebtext/prepare.py, into ArrayRecord shards.

    pip install datasets                      # the Hugging Face loader, only for this tool
    python tools/prepare_openwebtext.py --out gs://BUCKET/openwebtext --work_dir /mnt/disk/owt
    python tools/prepare_openwebtext.py --input owt_jsonl/ --out data/openwebtext   # local files

About 8M documents, 9B GPT-2 tokens: train ~17 GiB at uint16 before compression. Every document is
followed by <|endoftext|>; 0.05% of the documents (seed 2357) are the val split, like nanoGPT.
Local --input: .txt / .jsonl files or folders of them (as tools/prepare_text.py), or .parquet files.
"""

import argparse
import os

from nanojaxgpt import prepare
from nanojaxgpt.cli import run_command


def _datasets():
    try:
        import datasets
    except ImportError:
        raise prepare.PrepareError("prepare_openwebtext.py reads OpenWebText with the Hugging Face `datasets` "
                         "library: pip install datasets  (or pass local files with --input)") from None
    return datasets


def hf_documents(args):
    """(documents, count) from the Hugging Face hub, or from local .parquet files."""
    datasets = _datasets()
    try:
        if args.input:
            ds = datasets.load_dataset("parquet", data_files=args.input, split="train")
        else:
            ds = datasets.load_dataset(args.hf_name, revision=args.hf_revision, split="train",
                                       num_proc=args.num_proc)
    except Exception as e:
        raise prepare.PrepareError(f"could not load {args.input or args.hf_name}: {type(e).__name__}: {e}; "
                         "If the hub copy needs a loading script your `datasets` no longer runs, try "
                         "--hf_revision refs/convert/parquet, or download the files and pass --input.") from None
    if args.text_key not in ds.column_names:
        raise prepare.PrepareError(f"{args.input or args.hf_name} has no column {args.text_key!r} "
                         f"(columns: {ds.column_names}); choose one with --text_key")
    batches = ds.select_columns([args.text_key]).iter(batch_size=1024)
    return (text for batch in batches for text in batch[args.text_key]), len(ds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=None, help="local files instead of the hub")
    parser.add_argument("--hf_name", default="Skylion007/openwebtext", help="dataset on the Hugging Face hub")
    parser.add_argument("--hf_revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="processes for the hub download")
    parser.add_argument("--text_key", default="text")
    parser.add_argument("--val_fraction", type=float, default=0.0005)
    parser.add_argument("--seed", type=int, default=2357)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 8, help="tokenizer threads")
    prepare.add_output_args(parser, default_out="data/openwebtext")
    args = parser.parse_args(argv)
    if args.input and not all(str(p).endswith(".parquet") for p in args.input):
        documents = prepare.TextFiles(args.input, text_key=args.text_key)
        count = len(documents)
    else:
        documents, count = hf_documents(args)
    result = prepare.prepare_documents(documents, count, args.out, val_fraction=args.val_fraction,
                                       seed=args.seed, work_dir=args.work_dir, record_size=args.record_size,
                                       shard_tokens=args.shard_tokens, threads=args.threads)
    print(prepare.summary(result))
    return 0


if __name__ == "__main__":
    run_command(main, None, errors=(prepare.PrepareError, ValueError, OSError))
