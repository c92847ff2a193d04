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


# --- merge --teacher and export --weights read weights through the same reader ---------------------

def _weights_files(folder: Path) -> dict[str, str | None]:
    """File name -> the fragment its error must contain (None: a good file holding ``_GOOD``)."""
    from safetensors.torch import save_file

    from graphmerge.examples.mlp import build_model

    good = _GOOD.state_dict()
    save_file(good, str(folder / "w.safetensors"))
    torch.save({"state_dict": good}, folder / "w.pt")
    torch.save({"model": {f"module.{k}": v for k, v in good.items()}}, folder / "w.pth")  # DataParallel
    torch.save({"model_state_dict": good}, folder / "w.ckpt")
    torch.save(good, folder / "W.BIN")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, folder / "evil.pt")
    torch.save(build_model(), folder / "whole_model.pt")  # a pickled module, not a state dict
    torch.save({"epoch": 3}, folder / "no_tensors.pt")
    (folder / "cut.safetensors").write_bytes((folder / "w.safetensors").read_bytes()[:40])
    (folder / "w.txt").write_text("weights")
    ckpt.save_weights(folder / "wide.safetensors", build_model(hidden=7))
    return {"w.safetensors": None, "w.pt": None, "w.pth": None, "w.ckpt": None, "W.BIN": None,
            "evil.pt": "weights_only=True", "whole_model.pt": "weights_only=True",
            "no_tensors.pt": "does not hold a state dict", "cut.safetensors": "as safetensors",
            "w.txt": "unknown weights format", "missing.safetensors": "does not exist", "wide.safetensors": "(7, 1)"}


def _mlp() -> nn.Module:
    from graphmerge.examples.mlp import build_model

    torch.manual_seed(5)
    return build_model()


_GOOD = _mlp()


def test_merge_teacher_and_export_weights_accept_and_refuse_the_same_files(tmp_path: Path, monkeypatch):
    """Both commands run in-process up to the point where the weights are in the model; the heavy
    step after it (the merge recipe, the ONNX export) is replaced by a stub that records the model."""
    import graphmerge.passes.export
    from typer.testing import CliRunner

    import graphmerge.recipe
    from graphmerge.cli import app

    loaded: list[nn.Module] = []

    class Reached(Exception):
        pass

    def fake_merge(teachers, *args, **kwargs):
        loaded.append(teachers[0])
        raise Reached

    def fake_export(model, *args, **kwargs):
        loaded.append(model)
        raise Reached

    monkeypatch.setattr(graphmerge.recipe, "merge", fake_merge)
    monkeypatch.setattr(graphmerge.passes.export, "export_onnx_report", fake_export)
    runner = CliRunner()
    for name, fragment in _weights_files(tmp_path).items():
        path = str(tmp_path / name)
        merge = runner.invoke(app, ["merge", "examples:mlp", "-t", path, "-t", path, "--data", "sine",
                                    "--out", str(tmp_path / "s.safetensors")])
        export = runner.invoke(app, ["export", "examples:mlp", "--weights", path,
                                     "--out", str(tmp_path / "s.onnx")])
        if fragment is None:
            assert isinstance(merge.exception, Reached), (name, merge.output)
            assert isinstance(export.exception, Reached), (name, export.output)
            for model in loaded[-2:]:
                for key, tensor in _GOOD.state_dict().items():
                    assert torch.equal(model.state_dict()[key], tensor), (name, key)
            continue
        assert merge.exit_code == export.exit_code == 2, (name, merge.output, export.output)
        message = merge.stderr.strip()
        assert message == export.stderr.strip(), name  # the same words for the same file
        assert message.startswith("error: ") and "\n" not in message, message
        assert fragment in message and path in message, (name, message)
        assert "Traceback" not in message
