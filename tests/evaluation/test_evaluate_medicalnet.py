"""The evaluation CLI with real MedicalNet loading code on a weight file the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.evaluation.test_evaluate import _run, _write_preds


def test_cli_medicalnet_weights(tiny_prepared_dataset: Path, tmp_path: Path, capsys) -> None:
    from AutoEncoder.medicalnet import medicalnet_resnet10

    weights = tmp_path / "resnet_10_23dataset.pth"
    torch.manual_seed(0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in medicalnet_resnet10().state_dict().items()}}, weights)
    pred = tmp_path / "pred"
    _write_preds(tiny_prepared_dataset, pred, "train")
    out = tmp_path / "eval"
    code, _, err = _run(capsys, "--pred", pred, "--ref", tiny_prepared_dataset, "--split", "train", "--out", out,
                        "--medicalnet-weights", weights)
    assert code == 0, err
    fm = json.loads((out / "summary.json").read_text())["feature_metrics"]
    assert fm["n_features"] == 512 and fm["fid"] is None and "at least 513" in fm["fid_note"]
    assert isinstance(fm["mmd"], float)
    assert "FID" in err  # a one-line warning that FID was skipped
    code, _, err = _run(capsys, "--pred", pred, "--ref", tiny_prepared_dataset, "--split", "train",
                        "--out", tmp_path / "eval2", "--medicalnet-weights", tmp_path / "absent.pth")
    assert code == 2 and "MedicalNet weights not found" in err and not (tmp_path / "eval2").exists()
