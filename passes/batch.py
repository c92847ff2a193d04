"""Batch: where the batch dimension sits in each activation a gate multiplies.

A gate draws one realisation per sample, so every gate site must broadcast the per-sample values
along the batch. The batch is not always dim 0: ``nn.MultiheadAttention`` runs ``(L, N, E)``,
a window partition folds batch × windows into dim 0 (``B*64``), an attention reshape folds
``L × B`` (``L*B``, sequence-major). A site's place is ``dim`` with ``outer * B * inner``
positions: viewed as ``(outer, B, inner)``, the middle axis is the sample.

Two sources, in order:

1. The capture's symbolic shapes (``meta["val"]``): a tensor whose dim 0 is exactly the batch
   symbol of the graph's inputs and no other dim mentions it has the batch at dim 0. That is
   every CNN and most transformers, found without running anything.
2. Otherwise a probe: the graph runs on the example batch ``B`` and on ``B + 1`` samples (the
   example's samples, then sample 0 again). The dim whose size grows by ``k`` per sample holds
   the batch, ``k = outer * inner``; of the factorisations of ``k`` the place is the one under
   which the first ``B`` samples of the second run equal the first run. Samples never mix in
   eval mode, so exactly one factorisation matches wherever the samples differ.

Where neither finds one place (a static export, a batch spread over two dims, equal samples)
the site gets a reason instead, which ``add_gates`` reports with the node and source line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class BatchPlace:
    """Dim ``dim`` of an activation holds ``outer * B * inner`` positions, sample-major in the middle."""

    dim: int
    outer: int = 1
    inner: int = 1

    def as_arg(self) -> tuple[int, int, int]:
        return (self.dim, self.outer, self.inner)


#: no batch in the tensor at all (computed from parameters alone): one realisation is the only one
NO_BATCH = "the tensor does not depend on the batch"


def locate_batch(gm: torch.fx.GraphModule, sources: list[str], example_inputs: tuple,
                 example_kwargs: dict[str, Any] | None = None) -> dict[str, BatchPlace | str]:
    """For each node named in ``sources``: its batch place, or why it has none (see module doc).

    ``gm`` is the captured graph (or a graph built from it with the same node names, such as a
    big student); it is run, on copies of the inputs and in eval mode, only where the symbolic
    shapes do not say.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    symbols = batch_symbols(gm)
    found: dict[str, BatchPlace | str] = {}
    unknown = []
    for name in dict.fromkeys(sources):
        place = _symbolic_place(nodes[name].meta.get("val"), symbols)
        if place is None:
            unknown.append(name)
        else:
            found[name] = place
    if unknown:
        found.update(_probe(gm, unknown, tuple(example_inputs), dict(example_kwargs or {})))
    return found


def batch_symbols(gm: torch.fx.GraphModule) -> set[Any]:
    """The sympy symbols of the graph inputs' dim 0 (capture exports it as the dynamic batch)."""
    found = set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.ndim:
            expr = _expr(val.shape[0])
            if expr is not None and getattr(expr, "is_Symbol", False):
                found.add(expr)
    return found


def reference_input(gm: torch.fx.GraphModule) -> torch.fx.Node:
    """The first graph input whose dim 0 is the batch: the gates draw one row per sample of it."""
    symbols = batch_symbols(gm)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.ndim and _expr(val.shape[0]) in symbols:
            return node
    return placeholders[0]


def _expr(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else None


def _symbolic_place(val: Any, symbols: set[Any]) -> BatchPlace | str | None:
    """The place the symbolic shape proves, ``NO_BATCH``, or None when only a probe can tell."""
    if not isinstance(val, torch.Tensor) or not symbols:
        return None
    exprs = [_expr(size) for size in val.shape]
    free = [set(e.free_symbols) if e is not None else set() for e in exprs]
    if not any(free):
        return NO_BATCH
    holding = [d for d, f in enumerate(free) if f & symbols]
    other = [d for d, f in enumerate(free) if f - symbols]
    if len(holding) == 1 and not other and exprs[holding[0]] in symbols:
        return BatchPlace(holding[0])
    return None


def _at_batch(value: Any, size: int, batch: int) -> Any:
    """Inputs with ``size`` samples: the example's (``batch`` of them) in order, then from the start again."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[torch.arange(size, device=value.device) % batch]
    return value


def _example_batch(inputs: tuple, kwargs: dict[str, Any]) -> int | None:
    sizes = {x.shape[0] for x in pytree.tree_leaves((inputs, kwargs)) if isinstance(x, torch.Tensor) and x.ndim}
    return sizes.pop() if len(sizes) == 1 else None


def _probe(gm: torch.fx.GraphModule, names: list[str], inputs: tuple,
           kwargs: dict[str, Any]) -> dict[str, BatchPlace | str]:
    batch = _example_batch(inputs, kwargs)
    if batch is None:
        return {name: "the example inputs do not share one batch size" for name in names}
    dtype = next((t.dtype for t in gm.state_dict().values() if t.is_floating_point()), None)
    if dtype is not None:  # the inputs as the model's floats (a float64 copy is run on float32 examples)
        inputs, kwargs = pytree.tree_map(
            lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, (inputs, kwargs))
    runs = []
    for size in (batch, batch + 1):
        grown = pytree.tree_map(lambda x, size=size: _at_batch(x, size, batch), (inputs, kwargs))
        try:
            runs.append(_record(gm, names, *grown))
        except Exception as error:  # noqa: BLE001 - a graph that cannot run at another batch size
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
            reason = (f"the graph does not run on {size} samples ({type(error).__name__}: {first}; was it captured "
                      "with a static batch?)")
            return {name: reason for name in names}
    return {name: _place_from_runs(runs[0].get(name), runs[1].get(name), batch) for name in names}


def _place_from_runs(first: Any, second: Any, batch: int) -> BatchPlace | str:
    if not isinstance(first, torch.Tensor) or not isinstance(second, torch.Tensor) or first.ndim != second.ndim:
        return "the probe did not produce one tensor there"
    grown = [d for d in range(first.ndim) if first.shape[d] != second.shape[d]]
    if not grown:
        return NO_BATCH
    if len(grown) > 1:
        return f"the batch is spread over dims {grown}"
    dim = grown[0]
    per_sample, rest = divmod(first.shape[dim], batch)
    if rest or second.shape[dim] != per_sample * (batch + 1):
        return f"dim {dim} grows from {first.shape[dim]} to {second.shape[dim]}, not in proportion to the batch"
    first, second = first.detach().double(), second.detach().double()
    tolerance = 1e-4 * max(1.0, float(first.abs().max())) if first.numel() else 0.0
    matches = []
    for inner in _divisors(per_sample):
        outer = per_sample // inner
        want = first.unflatten(dim, (outer, batch, inner))
        got = second.unflatten(dim, (outer, batch + 1, inner)).narrow(dim + 1, 0, batch)
        if float((want - got).abs().max()) <= tolerance:
            matches.append(BatchPlace(dim, outer, inner))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        return f"no order of the {per_sample} positions per sample in dim {dim} keeps the samples apart"
    return (f"{len(matches)} orders of the {per_sample} positions per sample in dim {dim} fit the example inputs "
            "(are their samples equal?)")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small) | {n // d for d in small})


def _record(gm: torch.fx.GraphModule, names: list[str], inputs: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    wanted = set(names)
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            if n.name in wanted:
                values[n.name] = result
            return result

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            Recorder(gm).run(*inputs, *kwargs.values())
    finally:
        gm.train(was_training)
    return values
