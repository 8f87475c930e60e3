"""CT / X-ray I/O, preprocessing (HU -> [-1, 1], axes -> (B, C, D, H, W)), DRRs, manifests and datamodules."""

from dataset.dataset_info import DatasetInfo
from dataset.drr import DRRGeometry, ViewGeometry, render_drr_pair
from dataset.intensity import HUWindow
from dataset.io import atomic_save_torch, atomic_write, atomic_write_json, load_xray, read_ct, write_nifti
from dataset.lazy import lazy_exports
from dataset.manifest import Manifest
from dataset.paired_dataset import PairedDataset
from dataset.phantom import chest_phantom
from dataset.preprocess import Preprocessor
from dataset.radiograph import Radiograph, read_radiograph, to_detector
from dataset.radiograph_style import RadiographStyle
from dataset.volume import image_to_volume, volume_to_image
from dataset.xray_harmonization import IntensityReference

# the datamodules import Lightning (seconds), the converters pydicom / h5py; the CLIs in this package and
# training never need all of them, so they load on first use
__getattr__ = lazy_exports(__name__, {
    "CTDataModule": "dataset.ct_datamodule", "PairedDataModule": "dataset.paired_datamodule",
    "convert_dicom_folder": "dataset.convert_dicom", "read_dicom_series": "dataset.convert_dicom",
    "convert_pt_dataset": "dataset.convert_pt", "convert_h5_point_clouds": "dataset.convert_h5_points",
    "voxelize_points": "dataset.convert_h5_points", "volume_to_point_csv": "dataset.convert_volume_points",
    "volume_to_points": "dataset.convert_volume_points"})


__all__ = [
    "CTDataModule",
    "DRRGeometry",
    "DatasetInfo",
    "HUWindow",
    "IntensityReference",
    "Manifest",
    "PairedDataModule",
    "PairedDataset",
    "Preprocessor",
    "Radiograph",
    "RadiographStyle",
    "ViewGeometry",
    "atomic_save_torch",
    "atomic_write",
    "atomic_write_json",
    "chest_phantom",
    "image_to_volume",
    "load_xray",
    "read_ct",
    "read_radiograph",
    "render_drr_pair",
    "to_detector",
    "volume_to_image",
    "write_nifti",
]
__all__ += ["convert_dicom_folder", "convert_h5_point_clouds", "convert_pt_dataset", "read_dicom_series",
            "volume_to_point_csv", "volume_to_points", "voxelize_points"]
