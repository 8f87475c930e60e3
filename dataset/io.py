"""Reading CT volumes and X-rays, and atomic writes for every file the project produces.

A CT can come from a NIfTI file (``.nii`` / ``.nii.gz``), a DICOM series folder, or a ``.pt`` file
holding a tensor ``(D, H, W)`` / ``(1, D, H, W)`` in our layout (seed 000's ``<ct_dir>/<id>.pt``), or a
dict ``{"ct": tensor, "spacing": [sd, sh, sw]}``. Everything comes back as a :class:`tio.ScalarImage`
in Hounsfield units with its spacing and orientation.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
import torch
import torchio as tio

from dataset.checkpoint import load_torch_file
from dataset.volume import volume_to_image

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CT_SUFFIXES = NIFTI_SUFFIXES + (".pt",)


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, an output path that cannot be written: an existing folder, a parent that is a
    file, or a folder this process cannot write in (read-only file system, permissions).

    Raises:
        ValueError: one line naming ``path`` (``what`` says which output it is).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected a file name for the {what}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: {parent} is a file, not a folder; expected a folder for the {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write in {parent} (read-only file system or no permission); expected a "
                         f"writable folder for the {what}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", suffix: str = "") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success move it onto ``path`` with ``os.replace``.

    If the block raises, the temporary file is removed and ``path`` is left untouched.

    Args:
        path: final destination.
        mode: ``"wb"`` or ``"w"``.
        suffix: suffix for the temporary name (some writers infer the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes) for writers that need a file name.

    The file written there is moved onto ``path`` when the block succeeds, and removed otherwise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.removesuffix(suffix)}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (plain tensors/dicts only, loadable with weights_only)."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def write_nifti(image: tio.ScalarImage, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write a TorchIO image as NIfTI atomically, keeping its affine (qform and sform set).

    Args:
        image: the image; its first channel is written (a 3-D NIfTI opens in Slicer / ITK-SNAP).
        path: ``.nii`` or ``.nii.gz`` destination.
        dtype: optional cast (e.g. ``torch.int16`` for HU, rounded first).
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: expected a .nii or .nii.gz file name")
    data = image.data[0]
    if dtype is not None:
        if not dtype.is_floating_point:
            info = torch.iinfo(dtype)
            data = data.round().clamp(info.min, info.max)
        data = data.to(dtype)
    nii = nib.Nifti1Image(data.numpy(), image.affine)
    nii.set_qform(image.affine, code=1)
    nii.set_sform(image.affine, code=1)
    nii.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(nii, str(tmp))


def _is_dicom_file(path: Path) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    return False


def is_ct_source(path: Path) -> bool:
    """Whether ``path`` looks like a CT we can read (NIfTI / .pt file, or a folder of DICOM files)."""
    if path.is_file():
        return path.name.endswith(CT_SUFFIXES)
    if path.is_dir():
        return any(_is_dicom_file(p) for p in sorted(path.iterdir())[:20] if p.is_file())
    return False


def ct_subject_id(path: Path) -> str:
    """Subject id of a CT source: file name without its CT suffix, or the DICOM folder's name."""
    for suffix in CT_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _read_pt(path: Path, spacing_dhw: tuple[float, float, float]) -> tio.ScalarImage:
    obj = load_torch_file(path, "CT tensor file (.pt)")
    if isinstance(obj, dict):
        key = next((k for k in ("ct", "volume", "image", "data") if k in obj), None)
        if key is None:
            raise ValueError(f"{path}: dict without a 'ct' tensor (keys {sorted(obj)}); expected a tensor")
        spacing_dhw = tuple(float(s) for s in obj.get("spacing", spacing_dhw))
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(obj).__name__}; expected a (D, H, W) tensor")
    if obj.ndim == 4 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.ndim != 3:
        raise ValueError(f"{path}: tensor has shape {tuple(obj.shape)}; expected a 3-D CT (D, H, W)")
    return volume_to_image(obj[None].to(torch.float32), spacing_dhw)


def _read_nifti(path: Path) -> tio.ScalarImage:
    # nibabel, not ITK: ITK silently replaces NaN voxels, which would hide broken scans
    try:
        nii = nib.load(str(path))
        data = np.asarray(nii.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises assorted types for corrupt files
        raise ValueError(f"{path}: cannot be read as a NIfTI image ({type(e).__name__}: {e})") from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ValueError(f"{path}: image has shape {data.shape}; expected a 3-D CT volume")
    return tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(data))[None], affine=nii.affine)


def check_ct(image: tio.ScalarImage, source: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``source`` if ``image`` is not a usable 3-D CT in HU.

    Rejects: more than one channel, 2-D images (a spatial size of 1), NaN/Inf voxels, constant
    volumes, and volumes whose values all lie in [-1.5, 1.5] (already normalised, not HU).
    """
    shape = tuple(image.shape)
    if image.data.ndim != 4 or shape[0] != 1:
        raise ValueError(f"{source}: image has shape {shape}; expected one channel (1, I, J, K)")
    if min(shape[1:]) < 2:
        raise ValueError(f"{source}: image is 2-D (spatial size {shape[1:]}); expected a 3-D CT volume")
    data = image.data
    if not data.is_floating_point():
        data = data.to(torch.float32)
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise ValueError(f"{source}: {n_bad} voxels are NaN or Inf; expected finite Hounsfield units")
    lo, hi = float(data.min()), float(data.max())
    if hi - lo == 0:
        raise ValueError(f"{source}: every voxel equals {lo}; expected a CT in Hounsfield units")
    if lo >= -1.5 and hi <= 1.5:
        raise ValueError(
            f"{source}: values lie in [{lo:.3g}, {hi:.3g}], which looks already normalised; "
            "expected Hounsfield units (air about -1000)"
        )


def read_ct(path: str | os.PathLike, pt_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
            check: bool = True) -> tio.ScalarImage:
    """Read a CT volume in Hounsfield units.

    Args:
        path: a ``.nii`` / ``.nii.gz`` / ``.pt`` file or a DICOM series folder.
        pt_spacing: spacing (mm, along D, H, W) for ``.pt`` tensors that do not carry their own.
        check: validate with :func:`check_ct`.

    Returns:
        A loaded, float32 one-channel :class:`tio.ScalarImage` with the file's affine.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable / non-image file, or (with ``check``) not a usable 3-D HU volume.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; expected a CT (.nii, .nii.gz, .pt or DICOM folder)")
    if path.is_dir():
        if not is_ct_source(path):
            raise ValueError(f"{path}: folder holds no DICOM files; expected a DICOM series")
        kind = "DICOM series"
    elif path.name.endswith(NIFTI_SUFFIXES):
        kind = "NIfTI"
    elif path.suffix == ".pt":
        kind = "pt"
    else:
        raise ValueError(f"{path}: unknown CT format; expected .nii, .nii.gz, .pt or a DICOM series folder")
    if kind == "pt":
        image = _read_pt(path, pt_spacing)
    elif kind == "NIfTI":
        image = _read_nifti(path)
    else:
        try:
            image = tio.ScalarImage(path)
            image.load()
        except Exception as e:  # nibabel / SimpleITK raise assorted types for corrupt files
            raise ValueError(f"{path}: cannot be read as a {kind} image ({type(e).__name__}: {e})") from e
    if image.data.ndim != 4:
        raise ValueError(f"{path}: image has shape {tuple(image.shape)}; expected a 3-D CT volume")
    if image.data.shape[0] == 1 and image.data.dtype != torch.float32:
        image = tio.ScalarImage(tensor=image.data.to(torch.float32), affine=image.affine)
    if check:
        check_ct(image, path)
    return image


def load_xray(path: str | os.PathLike) -> torch.Tensor:
    """Load one X-ray as float32 ``(1, H, W)`` with its values as stored (see :mod:`dataset.radiograph`).

    A thin wrapper of the one X-ray reader, ``dataset.radiograph.read_radiograph(path, normalize=False)``:
    ``.pt`` and 2-D NIfTI values as stored (DRRs written by ``dataset.prepare`` are in [0, 1]),
    PNG / JPEG / TIFF scaled by their bit depth, DICOM after its Modality LUT (MONOCHROME1 inverted).
    Generation reads radiographs with ``read_radiograph`` itself, which also orients them by their
    tags, normalises them to [0, 1] and reports the geometry.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable or unsupported file, wrong shape, or NaN/Inf pixels (one line naming the file).
    """
    from dataset.radiograph import read_xray

    return read_xray(path)
