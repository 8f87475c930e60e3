"""benchmarks.bench_biflownet --profile: one profiled training step, its top operators and its copy share."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_biflownet
from tests.benchmarks.conftest import refusal


def test_profile_reports_the_step_and_its_most_expensive_operators(capsys) -> None:
    assert bench_biflownet.main(["--profile", "5", "--preset", "tiny", "--latent-size", "8", "--batch", "1",
                                 "--precisions", "fp32", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "biflownet_profile" and out["latent_shape"] == [8, 8, 8]
    (row,) = out["results"]
    assert row["precision"] == "fp32" and row["step_s"] > 0
    top = row["top"]
    assert len(top) == 5 and all(t["calls"] >= 1 for t in top)
    assert [t["self_s"] for t in top] == sorted((t["self_s"] for t in top), reverse=True)
    # the top operators are part of the profiled total, and the copies are a part of it too
    assert row["profiled_self_s"] >= sum(t["self_s"] for t in top) - 1e-3
    assert 0 <= row["copy_s"] <= row["profiled_self_s"] and 0 <= row["copy_share"] <= 1


@pytest.mark.parametrize("argv, needle", [
    (["--profile", "3", "--precisions", "fp16"], "--precisions"),
    (["--profile", "0"], "--profile"),
    (["--profile", "3", "--compare-official", "/nonexistent"], "separate runs"),
])
def test_profile_refuses_bad_options_in_one_line(argv, needle, capsys) -> None:
    assert needle in refusal(bench_biflownet.main, argv, capsys)


@pytest.mark.parametrize("native", [False, True])
def test_auto_precisions_skip_bf16_where_a_cpu_only_emulates_it(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_biflownet, "_native_bf16", lambda: native)
    assert bench_biflownet.precision_list("auto") == (["fp32", "bf16"] if native else ["fp32"])
    assert bench_biflownet.precision_list("auto", "cuda") == ["fp32", "bf16"]
    assert bench_biflownet.precision_list("fp32,bf16") == ["fp32", "bf16"]  # asked for: measured even if emulated
    assert bench_biflownet.precision_list("bf16") == ["bf16"]
