"""Memory of a BiFlowNet training step, counted on PyTorch's ``meta`` device, and ``grad_checkpointing: auto``.

Activation checkpointing (recomputing the DiT and U-Net blocks in backward) trades about 10-25 % of a training
step for memory. Whether a run needs it depends on the preset, the latent size, the per-device batch and the
device, so ``network.grad_checkpointing: auto`` (the base and large presets) decides per run: the step is
counted without recompute on ``meta`` (shapes only, seconds even at 512^3) and recompute stays off when the
count fits the device with room to spare.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GB = 1e9
# on top of the step's live peak (activations, gradients) and the weights: AdamW's two moments and the EMA copy,
# 12 bytes per fp32 parameter, rounded up to 16 as the GPU memory guide (benchmarks/bench_memory.py) counts them
STATE_BYTES_PER_PARAMETER = 16
# what the count leaves out (the CUDA context and kernel workspaces, about 0.5-1 GB, allocator fragmentation,
# data loading) is covered by using at most this fraction of the device's memory, less one GB
AUTO_FRACTION = 0.85
AUTO_RESERVE_BYTES = int(1 * GB)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created inside it while the storage is alive.

    ``peak`` is the largest total at any moment; ``peak_activations`` the largest total without the parameter
    gradients accumulated so far (counted through ``grad_bytes``, which a post-accumulate hook keeps). On
    ``meta``, ``nonzero`` (the footprint attention's voxel lists) has no data to count: every element counts.
    """

    def __init__(self) -> None:
        super().__init__()
        import torch.fx.experimental._config as fx_config

        self._nonzero = fx_config.patch(meta_nonzero_assume_all_nonzero=True)
        self.live = 0
        self.peak = 0
        self.grad_bytes = 0
        self.peak_activations = 0
        self._alive: set[int] = set()

    def __enter__(self):
        self._nonzero.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._nonzero.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage) if t.device.type == "meta" else storage.data_ptr()
                if key in self._alive:
                    continue
                self._alive.add(key)
                n = storage.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                self.peak_activations = max(self.peak_activations, self.live - self.grad_bytes)
                weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._alive.discard(key)

    @contextmanager
    def counting_gradients(self, module: torch.nn.Module):
        """Keep ``grad_bytes`` up to date while ``module``'s parameter gradients accumulate."""
        def hook(p: torch.Tensor) -> None:
            self.grad_bytes += p.grad.nbytes if p.grad is not None else 0

        handles = [p.register_post_accumulate_grad_hook(hook) for p in module.parameters() if p.requires_grad]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@contextmanager
def fused_attention_on_meta():
    """Count attention on ``meta`` as the fused kernels that train on CPUs and GPUs: output and log-sum-exp kept,
    never the (queries x keys) score matrix, which PyTorch's reference path on ``meta`` would materialise."""
    import torch.nn.functional as F

    reference = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if not query.is_meta or dropout_p or kwargs:
            return reference(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, is_causal=is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = reference


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def step_inputs(network: dict, batch: int, device: str | torch.device) -> dict:
    """Random inputs of one BiFlowNet training step: noisy latent, timesteps, X-rays and labels as configured."""
    z = torch.randn(batch, network["in_channels"], *network["latent_shape"], device=device)
    out = {"x": z, "t": torch.randint(0, 1000, (batch,), device=device)}
    if network.get("xray"):
        for view in ("ap", "lat"):
            out[view] = torch.rand(batch, 1, *network["xray"]["image_size"], device=device)
    if network.get("num_classes"):
        out["y"] = torch.zeros(batch, dtype=torch.long, device=device)
    return out


def count_training_step(network: dict, batch: int, device: str = "meta", bf16: bool = False) -> LiveBytes:
    """Live bytes of one BiFlowNet training step (forward, loss, backward) of ``network`` (BiFlowNet kwargs).

    ``bf16`` counts the step under bf16 autocast as a GPU runs it (also on a CPU without native bf16). The
    activations keep the layout a GPU gives them: a count on the CPU leaves out the copies of the CPU-only fp32
    channels-last route (``ddpm.fast_conv.MAX_FP32_CHANNELS_LAST_CHANNELS``). The returned counter also carries
    ``params``, the bytes of the weights.
    """
    from ddpm import BiFlowNet, biflownet, fast_conv

    with torch.device(device):
        net = BiFlowNet(**network)
    inputs = step_inputs(network, batch, device)
    counter = LiveBytes()
    native, widest = biflownet._native_cpu_bf16, fast_conv.MAX_FP32_CHANNELS_LAST_CHANNELS
    biflownet._native_cpu_bf16 = lambda: True  # count bf16 even where this CPU would fall back to fp32
    fast_conv.MAX_FP32_CHANNELS_LAST_CHANNELS = 0
    try:
        with counter, counter.counting_gradients(net), fused_attention_on_meta():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(**inputs)
            (out.float() - inputs["x"]).square().mean().backward()
    finally:
        biflownet._native_cpu_bf16, fast_conv.MAX_FP32_CHANNELS_LAST_CHANNELS = native, widest
    counter.params = parameter_bytes(net)
    return counter


def training_bytes(network: dict, batch: int, grad_checkpointing: bool = False) -> int:
    """Bytes one training process holds at the peak of a BiFlowNet step, fp32, counted on ``meta``: the weights,
    the step's live peak (activations, gradients), AdamW's moments and the EMA copy (the memory guide's total)."""
    counter = count_training_step({**network, "grad_checkpointing": bool(grad_checkpointing)}, batch)
    return counter.peak + counter.params + STATE_BYTES_PER_PARAMETER * counter.params // 4


def device_memory(accelerator: str = "auto") -> tuple[int, str]:
    """(bytes, description) of the memory one training process may use on the device it will train on.

    A CUDA device (``LOCAL_RANK``'s, as torchrun sets it) unless ``accelerator`` is ``"cpu"`` or none is
    present; on the CPU the physical memory shared by the node's training processes (``LOCAL_WORLD_SIZE``).
    """
    if accelerator not in ("cpu",) and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), f"cuda:{index} ({props.name}, {props.total_memory / GB:.1f} GB)"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    share = f", shared by {local} processes" if local > 1 else ""
    return total // local, f"cpu ({total / GB:.1f} GB{share})"


def resolve_grad_checkpointing(network: dict, batch: int, memory_bytes: int) -> tuple[bool, int]:
    """``grad_checkpointing: auto`` for one run: (recompute?, counted bytes of a step without recompute).

    Recompute stays off when the step without it, counted in fp32 (bf16 autocast needs about 0.8x), fits in
    ``AUTO_FRACTION`` of ``memory_bytes`` less ``AUTO_RESERVE_BYTES``; otherwise it is turned on.

    Args:
        network: BiFlowNet keyword arguments (``grad_checkpointing`` is ignored).
        batch: samples per device and step.
        memory_bytes: memory of the device (see :func:`device_memory`).
    """
    if batch < 1:
        raise ValueError(f"batch={batch}; expected a positive number of samples per device")
    if memory_bytes <= 0:
        raise ValueError(f"device memory of {memory_bytes} bytes; expected a positive amount")
    need = training_bytes(network, batch, grad_checkpointing=False)
    return need > AUTO_FRACTION * memory_bytes - AUTO_RESERVE_BYTES, need


def grad_checkpointing_for(network: dict, batch: int, accelerator: str = "auto") -> tuple[bool, str | None]:
    """``network["grad_checkpointing"]`` as a bool for training at ``batch`` samples per device.

    ``True`` / ``False`` stay as given; ``"auto"`` is decided by :func:`resolve_grad_checkpointing` against the
    memory of the device that ``accelerator`` (a Lightning accelerator name) trains on.

    Returns:
        (recompute?, a one-line note of what ``auto`` counted and chose, or None when the value was given).
    """
    value = network.get("grad_checkpointing", False)
    if value in (True, False):
        return bool(value), None
    if str(value).lower() != "auto":
        raise ValueError(f"network.grad_checkpointing={value!r}; expected true, false or auto")
    memory, device = device_memory(accelerator)
    recompute, need = resolve_grad_checkpointing(network, batch, memory)
    note = (f"network.grad_checkpointing=auto: a training step without recompute needs {need / GB:.2f} GB at batch "
            f"{batch} per device; {device}: recompute {'on' if recompute else 'off'}")
    return recompute, note
