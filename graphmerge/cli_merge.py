"""The ``train``, ``merge`` and ``demo`` commands (registered by ``graphmerge/cli.py``).

Every check on the inputs (model spec, data spec, teacher files, output folder) runs before any
training, so a mistake costs seconds, not an epoch. Output files are written atomically. Each
epoch prints one line; ``--log-json`` appends the same records as JSON lines.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import typer

from graphmerge.cli_export import check_positional_inputs
from graphmerge.errors import GraphMergeError
from graphmerge.passes.util import check_teacher_count, eval_mode, one_line

MODEL_HELP = "The model: path/to/model.py[:NAME], torchvision:NAME, timm:NAME, hf:PATH or examples:NAME."
DATA_HELP = ("The data: sine, mnist1d, digits, path/to/data.py (train_data(), val_data()), "
             "imagefolder:PATH[:SIZE] or cifar10:PATH.")
SCHEDULES = ("quadratic", "linear", "constant")
TRAINING_LIMITATION = ("training feeds the model only the positional batches of --data (graphmerge.merge and "
                       "graphmerge.train take no keyword inputs)")


# --- commands ------------------------------------------------------------------------------

def _device_option(device: str) -> str:
    try:
        return check_device(device)
    except GraphMergeError as error:
        raise typer.BadParameter(str(error)) from None


def check_device(device: str) -> str:
    """A device torch can use here, or a GraphMergeError naming what is missing."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise GraphMergeError(f"--device {device!r} is not a device torch knows: use cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise GraphMergeError(f"--device {device} asks for a GPU, but torch sees none here (no CUDA driver or "
                                  "device). Use --device cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise GraphMergeError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    elif parsed.type != "cpu":
        raise GraphMergeError(f"--device {device}: only cpu and cuda devices are supported.")
    return device


COMPILE_HELP = ("Run the training steps through torch.compile (inductor; compiles on the first step of each "
                "phase, seconds to minutes). Faster on some models, slower on others: see the README.")
PRECISION_HELP = ("fp32, or bf16: forward and loss under torch.autocast(bfloat16), weights and optimiser in "
                  "float32.")


def train_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Where to write the trained weights (.safetensors)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and the data order."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Global batch size."),
    lr: float = typer.Option(0.01, "--lr", help="SGD learning rate (momentum 0.9).", min=0.0),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Checkpoint every epoch here."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --checkpoint-dir."),
    log_json: Path | None = typer.Option(None, "--log-json", help="Append one JSON record per epoch here."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N.", callback=_device_option),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
) -> None:
    """Train one teacher from a seed (SGD, momentum 0.9, lr / 10 at half and 3/4 of training)."""
    import torch

    from graphmerge import checkpoint, recipe

    _check_output(out)
    train_data, val_data, _, task = _load_data(data)
    torch.manual_seed(seed)
    loaded = _load_model(model)
    check_positional_inputs(loaded, "train", TRAINING_LIMITATION)
    _check_runs(loaded.model, train_data, model, data)
    result = recipe.train(loaded.model, train_data, val_data=val_data, loss=_loss_for(task), epochs=epochs,
                          batch_size=batch_size, lr=lr, seed=seed, checkpoint_dir=checkpoint_dir,
                          resume=resume, log=_epoch_logger(log_json, resume), progress=True, device=device,
                          compile=compile, precision=precision)
    if _is_main():
        checkpoint.save_weights(out, result.model, metadata={"seed": str(seed), "model": model, "data": data})
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"wrote {out} ({metrics} on {'val' if val_data is not None else 'train'})")


def merge_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    teacher: list[Path] = typer.Option(..., "--teacher", "-t", help="A teacher's weights; at least two."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(Path("student.safetensors"), "--out", help="Where to write the student."),
    gate_epochs: int = typer.Option(10, "--gate-epochs", min=0, help="Epochs learning the gates."),
    finetune_epochs: int = typer.Option(10, "--finetune-epochs", min=0, help="Fine-tuning epochs."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Global batch size."),
    lr: float = typer.Option(0.01, "--lr", help="Weights' SGD learning rate in the gate phase.", min=0.0),
    gate_lr: float = typer.Option(0.1, "--gate-lr", help="Gates' SGD learning rate.", min=0.0),
    finetune_lr: float = typer.Option(0.01, "--finetune-lr", help="Fine-tuning SGD learning rate.", min=0.0),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay (never on gates).", min=0.0),
    gate_budget: str = typer.Option("projected", "--gate-budget",
                                    help="projected: the gates are held to a budget falling to 1/N (met on any "
                                         "number of gate epochs); penalty: the paper's lambda * L_half."),
    budget_ramp: float = typer.Option(0.5, "--budget-ramp", min=0.0, max=1.0,
                                      help="Fraction of the gate phase over which the budget falls to 1/N."),
    budget_direction: str = typer.Option("gradient", "--budget-direction",
                                         help="projected budget: move the gates along the budget's gradient "
                                              "(undecided ones close first) or 'uniform' (all by one constant)."),
    decide_gates: bool = typer.Option(True, "--decide-gates/--no-decide-gates",
                                      help="projected budget: after the budget reaches 1/N, drive the gates to "
                                           "the channels compress keeps (kept gates 1, the rest 0) while every "
                                           "group stays exactly 1/N open."),
    lambda0: float = typer.Option(0.01, "--lambda0", help="Initial weight of the L_half loss (--gate-budget "
                                                         "penalty)."),
    lambda_schedule: str = typer.Option("quadratic", "--lambda-schedule",
                                        help="How lambda grows per epoch: quadratic, linear, constant "
                                             "(--gate-budget penalty)."),
    distill: str = typer.Option("none", "--distill",
                                help="Distil during fine-tuning: big (towards the gated big student as trained in "
                                     "the gate phase), teachers (towards the mean of the teachers' outputs) or "
                                     "none."),
    distill_weight: float | None = typer.Option(None, "--distill-weight",
                                                help="w in the fine-tuning loss (1 - w)*task + w*distill, in [0, 1] "
                                                     "(default 0.5; needs --distill)."),
    temperature: float | None = typer.Option(None, "--temperature",
                                             help="Softmax temperature T of the distillation term KL * T^2 for "
                                                  "classification data (default 1; needs --distill)."),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Checkpoint every epoch here."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --checkpoint-dir."),
    seed: int = typer.Option(0, "--seed", help="Seed of the gate noise and the data order."),
    log_json: Path | None = typer.Option(None, "--log-json", help="Append one JSON record per epoch here."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N.", callback=_device_option),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    normalised_groups: str = typer.Option("block", "--normalised-groups",
                                          help="How a channel group a normalisation spans (a pre-norm transformer's "
                                               "residual stream) is selected: 'block' keeps one teacher's whole "
                                               "block (compression exact), 'mixed' the top channels of any."),
    preflight: bool = typer.Option(True, "--preflight/--no-preflight",
                                   help="Before any training, run the whole merge at toy scale on two samples "
                                        "(gates in train mode, compress by the gates, reload) so a model that "
                                        "cannot be merged fails in seconds, naming the stage."),
) -> None:
    """Merge trained teachers into one student of the same size (widen, gates, compress, fine-tune)."""
    from graphmerge import checkpoint, recipe

    check_teacher_count(len(teacher), f"pass --teacher A.safetensors --teacher B.safetensors (train them with "
                                      f"`graphmerge train {model} --data {data} --seed S --out S.safetensors`).")
    if lambda_schedule not in SCHEDULES:
        raise GraphMergeError(f"unknown --lambda-schedule {lambda_schedule!r}: use {', '.join(SCHEDULES)}.")
    _check_output(out)
    states = [checkpoint.read_state_dict(path) for path in teacher]  # the reader export --weights uses
    train_data, val_data, _, task = _load_data(data)
    loaded = _load_model(model)
    check_positional_inputs(loaded, "merge", TRAINING_LIMITATION)
    teachers = [checkpoint.load_weights(copy.deepcopy(loaded.model), state, name=str(path))
                for path, state in zip(teacher, states, strict=True)]
    _check_runs(teachers[0], train_data, model, data)
    distillation = {"distill": None if distill.lower() == "none" else distill}
    distillation.update({name: value for name, value in (("distill_weight", distill_weight),
                                                         ("temperature", temperature)) if value is not None})
    start = time.perf_counter()
    result = recipe.merge(
        teachers, train_data, val_data=val_data, loss=_loss_for(task), gate_epochs=gate_epochs,
        finetune_epochs=finetune_epochs, batch_size=batch_size, weight_lr=lr, gate_lr=gate_lr,
        finetune_lr=finetune_lr, weight_decay=weight_decay, gate_budget=gate_budget, budget_ramp=budget_ramp,
        budget_direction=budget_direction, decide_gates=decide_gates,
        lambda0=lambda0, lambda_schedule=lambda_schedule, **distillation,
        checkpoint_dir=checkpoint_dir, resume=resume, seed=seed, log=_epoch_logger(log_json, resume),
        progress=True, device=device, compile=compile, precision=precision, preflight=preflight,
        normalised_groups=normalised_groups)
    if _is_main():
        checkpoint.save_weights(out, result.student, metadata={"model": model, "data": data})
        print_gate_report(result)
        print_summary(result, [p.name for p in teacher], time.perf_counter() - start)
        print(f"wrote {out}")


def demo_command() -> None:
    """Train two MNIST-1D CNN teachers from two seeds, merge them, and print the comparison table."""
    from graphmerge import recipe
    from graphmerge.data import mnist1d
    from graphmerge.examples.mnist1d_cnn import build_model

    print("graphmerge demo: two MNIST-1D CNN teachers (seeds 1000, 1001) -> one student of the same "
          "size, on CPU.")
    train_data, val_data, _, _ = mnist1d()
    start = time.perf_counter()
    result = recipe.merge(build_model, train_data, val_data=val_data, loss="cross_entropy",
                          **DEMO_SETTINGS, log=_epoch_logger(None, False), progress=True)
    print_gate_report(result)
    budget = 2 * DEMO_SETTINGS["teacher_epochs"] + DEMO_SETTINGS["gate_epochs"] + DEMO_SETTINGS["finetune_epochs"]
    torch.manual_seed(1002)
    single = recipe.train(build_model(), train_data, val_data=val_data, epochs=budget,
                          batch_size=DEMO_SETTINGS["batch_size"], seed=1002)
    print_summary(result, ["seed 1000", "seed 1001"], time.perf_counter() - start,
                  baseline=(f"one model, same {budget} epochs (seed 1002)", single.metrics))


# Short enough for about a minute or two on 2 CPU cores; the gate phase runs on the defaults (the
# projected budget reaches 1/N on any number of gate epochs).
DEMO_SETTINGS: dict[str, Any] = {"teacher_epochs": 5, "gate_epochs": 8, "finetune_epochs": 4,
                                 "batch_size": 64, "seed": 0}


# --- reporting -----------------------------------------------------------------------------

def format_record(record: dict[str, Any]) -> str:
    """One log line per epoch: phase, epoch, loss, λ, L_half, open fraction, distillation term, validation
    metric."""
    parts = [f"{record['phase']:>9} epoch {record['epoch']:>3}", f"loss {record['loss']:.4f}"]
    for key, label in (("lambda", "λ"), ("budget", "budget"), ("l_half", "L_half"), ("open_fraction", "open"),
                       ("distill_loss", "distill")):
        if key in record:
            parts.append(f"{label} {record[key]:.4g}")
    for key in ("val_loss", "val_acc"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    return "  ".join(parts)


def print_summary(result: Any, teacher_names: Sequence[str], seconds: float,
                  baseline: tuple[str, dict[str, float]] | None = None) -> None:
    """The table the paper's comparison needs: teachers, big student, student before/after fine-tune.

    ``baseline`` adds a row for a model trained with the same total epoch budget, for a fair reading.
    """
    from rich.console import Console
    from rich.table import Table

    summary = result.summary
    metric = summary["metric"]
    better = "higher" if metric.endswith("acc") else "lower"
    distill = summary.get("distill")
    caption = None if distill is None else (
        f"fine-tuned towards the {'gated big student' if distill['target'] == 'big' else 'teachers mean'} "
        f"(distill weight {distill['weight']:g}, T {distill['temperature']:g}): {distill['model_forwards']} extra "
        f"forwards of {'a teacher' if distill['target'] == 'teachers' else 'the big student'}")
    table = Table(title=f"{metric} ({better} is better), total {seconds:.0f} s", caption=caption)
    table.add_column("model")
    table.add_column(metric, justify="right")
    for name, value in zip(teacher_names, summary["teachers"], strict=True):
        table.add_row(f"teacher {name}", f"{value:.4f}")
    table.add_row("big student (before gate phase)", f"{summary['big']:.4f}")
    table.add_row("student before fine-tuning", f"{summary['before_finetune']:.4f}")
    table.add_row("student after fine-tuning", f"{summary['after_finetune']:.4f}")
    if baseline is not None and metric.removeprefix("val_") in baseline[1]:
        table.add_row(baseline[0], f"{baseline[1][metric.removeprefix('val_')]:.4f}")
    elif baseline is not None and metric in baseline[1]:
        table.add_row(baseline[0], f"{baseline[1][metric]:.4f}")
    Console().print(table)


def print_gate_report(result: Any) -> None:
    """Per group: mean P[gate open] and how many kept channels came from each teacher."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gate phase: channels kept per group")
    for column in ("group", "open fraction", "kept from each teacher"):
        table.add_column(column, justify="right")
    for group, fraction in sorted(result.open_fraction.items()):
        share = result.teacher_share.get(group, [])
        table.add_row(str(group), f"{fraction:.3f}", " / ".join(str(c) for c in share))
    Console().print(table)


def _epoch_logger(log_json: Path | None, resume: bool) -> Callable[[dict[str, Any]], None]:
    """Print one line per epoch and append the record to ``log_json`` (restarted unless resuming)."""
    if log_json is not None and not resume and _is_main():
        log_json.parent.mkdir(parents=True, exist_ok=True)
        log_json.write_text("")

    def log(record: dict[str, Any]) -> None:
        print(format_record(record), flush=True)
        if log_json is not None:
            with open(log_json, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    return log


# --- input checks --------------------------------------------------------------------------

def _check_output(out: Path) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise GraphMergeError(f"cannot write {out}: folder {folder} does not exist. Create it first or "
                              f"choose another --out.")
    if out.suffix != ".safetensors":
        raise GraphMergeError(f"--out {out} must end in .safetensors (graphmerge writes weights only in "
                              f"safetensors format).")


def _load_data(spec: str) -> tuple:
    from graphmerge.data import load_data

    return load_data(spec)


def _load_model(spec: str) -> Any:
    from graphmerge.loading import load_model

    return load_model(spec)


def _loss_for(task: str) -> str:
    return "cross_entropy" if task == "classification" else "mse"


def _check_runs(model: Any, train_data: Any, model_spec: str, data_spec: str) -> None:
    """Fail early, in one paragraph, when the model cannot take the data's inputs."""
    import torch

    from graphmerge.data import first_inputs

    inputs = first_inputs(train_data)
    try:
        with eval_mode(model), torch.no_grad():
            output = model(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise GraphMergeError(f"the model {model_spec} cannot run on the data {data_spec}: a batch of shape "
                              f"{shapes} gave {one_line(exc)}. Pick data that matches the model's input.") from exc
    if not isinstance(output, torch.Tensor):
        raise GraphMergeError(f"the model {model_spec} returns a {type(output).__name__}, not a tensor, on the data "
                              f"{data_spec}; the training loss and metrics need one output tensor (logits or "
                              f"predictions). Wrap the model in a model file whose forward returns that tensor "
                              f"(for a Hugging Face output, its .logits).")


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
