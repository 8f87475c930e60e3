"""The ``threads`` option of both training entry points (train.common.configure_threads)."""

from __future__ import annotations

import pytest
import torch

from train import common


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_shares_torchs_default_among_the_local_processes(restore_threads, monkeypatch) -> None:
    monkeypatch.setattr(common, "_DEFAULT_THREADS", 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert common.configure_threads("auto") == 8 and torch.get_num_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert common.configure_threads(None) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # never 0
    assert common.configure_threads("auto") == 1 and torch.get_num_threads() == 1


def test_explicit_count_and_bad_values(restore_threads) -> None:
    assert common.configure_threads(3) == 3 and torch.get_num_threads() == 3
    for bad in (0, -2, 1.5, "many"):
        with pytest.raises(ValueError, match="expected auto or a positive integer"):
            common.configure_threads(bad)
