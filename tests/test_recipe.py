"""The training recipe: teachers, λ schedules, merge end to end, resume, divergence, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from graphmerge import checkpoint as ckpt
from graphmerge.data import sine
from graphmerge.errors import GraphMergeError
from graphmerge.examples.mlp import build_model as build_mlp
from graphmerge.examples.mnist1d_cnn import build_model as build_cnn
from graphmerge.recipe import MergeSettings, merge, train
from graphmerge.training import DistContext, default_milestones, epoch_batches, evaluate, lambda_schedule

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_sine(n_train: int = 512, n_val: int = 128):
    train_data, val_data, _, _ = sine(n_train=n_train, n_val=n_val, n_test=1)
    return train_data, val_data


def small_mnist1d(n: int = 256):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    x = torch.randn(n, 1, 40, generator=generator) + labels.view(-1, 1, 1).float() / 3
    return TensorDataset(x, labels)


# --- schedules and data order --------------------------------------------------------------

def test_quadratic_lambda_follows_the_reference_update_before_each_epoch():
    schedule = lambda_schedule("quadratic", 0.01, 0.05)
    expected = 0.01
    for epoch in range(5):
        expected += 0.05 * math.sqrt(expected)  # updated before the epoch
        assert schedule(epoch) == pytest.approx(expected)
    assert lambda_schedule("constant", 0.3)(7) == 0.3
    assert lambda_schedule("linear", 0.04, 0.05)(1) == pytest.approx(0.04 + 2 * 0.05 * 0.2)
    assert lambda_schedule(lambda e: 2.0 * e)(3) == 6.0
    with pytest.raises(GraphMergeError, match="unknown lambda schedule"):
        lambda_schedule("cubic")


def test_default_milestones_at_half_and_three_quarters():
    assert default_milestones(100) == [50, 75]
    assert default_milestones(1) == []


def hand_finetune(model: torch.nn.Module, data: TensorDataset, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, epochs: int = 2,
                  seed: int = 4 + 1) -> None:
    """The recipe's fine-tuning written out by hand: MSE, batches of 32 in the order of ``epoch_batches``
    (the merge's seed + 1), the scheduler stepped per epoch. A reference for the tests, not the recipe's code."""
    for epoch in range(epochs):
        model.train()
        for x, y in epoch_batches(data, 32, seed=seed, epoch=epoch, ctx=DistContext()):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_data_order_depends_only_on_seed_and_epoch():
    data = TensorDataset(torch.arange(50).float().unsqueeze(1), torch.zeros(50))

    def order(seed: int, epoch: int) -> list[float]:
        batches = epoch_batches(data, 8, seed=seed, epoch=epoch, ctx=DistContext())
        return torch.cat([x for x, _ in batches]).flatten().tolist()

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    assert sorted(order(0, 3)) == list(range(50))


# --- teacher training ----------------------------------------------------------------------

def test_teacher_training_decreases_the_sine_loss():
    train_data, val_data = small_sine()
    torch.manual_seed(0)
    model = build_mlp()
    before = evaluate(model, val_data, "mse")["loss"]
    result = train(model, train_data, val_data=val_data, loss="mse", epochs=4, lr=0.05, milestones=[])
    after = evaluate(result.model, val_data, "mse")["loss"]
    assert after < before
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]


def test_divergence_names_phase_and_epoch_and_keeps_last_checkpoint(tmp_path: Path):
    train_data, _ = small_sine(n_train=64)
    calls = {"n": 0}
    batches_per_epoch = 2  # 64 samples / batch 32

    def loss_nan_in_epoch_two(output, target):
        calls["n"] += 1
        value = torch.nn.functional.mse_loss(output, target)
        return value * float("nan") if calls["n"] > batches_per_epoch else value

    with pytest.raises(GraphMergeError, match=r"teacher0 phase at epoch 2, batch 1") as info:
        merge(build_mlp, train_data, loss=loss_nan_in_epoch_two, teacher_epochs=3, gate_epochs=1,
              finetune_epochs=1, checkpoint_dir=tmp_path)
    assert "last good checkpoint is kept" in str(info.value)
    saved = ckpt.load_state(tmp_path / "merge.safetensors")
    assert (saved["phase"], saved["epoch"]) == ("teacher0", 1)
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_exploding_learning_rate_is_caught():
    train_data, _ = small_sine(n_train=256)
    with pytest.raises(GraphMergeError, match="diverged in the train phase at epoch 1"):
        train(build_mlp(), train_data, loss="mse", epochs=2, lr=1e6)


def test_merge_rejects_a_single_teacher_and_a_factory_without_epochs():
    train_data, _ = small_sine(n_train=32)
    with pytest.raises(GraphMergeError, match="at least 2 teachers"):
        merge([build_mlp()], train_data, loss="mse")
    with pytest.raises(GraphMergeError, match="teacher_epochs"):
        merge(build_mlp, train_data, loss="mse")


@pytest.mark.parametrize(("options", "message"), [
    ({"weight_lr": -0.1}, "weight_lr must be at least 0, got -0.1"),
    ({"finetune_lr": float("nan")}, "finetune_lr must be a finite number"),
    ({"gate_epochs": -1}, "gate_epochs must be at least 0, got -1"),
    ({"finetune_epochs": 2.5}, "finetune_epochs must be a whole number, got 2.5"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"teacher_epochs": 0}, "teacher_epochs must be at least 1"),
    ({"n_teachers": 1}, "n_teachers must be at least 2"),
    ({"gate_momentum": 1.0}, "gate_momentum must be below 1"),
    ({"weight_decay": -1e-4}, "weight_decay must be at least 0"),
    ({"finetune_gamma": 0}, "finetune_gamma must be positive"),
    ({"finetune_milestones": [2, -1]}, "finetune_milestones must be at least 0, got -1"),
    ({"teacher_seeds": "12"}, "teacher_seeds must be a list of whole numbers"),
    ({"gate_options": 3}, "gate_options must be a mapping"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"lambda_schedule": "cubic"}, "unknown lambda schedule 'cubic'"),
    ({"resume": True}, "resume=True needs checkpoint_dir"),
    ({"gate_epoch": 3}, "unknown setting(s) gate_epoch"),
    ({"distill": "bigger"}, "unknown distill 'bigger'"),
    ({"distill": "none"}, "unknown distill 'none'"),
    ({"distill": "big", "distill_weight": 1.5}, "distill_weight is w in the fine-tuning loss"),
    ({"distill": "big", "distill_weight": -0.1}, "distill_weight must be at least 0, got -0.1"),
    ({"distill": "big", "distill_weight": float("nan")}, "distill_weight must be a finite number"),
    ({"distill": "teachers", "temperature": 0}, "temperature must be positive, got 0"),
    ({"distill": "teachers", "temperature": 2.0}, "temperature=2.0 softens logits in the cross-entropy"),
    ({"distill": "teachers", "loss": lambda o, t: (o - t).abs().mean()}, "needs distill_loss too"),
    ({"distill": "teachers", "distill_loss": "kl"}, "distill_loss must be a callable"),
    ({"distill_weight": 0.3}, "distill_weight is set but distill is None"),
    ({"temperature": 3.0}, "temperature is set but distill is None"),
])
def test_merge_settings_are_checked_before_any_work(options, message):
    train_data, _ = small_sine(n_train=32)
    with pytest.raises(GraphMergeError) as info:
        merge(build_mlp, train_data, **{"loss": "mse", "teacher_epochs": 1, **options})
    assert message in str(info.value)


def test_train_settings_are_checked():
    train_data, _ = small_sine(n_train=32)
    for options, message in [({"epochs": 0}, "epochs must be at least 1"), ({"lr": -1.0}, "lr must be at least 0"),
                             ({"momentum": 1.5}, "momentum must be below 1"), ({"milestones": [-3]}, "milestones")]:
        with pytest.raises(GraphMergeError, match=message):
            train(build_mlp(), train_data, **{"epochs": 1, "loss": "mse", **options})


def test_merge_settings_fingerprint_is_the_checkpoint_format():
    """The keys and values a checkpoint records (unchanged since settings were a dict of merge's keyword
    arguments, so older checkpoints still resume; decide_gates, which changed the default gate phase,
    is recorded while it acts, so a checkpoint of the old default is refused rather than continued
    differently, and so are normalised_groups="block" and dead_channels="replace");
    callables by name; run-only settings left out."""
    def my_loss(output, target):
        return (output - target).abs().mean()

    settings = MergeSettings(loss=my_loss, finetune_milestones=[3, 4], log=print, device="cpu", progress=True,
                             checkpoint_dir="ck", resume=True, example_inputs=torch.zeros(1, 1))
    assert settings.finetune_milestones == (3, 4) and settings.example_inputs[0].shape == (1, 1)
    assert settings.fingerprint() == {
        "loss": "test_merge_settings_fingerprint_is_the_checkpoint_format.<locals>.my_loss",
        "gate_epochs": 10, "finetune_epochs": 10, "batch_size": 32, "weight_lr": 0.01, "weight_momentum": 0.9,
        "weight_decay": 0.0, "gate_lr": 1.0, "gate_momentum": 0.9, "gate_budget": "projected", "budget_ramp": 0.5,
        "budget_direction": "gradient", "decide_gates": True,
        "lambda_schedule": "quadratic", "lambda0": 0.01,
        "lambda_growth": 0.05, "gate_options": None, "finetune_lr": 0.01, "finetune_momentum": 0.9,
        "finetune_milestones": (3, 4), "finetune_gamma": 0.1, "teacher_epochs": None, "teacher_seeds": None,
        "n_teachers": 2, "teacher_lr": 0.01, "teacher_milestones": None, "seed": 0, "normalised_groups": "block",
        "dead_channels": "replace"}
    assert "normalised_groups" not in MergeSettings(normalised_groups="mixed").fingerprint()  # the old selection
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 3  # type: ignore[misc]


# --- merge end to end ----------------------------------------------------------------------

def test_merge_sine_mlp_end_to_end(tmp_path: Path):
    train_data, val_data = small_sine()
    records = []
    result = merge(build_mlp, train_data, val_data=val_data, loss="mse", teacher_epochs=2, gate_epochs=2,
                   finetune_epochs=2, gate_budget="penalty", lambda0=0.5, log=records.append,
                   checkpoint_dir=tmp_path / "ck")
    assert type(result.student).__name__ == "SineMLP"
    build_mlp().load_state_dict(result.student.state_dict(), strict=True)
    phases = [(r["phase"], r["epoch"]) for r in records]
    assert phases == [("teacher0", 1), ("teacher0", 2), ("teacher1", 1), ("teacher1", 2), ("gate", 1),
                      ("gate", 2), ("finetune", 1), ("finetune", 2)]
    gate_records = [r for r in records if r["phase"] == "gate"]
    assert all({"lambda", "l_half", "open_fraction", "val_loss"} <= set(r) for r in gate_records)
    assert gate_records[1]["lambda"] > gate_records[0]["lambda"]
    summary = result.summary
    assert summary["metric"] == "val_loss" and len(summary["teachers"]) == 2
    assert summary["after_finetune"] == pytest.approx(evaluate(result.student, val_data, "mse")["loss"])
    # the big student in eval mode is the teachers' mean: its loss is at most the mean teacher loss
    assert summary["big"] <= sum(summary["teachers"]) / 2 + 1e-6
    assert sum(result.teacher_share[next(iter(result.teacher_share))]) == 100


def test_merge_cnn_with_batchnorm_and_residual_end_to_end():
    data = small_mnist1d()
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(train(build_cnn(), data, epochs=1, seed=seed, batch_size=64).model)
    result = merge(teachers, data, loss="cross_entropy", gate_epochs=1, finetune_epochs=1, batch_size=64)
    fresh = build_cnn()
    fresh.load_state_dict(result.student.state_dict(), strict=True)
    assert fresh(torch.randn(3, 1, 40)).shape == (3, 10)
    assert 0.0 <= result.summary["after_finetune"] <= 1.0 and result.summary["metric"] == "train_acc"
    assert all(0.0 <= f <= 1.0 for f in result.open_fraction.values())


def test_far_from_half_open_gates_warn():
    train_data, _ = small_sine(n_train=64)
    with pytest.warns(UserWarning, match="far from 0.50 open"):
        merge(build_mlp, train_data, loss="mse", teacher_epochs=1, gate_epochs=1, finetune_epochs=0,
              gate_budget="penalty", lambda_schedule="constant", lambda0=0.0)


@pytest.mark.parametrize("gate_epochs", [1, 3])
def test_projected_budget_meets_one_over_n_on_any_number_of_gate_epochs(gate_epochs: int):
    """The default gate phase ends with every group at mean P[g > 0] = 1/N, recomputed here from the
    gates' log-alphas; the paper's schedule on the same teachers stays far above it."""
    data = small_mnist1d()
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(train(build_cnn(), data, epochs=1, seed=seed, batch_size=64).model)
    records = []
    gated = _gated_after_gate_phase(teachers, data, gate_epochs, "projected", records.append)
    gates = gated.gates
    shift = gates.beta * math.log(-gates.gamma / gates.zeta)
    for gid in gates.group_ids:
        mean_open = float(torch.sigmoid(gates.log_alpha[f"g{gid}"].detach().double() - shift).mean())
        assert mean_open == pytest.approx(0.5, abs=1e-4), gid
    budgets = [r["budget"] for r in records if r["phase"] == "gate"]
    assert budgets[-1] == 0.5 and len(budgets) == gate_epochs
    penalty = _gated_after_gate_phase(teachers, data, gate_epochs, "penalty", None)
    assert max(penalty.open_fraction().values()) > 0.6


@pytest.mark.parametrize("decide", [True, False])
def test_short_gate_phase_ends_decided_on_the_budget_and_compresses_exactly(decide: bool):
    """3 gate epochs on the sine MLP through the real recipe. With the default decision every
    group's mean P[g > 0] (the hard-concrete formula written out here) is 1/2 within 0.005, every
    kept channel's eval gate (the top half by log-alpha, as compress keeps) is >= 0.99 and every
    dropped one's <= 0.01, and the compressed student equals the gated big student (I3).
    decide_gates=False gives the old end state: on the budget, but every gate half open."""
    import graphmerge
    from graphmerge.merge_run import MergeRun

    train_data, _ = small_sine(n_train=256)
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(train(build_mlp(), train_data, loss="mse", epochs=3, seed=seed).model.eval())
    records = []
    settings = MergeSettings(loss="mse", gate_epochs=3, finetune_epochs=0, decide_gates=decide, log=records.append)
    gated = MergeRun(teachers, train_data, None, settings)._gate_phase(teachers)
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    for name, param in gated.gates.log_alpha.items():
        log_alpha = param.detach().double()
        mean_open = float((1 / (1 + torch.exp(-(log_alpha - beta * math.log(-gamma / zeta))))).mean())
        assert abs(mean_open - 0.5) <= 0.005, name
        eval_gate = ((1 / (1 + torch.exp(-log_alpha))) * (zeta - gamma) + gamma).clamp(0, 1)
        kept = torch.zeros_like(log_alpha, dtype=torch.bool)
        kept[torch.argsort(-log_alpha, stable=True)[: log_alpha.numel() // 2]] = True
        if decide:
            assert float(eval_gate[kept].min()) >= 0.99 and float(eval_gate[~kept].max()) <= 0.01, name
        else:
            assert float(eval_gate[kept].mean()) < 0.5, name
    gate_records = [r for r in records if r["phase"] == "gate"]
    assert [r.get("decision") for r in gate_records] == ([0.0, pytest.approx(2 / 3), 1.0] if decide else [None] * 3)
    x = torch.linspace(-4, 4, 101).view(-1, 1)
    student = graphmerge.compress(gated.eval(), "gates").eval()
    with torch.no_grad():
        difference = float((student(x) - gated(x)).abs().max())
    assert difference < 1e-5 if decide else difference > 1e-3
    assert ("decide_gates" in settings.fingerprint()) == decide
    assert "decide_gates" not in dataclasses.replace(settings, gate_budget="penalty").fingerprint()


def _gated_after_gate_phase(teachers, data, gate_epochs, budget, log):
    """The gated student at the end of the recipe's gate phase (merge returns only the student)."""
    from graphmerge.merge_run import MergeRun
    from graphmerge.recipe import MergeSettings

    settings = MergeSettings(loss="cross_entropy", gate_epochs=gate_epochs, finetune_epochs=0, batch_size=64,
                             gate_budget=budget, log=log)
    return MergeRun(teachers, data, None, settings)._gate_phase([t.eval() for t in teachers])


# --- resume --------------------------------------------------------------------------------

RESUME_SCRIPT = """
    import os, signal, sys
    from graphmerge.checkpoint import save_weights
    from graphmerge.data import sine
    from graphmerge.examples.mlp import build_model
    from graphmerge.recipe import merge

    out, checkpoint_dir, crash_at, resume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    distill = sys.argv[5] if len(sys.argv) > 5 else None

    def crash_after_checkpoint(record):  # the log runs after the epoch's checkpoint is written
        if f"{record['phase']}:{record['epoch']}" == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a killed job dies

    train_data, val_data, _, _ = sine(n_train=256, n_val=64, n_test=1)
    result = merge(build_model, train_data, val_data=val_data, loss="mse", teacher_epochs=2, gate_epochs=3,
                   finetune_epochs=2, lambda0=0.5, checkpoint_dir=checkpoint_dir, resume=resume,
                   log=crash_after_checkpoint, distill=distill)
    save_weights(out, result.student)
"""


def _run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _uninterrupted_run(folder: Path, *extra: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The resume script, and the student of one run that nothing interrupts."""
    script = folder / "run.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT))
    reference = _run_script(script, str(folder / "ref.safetensors"), str(folder / "ref_ck"), "never", "0", *extra)
    assert reference.returncode == 0, reference.stderr
    return script, load_file(folder / "ref.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    return _uninterrupted_run(tmp_path_factory.mktemp("resume"))


def _crash_and_resume(tmp_path: Path, script: Path, crash_at: str, *extra: str) -> dict[str, torch.Tensor]:
    """Kill the script after the checkpoint of ``crash_at`` ("phase:epoch"), resume it; -> its student."""
    crashed = _run_script(script, str(tmp_path / "b.safetensors"), str(tmp_path / "ck"), crash_at, "0", *extra)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert not (tmp_path / "b.safetensors").exists()
    phase, epoch = crash_at.split(":")
    saved = ckpt.load_state(tmp_path / "ck" / "merge.safetensors")
    assert (saved["phase"], saved["epoch"]) == (phase, int(epoch))
    resumed = _run_script(script, str(tmp_path / "b.safetensors"), str(tmp_path / "ck"), "never", "1", *extra)
    assert resumed.returncode == 0, resumed.stderr
    return load_file(tmp_path / "b.safetensors")


# Killed after: a teacher epoch, a gate epoch, the last gate epoch (resume must compress), a
# fine-tuning epoch.
@pytest.mark.parametrize("crash_at", ["teacher1:2", "gate:1", "gate:3", "finetune:1"])
def test_resume_after_a_kill_gives_the_uninterrupted_result_bitwise(tmp_path: Path, crash_at: str, uninterrupted):
    script, expected = uninterrupted
    actual = _crash_and_resume(tmp_path, script, crash_at)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_resume_with_different_settings_is_refused(tmp_path: Path):
    train_data, _ = small_sine(n_train=64)
    merge(build_mlp, train_data, loss="mse", teacher_epochs=1, gate_epochs=1, finetune_epochs=1,
          checkpoint_dir=tmp_path)
    with pytest.raises(GraphMergeError, match="gate_epochs=1.*gate_epochs=2"):
        merge(build_mlp, train_data, loss="mse", teacher_epochs=1, gate_epochs=2, finetune_epochs=1,
              checkpoint_dir=tmp_path, resume=True)


def test_resume_with_other_teachers_or_other_data_is_refused(tmp_path: Path):
    train_data, _ = small_sine(n_train=64)
    torch.manual_seed(1)
    teachers = [build_mlp(8) for _ in range(2)]
    merge(teachers, train_data, loss="mse", gate_epochs=1, finetune_epochs=1, checkpoint_dir=tmp_path)
    torch.manual_seed(2)
    others = [build_mlp(8) for _ in range(2)]  # same architecture, other weights
    with pytest.raises(GraphMergeError, match="teachers_sha256"):
        merge(others, train_data, loss="mse", gate_epochs=1, finetune_epochs=1, checkpoint_dir=tmp_path,
              resume=True)
    smaller, _ = small_sine(n_train=32)
    with pytest.raises(GraphMergeError, match="data_sizes"):
        merge(teachers, smaller, loss="mse", gate_epochs=1, finetune_epochs=1, checkpoint_dir=tmp_path,
              resume=True)
    merge(teachers, train_data, loss="mse", gate_epochs=1, finetune_epochs=1, checkpoint_dir=tmp_path,
          resume=True)  # the same teachers and data resume


# --- CLI -----------------------------------------------------------------------------------

def test_cli_train_then_merge_on_sine(run_cli, tmp_path: Path):
    for seed in (1, 2):
        done = run_cli("train", "examples:mlp", "--data", "sine", "--seed", str(seed), "--epochs", "1",
                       "--batch-size", "256", "--out", f"t{seed}.safetensors")
        assert done.returncode == 0, done.stderr
    done = run_cli("merge", "examples:mlp", "--teacher", "t1.safetensors", "--teacher", "t2.safetensors",
                   "--data", "sine", "--gate-epochs", "1", "--finetune-epochs", "1", "--batch-size", "256",
                   "--out", "student.safetensors", "--log-json", "log.jsonl", "--checkpoint-dir", "ck")
    assert done.returncode == 0, done.stderr
    build_mlp().load_state_dict(load_file(tmp_path / "student.safetensors"), strict=True)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["gate", "finetune"]
    assert "student after fine-tuning" in done.stdout and "gate epoch   1" in done.stdout


def test_cli_bad_inputs_exit_2_with_a_message(run_cli, tmp_path: Path):
    ckpt.save_weights(tmp_path / "a.safetensors", build_mlp())
    ckpt.save_weights(tmp_path / "wide.safetensors", build_mlp(hidden=7))
    a = ["--teacher", "a.safetensors"]
    cases = [
        ([*a, "--teacher", "missing.safetensors", "--data", "sine"], "missing.safetensors"),
        ([*a, "--data", "sine"], "at least 2 teachers"),
        ([*a, *a, "--data", "nope"], "unknown data spec"),
        ([*a, "--teacher", "wide.safetensors", "--data", "sine"], "(7, 1)"),
    ]
    for args, message in cases:
        done = run_cli("merge", "examples:mlp", *args, "--out", "s.safetensors")
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--lr", "-1", "greater than or equal to 0"),
    ("--device", "foo", "not a device torch knows"),
    ("--device", "cuda:3", "cuda:3"),
])
def test_cli_train_rejects_bad_options_before_any_work(run_cli, tmp_path: Path, option, value, expected):
    out = tmp_path / "t.safetensors"
    result = run_cli("train", "examples:mlp", "--data", "sine", "--epochs", "1", option, value, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert not out.exists()


# --- distillation in fine-tuning -----------------------------------------------------------

def test_distill_settings_are_fingerprinted_only_when_on():
    plain = MergeSettings(loss="mse").fingerprint()
    assert not {"distill", "distill_weight", "temperature", "distill_loss"} & set(plain)
    on = MergeSettings(loss="cross_entropy", distill="big", distill_weight=0.25, temperature=4.0).fingerprint()
    assert {k: on[k] for k in ("distill", "distill_weight", "temperature", "distill_loss")} == {
        "distill": "big", "distill_weight": 0.25, "temperature": 4.0, "distill_loss": None}
    assert on.keys() - plain.keys() == {"distill", "distill_weight", "temperature", "distill_loss"}


def test_resume_with_another_distill_setting_is_refused(tmp_path: Path):
    train_data, _ = small_sine(n_train=64)
    options = {"loss": "mse", "teacher_epochs": 1, "gate_epochs": 1, "finetune_epochs": 1, "checkpoint_dir": tmp_path}
    merge(build_mlp, train_data, distill="teachers", **options)
    with pytest.raises(GraphMergeError, match="distill_weight=0.5.*distill_weight=0.9"):
        merge(build_mlp, train_data, distill="teachers", distill_weight=0.9, resume=True, **options)
    with pytest.raises(GraphMergeError, match="distill='teachers'.*distill=None"):
        merge(build_mlp, train_data, resume=True, **options)


def test_without_distill_fine_tuning_is_plain_sgd_on_the_task_loss_bitwise():
    """distill=None: the fine-tuned student is, bit for bit, the compressed student trained by a
    hand-written SGD loop on the MSE alone (the recipe's behaviour before distillation existed)."""
    train_data, _ = small_sine(n_train=96)
    torch.manual_seed(3)
    teachers = [build_mlp(16) for _ in range(2)]
    options = {"loss": "mse", "gate_epochs": 1, "batch_size": 32, "finetune_lr": 0.05, "seed": 4}
    start = merge(teachers, train_data, finetune_epochs=0, **options).student
    student = merge(teachers, train_data, finetune_epochs=2, **options).student

    optimizer = torch.optim.SGD(start.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.1)  # half of 2 epochs
    hand_finetune(start, train_data, optimizer, scheduler)
    expected, actual = start.state_dict(), student.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def _one_step(student: torch.nn.Module, loss_of_output, x: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """The parameters after one plain SGD step on ``loss_of_output(student(x))`` (train mode)."""
    student.train()
    student.zero_grad()
    loss_of_output(student(x)).backward()
    return {name: (p - lr * p.grad).detach() for name, p in student.named_parameters()}


def _l1(output, target):
    return (output - target).abs().mean()


@pytest.mark.parametrize("custom", [False, True])
def test_distill_towards_the_teachers_mean_gives_the_gradient_of_the_hand_written_loss(custom: bool):
    """distill_weight=1, target "teachers": one fine-tuning step (one batch, no momentum) moves the
    student by -lr · ∇ MSE(student(x), (teacher_0(x) + teacher_1(x)) / 2); with a custom loss, by the
    gradient of the given distill_loss (here L1) instead."""
    train_data, _ = small_sine(n_train=64)
    x = train_data.tensors[0]
    torch.manual_seed(5)
    teachers = [build_mlp(16) for _ in range(2)]
    options = {"loss": _l1 if custom else "mse", "gate_epochs": 1, "batch_size": 64, "finetune_lr": 0.1,
               "finetune_momentum": 0.0}
    before = merge(teachers, train_data, finetune_epochs=0, **options).student
    result = merge(teachers, train_data, finetune_epochs=1, distill="teachers", distill_weight=1.0,
                   distill_loss=_l1 if custom else None, **options)
    with torch.no_grad():
        target = (teachers[0](x) + teachers[1](x)) / 2
    hand = (lambda out: (out - target).abs().mean()) if custom else (lambda out: ((out - target) ** 2).mean())
    expected = _one_step(before, hand, x, lr=0.1)
    actual = dict(result.student.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].detach(), value, rtol=1e-5, atol=1e-7)
    assert result.history[-1]["distill_samples"] == 64
    assert result.summary["distill"] == {"target": "teachers", "weight": 1.0, "temperature": 1.0, "samples": 64,
                                         "target_models": 2, "model_forwards": 128}


def test_distill_towards_the_gated_big_student_mixes_cross_entropy_and_hintons_kl():
    """Target "big" (the gated big student at the end of the gate phase, eval mode), cross-entropy,
    w = 0.3, T = 2: one step follows ∇[(1 − w)·CE + w·T²·mean_b Σ_c p_t (log p_t − log p_s)], p at T."""
    data = small_mnist1d(64)
    x, labels = data.tensors
    torch.manual_seed(6)
    teachers = [build_cnn().eval() for _ in range(2)]
    options = {"loss": "cross_entropy", "gate_epochs": 1, "batch_size": 64, "finetune_lr": 0.1,
               "finetune_momentum": 0.0}
    before = merge(teachers, data, finetune_epochs=0, **options).student
    result = merge(teachers, data, finetune_epochs=1, distill="big", distill_weight=0.3, temperature=2.0, **options)
    gated = _gated_after_gate_phase(teachers, data, 1, "projected", None).eval()
    with torch.no_grad():
        p_target = torch.softmax(gated(x) / 2.0, dim=1)

    def loss(out):
        kl = (p_target * (p_target.log() - torch.log_softmax(out / 2.0, dim=1))).sum(dim=1).mean() * 4.0
        return 0.7 * torch.nn.functional.cross_entropy(out, labels) + 0.3 * kl

    expected = _one_step(before, loss, x, lr=0.1)
    actual = dict(result.student.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].detach(), value, rtol=1e-4, atol=1e-6)
    assert result.summary["distill"]["model_forwards"] == 64 and result.summary["distill"]["target_models"] == 1


@pytest.fixture(scope="module")
def uninterrupted_distill_big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    return _uninterrupted_run(tmp_path_factory.mktemp("resume_distill"), "big")


# After the last gate epoch the gated big student comes from the gate checkpoint; after a
# fine-tuning epoch it is rebuilt from the state the fine-tuning checkpoint keeps.
@pytest.mark.parametrize("crash_at", ["gate:3", "finetune:1"])
def test_resume_with_distill_big_gives_the_uninterrupted_result_bitwise(tmp_path: Path, crash_at: str,
                                                                        uninterrupted_distill_big):
    script, expected = uninterrupted_distill_big
    actual = _crash_and_resume(tmp_path, script, crash_at, "big")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_cli_distill_flags_reach_the_settings(run_cli, sine_merge_args: list[str], tmp_path: Path):
    teachers = sine_merge_args
    done = run_cli("merge", "examples:mlp", *teachers, "--distill", "teachers", "--distill-weight", "0.25",
                   "--checkpoint-dir", "ck", "--log-json", "log.jsonl", "--out", "s.safetensors")
    assert done.returncode == 0, done.stderr
    settings = ckpt.load_state(tmp_path / "ck" / "merge.safetensors")["settings"]
    assert (settings["distill"], settings["distill_weight"], settings["temperature"]) == ("teachers", 0.25, 1.0)
    record = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert record["phase"] == "finetune" and record["distill_samples"] == 10_000
    assert "20000 extra forwards of a teacher" in " ".join(done.stdout.split())
    for args, message in [(["--distill", "bigger"], "unknown distill 'bigger'"),
                          (["--distill", "big", "--temperature", "3"], "temperature=3.0 softens logits"),
                          (["--distill-weight", "0.3"], "distill_weight is set but distill is None")]:
        failed = run_cli("merge", "examples:mlp", *teachers, *args, "--out", "t.safetensors")
        assert failed.returncode == 2 and message in " ".join(failed.stderr.split()), (args, failed.stderr)
        assert "Traceback" not in failed.stderr and not (tmp_path / "t.safetensors").exists()


# --- the preflight: the whole merge at toy scale before any training ---------------------------

def test_a_model_that_cannot_be_merged_fails_before_the_teachers_train(monkeypatch):
    """Break decide: merge, asked to train its teachers first, fails at once naming the stage, with no
    teacher epoch logged; without the preflight the same failure comes only after the teachers and the
    gate phase ran."""
    from graphmerge.passes.gate import GatedStudent

    def broken(self, *args, **kwargs):
        raise RuntimeError("decide is broken")

    monkeypatch.setattr(GatedStudent, "decide", broken)
    train_data, _ = small_sine(n_train=64)
    records = []
    with pytest.raises(GraphMergeError, match="fails at 'decide': RuntimeError: decide is broken"):
        merge(build_mlp, train_data, loss="mse", teacher_epochs=1, gate_epochs=1, finetune_epochs=0,
              log=records.append)
    assert records == []
    with pytest.raises(RuntimeError, match="decide is broken"):
        merge(build_mlp, train_data, loss="mse", teacher_epochs=1, gate_epochs=1, finetune_epochs=0,
              log=records.append, preflight=False)
    assert records, "without the preflight the teachers trained first"


def test_the_preflight_leaves_the_run_unchanged():
    """The preflight forks every RNG it touches: a run with it equals a run without it, bitwise."""
    train_data, _ = small_sine(n_train=64)
    runs = [merge(build_mlp, train_data, loss="mse", teacher_epochs=1, gate_epochs=1, finetune_epochs=1,
                  preflight=flag, seed=3) for flag in (True, False)]
    for key, value in runs[0].student.state_dict().items():
        assert torch.equal(value, runs[1].student.state_dict()[key]), key
