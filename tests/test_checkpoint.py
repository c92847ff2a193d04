"""Checkpoints: lossless round trip, atomic writes, clear mismatch errors, no pickle."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from graphmerge import checkpoint as ckpt
from graphmerge.errors import GraphMergeError, ModelMismatchError


def _trained_optimizer() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4])
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_state_round_trip_restores_model_optimizer_scheduler(tmp_path: Path):
    model, optimizer, scheduler = _trained_optimizer()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "sched": scheduler.state_dict(),
             "history": [{"phase": "gate", "epoch": 1, "loss": 0.5}], "pair": (1, "a"), "none": None}
    ckpt.save_state(tmp_path / "s.safetensors", state)
    back = ckpt.load_state(tmp_path / "s.safetensors")
    for key, tensor in model.state_dict().items():
        assert torch.equal(back["model"][key], tensor)
    momentum = optimizer.state_dict()["state"]
    assert set(back["optim"]["state"]) == set(momentum)  # integer keys survive
    for index, entry in momentum.items():
        assert torch.equal(back["optim"]["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    assert back["optim"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert back["sched"]["milestones"] == Counter({2: 1, 4: 1})
    assert isinstance(back["sched"]["milestones"], Counter)
    assert back["history"] == state["history"] and back["pair"] == (1, "a") and back["none"] is None
    fresh_optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fresh_optimizer.load_state_dict(back["optim"])  # loads into a real optimizer


def test_checkpoint_is_safetensors_not_pickle(tmp_path: Path):
    from safetensors import safe_open

    model, optimizer, _ = _trained_optimizer()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    ckpt.save_state(tmp_path / "s.safetensors", state)
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["format"] == ckpt.STATE_FORMAT
    assert "/model/0.weight" in keys and "/optim/state/0/momentum_buffer" in keys


def test_rng_round_trip_replays_every_generator(tmp_path: Path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    ckpt.save_state(tmp_path / "rng.safetensors", {"rng": ckpt.capture_rng()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.restore_rng(ckpt.load_state(tmp_path / "rng.safetensors")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_crash_during_write_keeps_old_checkpoint_and_leaves_no_temp_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "merge.safetensors"
    ckpt.save_state(path, {"epoch": 1, "w": torch.ones(3)})
    old_bytes = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk died mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk died"):
        ckpt.save_state(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert ckpt.load_state(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.safetensors"]


def test_weights_round_trip_and_shared_tensors(tmp_path: Path):
    model = nn.Linear(3, 3)
    tied = {"a": model.weight, "b": model.weight, "bias": model.bias}  # safetensors refuses shared storage
    ckpt.save_weights(tmp_path / "w.safetensors", tied)
    back = ckpt.read_state_dict(tmp_path / "w.safetensors")
    assert torch.equal(back["a"], model.weight) and torch.equal(back["b"], model.weight)


def test_mismatching_shape_names_key_and_both_shapes(tmp_path: Path):
    ckpt.save_weights(tmp_path / "t.safetensors", nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)))
    with pytest.raises(ModelMismatchError) as info:
        ckpt.load_weights(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), tmp_path / "t.safetensors")
    message = str(info.value)
    assert "'0.weight'" in message and "(5, 3)" in message and "(4, 3)" in message


def test_missing_and_unexpected_keys_are_named(tmp_path: Path):
    ckpt.save_weights(tmp_path / "t.safetensors", nn.Linear(3, 4))
    with pytest.raises(ModelMismatchError, match="'0.weight'.*missing"):
        ckpt.load_weights(nn.Sequential(nn.Linear(3, 4)), tmp_path / "t.safetensors")
    ckpt.save_weights(tmp_path / "u.safetensors", {**nn.Linear(3, 4).state_dict(), "extra": torch.ones(1)})
    with pytest.raises(ModelMismatchError, match="unexpected key 'extra'"):
        ckpt.load_weights(nn.Linear(3, 4), tmp_path / "u.safetensors")


def test_legacy_pt_is_read_with_weights_only(tmp_path: Path):
    model = nn.Linear(2, 2)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "t.pt")
    fresh = ckpt.load_weights(nn.Linear(2, 2), tmp_path / "t.pt")
    assert torch.equal(fresh.weight, model.weight)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(GraphMergeError, match="weights_only=True"):
        ckpt.read_state_dict(tmp_path / "evil.pt")


def test_missing_weights_file_is_explained(tmp_path: Path):
    with pytest.raises(GraphMergeError, match="does not exist"):
        ckpt.read_state_dict(tmp_path / "nope.safetensors")


def test_not_a_training_checkpoint_is_explained(tmp_path: Path):
    ckpt.save_weights(tmp_path / "w.safetensors", nn.Linear(2, 2))
    with pytest.raises(GraphMergeError, match="not a graphmerge training checkpoint"):
        ckpt.load_state(tmp_path / "w.safetensors")
