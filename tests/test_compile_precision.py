"""merge/train options for speed: ``compile=True`` (torch.compile of the training steps) and
``precision="bf16"`` (torch.autocast with bfloat16 around forward and loss)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from graphmerge import checkpoint as ckpt
from graphmerge.data import sine
from graphmerge.errors import GraphMergeError
from graphmerge.examples.mlp import build_model as build_mlp
from graphmerge.recipe import MergeSettings, merge, train
from graphmerge.training import PhaseConfig, fit, sgd

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile (inductor) on CPU needs a C++ compiler")


def _teachers() -> list[nn.Module]:
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(build_mlp())
    return teachers


class _Interrupted(Exception):
    pass


def _keys(state: object) -> list[str]:
    """Every string key of a nested checkpoint state."""
    if isinstance(state, dict):
        return [k for key, value in state.items() for k in [str(key), *_keys(value)]]
    if isinstance(state, list | tuple):
        return [k for value in state for k in _keys(value)]
    return []


@pytest.mark.slow
@needs_compiler
def test_compiled_merge_matches_eager_under_the_same_seed_and_resumes(tmp_path: Path) -> None:
    """Two gate steps per epoch, two gate epochs, one fine-tuning epoch on the sine MLP. With
    inductor's fallback_random the compiled steps draw torch's uniforms, so the compiled run must
    reproduce the eager one: the same losses, the same gates meeting the same budget schedule, the
    same student. Its checkpoints hold the plain module's keys. With inductor's own random numbers,
    a compiled run interrupted after the first gate epoch resumes to the uninterrupted compiled
    result bit for bit."""
    from torch import _dynamo
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    train_data, val_data, _, _ = sine(n_train=64, n_val=32, n_test=1)
    options = {"loss": "mse", "gate_epochs": 2, "finetune_epochs": 1, "batch_size": 32, "seed": 3,
               "val_data": val_data}
    teachers = _teachers()
    eager_log: list[dict] = []
    eager = merge(copy.deepcopy(teachers), train_data, log=eager_log.append, **options)
    def interrupt(record: dict) -> None:  # called after the epoch's checkpoint is written
        if (record["phase"], record["epoch"]) == ("gate", 1):
            raise _Interrupted

    counters.clear()
    try:
        with inductor_config.patch(fallback_random=True):
            compiled_log: list[dict] = []
            compiled = merge(copy.deepcopy(teachers), train_data, compile=True, log=compiled_log.append,
                             checkpoint_dir=tmp_path / "a", **options)
        # inductor's own random numbers: an interrupted compiled run resumes to the uninterrupted one
        uninterrupted = merge(copy.deepcopy(teachers), train_data, compile=True, **options)
        with pytest.raises(_Interrupted):
            merge(copy.deepcopy(teachers), train_data, compile=True, log=interrupt, checkpoint_dir=tmp_path / "b",
                  **options)
        resumed = merge(copy.deepcopy(teachers), train_data, compile=True, checkpoint_dir=tmp_path / "b",
                        resume=True, **options)
    finally:
        _dynamo.reset()
    assert counters["stats"]["unique_graphs"] >= 2  # dynamo compiled the gate phase's and fine-tuning's steps
    assert [(r["phase"], r["epoch"]) for r in compiled_log] == [("gate", 1), ("gate", 2), ("finetune", 1)]
    for a, b in zip(eager_log, compiled_log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5), (a, b)
    # the projected budget: 1 -> 1/2 over the first half of the phase; every group ends on 1/2
    assert [r["budget"] for r in compiled_log[:2]] == [0.5, 0.5]
    assert compiled.open_fraction.keys() == eager.open_fraction.keys()
    for gid, fraction in compiled.open_fraction.items():
        assert fraction == pytest.approx(0.5, abs=1e-4) and fraction == pytest.approx(eager.open_fraction[gid],
                                                                                     abs=1e-5)
    assert compiled.teacher_share == eager.teacher_share
    expected = eager.student.state_dict()
    for name, value in compiled.student.state_dict().items():
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name
    saved = ckpt.load_state(tmp_path / "a" / "merge.safetensors")
    assert set(saved["model"]) == set(build_mlp().state_dict()) and not any("_orig_mod" in k for k in _keys(saved))
    expected = uninterrupted.student.state_dict()
    for name, value in resumed.student.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert resumed.open_fraction == uninterrupted.open_fraction


def test_compile_is_not_fingerprinted_and_precision_only_when_not_fp32() -> None:
    plain = MergeSettings(loss="mse").fingerprint()
    assert MergeSettings(loss="mse", compile=True).fingerprint() == plain
    assert "precision" not in plain
    assert MergeSettings(loss="mse", precision="bf16").fingerprint() == {**plain, "precision": "bf16"}
    with pytest.raises(GraphMergeError, match="unknown precision 'fp16'"):
        MergeSettings(loss="mse", precision="fp16")
    with pytest.raises(GraphMergeError, match="compile must be True or False"):
        MergeSettings(loss="mse", compile="yes")
    with pytest.raises(GraphMergeError, match="unknown precision"):
        train(build_mlp(), sine(n_train=8, n_val=1, n_test=1)[0], epochs=1, loss="mse", precision="half")


class _Recorder(nn.Module):
    """A linear layer that records the dtype its output has in training."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.training:
            self.seen.append(out.dtype)
        return out


def _step_by_hand(model: _Recorder, x: torch.Tensor, y: torch.Tensor, lr: float, bf16: bool) -> _Recorder:
    """One SGD step (no momentum) on the whole batch, under autocast(cpu, bfloat16) when ``bf16``."""
    model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = nn.functional.cross_entropy(model.linear(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_step_under_each_precision_is_the_step_written_out(precision: str) -> None:
    """One full-batch SGD step through ``fit`` equals the same step written out by hand under
    ``torch.autocast(cpu, bfloat16)`` (bf16) or without it, and not the other one; the layer's
    output is bfloat16 under bf16 while the parameters stay float32."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    torch.manual_seed(0)
    model = _Recorder()
    by_hand = {bf16: _step_by_hand(model, x, y, 0.5, bf16) for bf16 in (False, True)}
    phase = PhaseConfig(name="t", epochs=1, batch_size=16, seed=0, optimizers={"weights": sgd(model.parameters(),
                                                                                               0.5, 0.0, 0.0)},
                        progress=False, precision=precision)
    fit(model, TensorDataset(x, y), "cross_entropy", phase)
    assert model.seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    same, other = by_hand[precision == "bf16"], by_hand[precision != "bf16"]
    # the epoch feeds the batch in a shuffled order: the mean loss agrees up to float32 rounding
    distance = {name: (p - dict(other.named_parameters())[name]).abs().max().item()
                for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.allclose(p, dict(same.named_parameters())[name], rtol=1e-5, atol=1e-6), name
    assert max(distance.values()) > 1e-4, distance  # bfloat16 rounding moves the step far more than that


def test_bf16_merge_runs_every_training_step_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gate steps and two fine-tuning steps (64 samples, batches of 32), each under bf16
    autocast; the student's weights stay float32."""
    from graphmerge import training

    entered: list[str] = []
    original = training.autocast

    def recording(precision: str, device: torch.device):
        entered.append(precision)
        return original(precision, device)
    monkeypatch.setattr(training, "autocast", recording)
    train_data, _, _, _ = sine(n_train=64, n_val=8, n_test=1)
    result = merge(_teachers(), train_data, loss="mse", gate_epochs=1, finetune_epochs=1, batch_size=32,
                   precision="bf16")
    assert entered == ["bf16"] * 4
    assert all(p.dtype == torch.float32 for p in result.student.parameters())
    assert all(torch.isfinite(p).all() for p in result.student.parameters())


def test_cli_precision_flag_reaches_the_settings(run_cli, sine_merge_args: list[str], tmp_path: Path) -> None:
    done = run_cli("merge", "examples:mlp", *sine_merge_args, "--precision", "bf16", "--checkpoint-dir", "ck",
                   "--out", "s.safetensors")
    assert done.returncode == 0, done.stderr
    assert ckpt.load_state(tmp_path / "ck" / "merge.safetensors")["settings"]["precision"] == "bf16"
    failed = run_cli("train", "examples:mlp", "--data", "sine", "--epochs", "1", "--precision", "fp16",
                     "--out", "t.safetensors")
    assert failed.returncode == 2 and "unknown precision 'fp16'" in " ".join(failed.stderr.split()), failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "t.safetensors").exists()
