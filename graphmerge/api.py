"""The driver behind the public API: checks inputs, then runs the passes in order."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from graphmerge.errors import GraphMergeError, ModelMismatchError
from graphmerge.passes.couple import couple
from graphmerge.passes.groups import GroupSet
from graphmerge.passes.layout import LayoutError
from graphmerge.passes.trace import trace


def _as_tuple(example_inputs: Any) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def analyze(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[Any] = (),
            concrete_args: dict[str, Any] | None = None) -> GroupSet:
    """Trace ``model`` on ``example_inputs`` and find its channel-coupling groups."""
    start = time.perf_counter()
    gm = trace(model, _as_tuple(example_inputs), leaf_modules=leaf_modules, concrete_args=concrete_args)
    traced = time.perf_counter()
    groups = couple(gm)
    groups.timings["trace_s"] = traced - start
    return groups


def check_same_architecture(teachers: Sequence[nn.Module]) -> None:
    """All teachers must be one class with identical parameter and buffer names and shapes."""
    if len(teachers) < 2:
        raise GraphMergeError(f"merging needs at least 2 teachers, got {len(teachers)}: pass two or more "
                              "trained instances of the same architecture.")
    first = teachers[0]
    reference = first.state_dict()
    for index, other in enumerate(teachers[1:], start=1):
        if type(other) is not type(first):
            raise ModelMismatchError(
                f"teacher {index} is a {type(other).__name__} but teacher 0 is a {type(first).__name__}: "
                "all teachers must be instances of one class.")
        state = other.state_dict()
        for key, tensor in reference.items():
            if key not in state:
                raise ModelMismatchError(f"teacher {index} has no '{key}' (teacher 0 has it, shape "
                                         f"{tuple(tensor.shape)}): the teachers differ in architecture.")
            if state[key].shape != tensor.shape:
                raise ModelMismatchError(
                    f"parameter '{key}' has shape {tuple(tensor.shape)} in teacher 0 but "
                    f"{tuple(state[key].shape)} in teacher {index}: the teachers differ in architecture "
                    "(width, classes or kernel size).")
        extra = [k for k in state if k not in reference]
        if extra:
            raise ModelMismatchError(f"teacher {index} has '{extra[0]}', which teacher 0 lacks: the "
                                     "teachers differ in architecture.")


def widen(teachers: Sequence[nn.Module], example_inputs: Any, *, leaf_modules: Sequence[Any] = (),
          concrete_args: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """Concatenate N teachers into one big student (an fx GraphModule) computing their mean."""
    from graphmerge.passes.widen import widen as widen_pass

    teachers = list(teachers)
    check_same_architecture(teachers)
    groups = analyze(teachers[0], example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    start = time.perf_counter()
    with torch.no_grad():
        try:
            big = widen_pass(groups, teachers)
        except LayoutError as error:
            raise GraphMergeError(
                f"cannot lay out the big student of {type(teachers[0]).__name__}: {error}. The channels reach "
                "this op in an order the teacher-major layout cannot express (for example a residual add "
                "across a channel shuffle). Mark the submodule containing it a leaf (leaf_modules=[...]) so "
                "its channels are pinned, or file an issue with the model.") from None
    groups.timings["widen_s"] = time.perf_counter() - start
    big.train(teachers[0].training)
    return big
