import os
import pickle

import pytest
import torch

from dataset.checkpoint import CheckpointError, checkpoint_kind, load_torch_file, read_checkpoint

AE = {"state_dict": {"autoencoder.w": torch.zeros(2)}, "hyper_parameters": {"autoencoder": {"channels": [4]}}}
BF = {"state_dict": {"model.w": torch.zeros(2)}, "hyper_parameters": {"network": {}, "diffusion": {}}}


class _Payload:
    def __reduce__(self):
        return (os.remove, ("/definitely/not/here",))


def _write_bad_files(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save(AE, good)
    blob = good.read_bytes()
    files = {
        "truncated": blob[: len(blob) // 2],
        "random": bytes(range(256)) * 8,
        "empty": b"",
        "text": b"hello world\n",
        "pickle": pickle.dumps({"x": 1}),
    }
    for name, data in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(data)
    torch.save({"x": _Payload()}, tmp_path / "payload.ckpt")
    return good


@pytest.mark.parametrize("name, match", [
    ("truncated", "truncated or damaged"),
    ("random", "not a checkpoint"),
    ("empty", "is empty"),
    ("text", "not a checkpoint"),
    ("pickle", "not a checkpoint"),
    ("payload", "unsafe content"),
])
def test_every_bad_file_is_one_line_naming_it(tmp_path, name, match) -> None:
    _write_bad_files(tmp_path)
    path = tmp_path / f"{name}.ckpt"
    with pytest.raises(CheckpointError, match=match) as e:
        read_checkpoint(path, "autoencoder")
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)  # bad input for the CLI layer (exit 2)


def test_payload_is_never_executed(tmp_path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("x")

    class Remove:
        def __reduce__(self):
            return (os.remove, (str(marker),))

    torch.save({"x": Remove()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="unsafe"):
        load_torch_file(tmp_path / "evil.pt")
    assert marker.exists()


def test_kinds_and_wrong_kind(tmp_path) -> None:
    torch.save(AE, tmp_path / "ae.ckpt")
    torch.save(BF, tmp_path / "bf.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    assert checkpoint_kind(read_checkpoint(tmp_path / "ae.ckpt")) == "autoencoder"
    assert checkpoint_kind(read_checkpoint(tmp_path / "bf.ckpt", "biflownet")) == "biflownet"
    with pytest.raises(CheckpointError, match="is a biflownet checkpoint; expected an autoencoder checkpoint"):
        read_checkpoint(tmp_path / "bf.ckpt", "autoencoder")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        read_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="kind="):
        read_checkpoint(tmp_path / "ae.ckpt", "adapter")


def test_mmap_read_gives_the_same_values(tmp_path) -> None:
    torch.save({"t": torch.arange(5.0)}, tmp_path / "t.pt")
    assert torch.equal(load_torch_file(tmp_path / "t.pt", mmap=True)["t"], torch.arange(5.0))
