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
             "imagefolder:PATH[:SIZE], cifar10:PATH, or for hf: models text:PATH (a .txt file or a folder of them).")
BLOCK_SIZE_HELP = ("text: data: tokens per training block (default 128, at most the model's "
                   "max_position_embeddings); the last tenth of the blocks validates.")
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
OPTIMIZER_HELP = "The weights' optimiser in every weight phase: sgd (momentum 0.9) or adamw (betas 0.9, 0.999)."
SCHEDULE_HELP = ("Learning-rate schedule of every weight phase: multistep (lr / 10 at 1/2 and 3/4, per epoch; "
                 "the default, constant for the gate phase's weights), cosine, linear or constant (per step).")
WARMUP_HELP = "Fraction of each weight phase's steps over which the lr rises linearly from 0 (needs --schedule)."
WEIGHT_DECAY_HELP = ("Weight decay (never on the gates): on every weight, or with --optimizer/--schedule/--warmup/"
                     "--clip only on those of 2+ dimensions (not on norms, biases).")
CLIP_HELP = "Clip the weights' gradient norm (all of a phase's weights together) to this value."
SHARD_HELP = ("Under torchrun: shard the gate phase's big student and the fine-tuned student over the processes "
              "(FSDP2: each holds 1/K of the weights, gradients and optimiser state; the gates stay whole on "
              "every process); checkpoints are sharded too.")


def train_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Where to write the trained weights (.safetensors); for an hf: "
                                                "model, the save_pretrained directory (config, weights, tokenizer)."),
    block_size: int | None = typer.Option(None, "--block-size", min=2, help=BLOCK_SIZE_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and the data order."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Global batch size."),
    lr: float = typer.Option(0.01, "--lr", help="Learning rate (peak of the schedule).", min=0.0),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="Checkpoint every epoch here."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --checkpoint-dir."),
    log_json: Path | None = typer.Option(None, "--log-json", help="Append one JSON record per epoch here."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N.", callback=_device_option),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help=WEIGHT_DECAY_HELP, min=0.0),
    optimizer: str | None = typer.Option(None, "--optimizer", help=OPTIMIZER_HELP),
    schedule: str | None = typer.Option(None, "--schedule", help=SCHEDULE_HELP),
    warmup: float | None = typer.Option(None, "--warmup", help=WARMUP_HELP),
    clip: float | None = typer.Option(None, "--clip", help=CLIP_HELP),
) -> None:
    """Train one teacher from a seed (SGD, momentum 0.9, lr / 10 at half and 3/4 of training)."""
    import torch

    from graphmerge import checkpoint, hf, loading, recipe
    from graphmerge import data as data_module
    from graphmerge.optim import cli_optimizers

    optimizers = cli_optimizers(optimizer, schedule, warmup, clip, weight_decay, {"optimizer": (lr, "multistep")})
    optimizer_options = optimizers or {"lr": lr, "weight_decay": weight_decay}
    hf_run = hf.prepare_train(model, data, out, block_size) if hf.is_hf_spec(model) else None
    if hf_run is None:
        check_output(out)
        train_data, val_data, _, task = data_module.load_data(data)
        torch.manual_seed(seed)
        loaded = loading.load_model(model)
        check_positional_inputs(loaded, "train", TRAINING_LIMITATION)
        check_runs(loaded.model, train_data, model, data)
        network, loss = loaded.model, loss_for(task)
    else:
        network, train_data, val_data, loss = hf_run.models[0], hf_run.train_data, hf_run.val_data, hf_run.loss
    result = recipe.train(network, train_data, val_data=val_data, loss=loss, epochs=epochs,
                          batch_size=batch_size, **optimizer_options, seed=seed, checkpoint_dir=checkpoint_dir,
                          resume=resume, log=_epoch_logger(log_json, resume), progress=True, device=device,
                          compile=compile, precision=precision)
    if _is_main():
        if hf_run is None:
            checkpoint.save_weights(out, result.model, metadata={"seed": str(seed), "model": model, "data": data})
        else:
            hf_run.save(result.model)
            result.metrics["perplexity"] = hf.perplexity(result.metrics["loss"])
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"wrote {out} ({metrics} on {'val' if val_data is not None else 'train'})")


def merge_command(
    models: list[str] = typer.Argument(..., help=MODEL_HELP + " With -t, one spec; or two or more hf:DIR teachers "
                                                             "(each a save_pretrained directory with its tokenizer)."),
    teacher: list[Path] = typer.Option([], "--teacher", "-t", help="A teacher's weights; at least two."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    block_size: int | None = typer.Option(None, "--block-size", min=2, help=BLOCK_SIZE_HELP),
    out: Path | None = typer.Option(None, "--out", help="Where to write the student (default student.safetensors; "
                                                        "for hf: teachers a directory, default student/)."),
    gate_epochs: int = typer.Option(10, "--gate-epochs", min=0, help="Epochs learning the gates."),
    finetune_epochs: int = typer.Option(10, "--finetune-epochs", min=0, help="Fine-tuning epochs."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Global batch size."),
    lr: float = typer.Option(0.01, "--lr", help="Weights' learning rate in the gate phase.", min=0.0),
    gate_lr: float = typer.Option(1.0, "--gate-lr", help="Gates' SGD learning rate.", min=0.0),
    finetune_lr: float = typer.Option(0.01, "--finetune-lr", help="Fine-tuning learning rate.", min=0.0),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help=WEIGHT_DECAY_HELP, min=0.0),
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
    dead_channels: str = typer.Option("replace", "--dead-channels",
                                      help="Kept channels that cannot reach the output (a transformer's heads that "
                                           "read a residual stream compress dropped): 'replace' them by the best "
                                           "channels that can, or 'keep' them."),
    average_kept: bool | None = typer.Option(None, "--average-kept/--average-all",
                                             help="Where the teachers meet (the classifier), average the teachers "
                                                  "whose channels the student kept (a student of one teacher's "
                                                  "channels is that teacher), or all N as the big student does. "
                                                  "Default: kept teachers unless a gate phase trained the weights."),
    selection: str = typer.Option("gates", "--selection",
                                  help="Which channels compress keeps: 'gates' (learned in the gate phase) or "
                                       "'magnitude' (those the next layers weigh most; with --gate-epochs 0 "
                                       "there is no gate phase, and all the training is fine-tuning)."),
    preflight: bool = typer.Option(True, "--preflight/--no-preflight",
                                   help="Before any training, run the whole merge at toy scale on two samples "
                                        "(gates in train mode, compress by the gates, reload) so a model that "
                                        "cannot be merged fails in seconds, naming the stage."),
    optimizer: str | None = typer.Option(None, "--optimizer", help=OPTIMIZER_HELP),
    schedule: str | None = typer.Option(None, "--schedule", help=SCHEDULE_HELP),
    warmup: float | None = typer.Option(None, "--warmup", help=WARMUP_HELP),
    clip: float | None = typer.Option(None, "--clip", help=CLIP_HELP),
    shard: bool = typer.Option(False, "--shard", help=SHARD_HELP),
) -> None:
    """Merge trained teachers into one student of the same size (widen, gates, compress, fine-tune)."""
    from graphmerge import checkpoint, hf, loading, recipe
    from graphmerge import data as data_module
    from graphmerge.sharding import check_strategy

    strategy = "fsdp" if shard else "ddp"
    check_strategy(strategy, _world_size())  # before anything is read or written

    hf_teachers, model = hf.teachers_form(models, teacher), models[0]  # hf:DIR teachers, or MODEL -t WEIGHTS
    if not hf_teachers:
        check_teacher_count(len(teacher), f"pass --teacher A.safetensors --teacher B.safetensors (train them with "
                                          f"`graphmerge train {model} --data {data} --seed S --out S.safetensors`).")
    if lambda_schedule not in SCHEDULES:
        raise GraphMergeError(f"unknown --lambda-schedule {lambda_schedule!r}: use {', '.join(SCHEDULES)}.")
    from graphmerge.optim import cli_optimizers

    phase_lrs = {"weight_optimizer": (lr, "constant"), "finetune_optimizer": (finetune_lr, "multistep")}
    optimizers = cli_optimizers(optimizer, schedule, warmup, clip, weight_decay, phase_lrs)
    optimizer_options = optimizers or {"weight_lr": lr, "finetune_lr": finetune_lr, "weight_decay": weight_decay}
    hf_run = hf.prepare_merge(models, data, out, block_size) if hf_teachers else None
    if hf_run is None:
        out = out or Path("student.safetensors")
        check_output(out)
        states = [checkpoint.read_state_dict(path) for path in teacher]  # the reader export --weights uses
        train_data, val_data, _, task = data_module.load_data(data)
        loaded = loading.load_model(model)
        check_positional_inputs(loaded, "merge", TRAINING_LIMITATION)
        teachers = [checkpoint.load_weights(copy.deepcopy(loaded.model), state, name=str(path))
                    for path, state in zip(teacher, states, strict=True)]
        check_runs(teachers[0], train_data, model, data)
        loss, names = loss_for(task), [p.name for p in teacher]
    else:
        teachers, train_data, val_data, loss, out = (hf_run.models, hf_run.train_data, hf_run.val_data, hf_run.loss,
                                                     hf_run.out)
        names = hf_run.names
    distillation = {"distill": None if distill.lower() == "none" else distill}
    distillation.update({name: value for name, value in (("distill_weight", distill_weight),
                                                         ("temperature", temperature)) if value is not None})
    start = time.perf_counter()
    result = recipe.merge(
        teachers, train_data, val_data=val_data, loss=loss, gate_epochs=gate_epochs,
        finetune_epochs=finetune_epochs, batch_size=batch_size, gate_lr=gate_lr, **optimizer_options,
        gate_budget=gate_budget, budget_ramp=budget_ramp,
        budget_direction=budget_direction, decide_gates=decide_gates,
        lambda0=lambda0, lambda_schedule=lambda_schedule, **distillation,
        checkpoint_dir=checkpoint_dir, resume=resume, seed=seed, log=_epoch_logger(log_json, resume),
        progress=True, device=device, compile=compile, precision=precision, preflight=preflight,
        normalised_groups=normalised_groups, dead_channels=dead_channels, average_kept=average_kept,
        selection=selection,
        strategy=strategy)
    if _is_main():
        if hf_run is None:
            checkpoint.save_weights(out, result.student, metadata={"model": model, "data": data})
        else:
            hf_run.save(result.student)
        print_gate_report(result)
        print_summary(result, names, time.perf_counter() - start)
        if hf_run is not None:
            print(hf_run.perplexity_line(result.summary))
        print(f"wrote {out}")


def demo_command() -> None:
    """Train two MNIST-1D CNN teachers from two seeds, merge them, and print the student beside what the
    same extra training FLOPs give otherwise: the best teacher fine-tuned, the weight average fine-tuned."""
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
    rows = alternative_rows(result, train_data, val_data, DEMO_SETTINGS)
    print_summary(result, ["seed 1000", "seed 1001"], time.perf_counter() - start, alternatives=rows)


def alternative_rows(result: Any, train_data: Any, val_data: Any,
                     s: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """The alternatives at the merge's extra training FLOPs (``s``'s gate phase + fine-tuning), each
    trained with the fine-tuning settings: the best teacher on validation, and the weight average."""
    from graphmerge import add_gates, widen
    from graphmerge.alternatives import plan_budget, spend, train_flops_per_sample, weight_average
    from graphmerge.data import first_example
    from graphmerge.training import evaluate

    teachers = [t.eval() for t in result.teachers]
    batch = s["batch_size"]
    small = train_flops_per_sample(teachers[0], train_data, batch_size=batch)
    inputs, kwargs = first_example(train_data)
    gated = train_flops_per_sample(add_gates(widen(teachers, inputs, example_kwargs=kwargs)), train_data,
                                   batch_size=batch)
    n = len(train_data)
    extra = n * (s["gate_epochs"] * gated + s["finetune_epochs"] * small)
    budget = plan_budget(extra, small, n)
    options = {"batch_size": batch, "lr": 0.01, "val_data": None}
    scores = result.summary["teachers"]
    best = max(range(len(teachers)), key=lambda i: scores[i])
    starts = {f"best teacher ({best}) fine-tuned": teachers[best],
              "weight average (BN re-estimated) fine-tuned": weight_average(teachers, bn_data=train_data)}
    rows = []
    for name, model in starts.items():
        trained = spend(model, train_data, budget, seed=s["seed"] + 7, **options)
        epochs = f"{budget.epochs} x {budget.samples} samples" if budget else "no training"
        rows.append((f"{name}, same extra FLOPs ({epochs})", evaluate(trained, val_data, "cross_entropy")))
    print(f"extra training FLOPs of the merge: {extra:.3g} (gate phase {s['gate_epochs']} epochs of the gated big "
          f"student at {gated / small:.1f}x a teacher's step, fine-tuning {s['finetune_epochs']} epochs); the "
          f"alternatives spend the same.")
    return rows


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
                  alternatives: Sequence[tuple[str, dict[str, float]]] = ()) -> None:
    """The table the paper's comparison needs: teachers, big student, student before/after fine-tune,
    and a row per ``alternatives`` entry (name, its evaluate() metrics) for a fair reading."""
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
    for name, metrics in alternatives:
        value = metrics.get(metric.removeprefix("val_"), metrics.get(metric))
        if value is not None:
            table.add_row(name, f"{value:.4f}")
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
    trace = result.gate_trace
    if trace:
        key = "val_acc" if "val_acc" in trace[0] else "val_loss"
        points = ", ".join(f"{e['progress']:.0%} {e[key]:.3f}" for e in trace)
        print(f"{key} through the gate phase (eval gates): big student {result.summary['big']:.3f}, {points}")


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

def check_output(out: Path) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise GraphMergeError(f"cannot write {out}: folder {folder} does not exist. Create it first or "
                              f"choose another --out.")
    if out.suffix != ".safetensors":
        raise GraphMergeError(f"--out {out} must end in .safetensors (graphmerge writes weights only in "
                              f"safetensors format).")


def loss_for(task: str) -> str:
    return "cross_entropy" if task == "classification" else "mse"


def check_runs(model: Any, train_data: Any, model_spec: str, data_spec: str) -> None:
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


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE") or 1)
