"""nanojaxgpt against PyTorch nanoGPT: the CPU Shakespeare recipe, wall time and final val loss.

    python tools/bench_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT --text tinyshakespeare.txt

Runs nanoGPT's README CPU command and nanojaxgpt's README quick-start command one after the other
on the same machine, each from a fresh output directory, and prints the wall time (start-up and
compilation included), the val loss at the last iteration and the ratio of wall times.
nanoGPT's own data preparation is given the same text file, so neither run downloads anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
         "--dropout=0.0"]


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}), see {log}:\n{text[-3000:]}")
    return wall, text


def last_val_loss(text: str) -> float:
    found = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", text)
    if not found:
        sys.exit("no 'step N: train loss X, val loss Y' line in the output")
    return float(found[-1][2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, type=Path, help="a checkout of karpathy/nanoGPT")
    p.add_argument("--text", required=True, type=Path, help="tinyshakespeare input.txt")
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--eval_iters", type=int, default=None,
                   help="give both runs this eval_iters (default: each command as its README has it: "
                        "nanoGPT 20, nanojaxgpt the config's 200)")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vs-nanogpt-"))
    work.mkdir(parents=True, exist_ok=True)
    iters = [f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]

    ng = work / "nanoGPT"
    shutil.rmtree(ng, ignore_errors=True)
    shutil.copytree(args.nanogpt, ng, ignore=shutil.ignore_patterns(".git", "out*"))
    shutil.copy(args.text, ng / "data/shakespeare_char/input.txt")
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=ng, check=True,
                   stdout=subprocess.DEVNULL)
    ours_data = work / "data/shakespeare_char"
    subprocess.run([sys.executable, str(REPO / "tools/prepare_shakespeare_char.py"),
                    "--input", str(args.text), "--out", str(ours_data)], check=True,
                   stdout=subprocess.DEVNULL)

    ng_eval = f"--eval_iters={args.eval_iters or 20}"
    ng_wall, ng_out = timed([sys.executable, "train.py", "config/train_shakespeare_char.py",
                             "--device=cpu", "--compile=False", ng_eval, "--log_interval=1",
                             *MODEL, *iters], ng, work / "nanogpt.log")
    ours_eval = [f"--eval_iters={args.eval_iters}"] if args.eval_iters else []
    ours_wall, ours_out = timed([sys.executable, "-m", "nanojaxgpt.train",
                                 str(REPO / "configs/shakespeare_char.toml"), *MODEL, *iters,
                                 *ours_eval, f"--data_dir={ours_data}",
                                 f"--out_dir={work / 'out-ours'}"], REPO, work / "ours.log")
    cores = os.cpu_count()
    print(f"\n{'run':<12} {'wall':>9} {'val loss @' + str(args.max_iters):>16}   ({cores} cores)")
    print(f"{'nanoGPT':<12} {ng_wall:8.1f}s {last_val_loss(ng_out):16.4f}")
    print(f"{'nanojaxgpt':<12} {ours_wall:8.1f}s {last_val_loss(ours_out):16.4f}")
    print(f"wall time ratio nanojaxgpt / nanoGPT = {ours_wall / ng_wall:.2f}")


if __name__ == "__main__":
    main()
