"""How every command of the package ends, for the errors a user can cause.

An expected error (a bad config value, missing data, a damaged checkpoint, a diverged run) is one
line on stderr, `error: ...`, and exit code 2 (or the error's own `exit_code`), never a traceback.
`--debug` on the command line, or NANOJAXGPT_DEBUG=1 in the environment, shows the traceback too.
Ctrl-C that reaches the top is one line and exit code 130. Anything else is a bug: its traceback
is printed as Python does.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

DEBUG_ENV = "NANOJAXGPT_DEBUG"
DEBUG_FLAG = "--debug"


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """argv without `--debug`, and whether tracebacks were asked for (flag or environment)."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    env = os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")
    return rest, env or len(rest) != len(argv)


def hard_exit(code: int) -> NoReturn:
    """Exit now, without joining worker threads (a compile or a stalled write may run for minutes)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_command(main: Callable[[list[str]], int], argv: Sequence[str] | None,
        errors: tuple[type[BaseException], ...],
        exit: Callable[[int], NoReturn] = sys.exit) -> NoReturn:  # noqa: A002
    """exit(main(argv)), turning `errors` (and Ctrl-C) into one line on stderr."""
    args, debug = split_debug(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except errors as e:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        code = 130
    exit(code)


def one_line(e: BaseException) -> str:
    """The message of an error on one line (details that span lines are joined)."""
    text = str(e) or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
