"""A small synthetic chest phantom in HU, for tests and benchmarks that must not need real data."""

from __future__ import annotations

import torch
import torchio as tio

from dataset.volume import volume_to_image


def chest_phantom(shape_dhw: tuple[int, int, int] = (32, 32, 32), spacing_dhw: tuple[float, float, float] = (8.0, 8.0, 8.0),
                  seed: int = 0, large_heart: bool = False) -> tio.ScalarImage:
    """A seeded chest-like HU volume: body, two lungs, a heart left of midline, a posterior spine.

    Geometry is jittered by ``seed``; ``large_heart`` scales the heart by 1.5 (a visible, honest
    binary label for class-conditional tests).

    Args:
        shape_dhw: size ``(D, H, W)``.
        spacing_dhw: voxel spacing in mm along ``(D, H, W)``.
        seed: jitter seed.
        large_heart: draw an enlarged heart.

    Returns:
        An LPI :class:`tio.ScalarImage`, float32 HU (air -1000, lung ~-850, soft tissue ~40, bone ~700).
    """
    g = torch.Generator().manual_seed(seed)
    jitter = lambda scale: float((torch.rand((), generator=g) - 0.5) * 2 * scale)  # noqa: E731
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * s for n, s in zip(shape_dhw, spacing_dhw)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")  # mm; z inferior, y posterior, x patient left
    half = [n * s / 2 for n, s in zip(shape_dhw, spacing_dhw)]
    hu = torch.full(shape_dhw, -1000.0)
    body_a, body_b = half[2] * (0.8 + jitter(0.08)), half[1] * (0.6 + jitter(0.06))
    body = (x / body_a) ** 2 + (y / body_b) ** 2 <= 1
    hu[body] = 40.0
    lung_r = torch.tensor([0.7 * half[0], 0.5 * body_b, 0.32 * body_a])  # radii along (z, y, x)
    for side in (-1.0, 1.0):
        cx = side * 0.45 * body_a
        lung = ((z / lung_r[0]) ** 2 + ((y + 0.1 * body_b) / lung_r[1]) ** 2 + ((x - cx) / lung_r[2]) ** 2) <= 1
        hu[lung] = -850.0 + jitter(30)
    heart_r = 0.22 * body_a * (1.5 if large_heart else 1.0) * (1 + jitter(0.08))
    heart = ((z - 0.2 * half[0]) ** 2 + (y + 0.2 * body_b) ** 2 + (x - 0.15 * body_a) ** 2) <= heart_r**2
    hu[heart] = 50.0
    spine = ((y - 0.7 * body_b) ** 2 + x**2 <= (0.12 * body_a) ** 2) & (z.abs() < 0.9 * half[0])
    hu[spine] = 700.0 + jitter(50)
    hu += torch.randn(shape_dhw, generator=g) * 10.0 * body
    return volume_to_image(hu[None], spacing_dhw)
