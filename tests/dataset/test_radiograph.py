"""The one X-ray reader: DICOM pixel handling, orientation tags, millimetre mapping, refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.drr import ViewGeometry
from dataset.radiograph import orientation_ops, read_radiograph, read_xray, to_detector
from tests.dicom_files import dicom_dataset, write_dicom


def ramp(rows: int = 12, cols: int = 16, high: int = 4095, dtype=np.uint16) -> np.ndarray:
    """Stored values rising left to right (one value per column) with a small row term."""
    r, c = np.mgrid[0:rows, 0:cols]
    return (c * (high // (cols + 2)) + r).astype(dtype)


# ------------------------------------------------------------------------------ pixels and intensity
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("dtype,bits", [(np.uint8, 8), (np.uint16, 12), (np.uint16, 16), (np.int16, 12)])
def test_photometric_interpretation_and_bit_depth(tmp_path: Path, photometric: str, dtype, bits: int) -> None:
    high = 2 ** bits - 1 if np.dtype(dtype).kind == "u" else 2 ** (bits - 1) - 1
    pixels = ramp(high=high, dtype=dtype)
    r = read_radiograph(write_dicom(tmp_path / "x.dcm", pixels, photometric=photometric, bits_stored=bits))
    x = r.image[0]
    assert r.image.shape == (1, 12, 16) and r.image.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    columns = x.mean(0)
    rising = bool((columns[1:] >= columns[:-1]).all())
    # brighter always means more attenuation: MONOCHROME1 shows high stored values dark, so they are inverted
    assert rising == (photometric == "MONOCHROME2")
    assert any(s.startswith("inverted MONOCHROME1") for s in r.steps) == (photometric == "MONOCHROME1")


def test_rescale_slope_intercept_is_applied(tmp_path: Path) -> None:
    pixels = ramp()
    r = read_radiograph(write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100),
                        normalize=False)
    assert torch.equal(r.image[0], torch.from_numpy(pixels.astype(np.float32) * 2 - 100))
    assert any("Rescale Slope 2 / Intercept -100" in s for s in r.steps)


def test_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    pixels = np.array([[0, 1, 2, 3]] * 4, np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.add_new(0x00283006, "US", [10, 40, 20, 30])  # LUT Data, deliberately not monotone: the table is used
    item.ModalityLUTType = "US"
    path = write_dicom(tmp_path / "x.dcm", pixels, ModalityLUTSequence=[item])
    assert torch.equal(read_xray(path)[0, 0], torch.tensor([10.0, 40.0, 20.0, 30.0]))


def test_bits_stored_ignores_unused_high_bits(tmp_path: Path) -> None:
    pixels = ramp()
    dirty = pixels | np.uint16(0xF000)  # garbage above the 12 stored bits
    clean = read_xray(write_dicom(tmp_path / "clean.dcm", pixels, bits_stored=12))
    assert torch.equal(read_xray(write_dicom(tmp_path / "dirty.dcm", dirty, bits_stored=12)), clean)


def test_pixel_padding_value_is_masked_to_air(tmp_path: Path) -> None:
    pixels = ramp()
    pixels[:, :3] = 4095  # a padded band; without the mask it would be the brightest thing in the image
    r = read_radiograph(write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, PixelPaddingValue=4095))
    assert not bool(r.valid[0, :, :3].any()) and bool(r.valid[0, :, 3:].all())
    assert float(r.image[0, :, :3].abs().max()) == 0.0
    assert float(r.image[0, :, 3:].max()) == 1.0  # the range comes from the real pixels


def test_rectangular_shutter_and_bright_collimator_band_are_masked(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = (rng.random((20, 24)) * 2000 + 500).astype(np.uint16)
    pixels[:, -4:] = 4000  # a flat bright band along the right edge (collimator blade)
    r = read_radiograph(write_dicom(tmp_path / "band.dcm", pixels, bits_stored=12))
    assert not bool(r.valid[0, :, -4:].any()) and bool(r.valid[0, :, :-4].all())
    r = read_radiograph(write_dicom(tmp_path / "shutter.dcm", pixels[:, :-4], bits_stored=12,
                                    ShutterShape="RECTANGULAR", ShutterLeftVerticalEdge=3,
                                    ShutterRightVerticalEdge=20, ShutterUpperHorizontalEdge=2,
                                    ShutterLowerHorizontalEdge=19))
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[1:19, 2:20] = True
    assert torch.equal(r.valid[0], expected)


def test_png_16_bit_and_pt_keep_their_unit_values(tmp_path: Path) -> None:
    from PIL import Image

    pixels = (ramp() * 16).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    r = read_radiograph(tmp_path / "x.png")
    assert torch.allclose(r.image[0], torch.from_numpy(pixels.astype(np.float32)) / 65535)
    x = torch.rand(1, 6, 7)
    torch.save(x, tmp_path / "x.pt")
    assert torch.equal(read_radiograph(tmp_path / "x.pt").image, x)
    torch.save(x * 300 - 50, tmp_path / "raw.pt")  # not in [0, 1]: normalised, and said so
    r = read_radiograph(tmp_path / "raw.pt")
    assert float(r.image.min()) == 0.0 and float(r.image.max()) == 1.0 and any("normalised" in s for s in r.steps)
    assert torch.equal(read_xray(tmp_path / "raw.pt"), x * 300 - 50)  # as stored, for importers


def test_grey_rgb_png_is_accepted_and_colour_refused(tmp_path: Path) -> None:
    from PIL import Image

    grey = np.repeat(ramp(high=255, dtype=np.uint8)[..., None], 3, axis=2)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert read_radiograph(tmp_path / "grey.png").image.shape == (1, 12, 16)
    grey[..., 0] = 255
    Image.fromarray(grey).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png: is a colour image"):
        read_radiograph(tmp_path / "colour.png")


def test_jpeg2000_compressed_dicom_reads_like_the_uncompressed(tmp_path: Path) -> None:
    from pydicom.uid import JPEG2000Lossless

    pixels = (np.random.default_rng(0).random((40, 40)) * 4095).astype(np.uint16)  # openjpeg needs >= 33 px
    plain = write_dicom(tmp_path / "plain.dcm", pixels, photometric="MONOCHROME1", bits_stored=12)
    ds = dicom_dataset(pixels, photometric="MONOCHROME1", bits_stored=12)
    try:
        ds.compress(JPEG2000Lossless)
    except (RuntimeError, ImportError) as e:
        pytest.skip(f"no JPEG 2000 encoder installed (pylibjpeg-openjpeg): {e}")
    ds.save_as(str(tmp_path / "j2k.dcm"), enforce_file_format=True)
    r = read_radiograph(tmp_path / "j2k.dcm")
    assert "JPEG 2000" in r.source
    assert torch.equal(r.image, read_radiograph(plain).image)


# ------------------------------------------------------------------------------------------ orientation
@pytest.mark.parametrize("view,orientation,ops", [
    ("AP", ("L", "F"), []), ("AP", ("R", "F"), ["flip-cols"]), ("AP", ("L", "H"), ["flip-rows"]),
    ("AP", ("F", "L"), ["transpose"]), ("AP", ("H", "R"), ["transpose", "flip-cols", "flip-rows"]),
    ("LAT", ("P", "F"), []), ("LAT", ("A", "F"), ["flip-cols"]), ("LAT", ("FL", "AL"), ["transpose", "flip-cols"]),
])
def test_orientation_ops_from_patient_orientation(view: str, orientation, ops) -> None:
    assert orientation_ops(orientation, view) == ops


def test_orientation_of_another_view_is_refused() -> None:
    with pytest.raises(ValueError, match=r"A\\F does not describe an AP image"):
        orientation_ops(("A", "F"), "AP")


def marker_image() -> np.ndarray:
    """12 x 16 MONOCHROME2, an L-shaped bright marker near the top-left corner (rows 1-4, columns 1-3)."""
    pixels = np.full((12, 16), 100, np.uint16)
    pixels[1:5, 1] = 3000
    pixels[4, 1:4] = 3000
    return pixels


@pytest.mark.parametrize("orientation,expect_left", [(["L", "F"], True), (["R", "F"], False)])
def test_patient_orientation_moves_the_marker(tmp_path: Path, orientation, expect_left: bool) -> None:
    r = read_radiograph(write_dicom(tmp_path / "x.dcm", marker_image(), PatientOrientation=orientation), view="AP")
    peak_col = int(r.image[0].sum(0).argmax())
    assert (peak_col < 8) == expect_left  # R\F: stored mirrored, the marker belongs on the other side


@pytest.mark.parametrize("view,position,laterality,reversed_", [
    ("AP", "AP", "", False), ("AP", "PA", "", True), ("LAT", "LL", "", False), ("LAT", "RL", "", True),
    ("LAT", "LATERAL", "R", True), ("LAT", "LATERAL", "L", False), ("AP", "", "", False)])
def test_view_position_sets_the_source_side(tmp_path: Path, view, position, laterality, reversed_) -> None:
    tags = {"ViewPosition": position, "ImagerPixelSpacing": [0.5, 0.5]}
    if laterality:
        tags["ImageLaterality"] = laterality
    r = read_radiograph(write_dicom(tmp_path / "x.dcm", marker_image(), **tags), view=view)
    assert r.reversed == reversed_ and r.geometry.reversed == reversed_
    assert torch.equal(r.image, read_radiograph(write_dicom(tmp_path / "y.dcm", marker_image()), view=view).image)


def test_view_position_or_orientation_of_the_other_view_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", marker_image(), ViewPosition="LL")
    with pytest.raises(ValueError, match="x.dcm: View Position LL is not an AP view"):
        read_radiograph(path, view="AP")
    path = write_dicom(tmp_path / "y.dcm", marker_image(), PatientOrientation=["P", "F"])
    with pytest.raises(ValueError, match=r"y.dcm: Patient Orientation P\\F does not describe an AP image"):
        read_radiograph(path, view="AP")


def test_without_tags_the_display_convention_is_assumed_and_said(tmp_path: Path) -> None:
    r = read_radiograph(write_dicom(tmp_path / "x.dcm", marker_image()), view="LAT")
    assert torch.equal(r.image, read_radiograph(tmp_path / "x.dcm").image)
    assert any("no Patient Orientation tag: assumed stored in the display convention" in s for s in r.steps)


def test_user_ops_apply_after_the_tags(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", marker_image(), PatientOrientation=["R", "F"])
    tagged = read_radiograph(path, view="AP").image
    assert torch.equal(read_radiograph(path, view="AP", ops=["flip-cols"]).image, tagged.flip(-1))
    assert torch.equal(read_radiograph(path, view="AP", ops=["transpose"]).image, tagged.transpose(-1, -2))


# ---------------------------------------------------------------------------------------- millimetres
def test_dicom_geometry_from_tags(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", marker_image(), ImagerPixelSpacing=[0.2, 0.1], DistanceSourceToDetector=1800,
                       EstimatedRadiographicMagnificationFactor=1.2, PatientOrientation=["F", "L"])
    g = read_radiograph(path, view="AP").geometry
    assert g.sdd == 1800 and math.isclose(g.sid, 1500)
    assert g.pixel_spacing == (0.1, 0.2) and g.detector_size == (16, 12)  # transposed into the display


def test_missing_distances_come_from_the_assumed_geometry(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", marker_image(), PixelSpacing=[0.3, 0.3])
    r = read_radiograph(path, view="AP", assume=ViewGeometry(1200, 1000))
    assert (r.geometry.sdd, r.geometry.sid) == (1200, 1000)
    assert any("assumed" in s for s in r.steps)


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    w = image[0].double()
    r, c = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
    return float((w * r).sum() / w.sum()), float((w * c).sum() / w.sum())


@pytest.mark.parametrize("pitch", [(0.5, 0.25), (1.5, 1.5), (3.0, 2.0)])
def test_marker_at_a_known_millimetre_position_lands_on_the_model_pixel(tmp_path: Path, pitch) -> None:
    # the model: 32 x 32 detector, 1.5 mm pitch at magnification 1.5 -> 1.0 mm at the isocentre
    model = ViewGeometry(1500, 1000, (32, 32), (1.5, 1.5))
    # the radiograph: another magnification (1.2) and its own pitch; a 2 x 2 mm marker 6 mm above and
    # 8 mm to the patient's left of the central ray (at the isocentre)
    mag = 1.2
    rows, cols = round(60 * mag / pitch[0]), round(50 * mag / pitch[1])  # 60 x 50 mm field at the isocentre
    r, c = np.mgrid[0:rows, 0:cols]
    u = (r - (rows - 1) / 2) * pitch[0] / mag  # mm at the isocentre
    v = (c - (cols - 1) / 2) * pitch[1] / mag
    pixels = np.where((np.abs(u + 6) <= 1) & (np.abs(v - 8) <= 1), 3000, 0).astype(np.uint16)
    path = write_dicom(tmp_path / "x.dcm", pixels, ImagerPixelSpacing=list(pitch), DistanceSourceToDetector=1200,
                       EstimatedRadiographicMagnificationFactor=mag)
    out = to_detector(read_radiograph(path, view="AP", assume=model), model)
    assert out.image.shape == (1, 32, 32)
    assert out.geometry.detector_size == (32, 32) and out.geometry.sdd == 1200
    assert np.allclose(out.geometry.pixel_spacing, (1.2, 1.2))  # 1.0 mm at the isocentre at this magnification
    marker = pixels > 0  # where the coarse grids put it: about 6 mm up and 8 mm left
    expected = (15.5 + u[marker].mean(), 15.5 + v[marker].mean())  # output pixels are 1 mm at the isocentre
    assert abs(expected[0] - 9.5) < 0.6 and abs(expected[1] - 23.5) < 0.6
    row, col = centre_of_mass(out.image)
    assert abs(row - expected[0]) < 0.2 and abs(col - expected[1]) < 0.2
    # 60 x 50 mm -> 32 x 32 mm: rows cropped, columns cropped; nothing stretched
    assert any("rows cropped" in s and "columns cropped" in s for s in out.steps)


def test_smaller_field_is_padded_with_air_and_marked_invalid(tmp_path: Path) -> None:
    model = ViewGeometry(1500, 1000, (32, 32), (1.5, 1.5))
    pixels = (np.random.default_rng(0).random((10, 20)) * 2000 + 1000).astype(np.uint16)
    path = write_dicom(tmp_path / "x.dcm", pixels, ImagerPixelSpacing=[1.5, 1.5], DistanceSourceToDetector=1500,
                       EstimatedRadiographicMagnificationFactor=1.5)
    out = to_detector(read_radiograph(path, view="AP", assume=model), model)
    assert int(out.valid.sum()) == 10 * 20 and float(out.image[~out.valid].abs().max()) == 0.0
    assert bool(out.valid[0, 11:21, 6:26].all())


def test_same_geometry_is_the_identity() -> None:
    from dataset.radiograph import Radiograph

    model = ViewGeometry(1500, 1000, (8, 8), (2.0, 2.0))
    image = torch.rand(1, 8, 8)
    r = Radiograph(image, model, (), "test", torch.ones(1, 8, 8, dtype=torch.bool), "AP")
    assert torch.equal(to_detector(r, model).image, image)


def test_without_spacing_the_image_is_fitted_keeping_its_aspect(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.linspace(100, 200, 20 * 40).reshape(20, 40).astype(np.uint8)).save(tmp_path / "x.png")
    model = ViewGeometry(1500, 1000, (16, 16), (2.0, 2.0))
    out = to_detector(read_radiograph(tmp_path / "x.png", view="AP"), model)
    assert out.image.shape == (1, 16, 16) and out.geometry == model
    assert bool(out.valid[0, 4:12].all()) and not bool(out.valid[0, :4].any()) and not bool(out.valid[0, 12:].any())
    assert any(s.startswith("warning: no pixel spacing") for s in out.steps)
    with_spacing = read_radiograph(tmp_path / "x.png", view="AP", pixel_spacing=[0.5, 0.25], sdd=1500, sid=1000)
    assert with_spacing.geometry.pixel_spacing == (0.5, 0.25)


# -------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kind,message", [
    ("colour", "is a colour DICOM image (Photometric Interpretation RGB"),
    ("multiframe", "is a multi-frame DICOM (2 frames"),
    ("nonimage", "is a non-image DICOM object"),
    ("nopixels", "has no pixel data"),
    ("ct", "is a CT slice (Modality CT"),
    ("spacing0", "Imager Pixel Spacing [0.0, 0.1] is invalid"),
    ("spacingnan", "Imager Pixel Spacing [nan, 0.1] is invalid"),
    ("notdicom", "cannot be read as a DICOM file"),
])
def test_bad_dicom_is_refused_in_one_line_naming_the_file(tmp_path: Path, kind: str, message: str) -> None:
    path = bad_dicom(tmp_path, kind)
    with pytest.raises(ValueError) as err:
        read_radiograph(path, view="AP")
    text = str(err.value)
    assert text.startswith(str(path)) and message in text and len(text.splitlines()) == 1


def bad_dicom(tmp_path: Path, kind: str) -> Path:
    """One refused DICOM of each kind (also used by the generate_ct tests)."""
    path = tmp_path / f"{kind}.dcm"
    grey = marker_image()
    if kind == "colour":
        rgb = np.zeros((8, 8, 3), np.uint8)
        rgb[..., 0] = 200  # red
        return write_dicom(path, rgb)
    if kind == "multiframe":
        return write_dicom(path, np.zeros((16, 8), np.uint16), NumberOfFrames=2, Rows=8)
    if kind == "nonimage":
        return write_dicom(path, None, modality="SR")
    if kind == "nopixels":
        return write_dicom(path, None, Rows=8, Columns=8)
    if kind == "ct":
        return write_dicom(path, grey.astype(np.int16), modality="CT", RescaleSlope=1, RescaleIntercept=-1024,
                           ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    if kind == "spacing0":
        return write_dicom(path, grey, ImagerPixelSpacing=[0.0, 0.1])
    if kind == "spacingnan":
        return write_dicom(path, grey, ImagerPixelSpacing=["NaN", "0.1"])
    if kind == "notdicom":
        path.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
        return path
    raise ValueError(kind)


def test_ct_localizer_is_a_radiograph(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "scout.dcm", marker_image().astype(np.int16), modality="CT",
                       ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert read_radiograph(path).image.shape == (1, 12, 16)


@pytest.mark.parametrize("spacing", [0.0, float("nan"), -1.0])
def test_bad_given_spacing_is_refused(tmp_path: Path, spacing: float) -> None:
    torch.save(torch.rand(1, 6, 7), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="pixel spacing .* is invalid; expected a positive finite"):
        read_radiograph(tmp_path / "x.pt", pixel_spacing=spacing)


@pytest.mark.parametrize("name,bits", [("x.png", 8), ("x.tif", 8), ("x.tif", 16), ("x.jpg", 8)])
def test_png_tiff_jpeg_scale_by_bit_depth(tmp_path: Path, name: str, bits: int) -> None:
    from PIL import Image

    high = 2 ** bits - 1
    pixels = ramp(high=high, dtype=np.uint8 if bits == 8 else np.uint16)
    Image.fromarray(pixels).save(tmp_path / name)
    r = read_radiograph(tmp_path / name, view="AP")
    tolerance = 4 / 255 if name.endswith(".jpg") else 1e-6  # JPEG is lossy
    assert r.image.shape == (1, 12, 16)
    assert float((r.image[0] - torch.from_numpy(pixels.astype(np.float32)) / high).abs().max()) <= tolerance


# ------------------------------------------------------------------ files from other systems (audit cases)
@pytest.mark.parametrize("photometric,shape,inverted", [("MONOCHROME1", "INVERSE", True),
                                                        ("MONOCHROME1", "IDENTITY", True),
                                                        ("MONOCHROME2", "IDENTITY", False),
                                                        ("MONOCHROME2", "INVERSE", True)])
def test_presentation_lut_shape_inverse_is_the_monochrome1_inversion_not_a_second_one(
        tmp_path: Path, photometric: str, shape: str, inverted: bool) -> None:
    # DX / CR files must say INVERSE with MONOCHROME1: one inversion, so high stored values still end up dark
    r = read_radiograph(write_dicom(tmp_path / "x.dcm", ramp(), photometric=photometric, bits_stored=12,
                                    PresentationLUTShape=shape))
    columns = r.image[0].mean(0)
    assert bool((columns[1:] <= columns[:-1]).all()) == inverted
    assert bool((columns[1:] >= columns[:-1]).all()) == (not inverted)
    assert sum(s.startswith("inverted") for s in r.steps) == int(inverted)


@pytest.mark.parametrize("name", ["IM0001", "image.IMA", "x.dcm"])
def test_dicom_without_preamble_or_file_meta_is_decoded_in_its_own_encoding(tmp_path: Path, name: str) -> None:
    from pydicom.filewriter import dcmwrite

    pixels = ramp()
    ds = dicom_dataset(pixels, bits_stored=12)
    del ds.file_meta  # a bare data set, as old archives and some exporters write
    path = tmp_path / name
    dcmwrite(str(path), ds, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    r = read_radiograph(path, normalize=False)
    assert torch.equal(r.image[0], torch.from_numpy(pixels.astype(np.float32)))
    assert any("no transfer syntax in the file" in s and "Implicit VR Little Endian" in s for s in r.steps)


def test_extensionless_files_that_are_not_dicom_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "IM0002"
    path.write_bytes(b"hello, this is not a radiograph\n" * 20)
    with pytest.raises(ValueError, match=r"IM0002: unsupported X-ray file type; expected DICOM"):
        read_radiograph(path)


def test_truncated_uncompressed_dicom_is_called_truncated_not_a_missing_codec(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", ramp(rows=64, cols=64), bits_stored=12)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(ValueError) as err:
        read_radiograph(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "truncated or corrupt" in msg and "codecs" not in msg
    assert "\n" not in msg


@pytest.mark.parametrize("keyword", ["ImagerPixelSpacing", "PixelSpacing"])
def test_single_valued_pixel_spacing_means_square_pixels(tmp_path: Path, keyword: str) -> None:
    r = read_radiograph(write_dicom(tmp_path / "x.dcm", ramp(), bits_stored=12, **{keyword: "0.2"}), view="AP")
    assert r.geometry is not None and r.geometry.pixel_spacing == pytest.approx((0.2, 0.2))


@pytest.mark.parametrize("turn,stored_from_upright", [(3, lambda u: u[::-1, ::-1]), (6, lambda u: np.rot90(u, 1)),
                                                      (8, lambda u: np.rot90(u, -1)), (2, lambda u: u[:, ::-1])])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_turns_the_image_upright(tmp_path: Path, turn: int, stored_from_upright, suffix: str) -> None:
    from PIL import Image

    upright = np.zeros((24, 16), np.uint8)
    upright[2:8, 2:6] = 255  # a bright block near the top left corner of the displayed image
    img = Image.fromarray(np.ascontiguousarray(stored_from_upright(upright)))
    exif = Image.Exif()
    exif[0x0112] = turn
    img.save(tmp_path / f"x{suffix}", exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    r = read_radiograph(tmp_path / f"x{suffix}")
    assert r.image.shape == (1, 24, 16)
    if suffix == ".png":  # lossless: exactly the upright image
        assert torch.equal(r.image[0], torch.from_numpy(upright / 255.0).float())
    assert float(r.image[0, 2:8, 2:6].mean()) > 0.9 and float(r.image[0, 14:, 8:].mean()) < 0.1
    assert any(f"EXIF orientation {turn}" in s for s in r.steps)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_twelve_bit_values_in_a_sixteen_bit_file_are_scaled_by_twelve_bits(tmp_path: Path, suffix: str) -> None:
    from PIL import Image

    pixels = ramp(high=4095)  # a DICOM -> PNG / TIFF export that kept the stored 12-bit values
    pixels[0, -1] = 4095
    Image.fromarray(pixels).save(tmp_path / f"x{suffix}")
    r = read_radiograph(tmp_path / f"x{suffix}")
    assert torch.allclose(r.image[0], torch.from_numpy(pixels.astype(np.float32)) / 4095)
    assert any("12-bit data in a 16-bit file" in s for s in r.steps)
    full = (pixels.astype(np.uint32) * 16).astype(np.uint16)  # the same image using the full 16 bits
    Image.fromarray(full).save(tmp_path / f"full{suffix}")
    r16 = read_radiograph(tmp_path / f"full{suffix}")
    assert torch.allclose(r16.image[0], torch.from_numpy(full.astype(np.float32)) / 65535)
    assert not any("bits (largest" in s for s in r16.steps)


def test_multi_page_tiff_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    pages = [Image.fromarray(ramp().astype(np.uint8)) for _ in range(2)]
    pages[0].save(tmp_path / "x.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ValueError, match=r"x\.tif: is a multi-page image \(2 pages\); expected a single radiograph"):
        read_radiograph(tmp_path / "x.tif")


def test_distance_source_to_patient_ends_at_the_table_so_the_isocentre_is_half_a_chest_closer(tmp_path: Path) -> None:
    from dataset.radiograph import TYPICAL_HALF_DEPTH_MM

    tags = dict(ImagerPixelSpacing=[0.2, 0.2], DistanceSourceToDetector=1800, DistanceSourceToPatient=1650)
    for view, position in (("AP", "PA"), ("LAT", "LL")):
        r = read_radiograph(write_dicom(tmp_path / f"{view}.dcm", ramp(), ViewPosition=position, **tags), view=view)
        assert r.geometry.sdd == 1800
        assert r.geometry.sid == pytest.approx(1650 - TYPICAL_HALF_DEPTH_MM[view])
        assert any("Distance Source to Patient 1650 mm" in s and "table" in s for s in r.steps)
    # the distance given for the view replaces the estimate
    r = read_radiograph(tmp_path / "AP.dcm", view="AP", sid=1600)
    assert r.geometry.sid == 1600 and not any("half a typical" in s for s in r.steps)
    # with a magnification factor and no SDD, the SDD is the distance times the factor
    path = write_dicom(tmp_path / "ermf.dcm", ramp(), ImagerPixelSpacing=[0.2, 0.2], DistanceSourceToPatient=1500,
                       EstimatedRadiographicMagnificationFactor=1.2)
    r = read_radiograph(path, view="AP")
    assert r.geometry.sdd == pytest.approx(1800) and r.geometry.sid == pytest.approx(1500)


def test_an_assumed_sdd_below_the_files_distance_is_refused_naming_the_assumption(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", ramp(), ImagerPixelSpacing=[0.2, 0.2], DistanceSourceToPatient=1800)
    with pytest.raises(ValueError) as err:
        read_radiograph(path, view="AP", assume=ViewGeometry(1500, 1000, (8, 8), (2.0, 2.0)))
    msg = str(err.value)
    assert "SDD 1500 mm (assumed: the model's" in msg and "--sdd" in msg and len(msg.splitlines()) == 1
    assert read_radiograph(path, view="AP", fill_sdd=1950).geometry.sdd == 1950


def test_shared_values_fill_in_only_what_a_file_lacks(tmp_path: Path) -> None:
    from PIL import Image

    dicom = write_dicom(tmp_path / "x.dcm", ramp(), ImagerPixelSpacing=[0.2, 0.2], DistanceSourceToDetector=1800)
    r = read_radiograph(dicom, view="AP", fill_pixel_spacing=0.3, fill_sdd=1500, fill_sid=1000)
    assert r.geometry.pixel_spacing == (0.2, 0.2) and r.geometry.sdd == 1800 and r.geometry.sid == 1000
    assert any("is for files without one: the file's is kept" in s for s in r.steps)
    r = read_radiograph(dicom, view="AP", pixel_spacing=0.3)  # given for this view: replaces the file's
    assert r.geometry.pixel_spacing == (0.3, 0.3) and any("replaced by the given one" in s for s in r.steps)
    Image.fromarray(ramp().astype(np.uint8)).save(tmp_path / "x.png")
    r = read_radiograph(tmp_path / "x.png", view="AP", fill_pixel_spacing=0.3, fill_sdd=1500, fill_sid=1000)
    assert r.geometry.pixel_spacing == (0.3, 0.3) and (r.geometry.sdd, r.geometry.sid) == (1500, 1000)


def test_ermf_of_zero_is_refused_as_a_factor(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", ramp(), ImagerPixelSpacing=[0.2, 0.2],
                       EstimatedRadiographicMagnificationFactor=0)
    with pytest.raises(ValueError, match="Magnification Factor 0.0 is invalid; expected a positive finite factor"):
        read_radiograph(path, view="AP")


def test_grey_secondary_capture_in_rgb_is_read_as_grey_and_annotations_do_not_refuse_it(tmp_path: Path) -> None:
    from PIL import Image

    grey = ramp(rows=40, cols=40, high=255, dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    r = read_radiograph(write_dicom(tmp_path / "sc.dcm", rgb, modality="OT"), normalize=False)
    assert torch.equal(r.image[0], torch.from_numpy(grey.astype(np.float32)))
    assert any("grey pixels in colour channels" in s for s in r.steps)
    rgb[0, :5] = (255, 0, 0)  # a red annotation mark: 5 of 1600 pixels
    Image.fromarray(rgb).save(tmp_path / "annotated.png")
    r = read_radiograph(tmp_path / "annotated.png", normalize=False)
    assert any("5 coloured pixels" in s for s in r.steps)
    rgb[:10, :, 0] = 255  # a quarter of the image coloured: a colour picture
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png: is a colour image"):
        read_radiograph(tmp_path / "colour.png")


def test_a_picture_under_a_dicom_name_is_read_as_the_picture_and_a_folder_is_named(tmp_path: Path) -> None:
    from PIL import Image

    grey = ramp(high=255, dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "x.png")
    (tmp_path / "x.dcm").write_bytes((tmp_path / "x.png").read_bytes())
    r = read_radiograph(tmp_path / "x.dcm", normalize=False)
    assert torch.equal(r.image[0], torch.from_numpy(grey / 255.0).float())
    assert any("is a PNG image despite its name" in s for s in r.steps)
    with pytest.raises(ValueError, match="is a folder; expected an X-ray file"):
        read_radiograph(tmp_path)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_a_blank_or_constant_xray_is_refused(tmp_path: Path, value: float) -> None:
    torch.save(torch.full((1, 8, 8), value), tmp_path / "x.pt")
    with pytest.raises(ValueError, match=f"x.pt: X-ray has no contrast: every pixel of its exposed field equals {value:g}"):
        read_radiograph(tmp_path / "x.pt")
