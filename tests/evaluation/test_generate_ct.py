"""generate_ct / class_conditional_generation CLIs on tiny checkpoints made here from the real modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from AutoEncoder import PatchVolumeModule
from dataset import DatasetInfo, IntensityReference, Manifest
from ddpm import BiFlowNetModule
from evaluation import class_conditional_generation, generate_ct
from evaluation.generation import CTGenerator

AE_CONFIG = {
    "in_channels": 1, "channels": [8, 8, 8], "embedding_dim": 4, "n_codes": 32, "num_res_blocks": 1,
    "attention_heads": 1, "num_groups": 4, "patch_size": 16, "encode_chunk_size": 4,
    "codebook": {"decay": 0.9, "dead_threshold": 0.01},
}


def network(**overrides) -> dict:
    cfg = {"in_channels": 4, "latent_shape": [8, 8, 8], "model_channels": 8, "channel_mults": [1, 1, 2],
           "attn_levels": [2], "norm_groups": 4, "sub_volume": 4, "token_patch": 2, "dit_heads": 2,
           "mlp_ratio": 2.0, "num_mid_dit": 1, "num_classes": 0,
           "xray": {"image_size": [32, 32], "patch_size": 8, "dim": 16, "depth": 1, "num_heads": 2},
           "cross_attention": "footprint", "back_projection": True, "backproj_channels": 4}
    cfg.update(overrides)
    return cfg


PROCESS = {"process": "ddpm", "target": "v", "num_train_timesteps": 100, "sampler": "ddim", "num_inference_steps": 3}


def save_module(module, path: Path) -> Path:
    """What Lightning writes, minus trainer state: the state dict and the plain hyper-parameters."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tiny_prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gen_ckpts")
    info = DatasetInfo.load(tiny_prepared_dataset.parent).to_dict()
    ae = PatchVolumeModule(AE_CONFIG, loss={"perceptual_weight": 0.0}, dataset_info=info)
    ae_path = save_module(ae, root / "ae.ckpt")
    stats = {"mean": 0.0, "std": 1.0, "ae_checkpoint": str(ae_path)}
    paths = {"ae": ae_path}
    xray_stats = IntensityReference.from_manifest(tiny_prepared_dataset).to_dict()
    for name, net in {"xray": network(), "class": network(xray=None, cross_attention="none",
                                                           back_projection=False, num_classes=2)}.items():
        module = BiFlowNetModule(net, PROCESS, latent_stats=stats,
                                 dataset_json=str(tiny_prepared_dataset.parent / "dataset.json"),
                                 xray_stats=xray_stats if net["xray"] else None)
        module.setup("fit")  # cone-beam grids from dataset.json
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # random weights: the zero-initialised conditioning paths become active
            for p in module.ema_model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        paths[name] = save_module(module, root / f"biflownet_{name}.ckpt")
    return paths


@pytest.fixture(scope="module")
def pair(tiny_prepared_dataset: Path) -> tuple[Path, Path, str]:
    row = next(Manifest.load(tiny_prepared_dataset).split("test").itertuples())
    return Path(row.ap), Path(row.lat), row.subject_id


def run_cli(module, args: list, capsys) -> tuple[int, str]:
    code = module.main([str(a) for a in args])
    return code, capsys.readouterr().err


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def test_one_pair_writes_hu_nifti_with_training_spacing(checkpoints, pair, tiny_prepared_dataset, tmp_path, capsys):
    ap, lat, _ = pair
    out = tmp_path / "ct.nii.gz"
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat,
                                      "--output", out, "--num-inference-steps", 2], capsys)
    assert code == 0, err
    data, affine = load(out)
    info = DatasetInfo.load(tiny_prepared_dataset.parent)
    assert data.shape == tuple(info.shape)
    assert np.allclose(sorted(np.abs(np.diag(affine)[:3])), sorted(info.spacing))
    # one world frame: the generated CT overlays the prepared reference (same affine)
    reference = Manifest.load(tiny_prepared_dataset).frame.iloc[0]["ct"]
    assert np.allclose(affine, load(Path(reference))[1], atol=1e-4)
    assert info.window.hu_min - 1e-3 <= data.min() and data.max() <= info.window.hu_max + 1e-3
    assert data.std() > 0  # a decoded volume, not a constant


def test_same_seed_same_volume_other_xrays_other_volume(checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    base = ["--checkpoint", checkpoints["xray"], "--num-inference-steps", 2, "--seed", 3]
    for name, (a, b) in {"a": (ap, lat), "b": (ap, lat), "c": (lat, ap)}.items():
        assert run_cli(generate_ct, base + ["--ap", a, "--lat", b, "--output", tmp_path / f"{name}.nii.gz"], capsys)[0] == 0
    a, b, c = (load(tmp_path / f"{n}.nii.gz")[0] for n in "abc")
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)  # swapping the views changes the condition and so the output


def test_num_samples_writes_mean_std_and_samples(checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    out = tmp_path / "ct.nii.gz"
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat, "--output", out,
                                      "--num-samples", 3, "--num-inference-steps", 2], capsys)
    assert code == 0, err
    samples = np.stack([load(tmp_path / f"ct_sample{k}.nii.gz")[0] for k in range(3)])
    mean, std = load(out)[0], load(tmp_path / "ct_std.nii.gz")[0]
    assert np.allclose(mean, samples.mean(0), atol=1e-2)
    assert np.allclose(std, samples.std(0, ddof=1), atol=1e-2)
    assert std.max() > 0  # independent noise gives different samples


def test_batch_mode_over_manifest_split(checkpoints, tiny_prepared_dataset, tmp_path, capsys):
    out = tmp_path / "gen"
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--manifest", tiny_prepared_dataset,
                                      "--split", "test", "--output-dir", out, "--num-inference-steps", 1,
                                      "--no-progress"], capsys)
    assert code == 0, err
    ids = list(Manifest.load(tiny_prepared_dataset).split("test").subject_id)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.nii.gz" for i in ids] + [f"{i}.json" for i in ids])
    side = json.loads((out / f"{ids[0]}.json").read_text())  # the prepared dataset's geometry was used
    assert any("geometry of the prepared dataset" in step for step in side["steps"])
    assert side["harmonization"] == "none"  # the default: intensities as read
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--manifest", tiny_prepared_dataset,
                                      "--split", "test", "--output-dir", out, "--num-inference-steps", 1,
                                      "--no-progress", "--overwrite", "--harmonize", "auto"], capsys)
    assert code == 0, err
    assert json.loads((out / f"{ids[0]}.json").read_text())["harmonization"] == "matched to the training X-ray statistics"


def test_existing_output_refused_unless_overwrite(checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    out = tmp_path / "ct.nii.gz"
    out.write_bytes(b"keep me")
    args = ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat, "--output", out, "--num-inference-steps", 1]
    code, err = run_cli(generate_ct, args, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    assert run_cli(generate_ct, args + ["--overwrite"], capsys)[0] == 0
    assert load(out)[0].ndim == 3


def bad_xray(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "small":
        torch.save(torch.rand(1, 16, 16), path)
    elif kind == "stack":
        torch.save(torch.rand(2, 32, 32), path)
    elif kind == "nan":
        x = torch.rand(1, 32, 32)
        x[0, 3, 3] = float("nan")
        torch.save(x, path)
    elif kind == "corrupt":
        path.write_bytes(b"not a tensor")
    elif kind != "missing":
        from tests.dataset.test_radiograph import bad_dicom

        return bad_dicom(tmp_path, kind)
    return path


@pytest.mark.parametrize("kind,message", [
    ("stack", "expected (H, W) or (1, H, W)"), ("nan", "NaN"), ("corrupt", "not a checkpoint or torch file"),
    ("missing", "no such file"), ("colour", "is a colour DICOM image"), ("multiframe", "is a multi-frame DICOM"),
    ("nonimage", "is a non-image DICOM object"), ("nopixels", "has no pixel data"), ("ct", "is a CT slice"),
    ("spacing0", "Imager Pixel Spacing [0.0, 0.1] is invalid"), ("spacingnan", "Imager Pixel Spacing [nan, 0.1] is invalid")])
def test_bad_xray_is_one_clear_error_and_nothing_written(kind, message, checkpoints, pair, tmp_path, capsys):
    ap, _, _ = pair
    out = tmp_path / "ct.nii.gz"
    preview = tmp_path / "preview.png"
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", bad_xray(tmp_path, kind),
                                      "--output", out, "--preview", preview], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not preview.exists() and not (tmp_path / "ct.json").exists()


@pytest.mark.parametrize("spacing", ["0", "nan", "-1"])
def test_bad_pixel_spacing_option_is_refused(spacing, checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    with pytest.raises(SystemExit) as exit_info:
        run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat,
                              "--output", tmp_path / "ct.nii.gz", "--pixel-spacing", spacing], capsys)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--pixel-spacing" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_xrays_of_another_size_are_fitted_with_a_warning(checkpoints, tmp_path, capsys):
    small = bad_xray(tmp_path, "small")
    other = tmp_path / "small_lat.pt"
    torch.save(torch.load(small).flip(-1), other)  # a second view of the same size
    code = generate_ct.main([str(a) for a in ["--checkpoint", checkpoints["xray"], "--ap", small, "--lat", other,
                                              "--output", tmp_path / "ct.nii.gz", "--num-inference-steps", 1]])
    out = capsys.readouterr().out
    assert code == 0
    assert "AP: warning: no pixel spacing: fitted 16 x 16 pixels into the 32 x 32 detector" in out


def test_autoencoder_checkpoint_as_model_is_refused(checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["ae"], "--ap", ap, "--lat", lat,
                                      "--output", tmp_path / "ct.nii.gz"], capsys)
    assert code == 2 and "is an autoencoder checkpoint; expected a biflownet checkpoint" in err


def test_autoencoder_of_other_latent_space_is_refused(checkpoints, tiny_prepared_dataset, tmp_path):
    info = DatasetInfo.load(tiny_prepared_dataset.parent).to_dict()
    other = save_module(PatchVolumeModule({**AE_CONFIG, "embedding_dim": 2}, loss={"perceptual_weight": 0.0},
                                          dataset_info=info), tmp_path / "other_ae.ckpt")
    with pytest.raises(ValueError, match="latent channels"):
        CTGenerator.from_checkpoints(checkpoints["xray"], other, device="cpu")


def test_recorded_autoencoder_is_found(checkpoints):
    gen = CTGenerator.from_checkpoints(checkpoints["xray"], device="cpu")
    assert gen.needs_xrays and gen.autoencoder.latent_channels == 4


def test_class_conditional_generation_by_label(checkpoints, tmp_path, capsys):
    out = tmp_path / "samples"
    code, err = run_cli(class_conditional_generation, ["--checkpoint", checkpoints["class"], "--output-dir", out,
                                                       "--num-volumes", 2, "--all-labels", "--num-inference-steps", 2],
                        capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["class0_0000.nii.gz", "class0_0001.nii.gz", "class1_0000.nii.gz", "class1_0001.nii.gz"]
    c0, c1 = load(out / "class0_0000.nii.gz")[0], load(out / "class1_0000.nii.gz")[0]
    assert c0.shape == (32, 32, 32) and not np.allclose(c0, c1)


def test_class_model_needs_a_label(checkpoints, tmp_path, capsys):
    code, err = run_cli(class_conditional_generation, ["--checkpoint", checkpoints["class"], "--output-dir", tmp_path],
                        capsys)
    assert code == 2 and "--label" in err
    assert not any(tmp_path.iterdir())


def test_xray_model_samples_unconditionally(checkpoints, tmp_path, capsys):
    out = tmp_path / "samples"
    code, err = run_cli(class_conditional_generation, ["--checkpoint", checkpoints["xray"], "--output-dir", out,
                                                       "--num-volumes", 1, "--num-inference-steps", 2], capsys)
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == ["sample_0000.nii.gz"]
    code, err = run_cli(class_conditional_generation, ["--checkpoint", checkpoints["xray"], "--output-dir", out,
                                                       "--label", 1], capsys)
    assert code == 2 and "--label 1" in err and "has no class condition" in err


def test_recorded_stats_travel_into_checkpoint(checkpoints):
    hp = torch.load(checkpoints["xray"], weights_only=True)["hyper_parameters"]
    assert json.loads(json.dumps(hp["latent_stats"]))["ae_checkpoint"] == str(checkpoints["ae"])


def test_guidance_scale_two_from_the_command_line(checkpoints, pair, tmp_path, capsys):
    # a model whose unconditional prediction is far from its conditional one (a large learned null condition),
    # so that guidance moves the latents across codebook cells and shows in the decoded volume
    ckpt = torch.load(checkpoints["xray"], weights_only=True)
    for name in ("null_tokens", "null_pooled"):
        ckpt["state_dict"][f"ema_model.xray.encoder.{name}"].fill_(50.0)
    torch.save(ckpt, tmp_path / "strong_null.ckpt")
    ap, lat, _ = pair
    common = ["--checkpoint", tmp_path / "strong_null.ckpt", "--ap", ap, "--lat", lat, "--num-inference-steps", 2,
              "--seed", 5]
    code, err = run_cli(generate_ct, common + ["--output", tmp_path / "plain.nii.gz"], capsys)
    assert code == 0, err
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "evaluation.generate_ct", *map(str, common),
                           "--guidance-scale", "2.0", "--output", str(tmp_path / "guided.nii.gz")],
                          cwd=root, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (plain, affine), (guided, guided_affine) = load(tmp_path / "plain.nii.gz"), load(tmp_path / "guided.nii.gz")
    assert guided.shape == plain.shape and np.allclose(guided_affine, affine)
    assert np.isfinite(guided).all() and guided.std() > 0
    # same seed and noise; only the guidance differs
    assert np.abs(guided - plain).max() > 50.0  # HU
def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("option, value, needle", [
    ("--guidance-scale", "nan", "argument --guidance-scale/--guidance_scale: 'nan' is not a finite number"),
    ("--guidance-scale", "-1", "argument --guidance-scale"),
    ("--num-inference-steps", "0", "argument --num-inference-steps"),
    ("--num-samples", "inf", "argument --num-samples"),
    ("--seed", "1.5", "argument --seed: '1.5' is not an integer"),
])
def test_bad_numbers_are_refused_before_anything_is_written(option, value, needle, checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    out = tmp_path / "o" / "ct.nii.gz"
    with pytest.raises(SystemExit) as e:
        generate_ct.main([str(a) for a in ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat,
                                           "--output", out, option, value]])
    assert e.value.code == 2 and needle in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model, extra, needle", [
    ("xray", ["--label", 99], "--label 99: "),  # a model without classes would ignore it
    ("class", [], "is not conditioned on X-rays"),  # a class-only model would ignore the X-rays
])
def test_options_the_model_would_ignore_are_refused(model, extra, needle, checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    out = tmp_path / "ct.nii.gz"
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints[model], "--ap", ap, "--lat", lat, "--output", out,
                                      "--num-inference-steps", 1, *extra], capsys)
    assert code == 2 and needle in _one_line(err) and not out.exists()


def test_guidance_without_a_condition_is_refused(checkpoints, tmp_path, capsys):
    out = tmp_path / "samples"
    code, err = run_cli(class_conditional_generation, ["--checkpoint", checkpoints["xray"], "--output-dir", out,
                                                       "--guidance-scale", 2, "--num-inference-steps", 1], capsys)
    assert code == 2 and "--guidance-scale 2: nothing to guide towards" in _one_line(err) and not out.exists()
    code, err = run_cli(class_conditional_generation, ["--checkpoint", checkpoints["xray"], "--output-dir", out,
                                                       "--all-labels"], capsys)
    assert code == 2 and "--all-labels" in _one_line(err)


@pytest.mark.parametrize("kind, needle", [("random", "not a checkpoint or torch file"),
                                          ("truncated", "truncated or damaged"), ("payload", "unsafe content"),
                                          ("empty", "is empty"), ("folder", "is a folder")])
def test_broken_checkpoints_are_one_line_and_never_run_code(kind, needle, checkpoints, pair, tmp_path, capsys):
    import os

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.ckpt"
    if kind == "random":
        bad.write_bytes(bytes(range(256)) * 16)
    elif kind == "truncated":
        bad.write_bytes(checkpoints["xray"].read_bytes()[:5000])
    elif kind == "payload":
        torch.save({"state_dict": Payload()}, bad)
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        bad.mkdir()
    ap, lat, _ = pair
    for model_option in ("--checkpoint", "--autoencoder"):
        code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], model_option, bad, "--ap", ap,
                                          "--lat", lat, "--output", tmp_path / "ct.nii.gz"], capsys)
        line = _one_line(err)
        assert code == 2 and str(bad) in line and needle in line
    assert not marker.exists() and not (tmp_path / "ct.nii.gz").exists()


def test_one_file_or_identical_images_for_both_views_are_refused(checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    copy = tmp_path / "copy.pt"
    copy.write_bytes(Path(ap).read_bytes())
    for second, message in ((ap, "given as both the AP and the lateral X-ray"),
                            (copy, "the AP and lateral images are identical")):
        code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", second,
                                          "--output", tmp_path / "ct.nii.gz", "--num-inference-steps", 1], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ct.nii.gz").exists()


@pytest.mark.parametrize("value,message", [("bogus", "--device 'bogus' is invalid; expected cpu, cuda or cuda:N"),
                                           ("meta", "--device 'meta' is invalid"),
                                           ("cuda:7", "--device 'cuda:7'")])
def test_device_is_checked_before_loading(checkpoints, pair, tmp_path, capsys, value, message):
    if value.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    ap, lat, _ = pair
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat, "--output",
                                      tmp_path / "ct.nii.gz", "--num-inference-steps", 1, "--device", value], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unwritable_or_misplaced_outputs_are_refused_before_sampling(checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.nii.gz").mkdir()
    cases = [(tmp_path / "afile" / "ct.nii.gz", "afile is a file, not a folder"),
             (tmp_path / "adir.nii.gz", "is a folder; expected a file name")]
    for output, message in cases:
        code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat, "--output",
                                          output, "--num-inference-steps", 1, "--overwrite"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_non_finite_weights_are_refused_and_nothing_is_written(checkpoints, pair, tmp_path, capsys):
    ap, lat, _ = pair
    ckpt = torch.load(checkpoints["xray"], map_location="cpu", weights_only=False)
    weight = next(k for k, v in ckpt["state_dict"].items() if k.startswith("ema_model.") and v.is_floating_point())
    for name, value, message in ((weight, float("nan"), "holds non-finite weights"),
                                 ("latent_std", float("inf"), "holds non-finite weights"),
                                 ("latent_mean", None, "latent_mean has shape (1,)")):
        broken = {**ckpt, "state_dict": dict(ckpt["state_dict"])}
        old = broken["state_dict"][name]
        broken["state_dict"][name] = torch.full_like(old, value) if value is not None else torch.zeros(1)
        bad = tmp_path / "bad.ckpt"
        torch.save(broken, bad)
        code, err = run_cli(generate_ct, ["--checkpoint", bad, "--ap", ap, "--lat", lat, "--output",
                                          tmp_path / "ct.nii.gz", "--num-inference-steps", 1], capsys)
        assert code == 2 and message in err and str(bad) in err, (name, err)
        assert not (tmp_path / "ct.nii.gz").exists()


def test_non_finite_volumes_are_not_written(tmp_path):
    from evaluation.generate_ct import write_generation

    volumes = torch.zeros(2, 1, 4, 4, 4)
    volumes[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or Inf voxels; nothing written"):
        write_generation(None, volumes, tmp_path / "ct.nii.gz")
    assert not any(tmp_path.iterdir())
