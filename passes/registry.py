"""The op registry: everything the passes know about an ATen op lives in that op's rule.

The front end (``graphmerge.passes.capture``) hands every pass a graph of ATen ops: one spelling per
op, where torch.fx's module, function and method levels had three. Each op has one ``OpRule``,
defined and registered (``@register``) in its family's module under ``graphmerge.passes.rules``
(elementwise, shape, indexing, reductions, norms, layers, attention), built from
``graphmerge.passes.rules.base`` (the rule types, the table, the shared helpers; re-exported here).
Importing this module imports every family, so every built-in rule is registered. A rule holds all
of the op's knowledge:

- ``couple(prop, node)`` — how channels flow through it: read the inputs' channel labels, add
  equalities, pins, roles and gate sites, return the output's labels (``graphmerge.passes.couple``);
- ``rewrite(node, sizes)`` — the literal sizes and arguments widen (and compress to a width ratio)
  rewrite for the new channel widths (view shapes, split sizes, slice bounds, group counts);
- ``plan_widen(node, ctx)`` and ``widen(node, ctx)`` — how widen rewrites the op in the big student
  beyond its sizes: block-wise per teacher (LayerNorm, a reduction or softmax over channels), with a
  parameter stacked per teacher (a token-mixing linear layer, a learned scalar), or averaging the
  teachers with an explicit 1/N (a layer whose weight is tied). ``ctx`` is a ``WidenContext``
  (``graphmerge.passes.widen_context``); the facts a rule recorded while coupling
  (``prop.reduce_per_block``, ``prop.token_mixing``...) come back to the same rule there, through
  ``ctx.layout``;
- ``linear`` — whether the op commutes with averaging the teachers (the layer that writes a graph
  output averages them; a non-linear op after it breaks invariant I1, and the analysis says so).

An op without a rule pins every channel it touches, naming the op and its source line. A rule
that raises is a bug in the rule and propagates (tests run every rule on the model zoo).

Users teach graphmerge an op of their own with ``register_rule(op, rule)`` (or ``@register(op)``, which
also refuses an op that already has a rule): ``op`` is an ATen ``OpOverload`` or
``OpOverloadPacket`` (``torch.ops.mylib.myop``), ``rule`` an ``OpRule``. Rules for a packet cover all
its overloads; a rule for one overload wins over its packet's. This module also drives the analysis
(``propagate_node``) and labels what no op makes: graph inputs and outputs, parameters and buffers.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx
from graphmerge.passes.ir import PinReason
from graphmerge.passes.labels import NOT_A_CHANNEL, TensorLabels
from graphmerge.passes.propagation import Propagation
from graphmerge.passes.rules import base  # the package imports every family, which registers every rule
from graphmerge.passes.rules.base import (
    describe,
    flatten,
    labels_of,
    node_shape,
    non_persistent_buffer,
    pin_all,
    rule_for,
    target_op,
    tensor_args,
    unlabelled,
)
from graphmerge.passes.util import getattr_path


def __getattr__(name: str) -> Any:
    """The rule API of ``graphmerge.passes.rules.base`` read through the registry (``OpRule``,
    ``register``, ``register_rule``, ``RULES``, ``labels_of``, ``tie_param``...): users and the docs'
    example import it from here."""
    try:
        return getattr(base, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


# -- graph boundary and state ---------------------------------------------------------------------

def placeholder(prop: Propagation, node: torch.fx.Node) -> Any:
    shape = node_shape(node) if "val" in node.meta else None
    if shape is None:
        return None
    dims = [np.full(shape[0], NOT_A_CHANNEL, np.int64)] if shape else []
    for d, size in enumerate(shape[1:], start=1):
        ids = prop.input_ids(size)
        prop.pin(ids, f"graph input '{node.name}' dim {d}", reason=PinReason.GRAPH_INPUT)
        dims.append(ids)
    return TensorLabels.from_dims(shape, dims)


def output(prop: Propagation, node: torch.fx.Node) -> Any:
    for labels in flatten(labels_of(prop, node.args[0])):
        if isinstance(labels, TensorLabels):
            prop.pin(labels.all_ids(), "graph output", reason=PinReason.GRAPH_OUTPUT)
    return None


def get_attr(prop: Propagation, node: torch.fx.Node) -> Any:
    value = getattr_path(prop.gm, str(node.target))
    if not isinstance(value, torch.Tensor):
        return None
    name = str(node.target)
    if _is_constant(prop, name, value):
        return TensorLabels.unlabelled(tuple(value.shape))
    if name in prop.params:  # the same tensor read again: the same labels
        return TensorLabels.from_dims(tuple(value.shape), [d if d is not None else np.full(s, -1, np.int64)
                                                           for d, s in zip(prop.params[name].dims, value.shape,
                                                                           strict=True)])
    dims = prop.param_labels(name, value, runs=False)
    prop.use_param(name, dims, out_dim=None)
    prop.fresh_param_dims[name] = list(prop.params[name].dims)
    prop.role(node, "member", np.concatenate(dims) if dims else None)
    return TensorLabels.from_dims(tuple(value.shape), dims)


def getitem(prop: Propagation, node: torch.fx.Node) -> Any:
    container, index = node.args
    value = labels_of(prop, container)
    if isinstance(value, (list, tuple)) and isinstance(index, int) and -len(value) <= index < len(value):
        return value[index]
    return None


def _is_constant(prop: Propagation, name: str, value: torch.Tensor) -> bool:
    """Tensors that are the same in every teacher carry no channels: integer tables (relative
    position indices), non-persistent buffers (rotary frequencies, masks) and tensors the model
    creates in forward. Parameters and persistent float buffers (BatchNorm statistics) do."""
    if not value.is_floating_point() and not value.is_complex():
        return True
    if name.startswith("lifted_tensor"):
        return True
    return non_persistent_buffer(prop, name) is not None


# -- driving the analysis --------------------------------------------------------------------------

def propagate_node(prop: Propagation, node: torch.fx.Node) -> Any:
    """Apply the rule of ``node``'s op; values without a shape (sizes, flags) carry no labels."""
    if node.op == "placeholder":
        return placeholder(prop, node)
    if node.op == "output":
        return output(prop, node)
    if node.op == "get_attr":
        return get_attr(prop, node)
    if node.target is operator.getitem:
        return getitem(prop, node)
    has_value = isinstance(node.meta.get("val"), (torch.Tensor, list, tuple))
    if not has_value:
        return None  # a size (sym_size, arithmetic on sizes) or a constant
    if not tensor_args(prop, node):
        return unlabelled(node)  # a tensor made from nothing (zeros, arange): no channels
    op = target_op(prop, node)
    rule = rule_for(op)
    if rule is None:
        return pin_all(prop, node, f"unknown op {describe(node)}: no rule in graphmerge.passes.registry "
                                   "(register one with graphmerge.register_rule)", reason=PinReason.UNKNOWN_OP)
    result = rule.couple(prop, node)
    if isinstance(result, TensorLabels) and not rule.is_linear(prop, node):
        prop.nonlinear.append((node.name, result.all_ids()))
    return result
