import pytest
import torch

from dataset import HUWindow


@pytest.mark.parametrize("window", [HUWindow(), HUWindow(-1024, 3071), HUWindow(-160, 240)])
def test_integer_hu_round_trip_is_exact(window: HUWindow) -> None:
    hu = torch.arange(int(window.hu_min), int(window.hu_max) + 1, dtype=torch.int16).float()
    unit = window.to_unit(hu)
    assert unit.dtype == torch.float32
    assert unit.min() == -1.0 and unit.max() == 1.0
    assert torch.equal(window.to_hu(unit).round(), hu)


def test_float_round_trip_and_clipping() -> None:
    w = HUWindow(-1000, 1000)
    hu = torch.empty(4, 5, 6).uniform_(-1500, 1500)
    back = w.to_hu(w.to_unit(hu))
    assert torch.allclose(back, hu.clamp(-1000, 1000), atol=1e-3)
    assert w.to_unit(torch.tensor([-3000.0, 0.0, 5000.0])).tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("lo,hi", [(100, 100), (200, -200), (float("nan"), 1)])
def test_bad_window_raises(lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="HU window"):
        HUWindow(lo, hi)


def test_dict_round_trip() -> None:
    w = HUWindow(-900, 1200)
    assert HUWindow.from_dict(w.to_dict()) == w
    with pytest.raises(ValueError):
        HUWindow.from_dict({"hu_min": 0})


def test_clip_keeps_the_window_on_both_sides() -> None:
    w = HUWindow(-500, 700)
    out = w.clip(torch.tensor([-3000, -500, 0, 700, 3000], dtype=torch.int16))
    assert out.dtype == torch.float32 and out.tolist() == [-500.0, -500.0, 0.0, 700.0, 700.0]
