import numpy as np
import pytest
import torch
import torchio as tio

from dataset import image_to_volume, volume_to_image
from dataset.volume import volume_affine


def _marked_image(orientation: str) -> tuple[tio.ScalarImage, dict[str, np.ndarray]]:
    """An image in ``orientation`` with three markers at known RAS world points (mm)."""
    base = tio.ScalarImage(tensor=torch.zeros(1, 20, 24, 16), affine=np.diag([2.0, 1.5, 3.0, 1.0]))
    image = tio.ToOrientation(orientation)(base)
    image.affine[:3, 3] += np.array([5.0, -7.0, 11.0])  # an arbitrary origin
    marks = {
        # RAS: +x = patient right, +y = anterior, +z = superior (relative to the centre)
        "left": np.array([-9.0, 0.0, 0.0]),
        "anterior": np.array([0.0, 12.0, 0.0]),
        "superior": np.array([0.0, 0.0, 18.0]),
    }
    centre = np.asarray(image.get_center())
    inv = np.linalg.inv(image.affine)
    data = image.data.clone()
    for value, (name, offset) in enumerate(marks.items(), start=1):
        i, j, k = np.round(inv @ np.append(centre + offset, 1.0))[:3].astype(int)
        data[0, i, j, k] = value
    return tio.ScalarImage(tensor=data, affine=image.affine), marks


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LPI", "PIR", "IAR"])
def test_axes_follow_anatomy(orientation: str) -> None:
    image, _ = _marked_image(orientation)
    volume, spacing = image_to_volume(image)
    d, h, w = volume.shape[1:]
    assert sorted(spacing) == [1.5, 2.0, 3.0] and spacing == (3.0, 1.5, 2.0)  # (D=S-I, H=A-P, W=R-L)
    pos = {v: torch.nonzero(volume[0] == v)[0].tolist() for v in (1, 2, 3)}
    # left marker: larger W (right -> left); anterior: smaller H; superior: smaller D
    assert pos[1][2] > (w - 1) / 2 and abs(pos[1][1] - (h - 1) / 2) <= 1 and abs(pos[1][0] - (d - 1) / 2) <= 1
    assert pos[2][1] < (h - 1) / 2 and abs(pos[2][2] - (w - 1) / 2) <= 1
    assert pos[3][0] < (d - 1) / 2 and abs(pos[3][2] - (w - 1) / 2) <= 1


def test_volume_to_image_round_trip_and_affine() -> None:
    volume = torch.randn(1, 5, 6, 7)
    image = volume_to_image(volume, (3.0, 2.0, 1.0))
    assert image.orientation == ("L", "P", "I")
    assert np.allclose(image.spacing, (1.0, 2.0, 3.0))
    assert np.allclose(image.get_center(), 0.0)
    back, spacing = image_to_volume(image)
    assert torch.equal(back, volume) and spacing == (3.0, 2.0, 1.0)
    # voxel (d, h, w) = (0, 0, 0) is the superior, anterior, patient-right corner (RAS: +x, +y, +z)
    corner = volume_affine((5, 6, 7), (3.0, 2.0, 1.0)) @ np.array([0, 0, 0, 1.0])
    assert (corner[:3] > 0).all()


def test_volume_to_image_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected \\(C, D, H, W\\)"):
        volume_to_image(torch.zeros(5, 6, 7), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        volume_to_image(torch.zeros(1, 5, 6, 7), (1.0, 0.0, 1.0))
