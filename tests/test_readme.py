"""The README's commands, run as written, in README order, from a fresh copy of the project.

Every command of every ```sh block in README.md must match one runner below (a command no runner
knows fails the suite). The only liberties taken, each where a test machine differs from a user's:
- `pip install -e .` installs into a fresh virtual environment (which sees the installed
  dependencies), so the test does not re-point the environment running the suite;
- `prepare_shakespeare_char.py` gets `--input` with a local copy of the text (the test is offline);
- the quick start's `--max_iters=2000` becomes 500 (the evaluation at its end is still run), and
  its first run is interrupted with Ctrl-C (SIGINT) after a checkpoint, then run again, as a user resumes;
- `--init_from=gpt2` reads a small random GPT-2 from a Hugging Face cache the test writes
  (HF_HUB_OFFLINE=1), not OpenAI's weights from the hub, and HellaSwag gets `--hellaswag_file`
  with a few records in its format (the test is offline);
- the test command itself is not run from inside the tests: it must be what .ci/run runs;
- `pip install -e ".[tpu]"` is not run: the test checks that what it would install (jax[tpu] of
  the installed jax, so its libtpu) is installed already;
- the AOT check gets `--json FILE` so the test reads its figures (it is the suite's one TPU compile).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.multiprocess import isolated_env

REPO = Path(__file__).resolve().parents[1]
QUICK_MAX_ITERS = 500


def readme_commands(text: str) -> list[str]:
    """Each command of the ```sh blocks, in order: continuation lines joined, `&&` chains split."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in line.split(" && ")]
    return commands


COMMANDS = readme_commands((REPO / "README.md").read_text())

# name -> pattern; each README command matches exactly one.
RUNNERS = {
    "install": r"pip install -e \.",
    "prepare": r"python tools/prepare_shakespeare_char\.py",
    "quick_start": r"python -m nanojaxgpt\.train configs/shakespeare_char\.toml (?!.*--eval_only).*",
    "eval_only": r"python -m nanojaxgpt\.train configs/shakespeare_char\.toml .* --eval_only=true",
    "sample": r"python -m nanojaxgpt\.sample --init_from=out-shakespeare-char .*",
    "inspect": r"python tools/inspect_checkpoint\.py out-shakespeare-char",
    "tensorboard_install": r"pip install tensorboard",
    "tensorboard": r"tensorboard --logdir out-shakespeare-char",
    "sample_gpt2": r"python -m nanojaxgpt\.sample --init_from=gpt2 .*",
    "eval_run": r"python -m nanojaxgpt\.eval --init_from=out-shakespeare-char --tasks=val_loss",
    "export": r"python -m nanojaxgpt\.export --init_from=out-shakespeare-char --out=\S+",
    "hellaswag_gpt2": r"python -m nanojaxgpt\.eval --init_from=gpt2 --tasks=hellaswag",
    "test_install": r'pip install -e "\.\[test\]"',
    "test": r"python -m pytest",
    "tpu_install": r'pip install -e "\.\[tpu\]"',
    "aot": r"python tools/aot_compile\.py configs/gpt2_124m\.toml --topology=[\w-]+",
}


def commands_of(name: str) -> list[str]:
    return [c for c in COMMANDS if re.fullmatch(RUNNERS[name], c)]


def the_command(name: str) -> str:
    found = commands_of(name)
    assert len(found) == 1, f"README.md should have one {name} command, has {found}"
    return found[0]


def test_every_readme_command_is_run_by_a_test():
    assert COMMANDS, "no ```sh blocks found in README.md"
    for command in COMMANDS:
        owners = [name for name, pattern in RUNNERS.items() if re.fullmatch(pattern, command)]
        assert len(owners) == 1, f"README command run by {owners or 'no test'}: {command}"


def test_the_code_map_lists_every_module_and_config():
    text = (REPO / "README.md").read_text()
    section = text.split("## Code map", 1)[1].split("\n\n", 3)[2]  # the table, after the intro
    listed = set(re.findall(r"^\|[^|]*\| `nanojaxgpt/(\w+\.py)` \|", section, re.M))
    modules = {p.name for p in (REPO / "nanojaxgpt").glob("*.py")} - {"__init__.py"}
    assert listed == modules, f"README code map: missing {modules - listed}, stale {listed - modules}"
    configs_row = re.search(r"^\|[^|]*\| `configs/` \|(.*)$", section, re.M).group(1)
    assert set(re.findall(r"`(\w+\.toml)`", configs_row)) == {p.name for p in (REPO / "configs").glob("*.toml")}


def test_the_readme_test_command_is_what_ci_runs():
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    readme = [the_command("test_install"), the_command("test")]
    assert [re.sub(r"^python -m pip install -q ", "pip install ", c).replace("pytest -q", "pytest")
            for c in ci] == readme


class Shell:
    """A fresh working directory with the project copied in and a venv on PATH, as a new user has."""

    def __init__(self, root: Path):
        self.cwd = root / "nanojaxgpt"
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout
        for name in filter(None, files.split("\0")):
            if (REPO / name).is_file():
                (self.cwd / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, self.cwd / name)
        self.venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(self.venv)],
                       check=True)
        self.env = isolated_env()  # no fake devices, no JAX_PLATFORMS: as a user's shell
        self.env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a user's run has its own default cache
        self.env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{self.env['PATH']}"
        self.env.pop("PYTHONPATH", None)

    def run(self, command: str, timeout: float = 300, env: dict | None = None,
            expect: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "-c", f"exec {command}"], cwd=self.cwd, text=True,
                              capture_output=True, timeout=timeout, env={**self.env, **(env or {})})
        assert proc.returncode == expect, (f"`{command}` exited {proc.returncode}:\n"
                                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        return proc

    def start(self, command: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.cwd, env=self.env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)


def shortened(command: str) -> str:
    assert "--max_iters=2000" in command, command
    return command.replace("--max_iters=2000", f"--max_iters={QUICK_MAX_ITERS}")


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> re.Match:
    deadline = time.time() + timeout
    while not (m := re.search(pattern, log.read_text())):
        assert proc.poll() is None, f"ended before {pattern!r}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {pattern!r} in {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    return m


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """After the quick start, as a user runs it: install, prepare, train, Ctrl-C, train again."""
    from tests.conftest import shakespeare

    root = tmp_path_factory.mktemp("readme")
    sh = Shell(root)
    sh.run(the_command("install"), timeout=600)
    text = root / "input.txt"
    text.write_text(shakespeare())
    sh.run(f"{the_command('prepare')} --input {shlex.quote(str(text))}")
    quick = shortened(the_command("quick_start"))
    log = root / "interrupted.log"
    proc = sh.start(quick, log)
    _wait_for(log, rf"step 260/{QUICK_MAX_ITERS} ", proc)  # after the checkpoint of step 250
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = int(re.search(r"saved a complete checkpoint of step (\d+)", log.read_text()).group(1))
    sh.quick = sh.run(quick)  # the same command again
    sh.stopped = stopped
    return sh


def test_quick_start_resumes_after_ctrl_c_and_ends_with_its_evaluation(shell):
    err = shell.quick.stderr
    assert f"resumed from step {shell.stopped} " in err, err[-3000:]
    final = re.search(rf"step {QUICK_MAX_ITERS}: train loss ([\d.]+), val loss ([\d.]+)", err)
    assert final and float(final.group(2)) < 2.6, err[-3000:]  # ln(65) = 4.17 untrained
    out = shell.cwd / "out-shakespeare-char"
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["out_dir"] == str(out)  # stored resolved


def test_sample_prints_text_that_starts_with_the_prompt(shell):
    command = the_command("sample")
    prompt = re.search(r'--start="([^"]*)"', command).group(1)
    n = int(re.search(r"--num_samples=(\d+)", command).group(1))
    out = shell.run(command).stdout
    samples = [s.strip("\n") for s in out.split("---------------") if s.strip()]
    assert len(samples) == n and all(s.startswith(prompt) and len(s) > len(prompt) + 50
                                     for s in samples), out[:2000]


def test_eval_only_reports_the_latest_checkpoint_and_saves_nothing(shell):
    command = the_command("eval_only")
    assert command == the_command("quick_start") + " --eval_only=true"
    checkpoints = shell.cwd / "out-shakespeare-char" / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    err = shell.run(shortened(command)).stderr
    m = re.search(rf"step {QUICK_MAX_ITERS}: train loss ([\d.]+), val loss ([\d.]+)", err)
    assert m and math.isfinite(float(m.group(2))), err[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == before


def test_inspect_lists_the_complete_checkpoints(shell):
    out = shell.run(the_command("inspect")).stdout
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line.strip()}
    assert rows.get(str(QUICK_MAX_ITERS)) == "complete", out
    assert str(shell.stopped) in rows or "250" in rows, out


def test_tensorboard_serves_the_run(shell, tmp_path):
    shell.run(the_command("tensorboard_install"))
    log = tmp_path / "tensorboard.log"
    proc = shell.start(the_command("tensorboard"), log)
    try:
        url = _wait_for(log, r"(http://localhost:\d+/)", proc, timeout=120).group(1)
        deadline = time.time() + 60
        while True:  # the first scan of the log dir runs in the background
            tags = json.loads(urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=10).read())
            if "val/loss" in tags.get(".", {}) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert {"train/loss", "val/loss", "perf/tokens_per_sec"} <= set(tags.get(".", {})), tags
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_eval_prints_the_val_loss_of_the_runs_last_evaluation(shell):
    out = shell.run(the_command("eval_run")).stdout
    m = re.fullmatch(r"val loss ([\d.]+) \((\d+) tokens\)", out.strip())
    final = re.search(rf"step {QUICK_MAX_ITERS}: train loss [\d.]+, val loss ([\d.]+)", shell.quick.stderr)
    assert m and final, out
    assert float(m.group(1)) == pytest.approx(float(final.group(1)), abs=2e-4), (out, final.group(0))


def test_export_opens_in_transformers(shell):
    import transformers

    command = the_command("export")
    shell.run(command)
    hf_dir = shell.cwd / re.search(r"--out=(\S+)", command).group(1)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    saved = json.loads((shell.cwd / "out-shakespeare-char" / "config.json").read_text())["model"]
    assert (model.config.n_layer, model.config.n_embd) == (saved["n_layer"], saved["n_embd"])


def _hf_cache_with_a_random_gpt2(home: Path) -> dict:
    """A Hugging Face cache holding a small random GPT-2 as openai-community/gpt2, offline."""
    import torch
    import transformers

    repo = home / "hub" / "models--openai-community--gpt2"
    snapshot = repo / "snapshots" / ("0" * 40)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2)  # vocab 50257
    transformers.GPT2LMHeadModel(cfg).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def test_hellaswag_of_gpt2(shell, tmp_path):
    from tests import eval_runs

    records = tmp_path / "hellaswag.jsonl"
    eval_runs.write_records(records)
    env = _hf_cache_with_a_random_gpt2(tmp_path / "hf")
    out = shell.run(f"{the_command('hellaswag_gpt2')} --hellaswag_file={records}", env=env).stdout
    m = re.fullmatch(r"hellaswag acc ([\d.]+) acc_norm ([\d.]+) \((\d+) examples\)", out.strip())
    assert m and int(m.group(3)) == len(eval_runs.RECORDS), out
    assert all(0 <= float(v) <= 1 for v in m.groups()[:2]), out


def test_sampling_from_gpt2(shell, tmp_path):
    command = the_command("sample_gpt2")
    prompt = re.search(r'--start="([^"]*)"', command).group(1)
    out = shell.run(command, env=_hf_cache_with_a_random_gpt2(tmp_path / "hf")).stdout
    samples = [s.strip("\n") for s in out.split("---------------") if s.strip()]
    n = int(re.search(r"--num_samples=(\d+)", command).group(1))
    assert len(samples) == n and all(s.startswith(prompt) for s in samples), out[:2000]


def test_the_tpu_extra_is_the_installed_jax_and_libtpu():
    """`pip install -e ".[tpu]"` pins jax[tpu] to the jax installed, whose tpu extra pins libtpu."""
    import tomllib
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    assert the_command("tpu_install")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tpu"]
    assert extra == [f"jax[tpu]=={version('jax')}"], extra
    wants = [Requirement(r) for r in requires("jax") if Requirement(r).name == "libtpu"
             and Requirement(r).marker.evaluate({"extra": "tpu"})]
    assert wants and all(w.specifier.contains(version("libtpu")) for w in wants), (wants, version("libtpu"))


@pytest.mark.timeout(900)
def test_the_aot_check_before_booking_a_slice(tmp_path):
    """The README's command compiles the shipped config for its slice with the real TPU compiler,
    from a fresh copy of the project (the tool needs no install of it), and it fits."""
    from tests.aot_run import check_gpt2_124m, needs_libtpu

    needs_libtpu()
    sh = Shell(tmp_path)  # a user's shell: no JAX_ or XLA_ variables
    out = tmp_path / "aot.json"
    proc = sh.run(f"{the_command('aot')} --json={out}", timeout=900)
    # The README's claim: it fits, as shipped, at 1.04x the model's FLOPs. v5e-16 executes 12.9 GiB
    # of collectives per chip per step (9.4 of them all-gathers of FSDP weights, measured), above
    # the 8 GiB the other shipped targets meet in `pytest -m aot tests/test_aot.py`.
    check_gpt2_124m(proc, json.loads(out.read_text()), max_collective_gib=14)
