"""Prepare tiny shakespeare at the character level, as nanoGPT's data/shakespeare_char/prepare.py.

    python tools/prepare_shakespeare_char.py                       # downloads, writes data/shakespeare_char
    python tools/prepare_shakespeare_char.py --input input.txt --out gs://BUCKET/shakespeare_char

65 characters; train = the first 90% of the text (1,003,854 tokens), val = the last 10% (111,540).
"""

import argparse
import urllib.request

from nanojaxgpt import prepare

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None, help=f"the text file (default: download {URL})")
    prepare.add_output_args(parser, default_out="data/shakespeare_char")
    args = parser.parse_args(argv)
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            text = f.read()
    else:
        print(f"downloading {URL}")
        with urllib.request.urlopen(URL, timeout=60) as response:
            text = response.read().decode("utf-8")
    result = prepare.prepare_char(text, args.out, work_dir=args.work_dir, record_size=args.record_size,
                                  shard_tokens=args.shard_tokens)
    print(prepare.summary(result))


if __name__ == "__main__":
    main()
