"""nanojaxgpt against PyTorch nanoGPT: the CPU Shakespeare recipe, wall time and final val loss.

    python tools/bench_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT --text tinyshakespeare.txt
        [--repeat 2] [--seeds 1337 1 2 3 4] [--eval_iters 200]

Runs nanoGPT's README CPU command and nanojaxgpt's README quick-start command alternately on the
same machine, each from a fresh output directory, and prints every run's wall time (start-up and
compilation included) and val loss at the last iteration, the median wall times and their ratio,
and the val loss over seeds (mean and standard deviation) for both.
nanoGPT's own data preparation is given the same text file, so neither run downloads anything.
nanoGPT has no seed option (train.py seeds torch with 1337): for other seeds the scratch copy's
train.py is edited to read the seed from $SEED.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
         "--dropout=0.0"]
SEED = 1337  # both programs' default


def timed(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
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
    p.add_argument("--eval_interval", type=int, default=None, help="give both runs this eval_interval")
    p.add_argument("--repeat", type=int, default=1, help="runs of each per seed, alternating")
    p.add_argument("--seeds", type=int, nargs="+", default=[SEED])
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vs-nanogpt-"))
    work.mkdir(parents=True, exist_ok=True)
    common = [*MODEL, f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]
    if args.eval_interval:
        common.append(f"--eval_interval={args.eval_interval}")

    ng = work / "nanoGPT"
    shutil.rmtree(ng, ignore_errors=True)
    shutil.copytree(args.nanogpt, ng, ignore=shutil.ignore_patterns(".git", "out*"))
    if args.seeds != [SEED]:
        seedable(ng / "train.py")
    shutil.copy(args.text, ng / "data/shakespeare_char/input.txt")
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=ng, check=True,
                   stdout=subprocess.DEVNULL)
    ours_data = work / "data/shakespeare_char"
    subprocess.run([sys.executable, str(REPO / "tools/prepare_shakespeare_char.py"),
                    "--input", str(args.text), "--out", str(ours_data)], check=True,
                   stdout=subprocess.DEVNULL)

    def fresh(out: Path) -> Path:  # a left-over run directory would be resumed, not re-run
        shutil.rmtree(out, ignore_errors=True)
        return out

    def nanogpt(seed: int, i: int) -> tuple[float, float]:
        out = fresh(work / f"out-nanogpt-{seed}-{i}")
        wall, text = timed([sys.executable, "train.py", "config/train_shakespeare_char.py",
                            "--device=cpu", "--compile=False", f"--eval_iters={args.eval_iters or 20}",
                            "--log_interval=1", *common, f"--out_dir={out}"],
                           ng, work / f"nanogpt-{seed}-{i}.log", env={"SEED": str(seed)})
        return wall, last_val_loss(text)

    def ours(seed: int, i: int) -> tuple[float, float]:
        extra = [f"--eval_iters={args.eval_iters}"] if args.eval_iters else []
        if seed != SEED:
            extra.append(f"--seed={seed}")
        wall, text = timed([sys.executable, "-m", "nanojaxgpt.train",
                            str(REPO / "configs/shakespeare_char.toml"), *common, *extra,
                            f"--data_dir={ours_data}", f"--out_dir={fresh(work / f'out-ours-{seed}-{i}')}"],
                           REPO, work / f"ours-{seed}-{i}.log")
        return wall, last_val_loss(text)

    runs = {"nanoGPT": nanogpt, "nanojaxgpt": ours}
    results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in runs}
    print(f"{'run':<12} {'seed':>5} {'wall':>9} {'val loss @' + str(args.max_iters):>16}   "
          f"({os.cpu_count()} cores)", flush=True)
    for seed in args.seeds:
        for i in range(args.repeat):
            order = list(runs) if i % 2 == 0 else list(runs)[::-1]  # alternate who goes first
            for name in order:
                wall, loss = runs[name](seed, i)
                results[name].append((seed, wall, loss))
                print(f"{name:<12} {seed:>5} {wall:8.1f}s {loss:16.4f}", flush=True)
    print()
    walls = {name: statistics.median(w for _, w, _ in r) for name, r in results.items()}
    for name, r in results.items():
        losses = [loss for _, _, loss in r]
        spread = f" +- {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        print(f"{name:<12} median wall {walls[name]:6.1f}s   val loss {statistics.mean(losses):.4f}"
              f"{spread} over {len(losses)} runs")
    print(f"wall time ratio nanojaxgpt / nanoGPT (medians) = {walls['nanojaxgpt'] / walls['nanoGPT']:.2f}")


def seedable(train_py: Path) -> None:
    """Make nanoGPT's train.py read its seed from $SEED (it hard-codes torch.manual_seed(1337 + ...))."""
    text = train_py.read_text()
    fixed = f"torch.manual_seed({SEED} + seed_offset)"
    if fixed not in text:
        sys.exit(f"{train_py}: no {fixed!r} to make seedable; run with the default seed only")
    train_py.write_text(text.replace(fixed, "torch.manual_seed(int(os.environ['SEED']) + seed_offset)"))


if __name__ == "__main__":
    main()
