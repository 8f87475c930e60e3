"""--adapter in the generation CLIs: the LoRA adapter changes the volumes, misfit adapters exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import BiFlowNetModule
from evaluation import class_conditional_generation, generate_ct
from evaluation.generation import CTGenerator
from tests.evaluation.test_generate_ct import PROCESS, checkpoints, load, pair, run_cli  # noqa: F401

# the random-weight bases barely use their inputs, so the adapter also reaches the output convolution
LORA = {"rank": 2, "alpha": 2.0, "target_modules": [r"dit\.(in|mid|out)_blocks\.\d+\.mlp\.fc[12]",
                                                    r"xray\.encoder\.blocks\.\d+\.mlp\.fc[12]",
                                                    r"unet\.(down|up)\.\d+\.res[12]\.conv[12]\.conv", r"unet\.out_conv"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """A LoRA adapter (random, clearly non-zero updates) for the X-ray and the class-conditional base."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name in ("xray", "class"):
        net = torch.load(checkpoints[name], weights_only=True)["hyper_parameters"]["network"]
        module = BiFlowNetModule(net, PROCESS, init_from=str(checkpoints[name]), lora=LORA)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for n, p in module.ema_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out[name] = module.save_adapter(str(root / name))
    return out


def test_generate_ct_with_adapter_differs_from_the_base_with_the_same_seed(checkpoints, adapters, pair,  # noqa: F811
                                                                           tmp_path, capsys) -> None:
    ap, lat, _ = pair
    common = ["--checkpoint", checkpoints["xray"], "--ap", ap, "--lat", lat, "--num-inference-steps", 2, "--seed", 5]
    runs = {"base": [], "adapted": ["--adapter", adapters["xray"]], "again": ["--adapter", adapters["xray"]]}
    for name, extra in runs.items():
        code, err = run_cli(generate_ct, [*common, *extra, "--output", tmp_path / f"{name}.nii.gz"], capsys)
        assert code == 0, err
    base, adapted, again = (load(tmp_path / f"{n}.nii.gz")[0] for n in runs)
    assert base.shape == adapted.shape
    assert not np.allclose(base, adapted, atol=1.0)  # same noise, different (adapted) network
    assert np.array_equal(adapted, again)  # and the adapted generation is reproducible


def test_adapter_is_merged_and_matches_the_unmerged_network(checkpoints, adapters) -> None:  # noqa: F811
    gen = CTGenerator.from_checkpoints(checkpoints["xray"], device="cpu", adapter=adapters["xray"])
    assert not any("lora_" in n for n, _ in gen.biflownet.model.named_parameters())  # merged for speed
    from ddpm import load_biflownet

    unmerged = load_biflownet(checkpoints["xray"], adapter=adapters["xray"], merge_adapter=False).model
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, 8, generator=g), torch.tensor([40])
    ap = torch.rand(1, 1, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(gen.biflownet.model(x, t, ap=ap, lat=ap), unmerged(x, t, ap=ap, lat=ap),
                                   rtol=1e-4, atol=1e-5)


def test_class_conditional_generation_with_adapter(checkpoints, adapters, tmp_path, capsys) -> None:  # noqa: F811
    common = ["--checkpoint", checkpoints["class"], "--num-volumes", 1, "--label", 1, "--num-inference-steps", 2]
    assert run_cli(class_conditional_generation, [*common, "--output-dir", tmp_path / "base"], capsys)[0] == 0
    code, err = run_cli(class_conditional_generation, [*common, "--adapter", adapters["class"],
                                                       "--output-dir", tmp_path / "adapted"], capsys)
    assert code == 0, err
    base, adapted = (load(tmp_path / d / "class1_0000.nii.gz")[0] for d in ("base", "adapted"))
    assert not np.allclose(base, adapted, atol=1.0)


def test_adapter_that_does_not_fit_exits_2_naming_it(checkpoints, adapters, pair, tmp_path, capsys) -> None:  # noqa: F811
    ap, lat, _ = pair
    out = tmp_path / "ct.nii.gz"
    # an adapter trained on another architecture
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--adapter", adapters["class"],
                                      "--ap", ap, "--lat", lat, "--output", out], capsys)
    assert code == 2 and f"adapter {adapters['class']} does not fit the base model" in err
    assert "different network configuration" in err and not out.exists()
    # the same architecture, but base weights other than the ones the adapter was trained on
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(checkpoints["xray"], weights_only=True)
    ckpt["state_dict"]["ema_model.dit.embed.weight"] += 0.01
    torch.save(ckpt, other)
    code, err = run_cli(class_conditional_generation, ["--checkpoint", other, "--adapter", adapters["xray"],
                                                       "--output-dir", tmp_path / "gen"], capsys)
    assert code == 2 and "fingerprint" in err and str(checkpoints["xray"].resolve()) in err
    code, err = run_cli(generate_ct, ["--checkpoint", checkpoints["xray"], "--adapter", tmp_path / "missing",
                                      "--ap", ap, "--lat", lat, "--output", out], capsys)
    assert code == 2 and "missing: no such folder; expected a LoRA adapter folder" in err and err.count("\n") == 1
