"""The evaluation CLI and evaluate_pairs on tiny volumes written by the tests."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchio as tio

from dataset import HUWindow, Manifest, read_ct, write_nifti
from evaluation.evaluate import CasePair, evaluate_pairs, find_pairs, main


def _write_preds(manifest: Path, out: Path, split: str = "train", offset_hu: float = 50.0,
                 edit=None) -> list[str]:
    """Write reference CT + offset as predictions for one split; ``edit(sid, data) -> data`` may change one."""
    frame = Manifest.load(manifest).split(split)
    out.mkdir(parents=True, exist_ok=True)
    for sid, ct in zip(frame["subject_id"], frame["ct"]):
        image = read_ct(ct)
        data = image.data.float() + offset_hu
        if edit is not None:
            data = edit(sid, data)
        write_nifti(tio.ScalarImage(tensor=data, affine=image.affine), out / f"{sid}.nii.gz")
    return list(frame["subject_id"])


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*map(str, args), "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_on_manifest_known_offset(tiny_prepared_dataset: Path, tmp_path: Path, capsys) -> None:
    pred = tmp_path / "pred"
    ids = _write_preds(tiny_prepared_dataset, pred, "train", offset_hu=40.0)
    image = read_ct(pred / f"{ids[0]}.nii.gz")  # an uncertainty volume (HU): used for figures only
    write_nifti(tio.ScalarImage(tensor=torch.full_like(image.data, 25.0), affine=image.affine),
                pred / f"{ids[0]}_std.nii.gz")
    out = tmp_path / "eval"
    code, stdout, err = _run(capsys, "--pred", pred, "--ref", tiny_prepared_dataset, "--split", "train",
                             "--out", out, "--figures")
    assert code == 0, err
    rows = pd.read_csv(out / "per_case.csv")
    assert sorted(rows["subject_id"]) == sorted(ids) and len(ids) == 6
    # the reference lies inside [-1000, 1000]; +40 HU exceeds the window only above 960 HU
    ref = torch.cat([read_ct(p).data.flatten() for p in Manifest.load(tiny_prepared_dataset).split("train")["ct"]])
    assert float(ref.max()) < 960
    assert rows["mae_hu"].to_numpy() == pytest.approx(40.0, rel=1e-4)
    assert rows["psnr_db"].to_numpy() == pytest.approx(20 * math.log10(2000 / 40), abs=1e-3)
    assert rows["x2ct_slice_psnr_db"].to_numpy() == pytest.approx(20 * math.log10(2000 / 40), abs=1e-3)
    for col in ("drr_ap_psnr_db", "drr_lat_psnr_db", "drr_ap_ssim", "drr_lat_ssim", "ssim_3d"):
        assert rows[col].notna().all() and (rows[col] > 0).all(), col
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 6
    assert summary["window"] == {"hu_min": -1000.0, "hu_max": 1000.0}
    assert summary["metrics"]["mae_hu"]["mean"] == pytest.approx(40.0, rel=1e-4)
    assert summary["metrics"]["mae_hu"]["n"] == 6
    assert summary["metrics"]["psnr_db"]["std"] == pytest.approx(0.0, abs=1e-3)
    assert "R = 2 on [-1, 1]" in summary["definitions"]["psnr_db"]
    assert "NOT comparable" in summary["definitions"]["x2ct_slice_psnr_db"]
    assert summary["feature_metrics"]["fid"] is None
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(f"{i}.png" for i in ids)
    assert json.loads(stdout)["n_cases"] == 6


def test_identical_volumes_give_inf_in_csv_and_json(tiny_prepared_dataset: Path, tmp_path: Path, capsys) -> None:
    pred = tmp_path / "pred"
    _write_preds(tiny_prepared_dataset, pred, "test", offset_hu=0.0)
    out = tmp_path / "eval"
    code, _, err = _run(capsys, "--pred", pred, "--ref", tiny_prepared_dataset, "--out", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: inf is a string
    assert summary["metrics"]["psnr_db"]["mean"] == "inf" and summary["metrics"]["psnr_db"]["n_inf"] == 1
    assert summary["metrics"]["mae_hu"]["mean"] == 0.0 and summary["metrics"]["mae_hu"]["std"] is None
    assert summary["metrics"]["drr_ap_psnr_db"]["mean"] == "inf"
    assert summary["metrics"]["lung_dice"]["mean"] == 1.0 and summary["metrics"]["bone_dice"]["mean"] == 1.0
    assert "HU < -500" in summary["definitions"]["anatomy_dice"]
    rows = pd.read_csv(out / "per_case.csv")
    assert math.isinf(rows["psnr_db"][0]) and rows["lung_dice"][0] == 1.0


def test_reference_folder_without_xrays_and_explicit_window(tiny_prepared_dataset: Path, tmp_path: Path,
                                                            capsys) -> None:
    pred = tmp_path / "pred"
    _write_preds(tiny_prepared_dataset, pred, "test", offset_hu=40.0)
    ref_dir = tiny_prepared_dataset.parent / "ct"
    out = tmp_path / "eval"
    code, _, err = _run(capsys, "--pred", pred, "--ref", ref_dir, "--hu-min", "-1000", "--hu-max", "3000",
                        "--out", out)
    assert code == 0, err
    rows = pd.read_csv(out / "per_case.csv")
    assert "drr_ap_psnr_db" not in rows.columns
    assert rows["psnr_db"][0] == pytest.approx(20 * math.log10(4000 / 40), abs=1e-3)  # window width 4000 HU
    summary = json.loads((out / "summary.json").read_text())
    assert "drr_consistency" not in summary["definitions"]
    assert "lung_dice" in summary["metrics"]  # the window [-1000, 3000] HU contains the thresholds
    narrow = tmp_path / "eval_narrow"
    code, _, err = _run(capsys, "--pred", pred, "--ref", ref_dir, "--hu-min", "-100", "--hu-max", "200", "--out", narrow)
    assert code == 0, err
    summary = json.loads((narrow / "summary.json").read_text())
    assert "lung_dice" not in summary["metrics"] and "not computed" in summary["definitions"]["anatomy_dice"]


def test_existing_output_is_refused_unless_overwrite(tiny_prepared_dataset: Path, tmp_path: Path, capsys) -> None:
    pred = tmp_path / "pred"
    _write_preds(tiny_prepared_dataset, pred, "test")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text("old")
    code, _, err = _run(capsys, "--pred", pred, "--ref", tiny_prepared_dataset, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert (out / "summary.json").read_text() == "old"
    (out / "figures").mkdir()
    (out / "figures" / "old_case.png").write_bytes(b"stale")
    code, _, err = _run(capsys, "--pred", pred, "--ref", tiny_prepared_dataset, "--out", out, "--overwrite",
                        "--figures")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["n_cases"] == 1
    test_id = Manifest.load(tiny_prepared_dataset).split("test")["subject_id"][0]
    assert [p.name for p in (out / "figures").iterdir()] == [f"{test_id}.png"]  # the stale figure is gone


def _nan_in(target: str):
    def edit(sid: str, data: torch.Tensor) -> torch.Tensor:
        if sid == target:
            data = data.clone()
            data[0, 3, 4, 5] = float("nan")
        return data
    return edit


@pytest.mark.parametrize("problem", ["nan", "shape", "missing_pred", "extra_pred", "missing_ref_dir", "split_on_dir"])
def test_bad_inputs_exit_2_and_write_nothing(problem: str, tiny_prepared_dataset: Path, tmp_path: Path,
                                             capsys) -> None:
    pred = tmp_path / "pred"
    ids = _write_preds(tiny_prepared_dataset, pred, "train",
                       edit=_nan_in("__none__") if problem != "nan" else None)
    ref: Path = tiny_prepared_dataset
    extra: list[str] = ["--split", "train"]
    expect = ""
    if problem == "nan":
        _write_preds(tiny_prepared_dataset, pred, "train", edit=_nan_in(ids[2]))
        expect = f"case '{ids[2]}'"
    elif problem == "shape":
        image = read_ct(pred / f"{ids[1]}.nii.gz")
        write_nifti(tio.ScalarImage(tensor=image.data[:, :, :, :-2], affine=image.affine), pred / f"{ids[1]}.nii.gz")
        expect = "shape"
    elif problem == "missing_pred":
        (pred / f"{ids[0]}.nii.gz").unlink()
        expect = "no prediction for 1 subjects"
    elif problem == "extra_pred":
        shutil.copy(pred / f"{ids[0]}.nii.gz", pred / "stranger.nii.gz")
        expect = "no reference for 1 predictions"
    elif problem == "missing_ref_dir":
        ref, extra, expect = tmp_path / "nowhere", [], "nowhere"
    elif problem == "split_on_dir":
        ref, expect = tiny_prepared_dataset.parent / "ct", "--split"
    out = tmp_path / "eval"
    code, _, err = _run(capsys, "--pred", pred, "--ref", ref, *extra, "--out", out)
    assert code == 2
    assert err.startswith("python -m evaluation.evaluate: error: ") and err.count("\n") == 1 and expect in err, err
    assert not out.exists()


def test_evaluate_pairs_feature_metrics_with_injected_extractor(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    g = torch.Generator().manual_seed(0)
    _write_preds(tiny_prepared_dataset, pred, "train", edit=lambda sid, d: d + 30 * torch.randn(d.shape, generator=g))
    pairs = find_pairs(pred, tiny_prepared_dataset, split="train")
    assert [p.subject_id for p in pairs] == sorted(p.subject_id for p in pairs) and pairs[0].ap is not None
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, stride=2), torch.nn.ReLU()).eval()
    rows, summary = evaluate_pairs(pairs, HUWindow(), feature_extractor=net, fid_min_samples=2)
    fm = summary["feature_metrics"]
    assert fm["n_samples"] == 6 and fm["n_features"] == 3
    assert math.isfinite(fm["fid"]) and fm["fid"] >= -1e-9 and math.isfinite(fm["mmd"])
    assert "drr_ap_psnr_db" not in rows[0]  # no geometry given
    # identical predictions give FID ~ 0
    same = [CasePair(p.subject_id, p.ref, p.ref) for p in pairs]
    _, s2 = evaluate_pairs(same, HUWindow(), feature_extractor=net, fid_min_samples=2)
    assert s2["feature_metrics"]["fid"] == pytest.approx(0.0, abs=1e-6)
    # default minimum is features + 1 = 4 samples: fine with 6, and too few with 3 cases
    _, s3 = evaluate_pairs(same[:3], HUWindow(), feature_extractor=net)
    assert s3["feature_metrics"]["fid"] is None and "at least 4" in s3["feature_metrics"]["fid_note"]


def test_find_pairs_takes_std_files_as_uncertainty(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    ids = _write_preds(tiny_prepared_dataset, pred, "train")
    shutil.copy(pred / f"{ids[0]}.nii.gz", pred / f"{ids[0]}_std.nii.gz")
    pairs = {p.subject_id: p for p in find_pairs(pred, tiny_prepared_dataset, split="train")}
    assert sorted(pairs) == sorted(ids)
    assert pairs[ids[0]].std == pred / f"{ids[0]}_std.nii.gz"
    assert all(pairs[i].std is None for i in ids[1:])


def test_find_pairs_ignores_samples_written_beside_their_mean(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    ids = _write_preds(tiny_prepared_dataset, pred, "train")
    for k in range(2):
        shutil.copy(pred / f"{ids[0]}.nii.gz", pred / f"{ids[0]}_sample{k}.nii.gz")
    pairs = find_pairs(pred, tiny_prepared_dataset, split="train")
    assert sorted(p.subject_id for p in pairs) == sorted(ids)
    (pred / f"{ids[0]}.nii.gz").unlink()  # a sample without its mean is not silently taken for it
    with pytest.raises(ValueError, match=f"no prediction for 1 subjects.*{ids[0]}"):
        find_pairs(pred, tiny_prepared_dataset, split="train")


def test_bad_uncertainty_file_names_the_case(tiny_prepared_dataset: Path, tmp_path: Path, capsys) -> None:
    pred = tmp_path / "pred"
    ids = _write_preds(tiny_prepared_dataset, pred, "test")
    shutil.copy(pred / f"{ids[0]}.nii.gz", pred / f"{ids[0]}_std.nii.gz")  # a CT in HU: negative values
    code, _, err = _run(capsys, "--pred", pred, "--ref", tiny_prepared_dataset, "--out", tmp_path / "e", "--figures")
    assert code == 2 and f"case '{ids[0]}': uncertainty" in err and "non-negative" in err
    assert not (tmp_path / "e").exists()
