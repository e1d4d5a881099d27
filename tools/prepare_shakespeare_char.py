"""Prepare tiny shakespeare at the character level, as nanoGPT's data/shakespeare_char/prepare.py.

    python tools/prepare_shakespeare_char.py                       # downloads, writes data/shakespeare_char
    python tools/prepare_shakespeare_char.py --input input.txt --out gs://BUCKET/shakespeare_char

65 characters; train = the first 90% of the text (1,003,854 tokens), val = the last 10% (111,540).
"""

import argparse

from nanojaxgpt import prepare


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help=f"the text file (default: download {prepare.TINYSHAKESPEARE_URL})")
    prepare.add_output_args(parser, default_out="data/shakespeare_char")
    args = parser.parse_args(argv)
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            text = f.read()
    else:
        print(f"downloading {prepare.TINYSHAKESPEARE_URL}")
        text = prepare.download_text()
    result = prepare.prepare_char(text, args.out, work_dir=args.work_dir, record_size=args.record_size,
                                  shard_tokens=args.shard_tokens)
    print(prepare.summary(result))


if __name__ == "__main__":
    main()
