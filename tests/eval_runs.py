"""Shared by the eval, HellaSwag and export tests: a small HellaSwag-format file and one tiny
GPT-2 BPE training run (HellaSwag scored in its loop, biases on so that it exports)."""

import json

import pytest

from nanojaxgpt import prepare
from tests.train_runs import run

LONG = " ".join(["The crowd keeps cheering as the players run across the wide field."] * 6)
RECORDS = [  # HellaSwag's format; the LONG context is cut from the left to fit 64 + 1 tokens
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "A woman stands in a kitchen. She", "label": 0,
     "endings": ["cracks two eggs into a bowl.", "flies.", "is a kitchen that stands in itself and "
                 "then walks away slowly while singing.", "sits."]},
    {"ctx": LONG, "label": 1,
     "endings": ["The game ends.", "A player scores a goal and the crowd roars loudly.",
                 "Birds.", "The referee blows the whistle to stop the match for a moment."]},
    {"ctx": "Two dogs play in the snow. They", "label": 2,
     "endings": ["chase", "sleep on the couch.", "roll around and bark at each other.", "eat cake."]},
    {"ctx": "Ünïcode test: a café owner", "label": 1,
     "endings": ["pours espresso.", "counts coins — 1, 2, 3.", "waves 👋.", "closes the shop."]},
]


def write_records(path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory):
    """10 steps of a 2-layer model on GPT-2 tokens of tiny-shakespeare (paragraphs as documents),
    evaluated (val loss and HellaSwag) at steps 0 and 10, saved at step 10."""
    from tests.conftest import shakespeare

    root = tmp_path_factory.mktemp("bpe_run")
    docs = [p for p in shakespeare()[:300_000].split("\n\n") if p.strip()]
    prepare.prepare_documents(docs, len(docs), str(root / "data"), val_fraction=0.1, seed=0)
    write_records(root / "hellaswag_val.jsonl")
    run(str(root / "data"), str(root / "out"), "--bias=true", "--max_iters=10", "--dropout=0.0",
        "--train.hellaswag=true", f"--train.hellaswag_file={root / 'hellaswag_val.jsonl'}")
    return {"data": root / "data", "out": root / "out", "hellaswag": root / "hellaswag_val.jsonl"}
