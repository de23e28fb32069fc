"""Checkpoints: safetensors + JSON round trip, atomic writes, clear errors, no pickle."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

import convrecipes.checkpoint as ckpt
from convrecipes.checkpoint import load_checkpoint, load_model_weights, read_metadata, save_checkpoint
from convrecipes.errors import CheckpointError
from convrecipes.models import create_model


def _optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_of_nested_state(tmp_path):
    model, opt = _optimizer_state()
    tied = torch.arange(6.0)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": [torch.get_rng_state()],
        "numbers": (1, 2.5, float("inf"), None, True, "x"),
        "tied": {"a": tied, "b": tied[:3]},  # views sharing memory
        "bf16": torch.ones(2, dtype=torch.bfloat16),
    }
    path = save_checkpoint(tmp_path / "c.safetensors", state, {"epoch": 3, "recipe": {"name": "r"}})
    loaded, meta = load_checkpoint(path)
    assert meta == {"epoch": 3, "recipe": {"name": "r"}}
    assert read_metadata(path) == meta
    assert loaded["numbers"] == (1, 2.5, float("inf"), None, True, "x")
    assert torch.equal(loaded["tied"]["b"], torch.arange(3.0))
    assert loaded["bf16"].dtype == torch.bfloat16
    assert torch.equal(loaded["rng"][0], torch.get_rng_state()) or loaded["rng"][0].dtype == torch.uint8
    # optimizer state is keyed by int: a str key would make torch silently drop it
    assert set(loaded["optimizer"]["state"]) == {0, 1}
    opt2 = torch.optim.Adam(model.parameters())
    opt2.load_state_dict(loaded["optimizer"])
    for k in (0, 1):
        assert torch.equal(opt2.state_dict()["state"][k]["exp_avg"], opt.state_dict()["state"][k]["exp_avg"])


def test_crash_during_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)}, {"epoch": 1})

    real_fsync = ckpt.os.fsync

    def crash(fd):  # the temp file is half written when the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        save_checkpoint(path, {"w": torch.ones(3)}, {"epoch": 2})
    monkeypatch.setattr(ckpt.os, "fsync", real_fsync)
    state, meta = load_checkpoint(path)
    assert meta["epoch"] == 1 and torch.equal(state["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, cut):
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.randn(100, 100)}, {})
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(bad)


def test_foreign_files_are_rejected(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a convrecipes checkpoint"):
        load_checkpoint(other)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x80\x04this is a pickle, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt = _optimizer_state()
    path = save_checkpoint(tmp_path / "c.safetensors", {"model": model.state_dict(), "opt": opt.state_dict()}, {})

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    state, _ = load_checkpoint(path)
    assert torch.equal(state["model"]["weight"], model.weight.detach())


def test_weights_of_another_architecture_are_a_clear_error():
    small = create_model("tiny_cnn", 1, 10)
    resnet = create_model("small_resnet8", 1, 10)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_model_weights(small, resnet.state_dict(), "resnet.safetensors")
    other_classes = create_model("tiny_cnn", 1, 7)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model_weights(small, other_classes.state_dict(), "seven.safetensors")
