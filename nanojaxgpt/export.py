"""Export a model to a Hugging Face GPT-2 directory that transformers and lm-evaluation-harness open.

    python -m nanojaxgpt.export --init_from=out --out=out/hf
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \
        AutoModelForCausalLM.from_pretrained('out/hf'); AutoTokenizer.from_pretrained('out/hf')"

--init_from: a run directory (local or gs://), or any other source nanojaxgpt.sample takes.
Writes config.json + model.safetensors (nanojaxgpt.hf.save) and, where the model reads GPT-2 BPE
tokens, the tokenizer files (vocab.json, merges.txt, tokenizer_config.json), built from tiktoken's
GPT-2 encoding, so no download is needed. Only the GPT-2 architecture exports (bias, GELU MLP,
LayerNorm, learned positions): a variant is a one-line error naming what differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from nanojaxgpt import hf, storage
from nanojaxgpt.cli import run_command
from nanojaxgpt.sample import model_and_tokenizer
from nanojaxgpt.tokenizer import GPT2_EOT

EOT_TEXT = "<|endoftext|>"


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> character map that vocab.json and merges.txt spell tokens with: printable
    Latin-1 bytes stand for themselves, the other 68 for the characters from U+0100 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair whose merge made `token`: byte-pair encoding of its bytes with only the merges
    ranked before it leaves exactly two parts."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while True:
        best = min(((ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))))
        if best[0] >= limit:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, f"token {token!r} is not one merge of two earlier tokens"
    return parts[0], parts[1]


def write_gpt2_tokenizer(out: Path, block_size: int) -> list[str]:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of GPT-2's BPE."""
    from nanojaxgpt import tokenizer

    enc = tokenizer.GPT2Tokenizer()._enc
    ranks = {enc.decode_single_token_bytes(i): i for i in range(GPT2_EOT)}  # id = merge rank
    spell = _byte_spelling()
    text = lambda b: "".join(spell[x] for x in b)  # noqa: E731
    vocab = {text(t): i for t, i in ranks.items()} | {EOT_TEXT: GPT2_EOT}
    merges = [_merge_of(ranks, t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
         "add_bos_token": False, **special}, indent=2) + "\n")
    return ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]


def export(init_from: str, out: str, out_dir: str = "out") -> str:
    """Write the Hugging Face directory `out`; returns a one-line account of what was written."""
    if storage.is_gcs(out):
        raise ValueError(f"--out={out}: export writes a local directory; copy it afterwards "
                         "(gcloud storage cp -r DIR gs://...)")
    loaded = model_and_tokenizer(init_from, out_dir)
    model, tok = loaded.model, loaded.tokenizer
    path = Path(storage.absolute(out))
    hf.save(model, str(path))  # checks the architecture before writing anything
    written = ["config.json", "model.safetensors"]
    if getattr(tok, "name", None) == "gpt2" and model.config.vocab_size >= tok.vocab_size:
        written += write_gpt2_tokenizer(path, model.config.block_size)
        note = ""
    else:
        note = (f"; no tokenizer files: the model reads {getattr(tok, 'name', '?')!r} tokens, not "
                "GPT-2 BPE" + (" (its vocabulary is itos in the data's meta.json)"
                               if getattr(tok, "name", None) == "char" else ""))
    return f"wrote {path}: {', '.join(written)}{note}"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanojaxgpt.export", description=__doc__.split("\n")[0])
    p.add_argument("--init_from", default="resume", help="run dir (or GPT-2 name, HF dir, resume)")
    p.add_argument("--out_dir", default="out", help="the run directory for --init_from=resume")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write (local)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    print(export(args.init_from, args.out, args.out_dir))
    return 0


def cli(argv: list[str] | None = None, exit: Callable[[int], NoReturn] = sys.exit) -> NoReturn:  # noqa: A002
    # ValueError: hf.LoadError (an architecture GPT-2 cannot express), data.DataError;
    # RuntimeError: the checkpoint's errors and the GPT-2 tokenizer's missing files.
    run_command(main, argv, errors=(ValueError, OSError, RuntimeError), exit=exit)


if __name__ == "__main__":
    cli()
