"""Prepare OpenWebText for GPT-2 124M, as nanoGPT's data/openwebtext/prepare.py, into ArrayRecord shards.

    pip install datasets                      # the Hugging Face loader, only for this corpus
    python tools/prepare_openwebtext.py --out gs://BUCKET/openwebtext --work_dir /mnt/disk/owt
    python tools/prepare_openwebtext.py --input owt_jsonl/ --out data/openwebtext   # local files

The same as `tools/prepare_hf_dataset.py --dataset openwebtext` (all its options apply): about 8M
documents, 9B GPT-2 tokens, train ~17 GiB at uint16; 0.05% of the documents (seed 2357) are the
val split, like nanoGPT. Tokenized in parallel and resumably, uploaded to gs:// resumably.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_hf_dataset  # noqa: E402

from nanojaxgpt.cli import run_command  # noqa: E402


def main(argv=None) -> int:
    return prepare_hf_dataset.main(["--dataset", "openwebtext", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    run_command(main, None, errors=prepare_hf_dataset.ERRORS)
