"""Helpers shared by the benchmark tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def refusal(main: Callable[[Sequence[str]], int], argv: Sequence[str], capsys) -> str:
    """Run a benchmark's ``main`` on bad options; assert exit code 2 with one stderr line, and return that line."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse refuses the value itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err
