"""Encode every CT of a prepared dataset into autoencoder latents for BiFlowNet training.

    python -m train.generate_training_latent --manifest outputs/demo/data/manifest.csv --ae-ckpt ae.ckpt
    torchrun --nproc_per_node=8 -m train.generate_training_latent --manifest ... --ae-ckpt ...

Writes ``<out-dir>/<subject_id>.pt`` (``dataset.latents``: the float32 ``(C, d, h, w)`` continuous
pre-quantisation latent of ``load_autoencoder(ckpt).model.encode``, with the fingerprint of that autoencoder;
decode generated latents with ``decode(z, quantize=True)``), adds a ``latent`` column (paths relative to the
CSV) to the manifest, and writes ``latent_stats.json`` next to it (``dataset.latents.LatentStats``: per-channel
``mean``/``std`` over the train split, the autoencoder's fingerprint and checkpoint, and ``scale_factor`` = 1 /
the std over all channels, the latent-diffusion convention, for reference).

Resumable: a latent that exists with the right shape and was made by this autoencoder is kept; latents of
another autoencoder (or of unknown origin, or damaged) are re-encoded, and the run says how many. A deleted
``latents/`` folder is simply regenerated. Subjects are sharded across torchrun ranks; every file is written
atomically, and ``latent_stats.json`` is removed before any latent changes, so it never names an autoencoder
its latents did not come from.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchio as tio
from tqdm import tqdm

from AutoEncoder import LoadedAutoencoder, load_autoencoder
from dataset import DatasetInfo, Manifest
from dataset.checkpoint import CheckpointError
from dataset.cli import OneLineParser, number, run_cli
from dataset.ct_datamodule import CTCollate
from dataset.dataset_info import window_for
from dataset.latents import STATS_FILE, LatentStats, read_latent, write_latent
from dataset.volume import ORIENTATION

PROG = "python -m train.generate_training_latent"


def _dist_setup() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _check_window(ae: LoadedAutoencoder, manifest: Path) -> None:
    """The intensity window the autoencoder was trained with must equal the dataset's (when both are known)."""
    info = ae.dataset_info
    if not info or not (manifest.parent / "dataset.json").is_file():
        return
    data_window = DatasetInfo.load(manifest.parent).to_dict()["window"]
    if info.get("window") != data_window:
        raise ValueError(
            f"{ae.path}: the autoencoder was trained with HU window {info.get('window')}, but "
            f"{manifest.parent / 'dataset.json'} uses {data_window}; encode with a matching checkpoint or re-prepare the data"
        )


def _existing_latent(path: Path, shape: tuple[int, ...], fingerprint: str) -> tuple[torch.Tensor | None, str]:
    """(the latent if it can be kept, else None; why not: "missing", "stale", "damaged" or "" when kept)."""
    if not path.is_file():
        return None, "missing"
    try:
        z, fp = read_latent(path)
    except (CheckpointError, OSError):
        return None, "damaged"
    if fp != fingerprint:
        return None, "stale"
    if tuple(z.shape) != shape:
        return None, "damaged"
    return z, ""


def generate(
    manifest_path: str | os.PathLike,
    ae_ckpt: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Encode all subjects (this rank's shard under torchrun) and, on rank 0, write the manifest and statistics.

    Args:
        manifest_path: ``manifest.csv`` of a prepared dataset (a ``latent`` column listing deleted files is fine).
        ae_ckpt: checkpoint written by ``train.train_PatchVolume``.
        out_dir: where latents go (default ``<manifest dir>/latents``).
        chunk_size: patches per encoder call (default: the checkpoint's ``encode_chunk_size``).
        device: torch device for encoding.
        progress: show a progress bar on rank 0.

    Returns:
        ``{"encoded": n, "skipped": n, "stale": n, "stats": {...}, "manifest": path}`` (counts of this rank;
        ``stale``: latents of another autoencoder or damaged ones that were re-encoded).

    Raises:
        FileNotFoundError: missing manifest, CT or checkpoint.
        ValueError: bad manifest, a checkpoint that is not an autoencoder or does not match the data.
    """
    rank, world = _dist_setup()
    manifest = Manifest.load(manifest_path, check_files=False)
    ae = load_autoencoder(ae_ckpt, map_location=device)
    _check_window(ae, manifest.path)
    model, fingerprint = ae.model, ae.fingerprint
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        model.encode_chunk_size = chunk_size
    out = Path(out_dir) if out_dir is not None else manifest.path.parent / "latents"
    stats_path = manifest.path.parent / STATS_FILE
    if rank == 0 and stats_path.is_file():
        try:
            old = LatentStats.load(stats_path).ae_fingerprint
        except (ValueError, OSError):
            old = None
        if old != fingerprint:  # latents are about to change: the old statistics must not outlive them
            stats_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    collate = CTCollate(window_for(manifest.path))
    orient = tio.ToOrientation(ORIENTATION)
    rows = manifest.frame
    mine = list(range(rank, len(rows), world))
    c = model.latent_channels
    acc = torch.zeros(3, c, dtype=torch.float64)  # count, sum, sum of squares per channel (train split)
    encoded = skipped = stale = 0
    for i in tqdm(mine, desc="encoding", disable=not progress or rank != 0):
        sid, ct_path, split = rows.at[i, "subject_id"], rows.at[i, "ct"], rows.at[i, "split"]
        path = out / f"{sid}.pt"
        subject = orient(tio.Subject(ct=tio.ScalarImage(ct_path), subject_id=sid))
        spatial = tuple(subject["ct"].spatial_shape)
        expected = (c, *(s // model.downsample_factor for s in spatial))
        z, why = _existing_latent(path, expected, fingerprint)
        if z is not None:
            skipped += 1
        else:
            stale += why in ("stale", "damaged")
            x = collate([subject])["ct"].to(device)  # (1, 1, D, H, W) in [-1, 1]
            with torch.no_grad():
                z = model.encode(x)[0].float().cpu()  # (C, d, h, w)
            write_latent(z, path, fingerprint)
            encoded += 1
        if split == "train":
            flat = z.double().reshape(c, -1)
            acc[0] += flat.shape[1]
            acc[1] += flat.sum(1)
            acc[2] += flat.pow(2).sum(1)
    if world > 1:
        dist.all_reduce(acc)
    if acc[0, 0] == 0:
        raise ValueError(f"{manifest.path}: no subjects in split 'train' to compute latent statistics from")
    mean = acc[1] / acc[0]
    std = (acc[2] / acc[0] - mean.pow(2)).clamp_min(1e-12).sqrt()
    mean_all = float(acc[1].sum() / acc[0].sum())
    std_all = float((acc[2].sum() / acc[0].sum() - mean_all**2) ** 0.5)
    stats = LatentStats(
        mean=mean.tolist(), std=std.tolist(), ae_fingerprint=fingerprint, ae_checkpoint=str(Path(ae_ckpt).resolve()),
        count=int(acc[0, 0]), split="train",
        extra={"mean_all": mean_all, "std_all": std_all,
               "scale_factor": 1.0 / max(std_all, 1e-6),  # latent diffusion's single scale (z * scale_factor)
               "downsample_factor": model.downsample_factor, "latent_channels": c},
    )
    if world > 1:
        dist.barrier()  # every rank's latents are on disk before the manifest and statistics name them
    if rank == 0:
        frame = rows.copy()
        frame["latent"] = [str((out / f"{sid}.pt").resolve()) for sid in frame["subject_id"]]
        Manifest.write(frame, manifest.path)
        stats.save(stats_path)
    if world > 1:
        dist.barrier()
    return {"encoded": encoded, "skipped": skipped, "stale": stale, "stats": stats.to_dict(),
            "manifest": str(manifest.path)}


def build_parser() -> OneLineParser:
    """The ``train.generate_training_latent`` argument parser."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", "--data-path", dest="manifest", required=True, help="manifest.csv of a prepared dataset")
    p.add_argument("--ae-ckpt", "--AE-ckpt", dest="ae_ckpt", required=True, help="train_PatchVolume checkpoint")
    p.add_argument("--out-dir", default=None, help="latent folder (default: <manifest dir>/latents)")
    p.add_argument("--chunk-size", type=number(int, min=1), default=None, help="patches per encoder call (memory bound)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _work(args) -> int:
    try:
        if args.device.startswith("cuda") and "LOCAL_RANK" in os.environ:
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        result = generate(args.manifest, args.ae_ckpt, args.out_dir, args.chunk_size, args.device, not args.no_progress)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        note = (f" ({result['stale']} of them replaced latents of another autoencoder or damaged files)"
                if result["stale"] else "")
        print(f"latents: {result['encoded']} encoded{note}, {result['skipped']} kept (rank 0); "
              f"manifest {result['manifest']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI; bad input -> one line on stderr, exit code 2."""
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _work(args))


if __name__ == "__main__":
    sys.exit(main())
