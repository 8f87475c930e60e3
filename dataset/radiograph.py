"""The one X-ray reader: DICOM / PNG / JPEG / TIFF / 2-D NIfTI / ``.pt`` radiographs -> the models' convention.

:func:`read_radiograph` returns a :class:`Radiograph`: the image ``(1, H, W)`` float32 in [0, 1]
(brighter = more attenuation) in the display convention of the models (CLAUDE.md)::

    AP : rows superior -> inferior, columns patient right -> left   (Patient Orientation L\\F)
    LAT: rows superior -> inferior, columns anterior -> posterior    (Patient Orientation P\\F)

with the view's :class:`~dataset.drr.ViewGeometry` when the file tells it (pixel spacing and source
distances), and the list of steps applied. :func:`to_detector` then maps it onto a model's detector
grid in millimetres: the model's rows x cols, its field of view at the isocentre, cropped or padded
(with 0 = air) around the detector centre, never stretched.

DICOM (pydicom; compressed transfer syntaxes through its pixel-data plugins, e.g. pylibjpeg):

- Modality LUT (Rescale Slope / Intercept or a LUT sequence), Bits Stored honoured by pydicom,
  Pixel Padding Value (and Range Limit) masked; MONOCHROME1 (or an INVERSE Presentation LUT Shape)
  inverted so that brighter means more attenuation. The VOI LUT / window is not applied: it is a
  display choice, and the intensity is matched to the training X-rays later (harmonisation).
- Values are normalised to [0, 1] by the 0.5 / 99.5 % percentiles of the exposed field (padding,
  DICOM rectangular shutters and bright uniform collimator bands excluded and set to 0 = air).
- Orientation from Patient Orientation (0020,0020) when present; View Position AP / PA / LL / RL /
  LATERAL (PA and right lateral set ``reversed=True``: the source is behind / on the patient's left)
  and Image Laterality. Without tags the image is assumed to be stored in the display convention,
  and the steps say so. User ops (``transpose``, ``flip-rows``, ``flip-cols``) apply afterwards.
- Geometry: Imager Pixel Spacing (0018,1164) (else Pixel Spacing, scaled by the Estimated
  Radiographic Magnification Factor when calibrated at the patient, else Nominal Scanned Pixel
  Spacing), Distance Source to Detector (0018,1110), and the source-to-isocentre distance from the
  Estimated Radiographic Magnification Factor (0018,1114) or Distance Source to Patient (0018,1111).
  Missing distances come from ``assume`` (the model's training geometry) and the steps say so. The
  central ray is taken to hit the image centre.
- Refused, each in one line saying what the file is: colour, multi-frame, non-image objects,
  missing pixel data, cross-sectional slices (CT / MR / PET ...; a CT localizer is accepted).

PNG / JPEG / TIFF are turned upright by their EXIF orientation, as viewers show them, and scaled to [0, 1]
by their bit depth (16- and 32-bit files whose largest value fits a smaller even depth, 8, 10, 12 ..., using at
least half of its range, by that depth: detector data exported unscaled); grey-valued RGB (also in DICOM, up to
0.5 % coloured annotation pixels) is accepted, true colour refused;
multi-page files are refused; 2-D NIfTI and ``.pt`` keep their values when they lie in [0, 1], else they are normalised
like DICOM. None of these formats carry a pixel spacing: give ``pixel_spacing`` (and ``sdd`` /
``sid``), or :func:`to_detector` fits the image to the detector keeping its aspect.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataset.drr import VIEWS, ViewGeometry
from dataset.io import _is_dicom_file

#: Orientation ops (applied in order): swap rows and columns, reverse the rows, reverse the columns.
XRAY_OPS = ("transpose", "flip-rows", "flip-cols")
#: Patient Orientation (direction of increasing column index, of increasing row index) of each view's display.
DISPLAY_ORIENTATION = {"AP": ("L", "F"), "LAT": ("P", "F")}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
#: Half the depth of a typical adult chest along each view's beam (mm): DICOM's Distance Source to Patient ends at
#: the table or detector side of the patient, the isocentre lies this much closer to the source.
TYPICAL_HALF_DEPTH_MM = {"AP": 110.0, "LAT": 160.0}
_EXIF_ORIENTATION = 0x0112  # EXIF tag: how the stored pixels must be turned for display
_EXIF_TURNS = {2: "mirrored", 3: "rotated 180 degrees", 4: "flipped upside down", 5: "transposed",
               6: "rotated 90 degrees clockwise", 7: "transverse", 8: "rotated 90 degrees anticlockwise"}
#: Percentiles of the exposed field mapped to 0 and 1.
NORMALISE_PERCENTILES = (0.5, 99.5)
#: Cross-sectional modalities: one slice of these is not a projection radiograph.
_SLICE_MODALITIES = {"CT": "a CT slice", "MR": "an MR slice", "PT": "a PET slice", "NM": "a nuclear medicine image",
                     "US": "an ultrasound image", "OCT": "an OCT image"}
_OPPOSITE = {"A": "P", "P": "A", "L": "R", "R": "L", "H": "F", "F": "H"}
_AXIS = {"A": "AP", "P": "AP", "L": "LR", "R": "LR", "H": "SI", "F": "SI"}


@dataclass(frozen=True)
class Radiograph:
    """One radiograph as the models see it.

    Attributes:
        image: float32 ``(1, H, W)`` in [0, 1], brighter = more attenuation, display convention of its view.
        geometry: the view's geometry (pixel spacing, distances, source side) when known, else None.
        steps: what was done to the file's pixels, in order (for logs, previews and sidecars).
        source: what the file is (format, modality, photometric interpretation, size).
        valid: bool ``(1, H, W)``: pixels that show the patient (False for padding, shutters, and
            detector area outside the input after :func:`to_detector`).
        view: ``"AP"``, ``"LAT"`` or None when read without a view.
        path: the file read.
        reversed: the source lies on the other side (PA, right lateral), from the DICOM tags.
    """

    image: torch.Tensor
    geometry: ViewGeometry | None
    steps: tuple[str, ...]
    source: str
    valid: torch.Tensor
    view: str | None = None
    path: str = ""
    reversed: bool = False

    def to_dict(self) -> dict:
        """JSON-able description (no pixels): path, source, view, source side, geometry, steps."""
        return {"path": self.path, "source": self.source, "view": self.view, "reversed": self.reversed,
                "geometry": self.geometry.to_dict() if self.geometry is not None else None,
                "steps": list(self.steps)}


def apply_ops(image: torch.Tensor, ops: Sequence[str]) -> torch.Tensor:
    """Apply orientation ops (:data:`XRAY_OPS`) in order to the last two axes of ``image``."""
    for op in ops:
        if op == "transpose":
            image = image.transpose(-1, -2)
        elif op == "flip-rows":
            image = image.flip(-2)
        elif op == "flip-cols":
            image = image.flip(-1)
        else:
            raise ValueError(f"X-ray op {op!r} is invalid; expected one of {XRAY_OPS}")
    return image


def _ops_spacing(spacing: tuple[float, float], ops: Sequence[str]) -> tuple[float, float]:
    """Pixel spacing ``(row, col)`` after ``ops`` (a transpose swaps it)."""
    for op in ops:
        if op == "transpose":
            spacing = (spacing[1], spacing[0])
    return spacing


def _positive_pair(value, name: str, source: str) -> tuple[float, float]:
    """Two positive finite numbers (one number means square), else ``ValueError`` naming ``name``."""
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple, Sequence)) and not isinstance(value, str)
                                     else [value])]
    except (TypeError, ValueError):
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{source}: {name} {_show(value)} is invalid; expected a positive finite pixel spacing in mm "
                         "(row, column)")
    return values[0], values[1]


def _show(value) -> str:
    """A tag or option value for messages: numbers as numbers (DICOM decimal strings included)."""
    def one(v) -> str:
        try:
            return repr(float(v))
        except (TypeError, ValueError):
            return repr(v)

    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return "[" + ", ".join(one(v) for v in value) + "]"
    return one(value)


def _positive(value, name: str, source: str, expected: str = "distance in mm") -> float:
    """A positive finite number, else ``ValueError`` naming ``name`` and the ``expected`` kind of value."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{source}: {name} {_show(value)} is invalid; expected a positive finite {expected}")
    return v


# ----------------------------------------------------------------------------------------------- DICOM
def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: ``DICM`` after the 128-byte preamble, a DICOM suffix, or (any other
    name that is not an image, NIfTI or tensor file, e.g. ``IM0001``) a data set without preamble that pydicom
    parses into image-describing elements."""
    path = Path(path)
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(128)
            if f.read(4) == b"DICM":
                return True
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if name.endswith((*IMAGE_SUFFIXES, *NIFTI_SUFFIXES, ".pt")):
        return False
    return _parses_as_dicom(path)


def _parses_as_dicom(path: Path) -> bool:
    import pydicom

    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(str(path), force=True, stop_before_pixels=True)
        return any(k in ds for k in ("SOPClassUID", "Modality", "Rows"))
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse is not DICOM
        return False


@dataclass
class _Pixels:
    """Pixels and facts gathered from one file before orientation and geometry."""

    values: np.ndarray  # float64 (H, W), brighter = more attenuation (not yet in [0, 1])
    valid: np.ndarray  # bool (H, W)
    source: str
    steps: list[str] = field(default_factory=list)
    unit_range: bool = False  # values already a [0, 1] fraction (by bit depth or as stored)
    photographic: bool = True  # a radiograph export (DICOM, PNG, ...): look for collimator bands
    orientation: tuple[str, str] | None = None  # Patient Orientation (row direction, column direction)
    view_position: str = ""
    laterality: str = ""
    spacing: tuple[float, float] | None = None  # detector pitch (row, col), mm
    sdd: float | None = None
    sid: float | None = None
    table_distance: float | None = None  # Distance Source to Patient: to the table / detector side of the patient
    notes: list[str] = field(default_factory=list)  # geometry provenance


def _tag(ds, keyword: str):
    value = ds.get(keyword, None)
    if value is None or (isinstance(value, (str, bytes)) and not str(value).strip()):
        return None
    return value


@contextlib.contextmanager
def _quiet_pydicom():
    """Silence pydicom's warnings and log lines about odd tag values (bad values are refused by our own checks,
    in one line)."""
    import logging
    import warnings

    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _read_dicom(path: Path) -> _Pixels:
    """Read a DICOM radiograph (quietly: see :func:`_quiet_pydicom`)."""
    with _quiet_pydicom():
        return _read_dicom_quietly(path)


def _read_dicom_quietly(path: Path) -> _Pixels:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(str(path), force=not _is_dicom_file(path))
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: cannot be read as a DICOM file ({type(e).__name__}: {_first_line(e)})") from None
    if len(ds) == 0:
        raise ValueError(f"{path}: cannot be read as a DICOM file (no data elements after the header)")
    modality = str(ds.get("Modality", "") or "").upper()
    sop = ds.get("SOPClassUID", None)
    sop_name = getattr(sop, "name", str(sop or "unknown SOP class"))
    image_type = [str(v).upper() for v in (ds.get("ImageType", None) or [])]
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if ds.get("Rows", None) is None:
            raise ValueError(f"{path}: is a non-image DICOM object ({sop_name}, Modality {modality or 'unset'}); "
                             "expected a radiograph (CR, DX, ...)")
        raise ValueError(f"{path}: DICOM {modality or 'image'} has no pixel data (header only); expected a radiograph "
                         "with its pixels")
    if modality in _SLICE_MODALITIES and "LOCALIZER" not in image_type:
        raise ValueError(f"{path}: is {_SLICE_MODALITIES[modality]} (Modality {modality}, {sop_name}); expected a "
                         "projection radiograph (CR, DX, ...)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"{path}: is a multi-frame DICOM ({frames} frames, Modality {modality or 'unset'}); expected "
                         "a single radiograph")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    colour = samples == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422")  # e.g. a secondary capture
    if not colour and (samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2")):
        raise ValueError(f"{path}: is a colour DICOM image (Photometric Interpretation {photometric or 'unset'}, "
                         f"{samples} samples per pixel); expected a greyscale radiograph (MONOCHROME1/2)")
    guessed = _guess_transfer_syntax(ds)
    try:
        stored = ds.pixel_array
    except Exception as e:  # pydicom raises assorted types (missing codec, truncated data)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        if ts is not None and getattr(ts, "is_compressed", False):
            hint = "install the codecs in requirements.txt (pylibjpeg with its openjpeg and libjpeg plugins)"
        else:
            hint = "the file is truncated or corrupt; expected complete uncompressed pixel data"
        raise ValueError(f"{path}: pixel data ({ts_name}) cannot be decoded ({type(e).__name__}: {_first_line(e)}); "
                         f"{hint}") from None
    grey_step = None
    if colour and stored.ndim == 3 and stored.shape[-1] == 3:
        from pydicom.pixels import convert_color_space

        rgb = stored if photometric == "RGB" else convert_color_space(stored, photometric, "RGB")
        depth = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        try:
            stored, grey_step = _grey_from_rgb(np.asarray(rgb, dtype=np.float64), depth)
        except ValueError:
            raise ValueError(f"{path}: is a colour DICOM image (Photometric Interpretation {photometric}, 3 samples "
                             "per pixel, coloured pixels); expected a greyscale radiograph (MONOCHROME1/2)") from None
    if stored.ndim != 2:
        raise ValueError(f"{path}: pixel data has shape {stored.shape}; expected one greyscale frame (rows, cols)")
    bits = int(ds.get("BitsStored", 0) or 0)
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    intent = str(ds.get("PresentationIntentType", "") or "").upper()
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    source = (f"DICOM {modality or '?'} ({sop_name}), {photometric}, {bits} of {allocated} bits stored, "
              f"{stored.shape[0]} x {stored.shape[1]} pixels" + (f", {intent.lower()}" if intent else "")
              + (f", {ts.name}" if ts is not None and getattr(ts, "is_compressed", False) else ""))
    steps = [f"read {source}"] + ([guessed] if guessed else []) + ([f"colour image: {grey_step}"] if grey_step else [])
    valid = np.ones(stored.shape, dtype=bool)
    pad = _tag(ds, "PixelPaddingValue")
    if pad is not None:
        limit = _tag(ds, "PixelPaddingRangeLimit")
        lo, hi = (min(pad, limit), max(pad, limit)) if limit is not None else (pad, pad)
        padded = (stored >= lo) & (stored <= hi)
        if padded.any():
            valid &= ~padded
            steps.append(f"masked {int(padded.sum())} padding pixels (Pixel Padding Value {pad}"
                         + (f"..{limit}" if limit is not None else "") + ")")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if ds.get("ModalityLUTSequence"):
        steps.append("applied the Modality LUT sequence")
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        steps.append(f"applied Rescale Slope {float(ds.RescaleSlope):g} / Intercept {float(ds.RescaleIntercept):g}")
    shape_lut = str(ds.get("PresentationLUTShape", "") or "").upper()
    # DX and CR images must carry Presentation LUT Shape INVERSE with MONOCHROME1 (PS3.3 C.8.11.1): both name
    # the same single inversion. INVERSE with MONOCHROME2 asks for an inverted display on its own.
    invert = photometric == "MONOCHROME1" or shape_lut == "INVERSE"  # grey in colour channels: as MONOCHROME2
    if invert:
        values = -values
        what = (photometric + (" (Presentation LUT Shape INVERSE, the same inversion)" if shape_lut == "INVERSE"
                               else "") if photometric == "MONOCHROME1" else "(Presentation LUT Shape INVERSE)")
        steps.append(f"inverted {what} so that brighter means more attenuation")
    sign = _tag(ds, "PixelIntensityRelationshipSign")
    if sign is not None and int(sign) in (1, -1) and (int(sign) == 1) != invert:
        steps.append(f"note: Pixel Intensity Relationship Sign {int(sign):+d} disagrees with {photometric}; "
                     "the photometric interpretation was followed")
    relationship = str(ds.get("PixelIntensityRelationship", "") or "").upper()
    if relationship:
        steps.append(f"Pixel Intensity Relationship {relationship} (the intensity curve is matched later)")
    valid &= _shutter_mask(ds, stored.shape, steps)
    px = _Pixels(values, valid, source, steps)
    px.orientation = _patient_orientation(ds, path)
    px.view_position = str(ds.get("ViewPosition", "") or "").strip().upper()
    px.laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
    _dicom_geometry(ds, px, path)
    return px


def _guess_transfer_syntax(ds) -> str | None:
    """Give a dataset read without file meta (no preamble, ``force``) the transfer syntax of its own encoding,
    so that pydicom can decode its pixels; returns the step that says so, or None when it has one."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID", None) is not None:
        return None
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = uid
    return f"no transfer syntax in the file (no file meta): decoded as {uid.name}, the dataset's own encoding"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _shutter_mask(ds, shape: tuple[int, int], steps: list[str]) -> np.ndarray:
    """True inside the DICOM rectangular shutter (everything when there is none)."""
    keep = np.ones(shape, dtype=bool)
    shutter = ds.get("ShutterShape", None)
    shapes = [str(v).upper() for v in ([shutter] if isinstance(shutter, str) else list(shutter))] if shutter else []
    if "RECTANGULAR" in shapes:
        edges = [ds.get(k, None) for k in ("ShutterLeftVerticalEdge", "ShutterRightVerticalEdge",
                                          "ShutterUpperHorizontalEdge", "ShutterLowerHorizontalEdge")]
        if all(e is not None for e in edges):
            left, right, upper, lower = (int(e) for e in edges)  # 1-based, inclusive
            keep[:] = False
            keep[max(upper - 1, 0):lower, max(left - 1, 0):right] = True
            steps.append(f"masked outside the rectangular shutter (rows {upper}-{lower}, columns {left}-{right})")
    other = [s for s in shapes if s != "RECTANGULAR"]
    if other:
        steps.append(f"note: {'/'.join(other).lower()} shutter not applied (only rectangular shutters are)")
    return keep


def _patient_orientation(ds, path: Path) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation", None)
    if not value:
        return None
    parts = [str(v).strip().upper() for v in (value if not isinstance(value, str) else value.split("\\"))]
    if len(parts) != 2 or not all(parts) or any(c not in _OPPOSITE for p in parts for c in p):
        raise ValueError(f"{path}: Patient Orientation {value!r} is invalid; expected two direction codes such as "
                         "L\\F (letters A P L R H F)")
    return parts[0], parts[1]


def _dicom_geometry(ds, px: _Pixels, path: Path) -> None:
    """Detector pitch and distances from the DICOM tags (provenance in ``px.notes``)."""
    ermf = _tag(ds, "EstimatedRadiographicMagnificationFactor")
    ermf = _positive(ermf, "(0018,1114) Estimated Radiographic Magnification Factor", str(path),
                     "factor") if ermf is not None else None
    ips, ps, nsps = (_tag(ds, k) for k in ("ImagerPixelSpacing", "PixelSpacing", "NominalScannedPixelSpacing"))
    if ips is not None:
        px.spacing = _positive_pair(ips, "(0018,1164) Imager Pixel Spacing", str(path))
        px.notes.append(f"pixel spacing {px.spacing[0]:.4g} x {px.spacing[1]:.4g} mm (Imager Pixel Spacing)")
    elif ps is not None:
        px.spacing = _positive_pair(ps, "(0028,0030) Pixel Spacing", str(path))
        calibrated = _tag(ds, "PixelSpacingCalibrationType") is not None
        if calibrated and ermf is not None and ermf > 1:
            px.spacing = (px.spacing[0] * ermf, px.spacing[1] * ermf)
            px.notes.append(f"pixel spacing {px.spacing[0]:.4g} x {px.spacing[1]:.4g} mm at the detector (Pixel "
                            f"Spacing calibrated at the patient x magnification {ermf:g})")
        else:
            px.notes.append(f"pixel spacing {px.spacing[0]:.4g} x {px.spacing[1]:.4g} mm (Pixel Spacing, taken at "
                            "the detector)")
    elif nsps is not None:
        px.spacing = _positive_pair(nsps, "(0018,2010) Nominal Scanned Pixel Spacing", str(path))
        px.notes.append(f"pixel spacing {px.spacing[0]:.4g} x {px.spacing[1]:.4g} mm (Nominal Scanned Pixel Spacing)")
    sdd = _tag(ds, "DistanceSourceToDetector")
    if sdd is not None:
        px.sdd = _positive(sdd, "(0018,1110) Distance Source to Detector", str(path))
    dsp = _tag(ds, "DistanceSourceToPatient")
    dsp = _positive(dsp, "(0018,1111) Distance Source to Patient", str(path)) if dsp is not None else None
    if ermf is not None and ermf > 1 and px.sdd is None and dsp is not None:
        px.sdd = dsp * ermf  # the factor is SDD over the source-object distance
        px.notes.append(f"SDD {px.sdd:.1f} mm (Distance Source to Patient {dsp:g} mm x Estimated Radiographic "
                        f"Magnification Factor {ermf:g})")
    if ermf is not None and ermf > 1 and px.sdd is not None:
        px.sid = px.sdd / ermf
        px.notes.append(f"SDD {px.sdd:g} mm, source-isocentre {px.sid:.1f} mm (SDD / Estimated Radiographic "
                        f"Magnification Factor {ermf:g})")
    elif ermf is not None and ermf > 1:
        px.notes.append(f"magnification {ermf:g} (Estimated Radiographic Magnification Factor)")
        px.sid = -ermf  # resolved against the assumed SDD in _geometry
    else:
        px.table_distance = dsp  # resolved in _geometry, where the view is known
        if px.sdd is not None:
            px.notes.append(f"SDD {px.sdd:g} mm (Distance Source to Detector)")
        if ermf is not None:
            px.notes.append(f"note: Estimated Radiographic Magnification Factor {ermf:g} ignored (expected > 1)")


# ------------------------------------------------------------------------------------------ other formats
_PICTURE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _picture_format(path: Path) -> str | None:
    """``"PNG"`` / ``"JPEG"`` / ``"TIFF"`` when the file starts with that format's signature, else None."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            head = f.read(8)
        for magic, name in _PICTURE_MAGIC:
            if head.startswith(magic):
                return name
    return None


def _read_plain(path: Path, picture: str | None = None) -> _Pixels:
    name = path.name.lower()
    if name.endswith(".pt"):
        from dataset.checkpoint import load_torch_file

        x = load_torch_file(path, what="X-ray tensor")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{path}: holds a {type(x).__name__}; expected an (H, W) or (1, H, W) tensor")
        x = x.detach().to(torch.float32)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 2:
            raise ValueError(f"{path}: X-ray has shape {tuple(x.shape)}; expected (H, W) or (1, H, W)")
        values = x.numpy().astype(np.float64)
        return _Pixels(values, np.ones(values.shape, bool), f"tensor file, {values.shape[0]} x {values.shape[1]} pixels",
                       [f"read tensor ({values.shape[0]} x {values.shape[1]})"], photographic=False)
    if name.endswith(IMAGE_SUFFIXES) or picture is not None:
        from PIL import Image, ImageOps

        with Image.open(path) as opened:
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                raise ValueError(f"is a multi-page image ({frames} pages); expected a single radiograph")
            extra_steps = []
            turn = opened.getexif().get(_EXIF_ORIENTATION, 1)
            img = ImageOps.exif_transpose(opened) if turn in _EXIF_TURNS else opened
            if turn in _EXIF_TURNS:
                extra_steps.append(f"applied the EXIF orientation {turn} ({_EXIF_TURNS[turn]}), as image viewers do")
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(img, dtype=np.float64)
                full = 16 if mode != "I" or arr.max(initial=0) <= 65535 else 32
                bits = _effective_bits(arr, full)
                scale = float(2**bits - 1)
                if bits < full:
                    extra_steps.append(f"values fit in {bits} bits (largest {arr.max(initial=0):g}): {bits}-bit data "
                                      f"in a {full}-bit file")
            elif mode == "F":
                arr, scale = np.asarray(img, dtype=np.float64), None
            elif mode in ("L", "1"):
                arr, scale = np.asarray(img.convert("L"), dtype=np.float64), 255.0
            elif mode == "LA":
                arr, scale = np.asarray(img.convert("L"), dtype=np.float64), 255.0
            else:
                try:
                    arr, grey_step = _grey_from_rgb(np.asarray(img.convert("RGB"), dtype=np.float64), 255.0)
                except ValueError:
                    raise ValueError(f"{path}: is a colour image (mode {mode}); expected a greyscale radiograph") from None
                scale = 255.0
                extra_steps.append(f"mode {mode}: {grey_step}")
        kind = picture or path.suffix.lstrip(".").upper()
        source = f"{kind} image, mode {mode}, {arr.shape[0]} x {arr.shape[1]} pixels"
        px = _Pixels(arr if scale is None else arr / scale, np.ones(arr.shape, bool), source,
                     [f"read {source}", *extra_steps])
        px.unit_range = scale is not None
        if scale is not None:
            px.steps.append(f"scaled by the bit depth (/ {scale:g})")
        return px
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        arr = arr.reshape([n for n in arr.shape if n != 1] or [1]) if arr.ndim > 2 else arr
        if arr.ndim != 2:
            raise ValueError(f"{path}: NIfTI X-ray has shape {arr.shape}; expected a 2-D image")
        arr = np.ascontiguousarray(arr.T)  # NIfTI axis 0 is x (columns): (x, y) -> (rows, cols)
        return _Pixels(arr, np.ones(arr.shape, bool), f"2-D NIfTI, {arr.shape[0]} x {arr.shape[1]} pixels",
                       [f"read 2-D NIfTI ({arr.shape[0]} x {arr.shape[1]}, array axis 0 as columns)"], photographic=False)
    raise ValueError(f"{path}: unsupported X-ray file type; expected DICOM, .png/.jpg/.tif, 2-D .nii/.nii.gz or .pt")


def _grey_from_rgb(rgb: np.ndarray, depth: float) -> tuple[np.ndarray, str]:
    """An ``(H, W, 3)`` image of grey pixels (channels within 2 / 255 of the range ``depth``) as ``(H, W)`` and the
    step saying so. Up to 0.5 % coloured pixels (burnt-in annotations) are taken at their mean level; more is
    a colour picture: ``ValueError``."""
    spread = np.abs(rgb - rgb.mean(-1, keepdims=True)).max(-1)
    coloured = spread > 2.0 * depth / 255.0
    if coloured.mean() > 0.005:
        raise ValueError(f"{int(coloured.sum())} coloured pixels")
    step = "grey pixels in colour channels, read as grey"
    if coloured.any():
        step += f" ({int(coloured.sum())} coloured pixels, e.g. annotations, taken at their mean level)"
    return rgb.mean(-1), step


def _effective_bits(arr: np.ndarray, full: int) -> int:
    """The bit depth the values of a ``full``-bit greyscale image use: an even depth from 8 below ``full``, or
    ``full``.

    Exports of 10- to 14-bit detector data into 16-bit PNG / TIFF keep the stored values, so scaling them by
    65535 would give an almost black radiograph. A depth is taken only when the largest value uses at least
    half of its range (a 12-bit image reaches 2048 or more), so a dark 16-bit image keeps its 16 bits.
    """
    top = float(arr.max(initial=0))
    for bits in range(8, full, 2):
        if 2 ** (bits - 1) <= top <= 2**bits - 1:
            return bits
    return full


# ------------------------------------------------------------------------------------------- intensity
def _collimator_bands(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """True outside bright uniform bands along the image edges (collimator blades, burnt-in shutters)."""
    keep = valid.copy()
    inside = values[valid]
    if inside.size < 16:
        return keep
    lo, hi = np.percentile(inside, (0.5, 99.5))
    span = hi - lo
    if span <= 0:
        return keep
    rows, cols = values.shape

    def uniform_bright(line: np.ndarray, ok: np.ndarray) -> bool:
        line = line[ok]
        if line.size < 2:
            return True
        p5, p95 = np.percentile(line, (5, 95))
        return (p95 - p5) < 0.02 * span and np.median(line) >= hi - 0.05 * span  # flat and at the top of the range

    for axis, n in ((0, rows), (1, cols)):
        for ends in (range(n), range(n - 1, -1, -1)):
            count = 0
            for i in ends:
                line = values[i] if axis == 0 else values[:, i]
                ok = keep[i] if axis == 0 else keep[:, i]
                if count >= 0.45 * n or not uniform_bright(line, ok):
                    break
                count += 1
            if count >= max(2, 0.01 * n):  # a band, not one flat line of anatomy
                idx = list(ends)[:count]
                if axis == 0:
                    keep[idx, :] = False
                else:
                    keep[:, idx] = False
    if keep.sum() < 0.25 * valid.sum():  # flat everywhere: no collimator to tell apart
        return valid
    return keep


def _normalise(px: _Pixels, normalize: bool) -> np.ndarray:
    """The pixel values mapped to [0, 1] (``normalize``) or as stored; pixels outside ``px.valid`` become 0 (air)."""
    values = px.values
    finite = np.isfinite(values[px.valid])
    if not finite.all():
        raise ValueError(f"X-ray has {int((~finite).sum())} NaN or Inf pixels")
    if px.photographic:
        keep = _collimator_bands(values, px.valid)
        if (keep != px.valid).any():
            px.steps.append(f"masked {int((px.valid & ~keep).sum())} pixels of bright uniform edge bands (collimator)")
            px.valid = keep
    valid = px.valid
    inside = values[valid]
    if inside.size == 0:
        raise ValueError("X-ray has no pixel left after masking padding and shutters")
    if normalize:
        lo_v, hi_v = float(inside.min()), float(inside.max())
        if not hi_v > lo_v:  # a blank or constant image carries no anatomy, whatever its level
            raise ValueError(f"X-ray has no contrast: every pixel of its exposed field equals {lo_v:g}; expected a "
                             "radiograph")
        if px.unit_range or (not px.source.startswith("DICOM") and lo_v >= -1e-3 and hi_v <= 1 + 1e-3):
            values = np.clip(values, 0.0, 1.0)
        else:
            lo, hi = np.percentile(inside, NORMALISE_PERCENTILES)
            if not hi > lo:  # a mostly flat field with a few structures: use the full range
                lo, hi = lo_v, hi_v
            if not hi > lo:
                raise ValueError(f"X-ray has no contrast: every pixel of its exposed field equals {lo_v:g}")
            values = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
            px.steps.append(f"normalised the {NORMALISE_PERCENTILES[0]:g}-{NORMALISE_PERCENTILES[1]:g} % range of "
                            f"the exposed field ({lo:.4g}..{hi:.4g}) to [0, 1]")
    return values if valid.all() else np.where(valid, values, 0.0)


# ----------------------------------------------------------------------------------------- orientation
def orientation_ops(orientation: tuple[str, str], view: str) -> list[str]:
    """Ops that bring an image with Patient Orientation ``orientation`` into ``view``'s display convention.

    Args:
        orientation: (direction of increasing column index, of increasing row index), e.g. ``("R", "F")``;
            only the first letter of each (the main direction) counts.
        view: ``"AP"`` or ``"LAT"``.

    Raises:
        ValueError: the directions do not belong to ``view`` (e.g. anterior/posterior in an AP image).
    """
    row_dir, col_dir = orientation[0][0], orientation[1][0]
    target_row, target_col = DISPLAY_ORIENTATION[view]
    if {_AXIS[row_dir], _AXIS[col_dir]} != {_AXIS[target_row], _AXIS[target_col]}:
        raise ValueError(f"Patient Orientation {orientation[0]}\\{orientation[1]} does not describe an {view} image "
                         f"(expected the axes of {target_row}\\{target_col})")
    ops = []
    if _AXIS[row_dir] != _AXIS[target_row]:
        ops.append("transpose")
        row_dir, col_dir = col_dir, row_dir
    if row_dir != target_row:
        ops.append("flip-cols")
    if col_dir != target_col:
        ops.append("flip-rows")
    return ops


def _orient(px: _Pixels, view: str | None, path: Path) -> tuple[list[str], bool]:
    """Ops from the tags (and the steps explaining them) and whether the source is reversed (PA / right lateral)."""
    ops: list[str] = []
    reversed_ = False
    vp = px.view_position
    if view is not None:
        lateral = vp in ("LL", "RL", "LATERAL", "LAT", "LLO", "RLO")
        frontal = vp in ("AP", "PA")
        if (view == "AP" and lateral) or (view == "LAT" and frontal):
            raise ValueError(f"{path}: View Position {vp} is not an {view} view; swap the AP and lateral files")
        if vp in ("PA",):
            reversed_ = True
            px.steps.append("View Position PA: source behind the patient (reversed geometry)")
        elif vp == "AP":
            px.steps.append("View Position AP")
        elif vp in ("RL", "RLO"):
            reversed_ = True
            px.steps.append(f"View Position {vp}: right side to the detector, source on the patient's left "
                            "(reversed geometry)")
        elif vp in ("LL", "LLO"):
            px.steps.append(f"View Position {vp}: left side to the detector")
        elif vp in ("LATERAL", "LAT") and px.laterality in ("L", "R"):
            reversed_ = px.laterality == "R"
            px.steps.append(f"View Position {vp} with Image Laterality {px.laterality}: "
                            f"{'right' if reversed_ else 'left'} side taken to the detector")
        elif px.source.startswith("DICOM"):
            px.steps.append(f"no usable View Position ({vp or 'none'}): assumed "
                            f"{'AP' if view == 'AP' else 'left lateral'}")
        if px.orientation is not None:
            ops = orientation_ops(px.orientation, view)
            change = ", ".join(ops) if ops else "none needed"
            target = "\\".join(DISPLAY_ORIENTATION[view])
            px.steps.append(f"Patient Orientation {px.orientation[0]}\\{px.orientation[1]} -> display {target}: {change}")
        else:
            px.steps.append("no Patient Orientation tag: assumed stored in the display convention "
                            f"({_display_words(view)})")
    elif px.orientation is not None:
        px.steps.append(f"Patient Orientation {px.orientation[0]}\\{px.orientation[1]} not applied (no view given)")
    return ops, reversed_


def _display_words(view: str) -> str:
    return ("rows superior->inferior, columns patient right->left" if view == "AP"
            else "rows superior->inferior, columns anterior->posterior")


# --------------------------------------------------------------------------------------------- reader
def read_radiograph(path: str | os.PathLike, view: str | None = None, ops: Sequence[str] = (),
                    pixel_spacing: float | Sequence[float] | None = None, sdd: float | None = None,
                    sid: float | None = None, assume: ViewGeometry | None = None, normalize: bool = True,
                    fill_pixel_spacing: float | Sequence[float] | None = None, fill_sdd: float | None = None,
                    fill_sid: float | None = None) -> Radiograph:
    """Read one radiograph (see the module docstring for formats, tags and conventions).

    Args:
        path: DICOM file (any name), ``.png`` / ``.jpg`` / ``.tif`` (8 or 16 bit), 2-D ``.nii[.gz]`` or ``.pt``.
        view: ``"AP"`` or ``"LAT"``: orient by the DICOM tags into that view's display convention and
            check View Position; None reads the pixels as stored (tags only reported).
        ops: orientation ops (:data:`XRAY_OPS`) applied after the tag-based orientation (user overrides).
        pixel_spacing: detector pixel pitch ``(row, col)`` in mm as stored (before ``ops``; one number:
            square), overriding the file's.
        sdd, sid: source-to-detector and source-to-isocentre distances (mm), overriding the file's.
        fill_pixel_spacing, fill_sdd, fill_sid: the same, used only where the file carries none (a value the
            file has is kept, and the steps say so).
        assume: geometry whose distances fill in those still missing (default ``ViewGeometry()``).
        normalize: map the values to [0, 1] (see the module docstring); False keeps them as stored
            (DICOM: after the Modality LUT and inversion), for importers with their own normalisation.

    Returns:
        The :class:`Radiograph` (``geometry`` is None when no pixel spacing is known).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable / unsupported / refused file, bad tags or arguments, NaN pixels; one line
            naming the file.
    """
    path = Path(path)
    if view is not None and view not in VIEWS:
        raise ValueError(f"view={view!r} is invalid; expected one of {VIEWS}")
    bad_ops = [op for op in ops if op not in XRAY_OPS]
    if bad_ops:
        raise ValueError(f"X-ray ops {bad_ops} are invalid; expected some of {XRAY_OPS}")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected an X-ray file (DICOM, .png/.jpg/.tif, 2-D .nii.gz or .pt)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected an X-ray (DICOM, .png/.jpg/.tif, 2-D .nii.gz or .pt)")
    try:
        picture = _picture_format(path)
        if picture is not None and not path.name.lower().endswith(IMAGE_SUFFIXES):
            px = _read_plain(path, picture)  # a PNG / JPEG / TIFF under another name (e.g. .dcm)
            px.steps.append(f"note: the file is a {picture} image despite its name")
        elif is_dicom(path):
            px = _read_dicom(path)
        else:
            px = _read_plain(path)
        image = _normalise(px, normalize)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except Exception as e:  # PIL, nibabel and pickle errors: one line naming the file
        raise ValueError(f"{path}: cannot be read as an X-ray ({type(e).__name__}: {_first_line(e)})") from None
    if min(image.shape) < 2:
        raise ValueError(f"{path}: X-ray has shape {image.shape}; expected at least 2 x 2 pixels")
    try:
        tag_ops, reversed_ = _orient(px, view, path)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    all_ops = tag_ops + list(ops)
    if ops:
        px.steps.append(f"user ops: {', '.join(ops)}")
    tensor = apply_ops(torch.from_numpy(image.astype(np.float32))[None], all_ops).contiguous()
    valid = apply_ops(torch.from_numpy(px.valid)[None], all_ops).contiguous()
    geometry = _geometry(px, path, all_ops, reversed_, pixel_spacing, sdd, sid, assume or ViewGeometry(),
                         tuple(tensor.shape[1:]), (fill_pixel_spacing, fill_sdd, fill_sid), view)
    return Radiograph(tensor, geometry, tuple(px.steps), px.source, valid, view, str(path), reversed_)


def _geometry(px: _Pixels, path: Path, ops: Sequence[str], reversed_: bool, pixel_spacing, sdd, sid,
              assume: ViewGeometry, size: tuple[int, int], fill=(None, None, None),
              view: str | None = None) -> ViewGeometry | None:
    source = str(path)
    fill_spacing, fill_sdd, fill_sid = fill
    if pixel_spacing is not None:
        given = _positive_pair(pixel_spacing, "pixel spacing", source)
        if px.spacing is not None:
            px.notes.append(f"the file's pixel spacing {px.spacing[0]:.4g} x {px.spacing[1]:.4g} mm replaced by the "
                            "given one")
        px.notes.append(f"pixel spacing {given[0]:.4g} x {given[1]:.4g} mm (given for this view)")
        px.spacing = given
    elif fill_spacing is not None:
        given = _positive_pair(fill_spacing, "pixel spacing", source)
        if px.spacing is None:
            px.notes.append(f"pixel spacing {given[0]:.4g} x {given[1]:.4g} mm (given; the file has none)")
            px.spacing = given
        elif not np.allclose(given, px.spacing, rtol=1e-3):
            px.notes.append(f"the given pixel spacing {given[0]:.4g} x {given[1]:.4g} mm is for files without one: "
                            "the file's is kept (give it per view to replace it)")
    for name, key, over, fallback in (("SDD", "sdd", sdd, fill_sdd), ("source-isocentre distance", "sid", sid, fill_sid)):
        label = "SDD" if key == "sdd" else "source-isocentre"
        if over is not None:
            setattr(px, key, _positive(over, name, source))
            px.notes.append(f"{label} {getattr(px, key):g} mm (given for this view)")
            if key == "sid":
                px.table_distance = None
        elif fallback is not None:
            value = _positive(fallback, name, source)
            if getattr(px, key) is None and not (key == "sid" and px.table_distance is not None):
                setattr(px, key, value)
                px.notes.append(f"{label} {value:g} mm (given; the file has none)")
            else:
                px.notes.append(f"the given {label} {value:g} mm is for files without one: the file's is kept")
    if px.spacing is None:
        px.steps.extend(px.notes)
        if not px.source.startswith("tensor"):
            px.steps.append("no pixel spacing known" + ("; the distances are not used without one"
                                                        if px.sdd is not None or px.sid is not None else ""))
        return None
    sdd_assumed = px.sdd is None
    if px.sdd is None:
        px.sdd = assume.sdd
        px.notes.append(f"SDD {px.sdd:g} mm assumed (the model's)")
    if px.table_distance is not None and px.sid is None:
        half = TYPICAL_HALF_DEPTH_MM.get(view or "AP", TYPICAL_HALF_DEPTH_MM["AP"])
        px.sid = px.table_distance - half
        px.notes.append(f"source-isocentre {px.sid:g} mm: Distance Source to Patient {px.table_distance:g} mm (to the "
                        f"table or detector side of the patient, PS3.3 C.8.11.7) less half a typical adult chest "
                        f"({half:g} mm along the {'lateral' if view == 'LAT' else 'antero-posterior'} beam); "
                        "give --sid for another")
    if px.sid is None:
        px.sid = px.sdd / assume.magnification
        px.notes.append(f"source-isocentre {px.sid:.1f} mm assumed (the model's magnification {assume.magnification:.3g})")
    elif px.sid < 0:  # a magnification factor without SDD
        px.sid = px.sdd / -px.sid
        px.notes.append(f"source-isocentre {px.sid:.1f} mm (assumed SDD / magnification)")
    px.steps.extend(px.notes)
    if not px.sid > 0:
        raise ValueError(f"{path}: source-isocentre distance {px.sid:g} mm is invalid; expected a positive distance "
                         "(give it with --sid)")
    if not px.sdd > px.sid:
        how = "assumed: the model's, as the file has none" if sdd_assumed else "from the file or given"
        raise ValueError(f"{path}: SDD {px.sdd:g} mm ({how}) must exceed the source-isocentre distance {px.sid:g} mm; "
                         "give the distances with --sdd / --sid (or per view)")
    return ViewGeometry(px.sdd, px.sid, size, _ops_spacing(px.spacing, ops), reversed=reversed_)


# ----------------------------------------------------------------------------------- detector mapping
def to_detector(radiograph: Radiograph, target: ViewGeometry, fit_scale: float | None = None) -> Radiograph:
    """Map a radiograph onto a model's detector grid in millimetres (crop / pad around the centre, never stretch).

    With a known geometry the output has ``target``'s rows x cols and the pitch that gives
    ``target``'s field of view at the isocentre for the radiograph's own SDD / SID
    (``target.isocentre_pitch * sdd / sid``); each axis is resampled on its own (non-square pixels
    stay true to scale), anti-aliased when shrinking; what lies outside the input is 0 (air). Without
    a geometry the image is fitted into the detector with its aspect kept (a warning step) and takes
    ``target``'s geometry.

    Args:
        radiograph: from :func:`read_radiograph`.
        target: the model's view geometry (its ``detector_size`` and ``isocentre_pitch`` matter).
        fit_scale: without a geometry, input pixels per detector pixel (default: the image just fits); a pair
            from one detector shares the scale that fits the larger of its two images.

    Returns:
        A :class:`Radiograph` of ``target.detector_size`` with its new geometry and the steps added.
    """
    rows, cols = target.detector_size
    image = torch.where(radiograph.valid, radiograph.image, torch.zeros(()))
    h, w = image.shape[-2:]
    g = radiograph.geometry
    steps = list(radiograph.steps)
    if g is None:
        own = max(h / rows, w / cols)  # input pixels per detector pixel at which the whole image fits
        scale = own if fit_scale is None else max(float(fit_scale), own)
        in_pitch = (1.0, 1.0)
        out_pitch = (scale, scale)
        out_geometry = replace(target, reversed=radiograph.reversed)
        if (h, w) != (rows, cols) or scale != own:
            shared = " at the scale shared with the other view (one detector assumed)" if scale > own * (1 + 1e-9) else ""
            steps.append(f"warning: no pixel spacing: fitted {h} x {w} pixels into the {rows} x {cols} detector "
                         f"keeping the aspect{shared} (give the pixel spacing for a true scale)")
        else:
            steps.append(f"no pixel spacing: taken as the model's detector ({rows} x {cols}, "
                         f"{target.pixel_spacing[0]:.4g} x {target.pixel_spacing[1]:.4g} mm)")
    else:
        mag = g.magnification
        iso = target.isocentre_pitch
        out_pitch_mm = (iso[0] * mag, iso[1] * mag)
        in_pitch, out_pitch = g.pixel_spacing, out_pitch_mm
        out_geometry = ViewGeometry(g.sdd, g.sid, (rows, cols), out_pitch_mm, g.offset, g.angle, g.reversed)
        field_in = (h * in_pitch[0] / mag, w * in_pitch[1] / mag)
        field_out = (rows * iso[0], cols * iso[1])
        steps.append(f"pixel spacing {in_pitch[0]:.4g} x {in_pitch[1]:.4g} mm at magnification {mag:.3g} -> "
                     f"{out_pitch_mm[0]:.4g} x {out_pitch_mm[1]:.4g} mm (the model's {iso[0]:.4g} x {iso[1]:.4g} mm "
                     "at the isocentre)")
        crop = [("cropped" if a > b + 0.5 else "padded" if a < b - 0.5 else "kept", abs(a - b))  # to the mm shown
                for a, b in zip(field_in, field_out)]
        steps.append(f"field at the isocentre {field_in[0]:.0f} x {field_in[1]:.0f} mm -> {field_out[0]:.0f} x "
                     f"{field_out[1]:.0f} mm: rows {crop[0][0]}" + (f" {crop[0][1]:.0f} mm" if crop[0][0] != "kept" else "")
                     + f", columns {crop[1][0]}" + (f" {crop[1][1]:.0f} mm" if crop[1][0] != "kept" else "")
                     + " around the detector centre")
    same = (h, w) == (rows, cols) and all(abs(a - b) <= 1e-9 * max(a, b) for a, b in zip(in_pitch, out_pitch))
    if same:
        out, valid = image.clone(), radiograph.valid.clone()
    else:
        out, valid = _resample(image, radiograph.valid, in_pitch, out_pitch, (rows, cols))
    return Radiograph(out.clamp(0.0, 1.0).contiguous(), out_geometry, tuple(steps), radiograph.source,
                      valid.contiguous(), radiograph.view, radiograph.path, radiograph.reversed)


def _resample(image: torch.Tensor, valid: torch.Tensor, in_pitch: tuple[float, float],
              out_pitch: tuple[float, float], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``(1, h, w)`` with pitch ``in_pitch`` onto ``size`` pixels of ``out_pitch``, centres aligned.

    Shrinking axes are first reduced with an anti-aliased resize (torch's ``antialias=True``) to about
    the output pitch; the exact positions are then sampled bilinearly, 0 outside.
    """
    h, w = image.shape[-2:]
    x = image[None].double()
    m = valid[None].double()
    pitch = list(in_pitch)
    shrink = [max(1, round(n * p / q)) if q > p * 1.01 else n for n, p, q in zip((h, w), in_pitch, out_pitch)]
    if tuple(shrink) != (h, w):
        x = F.interpolate(x, size=tuple(shrink), mode="bilinear", align_corners=False, antialias=True)
        m = F.interpolate(m, size=tuple(shrink), mode="bilinear", align_corners=False, antialias=True)
        pitch = [n * p / s for n, p, s in zip((h, w), in_pitch, shrink)]  # same extent, fewer pixels
        h, w = shrink
    rows, cols = size
    r = (torch.arange(rows, dtype=torch.float64) - (rows - 1) / 2) * out_pitch[0]  # mm from the centre
    c = (torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2) * out_pitch[1]
    gy = 2 * r / (h * pitch[0])  # align_corners=False: the input's outer edges are at +-1
    gx = 2 * c / (w * pitch[1])
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]  # (1, rows, cols, (x, y))
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cover = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].float(), cover[0] > 0.5


def read_xray(path: str | os.PathLike) -> torch.Tensor:
    """The pixels of an X-ray file as stored (``read_radiograph(path, normalize=False).image``): ``(1, H, W)``."""
    return read_radiograph(path, normalize=False).image


__all__ = ["DISPLAY_ORIENTATION", "Radiograph", "XRAY_OPS", "apply_ops", "is_dicom", "orientation_ops",
           "read_radiograph", "read_xray", "to_detector"]
