"""Encode every CT of a prepared dataset into autoencoder latents for BiFlowNet training.

    python -m train.generate_training_latent --manifest outputs/demo/data/manifest.csv --ae-ckpt ae.ckpt
    torchrun --nproc_per_node=8 -m train.generate_training_latent --manifest ... --ae-ckpt ...

Writes ``<out-dir>/<subject_id>.pt`` (float32 ``(C, d, h, w)``, the continuous pre-quantisation latent of
``load_autoencoder(ckpt).encode``; decode generated latents with ``decode(z, quantize=True)``), adds a
``latent`` column (paths relative to the CSV) to the manifest, and writes ``latent_stats.json`` next to it
(per-channel ``mean``/``std`` over the train split, and ``scale_factor`` = 1 / the std over all channels, the
latent-diffusion convention, for reference). The same per-channel statistics are written into the autoencoder
checkpoint's ``latent_mean``/``latent_std`` buffers (``AutoEncoder.store_latent_stats``; skip with
``--no-store-stats``), so ``load_autoencoder(ckpt).normalize_latent`` / ``denormalize_latent`` use them.
Subjects are sharded across torchrun ranks; existing latents of the right shape are kept (resumable); every file
is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torchio as tio
from tqdm import tqdm

from AutoEncoder import PatchVolumeAutoencoder, load_autoencoder, store_latent_stats
from dataset import DatasetInfo, Manifest, atomic_save_torch, atomic_write_json
from dataset.ct_datamodule import CTCollate
from dataset.dataset_info import window_for
from dataset.volume import ORIENTATION


def _dist_setup() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _check_window(model: PatchVolumeAutoencoder, manifest: Path) -> None:
    """The intensity window the autoencoder was trained with must equal the dataset's (when both are known)."""
    info = getattr(model, "dataset_info", None)
    if not info or not (manifest.parent / "dataset.json").is_file():
        return
    data_window = DatasetInfo.load(manifest.parent).to_dict()["window"]
    if info.get("window") != data_window:
        raise ValueError(
            f"the autoencoder was trained with HU window {info.get('window')}, but {manifest.parent / 'dataset.json'} "
            f"uses {data_window}; encode with a matching checkpoint or re-prepare the data"
        )


def _latent_ok(path: Path, shape: tuple[int, ...] | None) -> bool:
    if not path.is_file():
        return False
    try:
        z = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: encode again
        return False
    return isinstance(z, torch.Tensor) and (shape is None or tuple(z.shape) == shape)


def generate(
    manifest_path: str | os.PathLike,
    ae_ckpt: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    store_stats: bool = True,
) -> dict:
    """Encode all subjects (this rank's shard under torchrun) and, on rank 0, write the manifest and statistics.

    Args:
        manifest_path: ``manifest.csv`` of a prepared dataset.
        ae_ckpt: checkpoint written by ``train.train_PatchVolume``.
        out_dir: where latents go (default ``<manifest dir>/latents``).
        chunk_size: patches per encoder call (default: the checkpoint's ``encode_chunk_size``).
        device: torch device for encoding.
        progress: show a progress bar on rank 0.
        store_stats: also write the statistics into ``ae_ckpt`` (rank 0; see ``AutoEncoder.store_latent_stats``).

    Returns:
        ``{"encoded": n, "skipped": n, "stats": {...}, "manifest": path}`` (counts of this rank).

    Raises:
        FileNotFoundError: missing manifest or checkpoint.
        ValueError: bad manifest, a checkpoint that is not an autoencoder or does not match the data.
    """
    rank, world = _dist_setup()
    manifest = Manifest.load(manifest_path)
    model = load_autoencoder(ae_ckpt, map_location=device)
    _check_window(model, manifest.path)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        model.encode_chunk_size = chunk_size
    out = Path(out_dir) if out_dir is not None else manifest.path.parent / "latents"
    out.mkdir(parents=True, exist_ok=True)
    collate = CTCollate(window_for(manifest.path))
    orient = tio.ToOrientation(ORIENTATION)
    rows = manifest.frame
    mine = list(range(rank, len(rows), world))
    c = model.latent_channels
    acc = torch.zeros(3, c, dtype=torch.float64)  # count, sum, sum of squares per channel (train split)
    encoded = skipped = 0
    for i in tqdm(mine, desc="encoding", disable=not progress or rank != 0):
        sid, ct_path, split = rows.at[i, "subject_id"], rows.at[i, "ct"], rows.at[i, "split"]
        path = out / f"{sid}.pt"
        subject = orient(tio.Subject(ct=tio.ScalarImage(ct_path), subject_id=sid))
        spatial = tuple(subject["ct"].spatial_shape)
        expected = (c, *(s // model.downsample_factor for s in spatial))
        if _latent_ok(path, expected):
            z = torch.load(path, map_location="cpu", weights_only=True)
            skipped += 1
        else:
            x = collate([subject])["ct"].to(device)  # (1, 1, D, H, W) in [-1, 1]
            with torch.no_grad():
                z = model.encode(x)[0].float().cpu()  # (C, d, h, w)
            atomic_save_torch(z, path)
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
    stats = {
        "mean": mean.tolist(), "std": std.tolist(), "mean_all": mean_all, "std_all": std_all,
        "scale_factor": 1.0 / max(std_all, 1e-6),  # latent diffusion's single scale (z * scale_factor)
        "count": int(acc[0, 0]), "split": "train", "ae_checkpoint": str(Path(ae_ckpt).resolve()),
        "downsample_factor": model.downsample_factor, "latent_channels": c,
    }
    if rank == 0:
        frame = rows.copy()
        frame["latent"] = [str((out / f"{sid}.pt").resolve()) for sid in frame["subject_id"]]
        Manifest.write(frame, manifest.path)
        atomic_write_json(manifest.path.parent / "latent_stats.json", stats)
        if store_stats:
            store_latent_stats(ae_ckpt, stats["mean"], stats["std"],
                               {"manifest": str(manifest.path.resolve()), "split": "train", "count": stats["count"]})
    if world > 1:
        dist.barrier()
    return {"encoded": encoded, "skipped": skipped, "stats": stats, "manifest": str(manifest.path)}


def main(argv: list[str] | None = None) -> int:
    """CLI; bad input -> one line on stderr, exit code 2."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", "--data-path", dest="manifest", required=True, help="manifest.csv of a prepared dataset")
    p.add_argument("--ae-ckpt", "--AE-ckpt", dest="ae_ckpt", required=True, help="train_PatchVolume checkpoint")
    p.add_argument("--out-dir", default=None, help="latent folder (default: <manifest dir>/latents)")
    p.add_argument("--chunk-size", type=int, default=None, help="patches per encoder call (memory bound)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-store-stats", action="store_true",
                   help="leave the autoencoder checkpoint untouched (statistics only in latent_stats.json)")
    args = p.parse_args(argv)
    try:
        if args.device.startswith("cuda") and "LOCAL_RANK" in os.environ:
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        result = generate(args.manifest, args.ae_ckpt, args.out_dir, args.chunk_size, args.device, not args.no_progress,
                          store_stats=not args.no_store_stats)
    except (ValueError, FileNotFoundError) as e:
        print(f"generate_training_latent: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"latents: {result['encoded']} encoded, {result['skipped']} kept (rank 0); manifest {result['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
