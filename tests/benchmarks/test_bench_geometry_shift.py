"""benchmarks.bench_geometry_shift refuses what it cannot run in one line (the run itself needs a finished demo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_geometry_shift


def test_cohorts_change_one_thing_and_include_the_readme_example() -> None:
    assert bench_geometry_shift.COHORTS["matched"] == []
    assert bench_geometry_shift.COHORTS["sdd1200_sid800_96"] == ["--sdd", "1200", "--sid", "800", "--drr-size", "96"]


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nowhere"], "no finished demo"),
    (["{tmp}", "--cohorts", "sideways"], "argument --cohorts: invalid choice: 'sideways'"),
    (["{tmp}", "--num-samples", "0"], "argument --num-samples"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    try:
        code = bench_geometry_shift.main([a.format(tmp=tmp_path) for a in argv] + ["--work", str(tmp_path / "w")])
    except SystemExit as e:  # argparse refuses the value itself
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w").exists()
