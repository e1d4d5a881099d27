"""Prepare a named corpus for GPT-2 training: download, tokenize in parallel, resumably, to local or gs://.

    pip install -e ".[data]"                 # huggingface_hub + pyarrow, only for this tool
    python tools/prepare_hf_dataset.py --dataset fineweb-edu-10bt --out gs://BUCKET/fineweb-edu-10bt
    python tools/prepare_hf_dataset.py --dataset fineweb-10bt --input fineweb_parquet/ --out data/fineweb-10bt

--dataset: fineweb-edu-10bt, fineweb-10bt (parquet files from the Hugging Face hub) or openwebtext
(through the `datasets` library: pip install datasets). --input reads local .parquet / .jsonl /
.txt files (or folders of them) instead of the hub. Every document is followed by <|endoftext|>;
a seeded --val_fraction of the documents is the val split (FineWeb: 1%, ~100M tokens, the size of
llm.c's val shard; OpenWebText: 0.05%, as nanoGPT). --workers processes tokenize a part each
(nanojaxgpt/prepare_parts.py); the progress bar shows documents, tokens and the time left.
Interrupted, the same command resumes: finished parts, downloaded files and uploaded shards are kept.
"""

import argparse
import os

from nanojaxgpt import corpora, prepare, prepare_parts, storage
from nanojaxgpt.cli import run_command

ERRORS = (prepare.PrepareError, ValueError, OSError)


def parts_of(args, corpus: corpora.Corpus) -> list:
    text_key = args.text_key or corpus.text_key
    if args.input:
        return corpora.local_parts(args.input, text_key, args.part_documents)
    if corpus.files is None:
        return corpora.dataset_parts(corpus, text_key, args.revision, args.num_proc, args.part_documents)
    files = corpora.hub_files(corpus, args.revision, args.cache_dir)
    return [p for f in files for p in corpora.parquet_parts(f, text_key, args.part_documents)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(corpora.CORPORA))
    parser.add_argument("--input", nargs="+", default=None, help="local files or folders instead of the hub")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--cache_dir", default=None, help="hub download folder (default: the Hugging Face cache)")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="download processes of the `datasets` library (openwebtext)")
    parser.add_argument("--text_key", default=None, help="the column or field holding the text")
    parser.add_argument("--val_fraction", type=float, default=None, help="share of documents held out")
    parser.add_argument("--seed", type=int, default=2357, help="seed of the train/val document split")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--threads", type=int, default=1, help="tokenizer threads per process")
    parser.add_argument("--part_documents", type=int, default=corpora.PART_DOCUMENTS,
                        help="documents per part (the unit of work and of resuming)")
    prepare.add_output_args(parser, default_out=None)
    args = parser.parse_args(argv)
    corpus = corpora.CORPORA[args.dataset]
    out = args.out or storage.absolute(f"data/{args.dataset}")
    if args.part_documents < 1:
        raise ValueError(f"--part_documents={args.part_documents} must be positive")
    print(f"{args.dataset}: {corpus.about}")
    parts = parts_of(args, corpus)
    val_fraction = corpus.val_fraction if args.val_fraction is None else args.val_fraction
    result = prepare_parts.prepare_parts(parts, out, val_fraction=val_fraction, seed=args.seed,
                                         work_dir=args.work_dir, record_size=args.record_size,
                                         shard_tokens=args.shard_tokens, workers=args.workers,
                                         threads=args.threads)
    print(prepare.summary(result))
    return 0


if __name__ == "__main__":
    run_command(main, None, errors=ERRORS)
