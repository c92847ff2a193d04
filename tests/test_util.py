"""graphmerge.passes.util: the helpers the passes and the driver share."""

from __future__ import annotations

import pytest
from graphmerge.passes.util import check_teacher_count, eval_mode, getattr_path, one_line, training_mode, write_atomic
from torch import nn

from graphmerge.errors import GraphMergeError


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.dot"
    write_atomic(target, "first")
    (tmp_path / "dir.dot").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "dir.dot", "second")  # os.replace onto a folder fails
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.dot", "out.dot"]
    write_atomic(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    with pytest.raises(GraphMergeError, match="does not exist"):
        write_atomic(tmp_path / "no" / "file", "x")


def test_modes_restore_each_submodule_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    model[1].eval()  # deliberately frozen inside a training model
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
    with training_mode(model, True):
        assert all(m.training for m in model.modules())
    assert not model[1].training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert model.training and not model[1].training


def test_getattr_path_and_one_line():
    model = nn.Sequential(nn.Linear(2, 3))
    assert getattr_path(model, "0.weight") is model[0].weight
    assert getattr_path(model, "0.nope.x", None) is None
    with pytest.raises(AttributeError, match="'0.nope'"):
        getattr_path(model, "0.nope")
    assert one_line(ValueError("bad\n  thing.\n")) == "ValueError: bad thing"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(ValueError("x" * 50), limit=20) == f"ValueError: {'x' * 14} [...]"


def test_teacher_count():
    check_teacher_count(2, "unused")
    with pytest.raises(GraphMergeError, match="at least 2 teachers, got 1: pass more"):
        check_teacher_count(1, "pass more")
