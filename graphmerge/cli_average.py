"""The ``average`` command (registered by ``graphmerge/cli.py``): the merges that need no training.

Weight averaging, Git Re-Basin and ZipIt!-style averaging, and a mosaic of aligned teachers, all on
the coupling groups of ``graphmerge.analyze`` (``graphmerge.align``). It prints each teacher's and
the result's validation metric and writes the result's weights; the BatchNorm statistics of the
result are recomputed on training data (averaged statistics describe no network).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import typer

from graphmerge.cli_export import check_positional_inputs
from graphmerge.cli_merge import DATA_HELP, MODEL_HELP, TRAINING_LIMITATION, check_output, check_runs, loss_for
from graphmerge.errors import GraphMergeError
from graphmerge.passes.util import check_teacher_count

ALIGNMENTS = ("none", "weights", "features")
ALIGN_HELP = ("How channels are matched before combining: none (plain weight average), weights (Git Re-Basin "
              "weight matching) or features (ZipIt!-style activation correlation on --samples training inputs).")
MOSAIC_HELP = ("Combine the aligned teachers unit by unit (each unit whole from the teacher whose version the "
               "next layers weigh most) instead of averaging them.")
SAMPLES_HELP = "Training inputs for feature matching and the BatchNorm statistics."


def average_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    teacher: list[Path] = typer.Option([], "--teacher", "-t", help="A teacher's weights; at least two."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(Path("average.safetensors"), "--out", help="Where to write the result (.safetensors)."),
    align: str = typer.Option("features", "--align", help=ALIGN_HELP),
    mosaic: bool = typer.Option(False, "--mosaic/--mean", help=MOSAIC_HELP),
    samples: int = typer.Option(512, "--samples", min=1, help=SAMPLES_HELP),
) -> None:
    """Average (or mosaic) trained teachers after aligning their channels; no training."""
    import graphmerge
    from graphmerge import align as alignment
    from graphmerge import checkpoint
    from graphmerge.alternatives import weight_average
    from graphmerge.data import first_inputs, load_data
    from graphmerge.loading import load_model
    from graphmerge.training import evaluate

    if align not in ALIGNMENTS:
        raise GraphMergeError(f"unknown --align {align!r}: use {', '.join(ALIGNMENTS)}.")
    if mosaic and align == "none":
        raise GraphMergeError("--mosaic combines aligned teachers unit by unit; with --align none the units of "
                              "different teachers do not correspond. Use --align features or --align weights.")
    check_teacher_count(len(teacher), f"pass --teacher A.safetensors --teacher B.safetensors (train them with "
                                      f"`graphmerge train {model} --data {data} --seed S --out S.safetensors`).")
    check_output(out)
    states = [checkpoint.read_state_dict(path) for path in teacher]
    train_data, val_data, _, task = load_data(data)
    loaded = load_model(model)
    check_positional_inputs(loaded, "average", TRAINING_LIMITATION)
    teachers = [checkpoint.load_weights(copy.deepcopy(loaded.model), state, name=str(path)).eval()
                for path, state in zip(teacher, states, strict=True)]
    check_runs(teachers[0], train_data, model, data)
    start = time.perf_counter()
    inputs = first_inputs(train_data, min(samples, len(train_data)))
    if len(inputs) != 1:
        raise GraphMergeError(f"average reads models with one input tensor; the data {data} gives {len(inputs)} per "
                              f"sample. Merge such models with `graphmerge merge`, or align them in Python with "
                              f"graphmerge.align.")
    x = inputs[0]
    if align == "none":
        result = weight_average(teachers, x)
    else:
        groups = graphmerge.analyze(teachers[0], (x[:2],))
        reference = teachers[0]
        def aligned_to_reference(teacher: torch.nn.Module) -> torch.nn.Module:
            if align == "features":
                return alignment.feature_matching(reference, teacher, groups, x)[0]
            return alignment.weight_matching(reference, teacher, groups, example_inputs=x[:32])[0]

        aligned = [reference] + [aligned_to_reference(t) for t in teachers[1:]]
        result = alignment.mosaic(aligned, groups, bn_data=x) if mosaic else weight_average(aligned, x)
    seconds = time.perf_counter() - start
    loss = loss_for(task)
    key = "acc" if loss == "cross_entropy" else "loss"
    for path, t in zip(teacher, teachers, strict=True):
        print(f"teacher {path.name}: val {key} {evaluate(t, val_data, loss)[key]:.4f}")
    how = ("mosaic" if mosaic else "average") + ("" if align == "none" else f" after {align} alignment")
    print(f"{how}: val {key} {evaluate(result, val_data, loss)[key]:.4f} ({seconds:.1f} s)")
    checkpoint.save_weights(out, result, metadata={"model": model, "data": data, "average": how})
    print(f"wrote {out}")
