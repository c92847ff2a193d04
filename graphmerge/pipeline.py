"""The pipeline certificate: the whole merge, in miniature, on the example inputs.

``widen`` certifies the big student (I1, I2), but a merge is more than widen: the gate phase
runs the gated big student in train mode at other batch sizes, the gates are decided, the
student is compressed by the gates (I3) and loaded into the teachers' class (I4). A model is
supported when all of that runs, so :func:`certify_pipeline` runs all of it, at toy scale:

1. ``widen`` (I1 and I2 certificates) unless a big student is given;
2. ``add_gates``;
3. one gate-phase step in train mode at ``batch_sizes[0]`` samples: forward, loss, backward,
   an SGD step on weights and gates, the budget projection;
4. *gates follow samples*: with fixed gate values per sample, the gated big student on the
   whole batch equals it run on each sample alone with that sample's values, so every gate site
   broadcasts each sample's realisation over that sample's positions and no other's;
5. ``decide`` (every group at its budget, the decision made);
6. ``compress`` by the gates, with the I3 certificate;
7. a strict load into a fresh instance of the teachers' class and a forward at ``batch_sizes[1]``;
8. optionally an ONNX export with parity.

Each stage's failure is a ``GraphMergeError`` that names the stage, so a model that cannot be
merged fails in seconds, before any training (``graphmerge.merge`` runs it first).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from graphmerge.errors import CertificateError, GraphMergeError

#: the gated big student on a batch vs on each sample alone (same per-sample gate values), float32
SAMPLE_TOLERANCE = 1e-4


@dataclass
class PipelineReport:
    """What :func:`certify_pipeline` ran and found."""

    seconds: dict[str, float] = field(default_factory=dict)
    certificates: dict[str, Any] = field(default_factory=dict)
    sample_error: float | None = None
    sample_skipped: str | None = None
    open_fraction: dict[int, float] = field(default_factory=dict)
    student: nn.Module | None = None
    onnx: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds),
                "certificates": {k: (v.to_dict() if v is not None else None) for k, v in self.certificates.items()},
                "sample_error": self.sample_error, "sample_skipped": self.sample_skipped,
                "open_fraction": {str(k): v for k, v in self.open_fraction.items()}}


def certify_pipeline(teachers: Sequence[nn.Module], example_inputs: Any, *,
                     example_kwargs: dict[str, Any] | None = None, big: Any = None,
                     loss: Callable[[Any], torch.Tensor] | None = None, batch_sizes: tuple[int, int] = (3, 5),
                     lr: float = 1e-3, seed: int = 0, onnx_path: str | Path | None = None) -> PipelineReport:
    """Run the whole merge at toy scale on ``example_inputs`` (see the module doc); raise a
    ``GraphMergeError`` naming the stage that fails.

    ``loss(output)`` is the task loss of one gate step (default: the mean square of every
    floating output). Inputs at other batch sizes repeat the example's samples in order.
    ``big``: a widened big student of these teachers, to skip step 1. Nothing given is modified.
    """
    import graphmerge
    from graphmerge.api import _as_tuple, student_certificate
    from graphmerge.passes.export import export_onnx_report
    from graphmerge.passes.gate_budget import budget_target
    from graphmerge.passes.ir import widen_info

    inputs, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    report = PipelineReport()
    stage = _Stages(report, type(teachers[0]).__name__)
    with stage("widen"):
        if big is None:
            big = graphmerge.widen(teachers, inputs, example_kwargs=kwargs)
        _, info = widen_info(big)
        report.certificates.update(info.certificates)
    with stage("add_gates"):
        gated = graphmerge.add_gates(big, seed=seed)
    n = gated.n_teachers
    with stage(f"gate step (train mode, {batch_sizes[0]} samples)"):
        torch.manual_seed(seed)
        gated.train()
        step_inputs, step_kwargs = at_batch((inputs, kwargs), batch_sizes[0])
        value = (loss or _mean_square)(gated(*step_inputs, **step_kwargs))
        value.backward()
        with torch.no_grad():
            for param in gated.parameters():
                if param.grad is not None:
                    param.sub_(lr * param.grad)
                    param.grad = None
        gated.project_to_budget(float(budget_target(0.25, n)))
    with stage("gates follow samples"):
        report.sample_error, report.sample_skipped = gates_follow_samples(gated, inputs, kwargs)
        if report.sample_error is not None and report.sample_error > SAMPLE_TOLERANCE:
            raise GraphMergeError(
                f"the gated big student does not keep its samples apart: run on the whole batch it differs from "
                f"each sample run alone with that sample's gate values by {report.sample_error:.3g} (relative). "
                "A gate site broadcasts a realisation over the wrong positions (its batch place, see "
                "graphmerge.passes.batch). Please report it with the model.")
    with stage("decide"):
        gated.decide(1.0 / n, 1.0)
        report.open_fraction = gated.open_fraction()
    with stage("compress by the gates (I3)"):
        student = graphmerge.compress(gated.eval(), "gates")
        report.certificates["I3"] = student_certificate(student)
    with stage(f"strict load into {type(teachers[0]).__name__} and a forward at {batch_sizes[1]} samples"):
        fresh = copy.deepcopy(teachers[0])
        fresh.load_state_dict(student.state_dict(), strict=True)
        more_inputs, more_kwargs = at_batch((inputs, kwargs), batch_sizes[1])
        with torch.no_grad():
            fresh.eval()(*more_inputs, **more_kwargs, **info.class_kwargs)
        report.student = student
    if onnx_path is not None:
        with stage("ONNX export with parity"):
            if kwargs:
                raise GraphMergeError("ONNX export takes positional tensor inputs only; this model takes keywords")
            report.onnx = export_onnx_report(student, inputs, onnx_path)
    return report


def perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add N(0, scale²) noise from ``seed`` to every floating tensor of ``model`` (in place; returns it in
    eval mode), BatchNorm statistics included, keeping all-positive vectors (running variances)
    positive: a second teacher that differs from ``model`` everywhere, for certifying one model (the
    CLI's ``trace --verify``, the coverage sweep, the tests)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                positive = tensor.ndim == 1 and bool((tensor > 0).all())
                tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * scale)
                if positive:
                    tensor.abs_()
    return model.eval()


def at_batch(value: Any, size: int) -> Any:
    """Every tensor of ``value`` with the example's batch at dim 0 grown or cut to ``size`` samples,
    repeating the example's samples in order."""
    leaves = [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor) and x.ndim]
    if not leaves:
        return value
    batch = leaves[0].shape[0]

    def resize(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch:
            return x[torch.arange(size, device=x.device) % batch]
        return x

    return pytree.tree_map(resize, value)


@torch.no_grad()
def gates_follow_samples(gated: nn.Module, inputs: tuple, kwargs: dict[str, Any]) -> tuple[float | None, str | None]:
    """The largest relative difference between the gated big student on the batch and on each sample
    alone, with fixed, distinct gate values per sample (eval mode: nothing else mixes samples);
    ``(None, reason)`` where the check cannot run."""
    from graphmerge.passes.gate import GATES

    leaves = [x for x in pytree.tree_leaves((inputs, kwargs)) if isinstance(x, torch.Tensor) and x.ndim]
    if not leaves:
        return None, "the example inputs have no batch dim"
    batch = leaves[0].shape[0]
    if batch < 2:
        return None, "the example inputs hold one sample"
    real = gated.gates
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(batch, real.total, generator=generator).to(real.all_log_alpha())
    shared = _shared_entries(gated.graph_module)
    values[:, shared] = values[:1, shared]  # one realisation for the batch there, by design (passes/batch.py)
    fixed = _FixedGates(torch.cat([values, torch.ones(batch, 1).to(values)], 1))
    modules = gated.graph_module._modules
    was_training = gated.training
    modules[GATES] = fixed
    try:
        gated.eval()
        whole = _float_leaves(gated(*inputs, **kwargs))
        error, scale = 0.0, 0.0
        compared = False
        for sample in range(batch):
            fixed.rows = slice(sample, sample + 1)
            one_inputs, one_kwargs = pytree.tree_map(
                lambda x, s=sample: x[s:s + 1] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch
                else x, (inputs, kwargs))
            try:
                alone = _float_leaves(gated(*one_inputs, **one_kwargs))
            except Exception as failure:  # noqa: BLE001 - a graph captured for a batch of at least 2
                return None, f"the gated big student does not run on one sample ({type(failure).__name__})"
            for a, b in zip(whole, alone, strict=True):
                if a.ndim and a.shape[0] == batch and b.ndim and b.shape[0] == 1:
                    error = max(error, float((a[sample:sample + 1] - b).abs().max()))
                    scale = max(scale, float(a.abs().max()))
                    compared = True
            fixed.rows = slice(None)
    finally:
        modules[GATES] = real
        gated.train(was_training)
    if not compared:
        return None, "no output has the batch at dim 0"
    return error / max(1.0, scale), None


def _shared_entries(gm: torch.fx.GraphModule) -> torch.Tensor:
    """The gate entries read by sites without a batch place (one realisation shared by the batch)."""
    from graphmerge.passes.gate_ops import apply_gate

    entries = [getattr(gm, node.args[2].target) for node in gm.graph.nodes
               if node.target is apply_gate and node.args[5] is None]
    total = gm.graphmerge_gates.total
    found = torch.cat(entries).unique() if entries else torch.zeros(0, dtype=torch.long)
    return found[found < total]


class _FixedGates(nn.Module):
    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values
        self.rows = slice(None)

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        return self.values[self.rows]


def _float_leaves(output: Any) -> list[torch.Tensor]:
    return [x.double() for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _mean_square(output: Any) -> torch.Tensor:
    leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not leaves:
        raise GraphMergeError("the model returns no floating-point tensor to take a loss of; pass loss=")
    return sum(x.float().pow(2).mean() for x in leaves)


class _Stages:
    """Times each stage and names it in the error of the stage that fails."""

    def __init__(self, report: PipelineReport, model: str):
        self.report, self.model = report, model
        self.name = ""

    def __call__(self, name: str) -> _Stages:
        self.name = name
        return self

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        self.report.seconds[self.name] = time.perf_counter() - self.start
        if error is None or not isinstance(error, Exception):
            return False
        message = (f"the merge pipeline of {self.model} fails at '{self.name}': {type(error).__name__}: "
                   f"{str(error).strip()}")
        raise (CertificateError if isinstance(error, CertificateError) else GraphMergeError)(message) from error
