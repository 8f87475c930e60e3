"""LoRA fine-tuning of a trained BiFlowNet with peft: wrap, count, fingerprint, save and load adapters.

A BiFlowNet (with its X-ray encoder) is adapted to a new site by training low-rank adapters on chosen
``nn.Linear`` / ``nn.Conv3d`` layers while every base weight stays frozen. An adapter folder holds
what ``peft`` writes (``adapter_config.json``, ``adapter_model.safetensors``) plus
``biflownet_adapter.json``: the base checkpoint it was trained on, a fingerprint of the base weights,
the network configuration and the signature of every adapted layer, so an adapter is refused by a base
it does not fit. The adapter also carries the projection of the site it was trained on (grids, default
DRR geometry and latent spacing in ``projection_grids.safetensors``, X-ray-conditioned models only).

Target modules are regular expressions matched (``re.fullmatch``) against module names of the plain
BiFlowNet, e.g. ``dit.in_blocks.0.attn.qkv`` or ``xray.encoder.blocks.0.mlp.fc1``; they are resolved to the
exact list of layer names before peft sees them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from dataset.checkpoint import ADAPTER_MARKER, check_adapter_dir, read_safetensors

ADAPTER_META = ADAPTER_MARKER
ADAPTER_GRIDS = "projection_grids.safetensors"
ADAPTER_FORMAT = "biflownet-lora"
SUPPORTED_LAYERS = (nn.Linear, nn.Conv3d, nn.Conv2d)
# network settings that change how the network runs, not its weights; they may differ from the base
RUNTIME_KEYS = ("grad_checkpointing",)

# attention and MLP linears of every DiT block (self-attention, cross-attention) and X-ray encoder block
DEFAULT_TARGETS = (
    r"dit\.(in|mid|out)_blocks\.\d+\.(attn\.(qkv|proj)|cross\.(q|kv|proj)|mlp\.fc[12])",
    r"xray\.encoder\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
)


@dataclass(frozen=True)
class LoraSettings:
    """Which layers get adapters and how big they are.

    Attributes:
        rank: LoRA rank r (columns of A / rows of B).
        alpha: scaling numerator; the update is ``(alpha / rank) * B @ A``.
        dropout: dropout on the adapter input during training.
        target_modules: regular expressions, each must fully match at least one Linear/Conv layer name.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ValueError(f"lora.rank={self.rank} must be >= 1")
        if float(self.alpha) <= 0:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must lie in [0, 1)")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"lora.target_modules={self.target_modules!r} must be a non-empty list of patterns")
        for p in self.target_modules:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"lora.target_modules pattern {p!r} is not a regular expression: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraSettings":
        """Build from a plain dict (config / checkpoint), refusing unknown keys."""
        known = {"rank", "alpha", "dropout", "target_modules"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRA setting(s) {unknown}; expected keys {sorted(known)}")
        kw = dict(d)
        if "target_modules" in kw and not isinstance(kw["target_modules"], str):
            kw["target_modules"] = tuple(str(p) for p in kw["target_modules"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, numbers) for checkpoints and JSON."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def _signature(module: nn.Module) -> list:
    """Type and shape of a layer, e.g. ["Linear", 16, 48] or ["Conv3d", 8, 8, [3, 3, 3], [1, 1, 1]]."""
    if isinstance(module, nn.Linear):
        return ["Linear", module.in_features, module.out_features]
    return [type(module).__name__, module.in_channels, module.out_channels, list(module.kernel_size),
            list(module.stride)]


def resolve_target_modules(model: nn.Module, patterns: Sequence[str]) -> dict[str, list]:
    """Names (and signatures) of the layers the patterns select.

    Args:
        model: plain BiFlowNet (not yet wrapped).
        patterns: regular expressions fully matched against module names.

    Returns:
        {module name: signature}, in module order.

    Raises:
        ValueError: the patterns select no supported layer (Linear, Conv2d, Conv3d); a single pattern
            that selects nothing only warns.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)}
    chosen: dict[str, list] = {}
    unused = []
    for p in patterns:
        hits = [n for n in layers if re.fullmatch(p, n)]
        if not hits:
            unused.append(p)
        for n in hits:
            chosen[n] = _signature(layers[n])
    if not chosen:
        raise ValueError(f"lora.target_modules patterns {list(patterns)} match no Linear/Conv layer of the network "
                         f"(layer names look like {list(layers)[:4]})")
    if unused:
        # a preset may name parts this network lacks (e.g. the X-ray encoder of a class-only model)
        warnings.warn(f"lora.target_modules patterns {unused} match no layer of this network", stacklevel=2)
    return {n: chosen[n] for n in layers if n in chosen}


def apply_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap a BiFlowNet with fresh LoRA adapters; only adapter weights remain trainable.

    Args:
        model: plain BiFlowNet carrying the base weights (changed in place by peft).
        settings: rank, alpha, dropout, target patterns.

    Returns:
        The peft model; calling it runs the BiFlowNet with adapters (initially the identity change).
    """
    targets = resolve_target_modules(model, settings.target_modules)
    config = LoraConfig(
        r=int(settings.rank),
        lora_alpha=float(settings.alpha),
        lora_dropout=float(settings.dropout),
        # exact names: peft full-matches a string pattern, so the saved config lists precisely these layers
        target_modules="(" + "|".join(re.escape(n) for n in targets) + ")",
        bias="none",
    )
    return get_peft_model(model, config)


_PEFT_PREFIX = "base_model.model."


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base (non-adapter) parameters under their plain BiFlowNet names, for a plain or wrapped model."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        out[name] = p
    return out


def weights_fingerprint(params: dict[str, torch.Tensor] | nn.Module) -> str:
    """SHA-256 over names, shapes and float32 values of the base parameters (buffers excluded).

    Buffers are left out on purpose: projection grids follow the site's DRR geometry, not the weights.
    """
    if isinstance(params, nn.Module):
        params = base_parameters(params)
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _adapted_layers(model: PeftModel) -> dict[str, list]:
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            out[name.removeprefix(_PEFT_PREFIX)] = _signature(m.base_layer)
    return out


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an older one (rename is atomic per step)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(
    model: PeftModel,
    adapter_dir: str | os.PathLike,
    *,
    base_checkpoint: str | os.PathLike,
    network: dict,
    settings: LoraSettings,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter folder atomically (temp folder in the same parent, then rename).

    Args:
        model: the peft-wrapped BiFlowNet whose adapter weights are saved (usually the EMA copy).
        adapter_dir: destination folder (replaced if it exists).
        base_checkpoint: checkpoint of the base weights the adapter was trained on.
        network: BiFlowNet keyword arguments of the base.
        settings: the LoRA settings used.
        step: training step the adapter comes from.
        extra: more JSON-serialisable facts to record (the training module adds its parameter counts).

    Returns:
        The adapter folder.
    """
    target = Path(adapter_dir).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        meta = {
            "format": ADAPTER_FORMAT,
            "version": 1,
            "base_checkpoint": str(Path(base_checkpoint).resolve()),
            "base_fingerprint": weights_fingerprint(model),
            "network": network,
            "lora": settings.to_dict(),
            "target_modules": _adapted_layers(model),
            "step": int(step),
            **(extra or {}),
        }
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        net = model.get_base_model()
        if getattr(net, "xray", None) is not None:
            save_file(net.xray.projection_state(), str(tmp / ADAPTER_GRIDS))
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``biflownet_adapter.json`` of an adapter folder.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: the folder is not a BiFlowNet LoRA adapter.
    """
    d = check_adapter_dir(adapter_dir)
    for name in (ADAPTER_META, "adapter_config.json", "adapter_model.safetensors"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d}: adapter folder has no {name}; expected a folder written by train_BiFlowNet "
                                    "with lora enabled")
    try:
        meta = json.loads((d / ADAPTER_META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / ADAPTER_META}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{d}: not a BiFlowNet LoRA adapter ({ADAPTER_META} has no format {ADAPTER_FORMAT!r})")
    return meta


def network_differences(ours: dict, base: dict, names: tuple[str, str] = ("adapter", "base")) -> list[str]:
    """Architecture settings in which two BiFlowNet configurations differ (runtime-only keys ignored)."""
    keys = sorted((set(ours) | set(base)) - set(RUNTIME_KEYS))
    return [f"{k}: {names[0]} {ours.get(k)!r} vs {names[1]} {base.get(k)!r}" for k in keys if ours.get(k) != base.get(k)]


def check_adapter_fits(model: nn.Module, adapter_dir: str | os.PathLike, network: dict | None = None) -> dict:
    """Raise ``ValueError`` naming the adapter and what does not fit, else return its metadata.

    Checks, in order: the network configuration (when ``network`` is given), every adapted layer
    exists in ``model`` with the same type and shape, and the fingerprint of the base weights.

    Args:
        model: plain BiFlowNet holding the base weights (not yet wrapped).
        adapter_dir: adapter folder.
        network: the base's BiFlowNet keyword arguments, if known.
    """
    d = Path(adapter_dir)
    meta = read_adapter_meta(d)
    if network is not None:
        diff = network_differences(meta.get("network") or {}, dict(network))
        if diff:
            raise ValueError(f"adapter {d} does not fit the base model: different network configuration "
                             f"({'; '.join(diff[:5])})")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)}
    problems = []
    for name, sig in meta.get("target_modules", {}).items():
        if name not in layers:
            problems.append(f"layer {name!r} does not exist in the base")
        elif _signature(layers[name]) != sig:
            problems.append(f"layer {name!r} is {sig} in the adapter but {_signature(layers[name])} in the base")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"adapter {d} does not fit the base model: {'; '.join(problems[:5])}{more}")
    fp = weights_fingerprint(model)
    if fp != meta.get("base_fingerprint"):
        raise ValueError(f"adapter {d} does not fit the base model: it was trained on the weights of "
                         f"{meta.get('base_checkpoint')} (fingerprint {str(meta.get('base_fingerprint'))[:12]}), "
                         f"but the base given has fingerprint {fp[:12]}")
    return meta


def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike, network: dict | None = None, merge: bool = False
) -> nn.Module:
    """Apply a saved adapter to a base BiFlowNet after checking that it fits.

    Args:
        model: plain BiFlowNet with the base weights (EMA weights of the base checkpoint); peft adds the
            adapter layers to it in place, so do not keep using it as the base afterwards.
        adapter_dir: folder written by :func:`save_adapter`.
        network: the base's BiFlowNet keyword arguments, to compare with the adapter's.
        merge: fold the adapter into the base weights (plain BiFlowNet back, faster sampling) instead
            of keeping separate adapter layers (a ``PeftModel``).

    Returns:
        An eval-mode model without gradients, computing the adapted network; the adapter's projection
        grids (site geometry) replace the base's when it carries them.

    Raises:
        FileNotFoundError: the adapter folder or one of its files is missing.
        ValueError: the adapter does not fit the base (network, layer shapes or base fingerprint).
    """
    d = Path(adapter_dir)
    check_adapter_fits(model, d, network)
    saved = read_safetensors(d / "adapter_model.safetensors", "LoRA adapter weights file")
    try:
        wrapped = PeftModel.from_pretrained(model, str(d), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"adapter {d} does not fit the base model: {e}") from None
    live = get_peft_model_state_dict(wrapped)
    unmatched = sorted(set(saved) ^ set(live)) + [k for k in saved if k in live and saved[k].shape != live[k].shape]
    if unmatched:
        raise ValueError(f"adapter {d} does not fit the base model: adapter weights {unmatched[:3]} have no matching layer")
    if (d / ADAPTER_GRIDS).is_file() and getattr(model, "xray", None) is not None:
        model.xray.load_projection_state(read_safetensors(d / ADAPTER_GRIDS, "adapter projection grids file"))
    out: nn.Module = wrapped.merge_and_unload() if merge else wrapped
    return out.eval().requires_grad_(False)


def describe_counts(trainable: int, total: int) -> str:
    """One line such as ``LoRA: 12,288 trainable of 1,234,567 parameters (1.00%)``."""
    return f"LoRA: {trainable:,} trainable of {total:,} parameters ({100.0 * trainable / max(total, 1):.2f}%)"


def iter_adapter_parameters(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) of the adapter weights of a wrapped model."""
    return ((n, p) for n, p in model.named_parameters() if "lora_" in n)


__all__ = [
    "ADAPTER_META",
    "DEFAULT_TARGETS",
    "LoraSettings",
    "apply_lora",
    "base_parameters",
    "check_adapter_fits",
    "describe_counts",
    "iter_adapter_parameters",
    "load_adapter",
    "network_differences",
    "read_adapter_meta",
    "resolve_target_modules",
    "save_adapter",
    "weights_fingerprint",
]
