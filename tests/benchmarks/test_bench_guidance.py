"""benchmarks.bench_guidance: settings are parsed into generate_ct's guidance and bad ones are refused in one line.

The run itself needs a finished demo; tests/evaluation/test_demo.py runs it on the toy demo it builds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_guidance
from evaluation.projection_guidance import DEFAULT_GUIDANCE


def test_settings_fill_omitted_parts_with_the_generator_defaults() -> None:
    s = bench_guidance.parse_setting("0.25")
    assert (s.weight, s.steps, s.refine_steps, s.start) == (0.25, DEFAULT_GUIDANCE.steps, DEFAULT_GUIDANCE.refine_steps,
                                                           DEFAULT_GUIDANCE.start)
    s = bench_guidance.parse_setting("1:6:20:0.3")
    assert (s.weight, s.steps, s.refine_steps, s.start) == (1.0, 6, 20, 0.3)
    assert not bench_guidance.parse_setting("0").active


@pytest.mark.parametrize("setting, message", [
    ("-0.5", "projection_guidance"),
    ("nan", "projection_guidance"),
    ("2", "projection_guidance"),
    ("0.5:0", "steps"),
    ("0.5:two", "WEIGHT[:STEPS"),
    ("0.5:2.5", "WEIGHT[:STEPS"),
    ("0.5::3", "WEIGHT[:STEPS"),
    ("0.5:1:2:3:4", "WEIGHT[:STEPS"),
])
def test_bad_settings_are_refused_in_one_line_before_anything_runs(setting: str, message: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    assert bench_guidance.main([str(tmp_path), "--settings", "0", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert "no finished demo" not in err  # refused before the demo folder is even looked at


def test_a_folder_without_a_finished_demo_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench_guidance.main([str(tmp_path / "nowhere"), "--settings", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no finished demo" in err and "nowhere" in err and len(err.splitlines()) == 1
