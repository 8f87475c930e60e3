"""benchmarks.bench_conv_weight_grad: oneDNN's conv3d weight gradient against the swapped one, and the choice."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_conv_weight_grad
from ddpm import fast_conv
from tests.benchmarks.conftest import refusal


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_reports_both_times_and_what_the_route_takes_here(capability: str, capsys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_conv, "cpu_capability", lambda: capability)
    monkeypatch.setattr(fast_conv, "_swapped_weight_grad_faster", lambda *key: True)
    assert bench_conv_weight_grad.main(["--repeats", "1", "--threads", "1", "--shapes", "2", "3", "4", "8", "0",
                                        "--shapes", "1", "2", "2", "8", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cpu_capability"] == capability and out["commit"]
    assert [s["shape"] for s in out["shapes"]] == ["2x3->4x8^3", "1x2->2x8^3 channels-last"]
    for s in out["shapes"]:
        assert s["onednn_ms"] > 0 and s["swapped_ms"] > 0
        assert s["ratio"] == pytest.approx(s["swapped_ms"] / s["onednn_ms"], abs=2e-3)
        assert s["route_takes_swap"] is (capability == "AVX2")


@pytest.mark.parametrize("argv, needle", [
    (["--repeats", "0"], "--repeats"),
    (["--shapes", "2", "0", "4", "8", "0"], "--shapes 2 0 4 8 0"),
    (["--shapes", "2", "3", "4", "8", "2"], "layout of 0 (contiguous) or 1"),
])
def test_refuses_bad_options_in_one_line(argv, needle, capsys) -> None:
    assert needle in refusal(bench_conv_weight_grad.main, argv, capsys)
