"""Command endings: one line and exit code 2 for expected errors, a traceback only with --debug."""

import pytest

from nanojaxgpt import cli


class Expected(ValueError):
    pass


class Diverged(RuntimeError):
    exit_code = 1


def _run(capsys, main, argv, monkeypatch, env=None):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(cli.DEBUG_ENV, env)
    with pytest.raises(SystemExit) as e:
        cli.run_command(main, argv, errors=(Expected, Diverged))
    return e.value.code, capsys.readouterr().err


def _fails_with(error):
    def main(argv):
        raise error
    return main


def test_expected_errors_are_one_line_with_their_exit_code(capsys, monkeypatch):
    code, err = _run(capsys, _fails_with(Expected("bad value\n  at line 2")), [], monkeypatch)
    assert code == 2 and err == "error: bad value at line 2\n"
    code, err = _run(capsys, _fails_with(Diverged("step 3: loss is nan")), [], monkeypatch)
    assert code == 1 and err == "error: step 3: loss is nan\n"
    code, err = _run(capsys, _fails_with(KeyboardInterrupt()), [], monkeypatch)
    assert code == 130 and err == "interrupted\n"


def test_debug_shows_the_traceback_and_is_not_passed_on(capsys, monkeypatch):
    seen = []

    def main(argv):
        seen.append(argv)
        raise Expected("bad value")

    for argv, env in ((["--x=1", "--debug"], None), (["--x=1"], "1")):
        code, err = _run(capsys, main, argv, monkeypatch, env)
        assert code == 2 and "Traceback (most recent call last)" in err
        assert err.endswith("error: bad value\n")
    assert seen == [["--x=1"], ["--x=1"]]
    assert _run(capsys, main, ["--x=1"], monkeypatch, "0")[1] == "error: bad value\n"


def test_a_bug_is_not_hidden(monkeypatch):
    with pytest.raises(ZeroDivisionError):
        cli.run_command(lambda argv: 1 // 0, [], errors=(Expected,))


def test_success_exits_with_mains_code():
    with pytest.raises(SystemExit) as e:
        cli.run_command(lambda argv: 0, [], errors=(Expected,))
    assert e.value.code == 0
