"""Test helper callback (instantiated through a Hydra override): each rank saves its codebook at the end."""

from __future__ import annotations

import os

import lightning as L
import torch


class CodebookDump(L.Callback):
    """Writes ``<out_dir>/codebook_rank<r>.pt`` with the quantiser buffers after training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        q = module.autoencoder.quantizer
        state = {k: v.detach().cpu().clone() for k, v in q.state_dict().items()}
        state["decoder_conv_out"] = module.autoencoder.decoder.conv_out.weight.detach().cpu().clone()
        torch.save(state, os.path.join(self.out_dir, f"codebook_rank{trainer.global_rank}.pt"))
