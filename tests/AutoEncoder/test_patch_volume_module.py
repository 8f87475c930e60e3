"""LightningModule: a training step with finite gradients, checkpoint/resume of the codebook, stage 2, loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from AutoEncoder import PatchVolumeModule, VectorQuantizer, load_autoencoder
from AutoEncoder.patch_volume_module import mpr_grid
from tests.AutoEncoder.conftest import tiny_config


class _Volumes(Dataset):
    def __init__(self, n: int = 4, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        base = torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, 4, generator=g), size=(size,) * 3, mode="trilinear")
        self.x = base * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"ct": self.x[i], "subject_id": f"s{i}"}


def _loader() -> DataLoader:
    return DataLoader(_Volumes(), batch_size=2)


def _trainer(tmp_path: Path, max_steps: int, **kw: Any) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


LOSS = {"perceptual_weight": 0.1, "gan_weight": 0.5, "discriminator_iter_start": 0,
        "discriminator": {"channels": 4, "num_layers": 2}}


class _GradCheck(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor | None] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters() if p.requires_grad}


def test_one_training_step_has_finite_gradients(tmp_path: Path, medicalnet_weights: Path) -> None:
    torch.manual_seed(0)
    module = PatchVolumeModule(tiny_config(4), loss={**LOSS, "perceptual": {"weights_path": str(medicalnet_weights)}})
    check = _GradCheck()
    _trainer(tmp_path, max_steps=2, callbacks=[check], enable_checkpointing=False).fit(module, _loader())
    assert int(module.iteration) == 1  # G and D both stepped in one training_step (2 optimiser steps)
    ae = {n: g for n, g in check.grads.items() if n.startswith("autoencoder.")}
    disc = {n: g for n, g in check.grads.items() if n.startswith("discriminator.")}
    assert ae and disc
    assert all(g is not None and torch.isfinite(g).all() for g in ae.values())
    assert all(g is not None and torch.isfinite(g).all() for g in disc.values())
    assert not any(n.startswith("perceptual.") for n in check.grads)  # frozen feature network


def _train_stage1(tmp_path: Path, steps: int = 2) -> tuple[PatchVolumeModule, Path]:
    torch.manual_seed(0)
    module = PatchVolumeModule(tiny_config(4), loss={"perceptual_weight": 0.0, "gan_weight": 0.0})
    trainer = _trainer(tmp_path, max_steps=steps, enable_checkpointing=False)
    trainer.fit(module, _loader())
    path = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(path)
    return module, path


def test_checkpoint_keeps_codebook_and_resume_does_not_reinitialise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, path = _train_stage1(tmp_path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain data
    assert isinstance(ckpt["hyper_parameters"]["autoencoder"], dict)
    assert bool(ckpt["state_dict"]["autoencoder.quantizer.initialised"])
    saved_codebook = module.autoencoder.quantizer.embedding.clone()

    def _fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("codebook re-initialised on resume")

    monkeypatch.setattr(VectorQuantizer, "_initialise", _fail)
    resumed = PatchVolumeModule(tiny_config(4), loss={"perceptual_weight": 0.0, "gan_weight": 0.0})
    seen: list[torch.Tensor] = []

    class _Spy(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, m: L.LightningModule, *args: Any) -> None:
            seen.append(m.autoencoder.quantizer.embedding.clone())

    trainer = _trainer(tmp_path, max_steps=4, callbacks=[_Spy()], enable_checkpointing=False)
    trainer.fit(resumed, _loader(), ckpt_path=str(path))
    assert torch.equal(seen[0], saved_codebook)
    assert trainer.global_step == 4 and int(resumed.iteration) == 4


def test_load_autoencoder_rebuilds_a_frozen_eval_model(tmp_path: Path) -> None:
    module, path = _train_stage1(tmp_path)
    loaded = load_autoencoder(path)
    model = loaded.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = _Volumes()[0]["ct"][None]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).reconstruction, module.autoencoder(x).reconstruction)
    assert torch.equal(model.quantizer.embedding, module.autoencoder.quantizer.embedding)
    assert loaded.config == module.hparams["autoencoder"] and loaded.path == path
    # the fingerprint names these weights: stable across loads, different after one weight changes
    assert loaded.fingerprint == load_autoencoder(path).fingerprint
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["autoencoder.decoder.conv_out.bias"] += 1e-3
    torch.save(ckpt, tmp_path / "changed.ckpt")
    assert load_autoencoder(tmp_path / "changed.ckpt").fingerprint != loaded.fingerprint
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_autoencoder(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, bad)
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load_autoencoder(bad)
    (tmp_path / "junk.ckpt").write_text("hello")
    with pytest.raises(ValueError, match="junk.ckpt: not a checkpoint or torch file"):
        load_autoencoder(tmp_path / "junk.ckpt")
    del ckpt["state_dict"]["autoencoder.decoder.conv_out.bias"]
    torch.save(ckpt, tmp_path / "incompatible.ckpt")
    with pytest.raises(ValueError, match=r"incompatible: .*1 missing \(e.g. decoder.conv_out.bias\)"):
        load_autoencoder(tmp_path / "incompatible.ckpt")


def test_stage2_freezes_encoder_and_codebook(tmp_path: Path) -> None:
    _, path = _train_stage1(tmp_path)
    with pytest.raises(ValueError, match="stage1_checkpoint"):
        PatchVolumeModule(tiny_config(4), stage=2)
    with pytest.raises(ValueError, match="incompatible: its weights do not fit the autoencoder config of this run"):
        PatchVolumeModule(tiny_config(8), loss={"perceptual_weight": 0.0, "gan_weight": 0.0}, stage=2, stage1_checkpoint=str(path))
    module = PatchVolumeModule(tiny_config(4), loss={"perceptual_weight": 0.0, "gan_weight": 0.0}, stage=2, stage1_checkpoint=str(path))
    frozen = {k: v.clone() for k, v in module.autoencoder.state_dict().items() if k.startswith(("encoder.", "quantizer."))}
    decoder = {k: v.clone() for k, v in module.autoencoder.state_dict().items() if k.startswith("decoder.")}
    modes: list[tuple[bool, bool, bool]] = []

    class _Modes(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, m: L.LightningModule, *args: Any) -> None:
            ae = m.autoencoder
            modes.append((ae.encoder.training, ae.quantizer.training, ae.decoder.training))

    _trainer(tmp_path, max_steps=2, callbacks=[_Modes()], enable_checkpointing=False).fit(module, _loader())
    state = module.autoencoder.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen.items())  # weights and codebook buffers untouched
    assert any(not torch.equal(v, state[k]) for k, v in decoder.items())  # decoder trained
    assert modes and all(m == (False, False, True) for m in modes)
    assert not any(p.requires_grad for p in module.autoencoder.encoder.parameters())


def test_mpr_grid_layout() -> None:
    vol = torch.zeros(1, 8, 12, 16)
    vol[0, 4] = 1.0  # the middle axial slice is white
    img = mpr_grid(vol)
    assert img.shape == (1, 12, 16 + 16 + 12)
    assert img[0, :12, :16].min() == 1.0 and img.max() <= 1.0 and img.min() >= 0.0


class _StepRecorder(L.Callback):
    """Per batch: did G / D weights change, and does D hold gradients."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, bool, bool, bool]] = []
        self._before: dict[str, torch.Tensor] = {}

    @staticmethod
    def _weights(m: L.LightningModule, prefix: str) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for n, p in m.named_parameters() if n.startswith(prefix)]).clone()

    def on_train_batch_start(self, trainer: L.Trainer, m: L.LightningModule, *args: Any) -> None:
        self._before = {k: self._weights(m, k) for k in ("autoencoder.", "discriminator.")}

    def on_train_batch_end(self, trainer: L.Trainer, m: L.LightningModule, *args: Any) -> None:
        g_moved = not torch.equal(self._before["autoencoder."], self._weights(m, "autoencoder."))
        d_moved = not torch.equal(self._before["discriminator."], self._weights(m, "discriminator."))
        d_grads = any(p.grad is not None for p in m.discriminator.parameters())
        self.rows.append((int(m.iteration) - 1, g_moved, d_moved, d_grads))


@pytest.mark.parametrize("accumulate,expected", [
    # (iteration, G stepped, D stepped, D has gradients); GAN from iteration 3
    (1, [(0, True, False, False), (1, True, False, False), (2, True, False, False),
         (3, True, True, True), (4, True, True, True)]),
    # windows (0, 1), (2, 3), (4, 5): iteration 3 is past the start but mid-window, so D waits for window (4, 5)
    (2, [(0, False, False, False), (1, True, False, False), (2, False, False, False), (3, True, False, False),
         (4, False, False, True), (5, True, True, True)]),
])
def test_gan_switches_on_at_discriminator_iter_start(tmp_path: Path, accumulate: int, expected: list) -> None:
    torch.manual_seed(0)
    loss = {"perceptual_weight": 0.0, "gan_weight": 0.5, "discriminator_iter_start": 3,
            "discriminator": {"channels": 4, "num_layers": 2}}
    module = PatchVolumeModule(tiny_config(4, num_groups=2), loss=loss, accumulate_grad_batches=accumulate)
    rec = _StepRecorder()
    g_steps = sum(g for _, g, _, _ in expected)
    d_steps = sum(d for _, _, d, _ in expected)
    trainer = _trainer(tmp_path, max_steps=g_steps + d_steps, callbacks=[rec], enable_checkpointing=False)
    trainer.fit(module, _loader())
    assert rec.rows == expected
    assert trainer.global_step == g_steps + d_steps  # Lightning counts G and D optimiser steps alike


def test_learning_rate_schedule_warms_up_then_follows_a_half_cosine_to_its_floor() -> None:
    off = {"perceptual_weight": 0.0, "gan_weight": 0.0}
    module = PatchVolumeModule(tiny_config(4), loss=off, lr_warmup_steps=10, lr_decay_steps=110, lr_min_ratio=0.1)
    assert [module.lr_factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert module.lr_factor(10) == pytest.approx(1.0)
    assert module.lr_factor(60) == pytest.approx(0.55)  # half way through the cosine: (1 + floor) / 2
    assert module.lr_factor(110) == pytest.approx(0.1) and module.lr_factor(500) == pytest.approx(0.1)
    # a run shorter than the warm-up keeps the shape: at most half of it warms up
    short = PatchVolumeModule(tiny_config(4), loss=off, lr_warmup_steps=20, lr_decay_steps=8, lr_min_ratio=0.0)
    assert short.lr_factor(3) == pytest.approx(1.0) and short.lr_factor(8) == pytest.approx(0.0)
    assert PatchVolumeModule(tiny_config(4), loss=off).configure_optimizers().__class__ is list  # no scheduler
    with pytest.raises(ValueError, match="non-negative"):
        PatchVolumeModule(tiny_config(4), loss=off, lr_decay_steps=-1)
    with pytest.raises(ValueError, match="lr_min_ratio"):
        PatchVolumeModule(tiny_config(4), loss=off, lr_min_ratio=1.5)


def test_learning_rate_schedule_is_stepped_by_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PatchVolumeModule(tiny_config(4), loss={"perceptual_weight": 0.0, "gan_weight": 0.0},
                               optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), lr_warmup_steps=2,
                               lr_decay_steps=6, lr_min_ratio=0.25)
    seen: list[float] = []

    class _Lr(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, m: L.LightningModule, *args: Any) -> None:
            seen.append(m.optimizers().param_groups[0]["lr"])

    _trainer(tmp_path, max_steps=7, callbacks=[_Lr()], enable_checkpointing=False).fit(module, _loader())
    assert seen == pytest.approx([1e-3 * module.lr_factor(s) for s in range(7)])
    assert seen[0] == pytest.approx(5e-4) and seen[-1] == pytest.approx(2.5e-4)
