"""graphmerge.Optimizer: the weights' optimiser of a phase (SGD/AdamW, per-step schedules with warmup,
weight decay on 2+-dimensional parameters only, gradient clipping), in merge, train, fit and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_recipe import hand_finetune
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import graphmerge
from graphmerge import checkpoint as ckpt
from graphmerge.data import sine
from graphmerge.errors import GraphMergeError
from graphmerge.examples.mlp import build_model as build_mlp
from graphmerge.optim import LegacySGD, phase_optimizer
from graphmerge.recipe import MergeSettings, merge, train
from graphmerge.training import PhaseConfig, fit

Optimizer = graphmerge.Optimizer


def small_sine(n_train: int = 96, n_val: int = 32):
    train_data, val_data, _, _ = sine(n_train=n_train, n_val=n_val, n_test=1)
    return train_data, val_data


def two_teachers(hidden: int = 16) -> list[nn.Module]:
    torch.manual_seed(3)
    return [build_mlp(hidden) for _ in range(2)]


class Mixed(nn.Module):
    """Every kind of parameter the decay rule distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.position = nn.Parameter(torch.zeros(8))  # a 1-d learned embedding
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3, bias=False)
        self.temperature = nn.Parameter(torch.tensor(1.0))  # a scalar
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position  # (B, T, 8)
        x = self.bn(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.head(self.norm(self.proj(x))).mean(dim=1) * self.temperature


# --- the decay rule --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_goes_to_parameters_of_two_or_more_dimensions_only(name: str):
    model = Mixed()
    optimizer = Optimizer(name, lr=0.1, weight_decay=0.05).build(model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups}
    assert groups == {
        0.05: {"embed.weight", "conv.weight", "proj.weight", "head.weight"},
        0.0: {"position", "conv.bias", "bn.weight", "bn.bias", "proj.bias", "norm.weight", "norm.bias",
              "temperature"},
    }
    assert type(optimizer) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]


def test_without_an_optimizer_the_flat_weight_decay_still_decays_every_parameter():
    model = Mixed()
    legacy = phase_optimizer(None, LegacySGD(0.1, 0.9, 0.05), model.parameters(), 4, lambda: None)
    assert [g["weight_decay"] for g in legacy.optimizer.param_groups] == [0.05]
    assert len(legacy.optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def test_gates_are_neither_decayed_nor_clipped_in_the_gate_phase(monkeypatch):
    """The gate phase's weight optimiser holds the big student's weights only, and clipping touches
    exactly those; the gates' log-alphas stay in their own SGD without decay."""
    from graphmerge.merge_run import MergeRun

    clipped: list[set[int]] = []
    original = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        params = list(params)
        clipped.append({id(p) for p in params})
        return original(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    train_data, _ = small_sine()
    settings = MergeSettings(loss="mse", gate_epochs=1, finetune_epochs=0, batch_size=32,
                             weight_optimizer=Optimizer("adamw", lr=1e-3, weight_decay=0.1, schedule="constant",
                                                        clip=0.5))
    gated = MergeRun(two_teachers(), train_data, None, settings)._gate_phase(two_teachers())
    weights = {id(p) for p in gated.weight_parameters()}
    gates = {id(p) for p in gated.gate_parameters()}
    assert gates and len(clipped) == 3  # 96 samples / 32
    assert all(ids == weights for ids in clipped)
    assert not gates & weights


# --- schedules -------------------------------------------------------------------------------

def _lrs_used(spec: Optimizer, epochs: int, n: int, batch_size: int) -> list[float]:
    """The learning rate of every optimiser step of a fit phase (read during the step's forward)."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    data = TensorDataset(torch.randn(n, 1), torch.randn(n, 1))
    tools = spec.for_phase(model.parameters(), epochs, lambda: math.ceil(n / batch_size))
    used: list[float] = []

    def read_lr(epoch: int) -> torch.Tensor:
        used.append(tools.optimizer.param_groups[0]["lr"])
        return torch.zeros(())

    phase = PhaseConfig(name="p", epochs=epochs, batch_size=batch_size, seed=0,
                        optimizers={"weights": tools.optimizer}, aux_loss=read_lr, progress=False,
                        **tools.phase_options())
    fit(model, data, "mse", phase)
    return used


@pytest.mark.parametrize(("schedule", "warmup"), [("cosine", 0.25), ("cosine", 0.0), ("linear", 0.3),
                                                  ("constant", 0.5)])
def test_per_step_schedules_follow_the_closed_form(schedule: str, warmup: float):
    epochs, n, batch_size, peak = 4, 40, 8, 0.2  # 5 steps per epoch, 20 steps
    used = _lrs_used(Optimizer("adamw", lr=peak, schedule=schedule, warmup=warmup), epochs, n, batch_size)
    total = 20
    warm = math.floor(warmup * total)
    expected = []
    for step in range(total):
        if step < warm:
            expected.append(peak * step / warm)
            continue
        progress = (step - warm) / (total - warm)
        shape = {"cosine": (1 + math.cos(math.pi * progress)) / 2, "linear": 1 - progress, "constant": 1.0}
        expected.append(peak * shape[schedule])
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if warm:
        assert used[0] == 0.0 and used[warm] == pytest.approx(peak)


def test_multistep_changes_the_rate_per_epoch_at_its_milestones():
    used = _lrs_used(Optimizer("sgd", lr=1.0, milestones=[1, 3], gamma=0.5), 4, 16, 8)
    assert used == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25])
    default = _lrs_used(Optimizer("sgd", lr=1.0), 4, 8, 8)  # the paper's milestones: epochs 2 and 3
    assert default == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_a_per_step_schedule_needs_the_length_of_the_data():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter([(torch.ones(1), torch.ones(1))] * 4)

    with pytest.raises(GraphMergeError, match="needs the number of steps per epoch.*IterableDataset"):
        train(build_mlp(4), torch.utils.data.DataLoader(Stream(), batch_size=2), epochs=1, loss="mse",
              optimizer=Optimizer(schedule="cosine"))


# --- the optimisers ----------------------------------------------------------------------------

def test_adamw_fine_tuning_is_torch_adamw_on_hand_listed_param_groups_bitwise():
    """A fine-tuning with Optimizer('adamw', constant) is, bit for bit, torch.optim.AdamW with the two
    weight matrices decayed and the two biases not, run over fit's batches."""
    train_data, _ = small_sine()
    teachers = two_teachers()
    options = {"loss": "mse", "gate_epochs": 1, "batch_size": 32, "seed": 4}
    start = merge(teachers, train_data, finetune_epochs=0, **options).student
    spec = Optimizer("adamw", lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, schedule="constant")
    student = merge(teachers, train_data, finetune_epochs=2, finetune_optimizer=spec, **options).student

    by_name = dict(start.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [by_name["fc1.weight"], by_name["fc2.weight"]], "weight_decay": 0.1},
                                   {"params": [by_name["fc1.bias"], by_name["fc2.bias"]], "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.8, 0.99))
    hand_finetune(start, train_data, optimizer)
    expected, actual = start.state_dict(), student.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_defaults_are_bitwise_the_explicit_sgd_optimizers():
    """None (the flat settings) and the Optimizers equal to the defaults give the same teachers and student."""
    train_data, val_data = small_sine()
    options = {"loss": "mse", "teacher_epochs": 2, "gate_epochs": 2, "finetune_epochs": 2, "batch_size": 16,
               "seed": 7}
    plain = merge(build_mlp, train_data, val_data=val_data, **options)
    explicit = merge(build_mlp, train_data, val_data=val_data, **options,
                     teacher_optimizer=Optimizer("sgd", lr=0.01, momentum=0.9, schedule="multistep"),
                     weight_optimizer=Optimizer("sgd", lr=0.01, schedule="constant"),
                     finetune_optimizer=Optimizer("sgd", lr=0.01, milestones=None, gamma=0.1))
    for a, b in [(plain.student, explicit.student), *zip(plain.teachers, explicit.teachers, strict=True)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in explicit.history]


def _grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def test_clipping_bounds_the_weights_gradient_norm_and_leaves_other_optimisers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    data = TensorDataset(torch.randn(64, 4), 100 * torch.randn(64, 1))  # large targets: large gradients
    first, second = list(model[0].parameters()), list(model[2].parameters())
    tools = Optimizer("sgd", lr=1e-4, schedule="constant", clip=0.5).for_phase(first, 1, lambda: 8)
    other = torch.optim.SGD(second, lr=1e-4)
    norms: dict[str, list[float]] = {"weights": [], "other": []}
    tools.optimizer.register_step_pre_hook(lambda *_: norms["weights"].append(_grad_norm(first)))
    other.register_step_pre_hook(lambda *_: norms["other"].append(_grad_norm(second)))
    phase = PhaseConfig(name="p", epochs=1, batch_size=8, seed=0, optimizers={"weights": tools.optimizer,
                                                                               "other": other},
                        progress=False, **tools.phase_options())
    fit(model, data, "mse", phase)
    assert len(norms["weights"]) == 8
    assert max(norms["weights"]) <= 0.5 * (1 + 1e-6)
    assert min(norms["weights"]) > 0.5 * (1 - 1e-6)  # every step was over the limit, so clipped to it
    assert min(norms["other"]) > 0.5  # not clipped


# --- resume ------------------------------------------------------------------------------------

class _Interrupted(Exception):
    pass


RESUMABLE = {"teacher_optimizer": Optimizer("adamw", lr=3e-3, weight_decay=0.01, schedule="linear", warmup=0.25),
             "weight_optimizer": Optimizer("sgd", lr=0.02, schedule="cosine", warmup=0.2, clip=1.0),
             "finetune_optimizer": Optimizer("adamw", lr=2e-3, schedule="cosine", warmup=0.3)}


def _resumable_merge(folder: Path, crash_at: str | None, resume: bool = False):
    train_data, val_data = small_sine(n_train=64)

    def log(record):
        if f"{record['phase']}:{record['epoch']}" == crash_at:
            raise _Interrupted

    return merge(build_mlp, train_data, val_data=val_data, loss="mse", teacher_epochs=2, gate_epochs=2,
                 finetune_epochs=2, batch_size=16, seed=2, checkpoint_dir=folder, resume=resume, log=log,
                 **RESUMABLE)


@pytest.mark.parametrize("crash_at", ["teacher0:1", "gate:1", "finetune:1"])
def test_resume_mid_schedule_gives_the_uninterrupted_result_bitwise(tmp_path: Path, crash_at: str):
    """Per-step schedules are checkpointed at the end of each epoch with the optimiser state; a run
    stopped there and resumed continues the schedule where it was (4 steps per epoch here), not
    from the start of its warm-up."""
    expected = _resumable_merge(tmp_path / "ref", None)
    with pytest.raises(_Interrupted):
        _resumable_merge(tmp_path / "ck", crash_at)
    saved = ckpt.load_state(tmp_path / "ck" / "merge.safetensors")
    assert f"{saved['phase']}:{saved['epoch']}" == crash_at
    actual = _resumable_merge(tmp_path / "ck", None, resume=True)
    a, b = expected.student.state_dict(), actual.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    finetune = [r["lr"] for r in expected.history if r["phase"] == "finetune"]  # the lr of each epoch's first step
    total, warm = 8, 2
    assert finetune == pytest.approx([0.0, 2e-3 * (1 + math.cos(math.pi * (4 - warm) / (total - warm))) / 2])


def test_train_with_a_cosine_optimizer_resumes_bitwise(tmp_path: Path):
    train_data, _ = small_sine(n_train=64)
    spec = Optimizer("adamw", lr=1e-2, schedule="cosine", warmup=0.1, clip=2.0)

    def run(folder: Path, crash: bool, resume: bool = False) -> nn.Module:
        def log(record):
            if crash and record["epoch"] == 2:
                raise _Interrupted

        torch.manual_seed(1)
        return train(build_mlp(8), train_data, epochs=3, loss="mse", batch_size=16, checkpoint_dir=folder,
                     resume=resume, log=log, optimizer=spec).model

    expected = run(tmp_path / "ref", False).state_dict()
    with pytest.raises(_Interrupted):
        run(tmp_path / "ck", True)
    actual = run(tmp_path / "ck", False, resume=True).state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    saved = ckpt.load_state(tmp_path / "ck" / "train.safetensors")["settings"]
    assert saved["optimizer"]["name"] == "adamw" and saved["optimizer"]["warmup"] == 0.1


def test_the_optimizers_are_fingerprinted_and_a_changed_one_is_refused(tmp_path: Path):
    assert not {"teacher_optimizer", "weight_optimizer", "finetune_optimizer"} & set(MergeSettings().fingerprint())
    settings = MergeSettings(finetune_optimizer=Optimizer("adamw", lr=1e-3, schedule="cosine", warmup=0.1, clip=1.0),
                             weight_optimizer=Optimizer(schedule="constant"))
    fingerprint = settings.fingerprint()
    assert fingerprint["finetune_optimizer"] == {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999],
                                                 "weight_decay": 0.0, "schedule": "cosine", "warmup": 0.1,
                                                 "clip": 1.0}
    assert fingerprint["weight_optimizer"] == {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0,
                                               "schedule": "constant", "warmup": 0.0, "clip": None}
    assert "teacher_optimizer" not in fingerprint
    train_data, _ = small_sine(n_train=32)
    options = {"loss": "mse", "gate_epochs": 1, "finetune_epochs": 1, "checkpoint_dir": tmp_path}
    merge(two_teachers(), train_data, finetune_optimizer=Optimizer("adamw", lr=1e-3), **options)
    with pytest.raises(GraphMergeError, match="finetune_optimizer=.*'lr': 0.001.*finetune_optimizer=.*'lr': 0.002"):
        merge(two_teachers(), train_data, finetune_optimizer=Optimizer("adamw", lr=2e-3), resume=True, **options)
    with pytest.raises(GraphMergeError, match="finetune_optimizer=.*finetune_optimizer=None"):
        merge(two_teachers(), train_data, resume=True, **options)


# --- bad values --------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"name": "adam"}, "unknown Optimizer name 'adam': use 'sgd'"),
    ({"schedule": "step"}, "unknown Optimizer schedule 'step': use 'multistep'"),
    ({"lr": -1.0}, "Optimizer lr must be at least 0"),
    ({"lr": float("nan")}, "Optimizer lr must be a finite number"),
    ({"weight_decay": -0.1}, "Optimizer weight_decay must be at least 0"),
    ({"momentum": 1.0}, "Optimizer momentum must lie in [0, 1)"),
    ({"name": "adamw", "momentum": 0.9}, "momentum=0.9 applies to name='sgd' only"),
    ({"betas": (0.9, 0.99)}, "betas=(0.9, 0.99) applies to name='adamw' only"),
    ({"name": "adamw", "betas": (0.9,)}, "betas must be two numbers"),
    ({"name": "adamw", "betas": (0.9, 1.0)}, "Optimizer betas must lie in [0, 1)"),
    ({"schedule": "cosine", "warmup": 1.0}, "Optimizer warmup must lie in [0, 1)"),
    ({"warmup": 0.1}, "warmup=0.1 ramps the learning rate per step"),
    ({"schedule": "cosine", "milestones": [2]}, "milestones=[2] applies to schedule='multistep' only"),
    ({"schedule": "linear", "gamma": 0.5}, "gamma=0.5 applies to schedule='multistep' only"),
    ({"milestones": [1.5]}, "Optimizer milestones must be a list of epochs"),
    ({"gamma": 0}, "Optimizer gamma must be positive"),
    ({"clip": 0.0}, "Optimizer clip must be positive"),
])
def test_bad_optimizer_values_name_the_field_and_the_choices(options, message):
    with pytest.raises(GraphMergeError) as info:
        Optimizer(**options)
    assert message in str(info.value)


def test_settings_refuse_what_an_optimizer_would_make_ineffective():
    with pytest.raises(GraphMergeError, match="finetune_optimizer must be a graphmerge.Optimizer or None"):
        MergeSettings(finetune_optimizer="adamw")
    with pytest.raises(GraphMergeError, match="finetune_lr is set, but finetune_optimizer is given"):
        MergeSettings(finetune_lr=0.1, finetune_optimizer=Optimizer())
    with pytest.raises(GraphMergeError, match="weight_decay is set, but teacher_optimizer and weight_optimizer and"):
        MergeSettings(weight_decay=0.1, teacher_optimizer=Optimizer(), weight_optimizer=Optimizer(),
                      finetune_optimizer=Optimizer())
    MergeSettings(weight_decay=0.1, finetune_optimizer=Optimizer())  # still feeds the gate phase's weights
    train_data, _ = small_sine(n_train=32)
    with pytest.raises(GraphMergeError, match="lr is set, but optimizer is given"):
        train(build_mlp(4), train_data, epochs=1, loss="mse", lr=0.1, optimizer=Optimizer())
    with pytest.raises(GraphMergeError, match="optimizer must be a graphmerge.Optimizer"):
        train(build_mlp(4), train_data, epochs=1, loss="mse", optimizer="adamw")


# --- the command line --------------------------------------------------------------------------

def test_cli_optimizer_flags_reach_every_weight_phase(run_cli, sine_merge_args: list[str], tmp_path: Path):
    flags = ["--optimizer", "adamw", "--schedule", "cosine", "--warmup", "0.1", "--clip", "1.5",
             "--weight-decay", "0.01"]
    done = run_cli("merge", "examples:mlp", *sine_merge_args, *flags, "--lr", "0.002", "--finetune-lr", "0.001",
                   "--checkpoint-dir", "ck", "--out", "s.safetensors")
    assert done.returncode == 0, done.stderr
    settings = ckpt.load_state(tmp_path / "ck" / "merge.safetensors")["settings"]
    common = {"name": "adamw", "betas": [0.9, 0.999], "weight_decay": 0.01, "schedule": "cosine", "warmup": 0.1,
              "clip": 1.5}
    assert settings["weight_optimizer"] == {**common, "lr": 0.002}
    assert settings["finetune_optimizer"] == {**common, "lr": 0.001}
    assert settings["weight_decay"] == 0.0 and "teacher_optimizer" not in settings

    done = run_cli("train", "examples:mlp", "--data", "sine", "--epochs", "1", "--batch-size", "500",
                   "--optimizer", "sgd", "--clip", "2", "--weight-decay", "0.001", "--lr", "0.05",
                   "--checkpoint-dir", "tk", "--out", "t.safetensors")
    assert done.returncode == 0, done.stderr
    settings = ckpt.load_state(tmp_path / "tk" / "train.safetensors")["settings"]
    assert settings["optimizer"] == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.001,
                                     "schedule": "multistep", "milestones": None, "gamma": 0.1, "clip": 2.0}


@pytest.mark.parametrize(("flags", "message"), [
    (["--optimizer", "adam"], "unknown --optimizer 'adam': use sgd"),
    (["--schedule", "step"], "unknown --schedule 'step': use multistep"),
    (["--warmup", "0.1"], "--warmup 0.1 ramps the learning rate per step, but the default schedule (multistep)"),
    (["--schedule", "multistep", "--warmup", "0.2"], "but --schedule multistep changes it per epoch"),
    (["--schedule", "cosine", "--warmup", "1.5"], "--warmup 1.5 must be a fraction"),
    (["--clip", "0"], "--clip 0.0 must be a positive maximum gradient norm"),
])
def test_cli_bad_optimizer_flags_exit_2_in_one_paragraph(run_cli, flags: list[str], message: str, tmp_path: Path):
    for command in (["train", "examples:mlp", "--data", "sine"],
                    ["merge", "examples:mlp", "--teacher", "a.safetensors", "--teacher", "b.safetensors",
                     "--data", "sine"]):
        failed = run_cli(*command, *flags, "--out", "o.safetensors")
        assert failed.returncode == 2, failed.stderr
        assert message in " ".join(failed.stderr.split()) and "Traceback" not in failed.stderr
        assert failed.stderr.count("error:") == 1 and not (tmp_path / "o.safetensors").exists()
