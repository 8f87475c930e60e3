"""Tiny DICOM files written with pydicom for the X-ray reader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1", "CT": "1.2.840.10008.5.1.4.1.1.2",
               "SR": "1.2.840.10008.5.1.4.1.1.88.11", "OT": "1.2.840.10008.5.1.4.1.1.7"}


def dicom_dataset(pixels: np.ndarray | None, modality: str = "DX", photometric: str = "MONOCHROME2",
                  bits_stored: int | None = None, **tags) -> Dataset:
    """A single-frame DICOM dataset holding ``pixels`` (uint8 / uint16 / int16 ``(rows, cols)`` or RGB
    ``(rows, cols, 3)``), with extra ``tags`` by keyword; ``pixels=None`` writes no pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES.get(modality, SOP_CLASSES["OT"])
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        bits = pixels.dtype.itemsize * 8
        ds.BitsAllocated = bits
        ds.BitsStored = bits_stored or bits
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else photometric
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def write_dicom(path: Path, pixels: np.ndarray | None, **kwargs) -> Path:
    """Write :func:`dicom_dataset` to ``path`` (with the DICM preamble) and return the path."""
    dicom_dataset(pixels, **kwargs).save_as(str(path), enforce_file_format=True)
    return path
