"""Prepare any local text for GPT-2 training: .txt / .jsonl files -> GPT-2 BPE tokens.

    python tools/prepare_text.py --input books/ notes.jsonl --out data/mytext
    python tools/prepare_text.py --input corpus.jsonl --text_key body --out gs://BUCKET/mytext

Each document (a .jsonl line's --text_key field; a .txt file, or with --txt_documents each paragraph
or line) is tokenized with tiktoken's "gpt2" and followed by <|endoftext|> (50256), as in nanoGPT's
openwebtext/prepare.py. A seeded --val_fraction of the documents (at least one) becomes the val split.
"""

import argparse
from pathlib import Path

from nanojaxgpt import prepare, storage
from nanojaxgpt.cli import run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl files or folders of them")
    parser.add_argument("--text_key", default="text", help="the field of each .jsonl line holding the text")
    parser.add_argument("--txt_documents", choices=("file", "paragraph", "line"), default="file",
                        help="what one document of a .txt file is")
    parser.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents held out")
    parser.add_argument("--seed", type=int, default=2357, help="seed of the train/val document split")
    parser.add_argument("--threads", type=int, default=8, help="tokenizer threads")
    prepare.add_output_args(parser, default_out=None)
    args = parser.parse_args(argv)
    out = args.out or storage.absolute(f"data/{Path(args.input[0]).stem}")
    documents = prepare.TextFiles(args.input, text_key=args.text_key, txt_documents=args.txt_documents)
    result = prepare.prepare_documents(documents, len(documents), out, val_fraction=args.val_fraction,
                                       seed=args.seed, work_dir=args.work_dir, record_size=args.record_size,
                                       shard_tokens=args.shard_tokens, threads=args.threads)
    print(prepare.summary(result))
    return 0


if __name__ == "__main__":
    run_command(main, None, errors=(prepare.PrepareError, ValueError, OSError))
