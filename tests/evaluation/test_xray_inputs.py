"""Radiographs in, end to end: DICOM pair -> reader -> model grid -> harmonisation; sidecar, preview, options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import DatasetInfo, IntensityReference, Manifest, read_radiograph
from dataset.drr import DRRGeometry
from dataset.radiograph_style import RadiographStyle
from evaluation import generate_ct
from evaluation.xray_inputs import XrayOptions, prepare_pair, sample_kwargs, sidecar, training_geometry
from tests.dicom_files import write_dicom
from tests.evaluation.test_generate_ct import checkpoints, pair  # noqa: F401 (module fixtures)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """2-D PSNR in dB."""
    return float(10 * torch.log10(data_range ** 2 / ((a - b) ** 2).mean()))


def finer_dicom(path: Path, drr: torch.Tensor, geometry: DRRGeometry, view: str, mirrored: bool, factor: int = 2) -> Path:
    """A DRR as a hospital file: MONOCHROME1, 12 bits, ``factor`` x finer pitch (nearest upsampling: exact
    block sums), a 4-pixel padding border, stored mirrored (left-right) with Patient Orientation saying so."""
    g = geometry.view(view)
    fine = drr[0].repeat_interleave(factor, 0).repeat_interleave(factor, 1).numpy()
    stored = np.round((1.0 - fine) * 4095).astype(np.uint16)  # MONOCHROME1: attenuation shows dark in the values
    stored = np.pad(stored, 4, constant_values=4095)  # a padding frame the reader must ignore
    direction = ("L", "F") if view == "AP" else ("P", "F")
    if mirrored:
        stored = stored[:, ::-1]
        direction = ({"L": "R", "P": "A"}[direction[0]], "F")
    return write_dicom(path, np.ascontiguousarray(stored), photometric="MONOCHROME1", bits_stored=12,
                       PatientOrientation=list(direction), ViewPosition="AP" if view == "AP" else "LL",
                       ImagerPixelSpacing=[g.pixel_spacing[0] / factor, g.pixel_spacing[1] / factor],
                       DistanceSourceToDetector=g.sdd, EstimatedRadiographicMagnificationFactor=g.sdd / g.sid,
                       PixelPaddingValue=4095, PixelPaddingRangeLimit=4095)


@pytest.fixture(scope="module")
def dataset_info(tiny_prepared_dataset: Path) -> DatasetInfo:
    return DatasetInfo.load(tiny_prepared_dataset.parent)


def test_mirrored_monochrome1_dicom_pair_reaches_the_model_as_the_drr(tiny_prepared_dataset, dataset_info, tmp_path):
    row = Manifest.load(tiny_prepared_dataset).split("test").iloc[0]
    ap, lat = read_radiograph(row["ap"]).image, read_radiograph(row["lat"]).image
    geometry = dataset_info.geometry
    ap_file = finer_dicom(tmp_path / "ap.dcm", ap, geometry, "AP", mirrored=True)
    lat_file = finer_dicom(tmp_path / "lat.dcm", lat, geometry, "LAT", mirrored=False)
    pair_in = prepare_pair(ap_file, lat_file, geometry.detector_size, geometry, None, XrayOptions(harmonize="none"))
    assert pair_in.geometry is not None
    for view, got, drr in (("AP", pair_in.ap, ap), ("LAT", pair_in.lat, lat)):
        assert got.image.shape == drr.shape
        # the same picture up to the 12-bit quantisation and the percentile normalisation
        scale = float((got.image * drr).sum() / (got.image * got.image).sum())
        assert (psnr(got.image * scale, drr, data_range=1.0)) > 35, view
        assert np.allclose(got.geometry.pixel_spacing, geometry.view(view).pixel_spacing)
    assert any("Patient Orientation R\\F -> display L\\F: flip-cols" in s for s in pair_in.steps)
    flipped = finer_dicom(tmp_path / "wrong.dcm", ap, geometry, "AP", mirrored=True)
    wrong = prepare_pair(flipped, lat_file, geometry.detector_size, geometry, None,
                         XrayOptions(harmonize="none", ap_ops=("flip-cols",)))
    assert (psnr(wrong.ap.image, ap, data_range=1.0)) < 25  # a needless flip shows


def test_asymmetric_marker_keeps_its_side_from_dicom_to_model_grid(dataset_info, tmp_path):
    """A bright marker on the patient's right, stored mirrored: it must land on the viewer's left."""
    geometry = dataset_info.geometry
    g = geometry.ap
    fine = np.zeros((64, 64), np.float32)
    fine[8:16, 44:52] = 1.0  # stored mirrored: columns run to the patient's right, so this is the patient's right
    fine[40:60, 30:34] = 0.5  # a body-like stripe for contrast
    stored = np.round(fine * 4000).astype(np.uint16)
    path = write_dicom(tmp_path / "ap.dcm", stored, bits_stored=12, PatientOrientation=["R", "F"],
                       ImagerPixelSpacing=[g.pixel_spacing[0] / 2, g.pixel_spacing[1] / 2],
                       DistanceSourceToDetector=g.sdd, EstimatedRadiographicMagnificationFactor=g.sdd / g.sid)
    lat = write_dicom(tmp_path / "lat.dcm", stored, bits_stored=12, PatientOrientation=["P", "F"])
    got = prepare_pair(path, lat, geometry.detector_size, geometry, None, XrayOptions(harmonize="none"))
    image = got.ap.image[0]
    rows, cols = image.shape
    peak = torch.nonzero(image == image.max())[0]
    assert peak[0] < rows // 2 and peak[1] < cols // 2  # superior, viewer's left = patient's right


def test_harmonisation_brings_a_processed_drr_back(tiny_prepared_dataset, dataset_info, tmp_path):
    row = Manifest.load(tiny_prepared_dataset).split("test").iloc[0]
    reference = IntensityReference.from_manifest(tiny_prepared_dataset)
    clean = {v: read_radiograph(row[v.lower()]).image for v in ("AP", "LAT")}
    style = {"gamma": 1.7, "lut_centre": 0.5, "lut_width": 0.2}
    paths = {}
    for view, image in clean.items():
        paths[view] = tmp_path / f"{view}.pt"
        torch.save(RadiographStyle.apply(image, style), paths[view])
    size = dataset_info.geometry.detector_size
    none = prepare_pair(paths["AP"], paths["LAT"], size, dataset_info.geometry, reference, XrayOptions(harmonize="none"))
    auto = prepare_pair(paths["AP"], paths["LAT"], size, dataset_info.geometry, reference, XrayOptions(harmonize="auto"))
    assert auto.harmonized and not none.harmonized
    for view in ("AP", "LAT"):
        r_none, r_auto = getattr(none, view.lower()), getattr(auto, view.lower())
        assert float((r_auto.image - clean[view]).abs().mean()) < 0.5 * float((r_none.image - clean[view]).abs().mean())


def test_training_geometry_comes_from_the_checkpoint(checkpoints, dataset_info):  # noqa: F811
    from evaluation.generation import CTGenerator

    gen = CTGenerator.from_checkpoints(checkpoints["xray"], device="cpu")
    assert training_geometry(gen.biflownet) == dataset_info.geometry


def test_pair_geometry_goes_to_samplers_that_take_it(dataset_info):
    class Takes:
        def sample(self, ap, lat, geometry=None):
            return geometry

    class Ignores:
        def sample(self, ap, lat):
            return None

    inputs = type("Inputs", (), {"geometry": dataset_info.geometry})()
    assert sample_kwargs(Takes(), inputs) == {"geometry": dataset_info.geometry}
    assert sample_kwargs(Ignores(), inputs) == {}


def test_dicom_pair_cli_writes_sidecar_and_preview(checkpoints, tiny_prepared_dataset, dataset_info, tmp_path,  # noqa: F811
                                                   capsys):
    row = Manifest.load(tiny_prepared_dataset).split("test").iloc[0]
    ap = finer_dicom(tmp_path / "ap.dcm", read_radiograph(row["ap"]).image, dataset_info.geometry, "AP", mirrored=True)
    lat = finer_dicom(tmp_path / "lat.dcm", read_radiograph(row["lat"]).image, dataset_info.geometry, "LAT", mirrored=False)
    out, preview = tmp_path / "ct.nii.gz", tmp_path / "preview.png"
    code = generate_ct.main([str(a) for a in ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat,
                                              "--output", out, "--preview", preview, "--num-inference-steps", 1,
                                              "--harmonize", "auto"]])
    log = capsys.readouterr().out
    assert code == 0 and out.is_file() and preview.is_file()
    side = json.loads(sidecar(out).read_text())
    assert side["inputs"] == {"AP": str(ap), "LAT": str(lat)}
    assert side["harmonization"] == "matched to the training X-ray statistics"
    assert side["views"]["AP"]["geometry"]["detector_size"] == [32, 32]
    assert any("flip-cols" in s for s in side["steps"]) and any(s.startswith("LAT: harmonised") for s in side["steps"])
    assert all(f"ct.nii.gz: {s}" in log for s in side["steps"])  # the same list goes to the log
    from PIL import Image

    with Image.open(preview) as img:
        assert img.size[0] > 400 and img.size[1] > 400


def test_preview_alone_samples_nothing(checkpoints, pair, tmp_path, capsys):  # noqa: F811
    ap, lat, _ = pair
    preview = tmp_path / "p.png"
    code = generate_ct.main([str(a) for a in ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat,
                                              "--preview", preview, "--harmonize", "none"]])
    assert code == 0 and [p.name for p in tmp_path.iterdir()] == ["p.png"]
    assert "harmonisation: none (--harmonize none)" in capsys.readouterr().out


def test_existing_sidecar_or_preview_is_refused(checkpoints, pair, tmp_path, capsys):  # noqa: F811
    ap, lat, _ = pair
    (tmp_path / "ct.json").write_text("{}")
    code = generate_ct.main([str(a) for a in ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat,
                                              "--output", tmp_path / "ct.nii.gz"]])
    err = capsys.readouterr().err
    assert code == 2 and "ct.json: already exists" in err and not (tmp_path / "ct.nii.gz").exists()
    code = generate_ct.main([str(a) for a in ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat,
                                              "--preview", tmp_path / "p.jpg"]])
    assert code == 2 and "expected a .png" in capsys.readouterr().err


def test_per_view_options_replace_the_files_values_and_shared_ones_fill_in(tmp_path: Path) -> None:
    import argparse

    from evaluation.xray_inputs import add_xray_arguments

    p = argparse.ArgumentParser()
    add_xray_arguments(p)
    args = p.parse_args(["--pixel-spacing", "0.3", "--sdd", "1500", "--lat-pixel-spacing", "0.2", "0.25",
                         "--ap-sid", "1000"])
    options = XrayOptions.from_args(args)
    assert options.pixel_spacing == (0.3, 0.3) and options.sdd == 1500
    assert options.of("LAT") == {"pixel_spacing": (0.2, 0.25)} and options.of("AP") == {"sid": 1000}
    with pytest.raises(ValueError, match="--ap-pixel-spacing takes ROW \\[COL\\] mm, got 3 values"):
        XrayOptions.from_args(p.parse_args(["--ap-pixel-spacing", "1", "2", "3"]))
    with pytest.raises(ValueError, match="per-view X-ray options"):
        XrayOptions(views={"PA": {"sdd": 1}})
    # a DICOM AP with its own spacing and a PNG lateral: the shared value is the PNG's, the DICOM keeps its own
    geometry = DRRGeometry()
    ap = write_dicom(tmp_path / "ap.dcm", np.arange(1600, dtype=np.uint16).reshape(40, 40), ImagerPixelSpacing=[0.5, 0.5],
                     DistanceSourceToDetector=geometry.ap.sdd, ViewPosition="AP")
    from PIL import Image

    Image.fromarray(np.arange(1600).reshape(40, 40).astype(np.uint8)).save(tmp_path / "lat.png")
    pair_in = prepare_pair(ap, tmp_path / "lat.png", geometry.detector_size, geometry, None,
                           XrayOptions(pixel_spacing=(0.7, 0.7)))
    assert any("pixel spacing 0.5 x 0.5 mm at magnification" in s for s in pair_in.ap.steps)
    assert any("pixel spacing 0.7 x 0.7 mm at magnification" in s for s in pair_in.lat.steps)


def test_a_pair_without_pixel_spacing_shares_one_scale(tmp_path: Path) -> None:
    from PIL import Image

    # the same 20-pixel-wide body, on a taller AP film and a square lateral one
    ap, lat = np.zeros((50, 40), np.uint8), np.zeros((40, 40), np.uint8)
    ap[5:45, 10:30] = 200
    lat[5:35, 10:30] = 200
    Image.fromarray(ap).save(tmp_path / "ap.png")
    Image.fromarray(lat).save(tmp_path / "lat.png")
    geometry = DRRGeometry()
    rows, cols = 20, 20
    pair_in = prepare_pair(tmp_path / "ap.png", tmp_path / "lat.png", (rows, cols), geometry, None, XrayOptions())
    width = {v: float((r.image[0] > 0.3).any(0).sum()) for v, r in (("AP", pair_in.ap), ("LAT", pair_in.lat))}
    assert width["AP"] == width["LAT"] == pytest.approx(20 * 20 / 50, abs=1)  # both at the AP's 2.5 px per pixel
    assert any("scale shared with the other view" in s for s in pair_in.lat.steps)


def test_impossible_distances_are_refused_even_without_a_pixel_spacing() -> None:
    with pytest.raises(ValueError, match="AP: SDD 500 mm must exceed the source-isocentre distance 1000 mm"):
        XrayOptions(sdd=500, sid=1000)
    with pytest.raises(ValueError, match="LAT: SDD 900 mm must exceed"):
        XrayOptions(sid=1000, views={"LAT": {"sdd": 900}})
