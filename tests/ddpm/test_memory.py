"""ddpm.memory: the meta-device byte count and the grad_checkpointing: auto decision."""

from __future__ import annotations

import pytest
import torch

from ddpm.memory import (AUTO_FRACTION, AUTO_RESERVE_BYTES, LiveBytes, device_memory, resolve_grad_checkpointing,
                         training_bytes)
from tests.ddpm.conftest import tiny_network


def test_live_bytes_follow_allocation_and_release() -> None:
    counter = LiveBytes()
    with counter:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = a[10:]  # a view: no new storage
        c = torch.empty(500, dtype=torch.float64, device="meta")  # 4000 bytes
        del a, b, c
        d = torch.empty(250, device="meta")  # 1000 bytes, after 8000 were released
    assert counter.peak == 8000 and counter.live == 1000
    del d


def test_training_bytes_grow_with_batch_and_shrink_with_recompute() -> None:
    net = tiny_network(latent_shape=[16, 16, 16], cross_attention="footprint", back_projection=True)
    one, four = training_bytes(net, 1), training_bytes(net, 4)
    assert 0 < one < four
    assert training_bytes(net, 4, grad_checkpointing=True) < four


def test_auto_recomputes_only_when_the_step_does_not_fit() -> None:
    net = tiny_network(latent_shape=[16, 16, 16])
    need = training_bytes(net, 2)
    roomy = int((need + AUTO_RESERVE_BYTES) / AUTO_FRACTION) + 1
    assert resolve_grad_checkpointing(net, 2, roomy) == (False, need)
    assert resolve_grad_checkpointing(net, 2, roomy - 2**20) == (True, need)
    assert resolve_grad_checkpointing({**net, "grad_checkpointing": True}, 2, roomy) == (False, need)


@pytest.mark.parametrize("batch, memory, message", [(0, 10**9, "batch=0"), (1, 0, "device memory of 0 bytes")])
def test_auto_refuses_bad_values(batch: int, memory: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_grad_checkpointing(tiny_network(), batch, memory)


def test_cpu_memory_is_shared_by_the_local_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    whole, text = device_memory("cpu")
    assert whole > 2**30 and text.startswith("cpu (")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    quarter, text = device_memory("cpu")
    assert quarter == whole // 4 and "shared by 4 processes" in text
