"""Prepare tiny shakespeare at the character level, as nanoGPT's data/shakespeare_char/prepare.py.

    python tools/prepare_shakespeare_char.py                       # downloads, writes data/shakespeare_char
    python tools/prepare_shakespeare_char.py --input input.txt --out gs://BUCKET/shakespeare_char

65 characters; train = the first 90% of the text (1,003,854 tokens), val = the last 10% (111,540).
"""

import argparse

from nanojaxgpt import prepare
from nanojaxgpt.cli import run_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help=f"the text file (default: download {prepare.TINYSHAKESPEARE_URL})")
    prepare.add_output_args(parser, default_out="data/shakespeare_char")
    args = parser.parse_args(argv)
    if args.input:
        text = prepare.read_input(args.input)
    else:
        print(f"downloading {prepare.TINYSHAKESPEARE_URL}")
        text = prepare.download_text()
    result = prepare.prepare_char(text, args.out, work_dir=args.work_dir, record_size=args.record_size,
                                  shard_tokens=args.shard_tokens)
    print(prepare.summary(result))
    return 0


if __name__ == "__main__":
    run_command(main, None, errors=(prepare.PrepareError, ValueError, OSError))
