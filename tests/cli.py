"""Helpers for testing command lines: the exit code of ``main(argv)``, whether it returns or exits."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def exit_code(main: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    """``main(argv)``'s return value, or the code of the ``SystemExit`` it raised (argparse refusals)."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return 0 if code is None else int(code)
